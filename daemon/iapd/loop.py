"""Run a coroutine on uvloop when it is installed (it is a dependency on Linux and macOS)."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop wheels
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
