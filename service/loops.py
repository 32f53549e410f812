"""The event loop the server runs on.

uvloop by default where it is installed: the gRPC server's per-call work runs on the loop, and
with uvloop a bare grpc.aio call costs measurably less CPU (docs/BENCHMARKS.md, the `floor`
rows). `asyncio` keeps the standard loop, for debugging or where uvloop is unavailable.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

CHOICES = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def resolve(choice: str) -> str:
    """'auto' to the loop that will run; an unknown or unavailable choice is an error."""
    if choice not in CHOICES:
        raise ValueError(f"event_loop must be one of {', '.join(CHOICES)}; got {choice!r}")
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise ValueError("event_loop uvloop asked for, but uvloop is not installed")
    if choice == "auto":
        return "uvloop" if available else "asyncio"
    return choice


def factory(choice: str) -> LoopFactory | None:
    """A loop factory for asyncio.Runner (None: the standard loop)."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None
