"""Waiting for a state in a test: on a real field, and failing loudly when it never comes.

A fixed sleep lets a test pass on a slow machine without reaching the state it claims to
test (the requests had not arrived yet, so there was no concurrency to get wrong); a wait
that gives up silently does the same. These wait for the condition itself and raise when
it does not hold within `guard_secs`, which is a hang guard, not a speed assertion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

HANG_GUARD_SECS = 30.0


async def until(condition: Callable[[], bool], what: str, guard_secs: float = HANG_GUARD_SECS) -> None:
    """Yield to the event loop until `condition()` holds; AssertionError naming `what` if not."""
    deadline = time.monotonic() + guard_secs
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {guard_secs:g} s")
        await asyncio.sleep(0.001)
