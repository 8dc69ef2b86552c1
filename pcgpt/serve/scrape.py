"""/metrics from a snapshot: a flood of scrapes costs the engines one collection, not one each.

A scrape asks every engine process for its series (work on the engine's side of the pipe, between
its steps) and renders the exposition text. A snapshot is served again for up to `max_age`
seconds, unless a request has started or ended since it was collected (`changed()`): a client
that scrapes after its request finished sees that request counted. Scrapes that arrive while a
collection of the same state is under way wait for it and share its text.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable


class ScrapeCache:
    def __init__(self, collect: Callable[[], Awaitable[bytes]], max_age: float):
        self.collect = collect  # the whole exposition text, freshly collected
        self.max_age = max_age
        self._version = 0  # bumped by changed()
        self._snapshot: tuple[int, float, bytes] | None = None  # (version, monotonic time collected, text)
        self._pending: tuple[int, asyncio.Task] | None = None  # the collection under way, and its version

    def changed(self) -> None:
        """A request started or ended (or an error was counted): the next scrape collects anew."""
        self._version += 1

    async def get(self) -> bytes:
        version = self._version
        if self._snapshot is not None:
            seen, collected, text = self._snapshot
            if seen == version and time.monotonic() - collected < self.max_age:
                return text
        if self._pending is None or self._pending[0] != version:
            # a task of its own: a scraper that leaves does not cancel the others' collection
            self._pending = (version, asyncio.ensure_future(self._collect(version)))
        return await asyncio.shield(self._pending[1])

    async def _collect(self, version: int) -> bytes:
        started = time.monotonic()
        try:
            text = await self.collect()
        finally:
            if self._pending is not None and self._pending[0] == version:
                self._pending = None
        if self._snapshot is None or self._snapshot[1] <= started:
            self._snapshot = (version, started, text)
        return text
