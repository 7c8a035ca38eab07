"""Where a waiting request stands: its place in its model's line and how long the wake should
take, read from the core's state (what a waiting stream tells its client, http/wait_notice.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmux.core.states import ModelState
from llmux.core.switch import Switch

if TYPE_CHECKING:
    from llmux.core.group import GroupCore


@dataclass(frozen=True)
class WaitView:
    model: str
    position: int  # 1: the next to be granted
    awake: bool  # the model serves, every slot on it taken (else it must wake first)
    cold: bool  # its wake starts its server
    seconds: float | None  # about this long until it serves, from measured costs; None: unknown


def where_waiting(core: GroupCore, rid: int, now: float) -> WaitView | None:
    """Where request `rid` waits, or None if it does not (granted, refused, gone)."""
    request = core.requests.get(rid)
    model = core.models.get(request.model) if request is not None else None
    if request is None or model is None or request.granted_to is not None:
        return None
    try:
        position = model.queue.index(request) + 1
    except ValueError:  # not in its model's line (a reload moved it): nothing to tell
        return None
    if model.state is ModelState.ACTIVE:
        return WaitView(model.name, position, awake=True, cold=False, seconds=None)
    switch = core.op if isinstance(core.op, Switch) and core.op.target is model else None
    if switch is not None:
        cold, seconds = switch.cold_wake or model.starts_cold, switch.remaining(now)
    else:  # its switch has not begun: what one costs, measured
        cold, seconds = model.starts_cold, core.snapshot().estimated_cost(model.name)
    return WaitView(model.name, position, awake=False, cold=cold, seconds=seconds)
