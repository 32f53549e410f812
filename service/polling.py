"""Repository polling: versions and models dropped into the repository load while serving.

Triton's `--model-control-mode=poll`, with our swap rule: a new version is loaded and warmed up
beside the serving one, requests move to it once it is ready, and the old version finishes the
requests it accepted before it is unloaded, so a swap under load fails no request. A version
that fails to load is marked FAILED with its reason (GetModel and the logs show it) and the
previous one keeps serving; it is not retried on every poll, since a version folder is
written once and never changes.
"""

from __future__ import annotations

import asyncio
import logging

from service.errors import ServiceError
from service.repository import ModelRepository, State

log = logging.getLogger(__name__)


class RepositoryPoller:
    """Rescans the repository every `interval` seconds and loads what is new."""

    def __init__(self, repository: ModelRepository, interval: float) -> None:
        self.repository = repository
        self.interval = interval

    def pending(self) -> list[str]:
        """Models whose newest version has never been loaded (new models, new versions)."""
        return [
            name
            for name in self.repository.models
            if name not in self.repository.unloaded_on_request
            and self.repository.newest(name).state is State.UNLOADED
        ]

    async def poll_once(self) -> list[str]:
        """One rescan; returns the models that now serve a newly loaded version."""
        try:
            self.repository.scan()
        except OSError as error:  # the folder vanished or is unreadable: keep serving, say so
            log.error("repository poll: %s", error)
            return []
        loaded = []
        for name in self.pending():
            try:
                entry = await self.repository.load_newest(name)
            except ServiceError as error:
                log.error("repository poll: %s", error)
                continue
            log.info("repository poll: %s now serves version %s", name, entry.version)
            loaded.append(name)
        return loaded

    async def run(self) -> None:
        """Poll until cancelled; one bad poll never ends the loop."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - polling must outlive any single failure
                log.exception("repository poll failed")
