"""How deep a model sleeps when its depth is chosen per sleep (`sleep_level = "auto"`).

Which depth wins depends on the model and the box. An 8B model measured for vLLM's sleep mode
(vLLM PR #48337): level 1 costs 10.57 s to sleep and 2.19 s to wake, level 2 0.31 s and 6.53 s;
another sample: 35.9 s and 1.2 s against 0.3 s and 8.2 s; small models wake from level 1 in a
fraction of a second. So the depth is chosen to cause the least waiting, in request-seconds:

- the sleep is paid now, by the requests waiting for the model that replaces it (`waiting`)
  and by every request that arrives while it runs (the group's request rate, `Snapshot.demand`
  summed: nothing else can be woken meanwhile), each for about all of it: half of it on average,
  then as long again for the backlog it leaves behind; an idle, admin or ttl sleep keeps
  nobody waiting but those arrivals;
- the next wake is paid by whoever asks for the model next and by the requests that arrive
  during that wake, weighed by how likely the model is to be wanted again soon (its own recent
  request rate).

Learning: a depth is measured when it is chosen. Until then its costs are estimated from the
other depth's measurements scaled by the ratios above, or taken from them outright, and a depth
whose estimate loses is not tried for its own sake (an 8B model's level-1 sleep costs
everyone arriving during it half a minute on some boxes). Host RAM decides last: a level-1
sleep whose weights do not fit goes to level 2 (core/host_ram.py). Ties go to level 2, which
holds no host RAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmux.core.snapshot import Snapshot

LEVELS = (1, 2)
BACKLOG_FACTOR = 2.0  # an arrival during a sleep waits half of it, then the backlog it left
LIKELY_WITHIN_SECS = 600.0  # a model asked for at rate r is wanted again within this w.p. ~


@dataclass(frozen=True)
class DepthCosts:
    """What sleeping at one depth costs: the sleep now and the wake later, in seconds."""

    sleep: float
    wake: float
    measured: bool  # both figures measured for this model (else estimated)


PRIOR = {1: DepthCosts(10.57, 2.19, False), 2: DepthCosts(0.31, 6.53, False)}  # PR #48337


def depth_costs(model: str, snapshot: Snapshot) -> dict[int, DepthCosts]:
    """Each depth's costs for `model`: measured, else estimated from the other depth's
    measurement by the prior's ratio, else the prior."""
    sleeps = {level: snapshot.sleep_costs.get((model, level)) for level in LEVELS}
    wakes = {level: snapshot.wake_step_costs.get((model, level)) for level in LEVELS}
    costs = {}
    for level in LEVELS:
        other = 3 - level
        sleep = _estimate(sleeps[level], sleeps[other], PRIOR[level].sleep / PRIOR[other].sleep)
        wake = _estimate(wakes[level], wakes[other], PRIOR[level].wake / PRIOR[other].wake)
        measured = sleeps[level] is not None and wakes[level] is not None
        costs[level] = DepthCosts(
            PRIOR[level].sleep if sleep is None else sleep,
            PRIOR[level].wake if wake is None else wake,
            measured,
        )
    return costs


def _estimate(own: float | None, other: float | None, ratio: float) -> float | None:
    if own is not None:
        return own
    return None if other is None else other * ratio


def waiting_caused(costs: DepthCosts, waiting: int, demand: float, group_demand: float) -> float:
    """The request-seconds of waiting a sleep at these costs causes (see above): `demand` is
    the sleeper's request rate, `group_demand` the whole group's."""
    likely = 1.0 - math.exp(-demand * LIKELY_WITHIN_SECS)
    now = costs.sleep * (waiting + group_demand * costs.sleep * BACKLOG_FACTOR)
    later = likely * costs.wake * (1.0 + group_demand * costs.wake / 2.0)
    return now + later


def default_sleep_depth(model: str, waiting: int, snapshot: Snapshot) -> int:
    """The depth that causes the least waiting (see above)."""
    costs = depth_costs(model, snapshot)
    demand = snapshot.demand.get(model, 0.0)
    group_demand = sum(snapshot.demand.values())
    return min(
        LEVELS,
        key=lambda level: (waiting_caused(costs[level], waiting, demand, group_demand), -level),
    )
