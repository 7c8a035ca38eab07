"""What the machine has, read once outside the core: the host RAM llmux may fill with the
weights of models asleep at level 1 when `[machine] ram_gb` does not say."""

from __future__ import annotations

import logging
from pathlib import Path

from llmux.config import GIB, Config

log = logging.getLogger("llmux.machine")

RESERVE_FRACTION = 0.2  # left to the system, the servers' own processes and llmux
RESERVE_MIN_GB = 4.0


def host_ram_gb(config: Config, meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """`[machine] ram_gb`, else the machine's memory less a reserve (a fifth, at least
    4 GiB); None when neither is known (then host RAM sets no limit)."""
    if config.machine.ram_gb is not None:
        return config.machine.ram_gb
    total = _mem_total_gb(meminfo)
    if total is None:
        log.warning("cannot read the machine's memory (%s): host RAM sets no limit", meminfo)
        return None
    return max(0.0, total - max(RESERVE_MIN_GB, total * RESERVE_FRACTION))


def _mem_total_gb(meminfo: Path) -> float | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB  # the kernel says kB
    except (OSError, ValueError, IndexError):
        return None
    return None
