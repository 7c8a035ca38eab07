"""A policy's every answer, checked in one place, before the core acts on it (rule 7).

A policy is code the operator plugs in; whatever it answers, the core must stay whole. So each
answer is checked here: `decide` must return Stay, a SwitchTo naming a model of the group, or a
CallAt with a finite time; `evict` must name distinct, known, awake models other than the target
that make enough room. Anything else, an exception included, is replaced by the default answer
and the problem is returned for the core to report.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmux.core.capacity import default_evictions, held
from llmux.core.snapshot import Snapshot
from llmux.core.states import ModelState
from llmux.policies.fifo import FifoPolicy
from llmux.policies.interface import CallAt, Decision, Stay, SwitchTo

if TYPE_CHECKING:
    from llmux.policies.interface import Event, Policy

ROOM_EPSILON = 1e-9
MAX_EVICTIONS = 1024  # an answer longer than this is not read to its end


@dataclass(frozen=True)
class Checked:
    """An answer the core may act on, and what was wrong with the policy's own ("" if
    nothing; `fallback` says which default replaced it)."""

    decision: Decision
    problem: str = ""
    fallback: str = ""


def checked_decision(
    policy: Policy, event: Event, snapshot: Snapshot, models: Collection[str]
) -> Checked:
    """The policy's decision if it makes sense; FIFO's if it raised, else Stay."""
    try:
        decision = policy.decide(event, snapshot)
    except Exception as exc:
        return Checked(FifoPolicy().decide(event, snapshot), f"failed ({exc!r})", "fifo")
    if isinstance(decision, SwitchTo):
        name = decision.model
        if isinstance(name, str) and name in models:
            return Checked(decision)
        return Checked(Stay(), f"asked to switch to {name!r}, which is not in the group", "stay")
    if isinstance(decision, CallAt):
        when = decision.when
        if isinstance(when, int | float) and not isinstance(when, bool) and math.isfinite(when):
            return Checked(decision)
        return Checked(Stay(), f"asked to be called at {when!r}, not a finite time", "stay")
    if isinstance(decision, Stay):
        return Checked(decision)
    return Checked(Stay(), f"answered {decision!r}, not Stay, SwitchTo or CallAt", "stay")


def checked_evictions(policy: Policy, target: str, snapshot: Snapshot) -> tuple[list[str], str]:
    """The models to put to sleep so that `target` fits: the policy's `evict(target, snapshot)`
    if it has one and its answer is sound, else the default (with what was wrong)."""
    default = default_evictions(target, snapshot)
    evict = getattr(policy, "evict", None)
    if evict is None or not default:
        return default, ""
    try:
        answer = evict(target, snapshot)
        if isinstance(answer, str | bytes) or not hasattr(answer, "__iter__"):
            return default, f"evict answered {answer!r}, not a list of model names"
        chosen = []
        for name in answer:
            chosen.append(name)
            if len(chosen) > MAX_EVICTIONS:
                return default, "evict answered more names than the group has"
    except Exception as exc:
        return default, f"evict failed ({exc!r})"
    problem = _evictions_problem(chosen, target, snapshot)
    return (default, problem) if problem else (chosen, "")


def _evictions_problem(chosen: list[object], target: str, snapshot: Snapshot) -> str:
    views = snapshot.models
    for name in chosen:
        if not isinstance(name, str):
            return f"evict answered {chosen!r}: {name!r} is not a model name"
        if name == target or name not in views or views[name].state is not ModelState.ACTIVE:
            return f"evict answered {chosen!r}: {name!r} is not another awake model"
    if len(set(chosen)) != len(chosen):
        return f"evict answered {chosen!r}: a model named twice"
    kept = held(snapshot, {target, *chosen})  # type: ignore[arg-type]
    if kept + views[target].size > snapshot.capacity + ROOM_EPSILON:
        return f"evict answered {chosen!r}, which does not make room for {target}"
    return ""


def choose_evictions(policy: Policy, target: str, snapshot: Snapshot) -> list[str]:
    """`checked_evictions` without the problem: what the core would put to sleep."""
    return checked_evictions(policy, target, snapshot)[0]
