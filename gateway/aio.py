"""asyncio helpers shared by the drivers and the wiring (imports nothing of drivers/ or rules/)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_of(*aws: Awaitable[Any], name: str = "first_of") -> int:
    """Wait until the first of several awaitables finishes and return its index; the others are
    cancelled and awaited before this returns. Tasks passed in are awaited, not cancelled: their
    owner (a TaskGroup) keeps them. The helper tasks live in a TaskGroup of their own, so none
    outlives the call and an exception in one reaches the caller."""
    winner: list[int] = []
    async with asyncio.TaskGroup() as tg:
        made: list[asyncio.Future] = []

        def done(i: int):
            def callback(_: asyncio.Future) -> None:
                if not winner:
                    winner.append(i)
                    for other in made:
                        if not other.done():
                            other.cancel()
            return callback

        for i, aw in enumerate(aws):
            if isinstance(aw, asyncio.Future):
                waiter = tg.create_task(asyncio.wait({aw}), name=f"{name}.{i}")  # never cancels `aw`
            else:
                waiter = tg.create_task(aw, name=f"{name}.{i}")
            waiter.add_done_callback(done(i))
            made.append(waiter)
    return winner[0]
