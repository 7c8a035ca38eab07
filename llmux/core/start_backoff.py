"""The back-off after a model's `cmd` server failed to start: a broken command line, a missing
weights file or a port held by another process fails again at once, and each start may take
tens of seconds (a vLLM loading until it dies). So a model whose start failed is not started
again for a while; requests for it are refused at once meanwhile, saying how long is left.

The pause doubles with each failed start in a row (FIRST_SECS, then twice that, ...) up to
MAX_SECS: the first is short, for a cause that clears by itself (a GPU another process frees, a
port in TIME_WAIT); a command that stays broken costs one start per MAX_SECS at most. A start
that succeeds (the model becomes active) ends it, and so does a reload that changes the model's
config (the usual fix). It holds for the config that failed: it lives on the model's record,
which a change of config resets or replaces (core/group.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FIRST_SECS = 10.0
MAX_SECS = 300.0


def pause_after(failures: int) -> float:
    """The back-off after `failures` failed starts in a row (1 or more)."""
    return min(FIRST_SECS * 2.0 ** min(failures - 1, 64), MAX_SECS)


@dataclass
class StartBackoff:
    """A model's failed starts in a row, and until when it is not started again (core time)."""

    failures: int = 0
    until: float = -math.inf
    message: str = ""  # the latest failure, as clients are told

    def failed(self, now: float, message: str) -> float:
        """One more failed start at `now`; the pause it brings."""
        self.failures += 1
        self.message = message
        pause = pause_after(self.failures)
        self.until = now + pause
        return pause

    def holds(self, now: float) -> bool:
        return now < self.until

    def left(self, now: float) -> float:
        """Seconds until a start may be tried again (0 once it may)."""
        return max(0.0, self.until - now)
