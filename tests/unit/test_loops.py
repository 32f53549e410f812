"""The event-loop choice: uvloop by default where installed, errors named before start-up."""

from __future__ import annotations

import asyncio

import pytest

from service import config, loops


def test_auto_takes_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert loops.resolve("auto") == "uvloop"
    with asyncio.Runner(loop_factory=loops.factory("auto")) as runner:
        assert type(runner.get_loop()).__module__.startswith("uvloop")


def test_asyncio_keeps_the_standard_loop() -> None:
    assert loops.factory("asyncio") is None


def test_an_unknown_loop_is_refused_at_configuration() -> None:
    with pytest.raises(ValueError, match="event_loop must be one of auto, uvloop, asyncio"):
        config.validate(config.Settings(event_loop="tornado"))
