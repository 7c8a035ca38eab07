"""Time limits on the hot path without a cancel scope per event.

A stream's silences and a client's stalled writes are bounded per event. With a trio cancel
scope around each read and each write, every SSE event pays for a scope and two deadline
changes in trio's deadline heap (about 9 us here, of some 120). Instead the hot path stamps the
time a wait began on a `Watch` (a float), and one task per watchdog looks at every watch a few
times per limit and acts on those overdue. A limit then fires between `limit` and `limit` plus
one tick (an eighth of the shortest limit, at most a second), which is what a timeout of
seconds or minutes needs.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

MIN_TICK_SECS = 0.02
MAX_TICK_SECS = 1.0
TICKS_PER_LIMIT = 8


class Watch:
    """One bounded wait: `begin()` when it starts, `end()` when it is over; `on_overdue` is
    called once, from the watchdog's task, if it lasts `limit` seconds."""

    __slots__ = ("limit", "on_overdue", "since")

    def __init__(self, limit: float, on_overdue: Callable[[], None]) -> None:
        self.limit = limit
        self.on_overdue = on_overdue
        self.since: float | None = None

    def begin(self) -> None:
        self.since = trio.current_time()

    def end(self) -> None:
        self.since = None


class Watchdog:
    def __init__(self) -> None:
        self._watches: set[Watch] = set()
        self._added = trio.Event()

    def watch(self, limit: float, on_overdue: Callable[[], None]) -> Watch:
        watch = Watch(limit, on_overdue)
        self._watches.add(watch)
        self._added.set()
        return watch

    def forget(self, watch: Watch) -> None:
        self._watches.discard(watch)

    async def run(self) -> None:
        """Look at the watches until cancelled; sleeps while there are none."""
        while True:
            if not self._watches:
                self._added = trio.Event()
                await self._added.wait()
            shortest = min((w.limit for w in self._watches), default=MAX_TICK_SECS)
            await trio.sleep(min(MAX_TICK_SECS, max(MIN_TICK_SECS, shortest / TICKS_PER_LIMIT)))
            now = trio.current_time()
            for watch in list(self._watches):
                since = watch.since
                if since is not None and now - since >= watch.limit:
                    watch.since = None
                    watch.on_overdue()
