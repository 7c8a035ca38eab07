"""A policy's every answer, checked in one place, before the core acts on it (rule 7).

A policy is code the operator plugs in; whatever it answers, the core must stay whole. So each
answer is checked here: `decide` must return Stay, a SwitchTo naming a model of the group, or a
CallAt with a finite time; `evict` must name distinct, known, awake models other than the target
that make enough room; `sleep_depth` must answer 1 or 2. Anything else is replaced by the
default answer, and what was wrong is returned for the core to report. Nothing a policy does
gets past this module: whatever it raises (BaseException subclasses included: a policy's
SystemExit must not stop llmux), and whatever odd value it returns (a str subclass that cannot
be hashed, an int too large for a float, an endless generator), is caught while it is looked
at. The snapshot a policy sees is read-only (group_view.py), so it cannot change what its
answer is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmux.core.capacity import default_evictions, held
from llmux.core.depth import LEVELS, default_sleep_depth
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
    """An answer the core may act on; if the policy's own was replaced, what was wrong with it
    (`problem`, for the log), of which kind (`kind`, said once per kind), what replaced it
    (`fallback`), and the exception it raised, if it did."""

    decision: Decision
    problem: str = ""
    kind: str = ""
    fallback: str = ""
    error: BaseException | None = None


def checked_decision(
    policy: Policy, event: Event, snapshot: Snapshot, models: Collection[str]
) -> Checked:
    """The policy's decision if it makes sense; FIFO's if it raised, else Stay."""
    try:
        decision = policy.decide(event, snapshot)
        return _checked(decision, models)
    except BaseException as exc:  # whatever a plug-in raises, llmux stays up
        fifo = FifoPolicy().decide(event, snapshot)
        kind = f"raised {type(exc).__name__}"
        return Checked(fifo, f"failed ({_shown(exc)})", kind, "fifo", exc)


def _checked(decision: object, models: Collection[str]) -> Checked:
    if isinstance(decision, SwitchTo):
        name = _plain(decision.model)
        if name is not None and name in models:
            return Checked(SwitchTo(name))
        problem = f"asked to switch to {decision.model!r}, which is not in the group"
        return Checked(Stay(), problem, "switch to an unknown model", "stay")
    if isinstance(decision, CallAt):
        when = _finite(decision.when)
        if when is not None:
            return Checked(CallAt(when))
        problem = f"asked to be called at {decision.when!r}, not a finite time"
        return Checked(Stay(), problem, "call at a time that is not finite", "stay")
    if isinstance(decision, Stay):
        return Checked(decision)
    problem = f"answered {decision!r}, not Stay, SwitchTo or CallAt"
    return Checked(Stay(), problem, "not a decision", "stay")


def checked_evictions(
    policy: Policy, target: str, snapshot: Snapshot
) -> tuple[list[str], Checked | None]:
    """The models to put to sleep so that `target` fits: the policy's `evict(target, snapshot)`
    if it has one and its answer is sound, else the default (with what was wrong)."""
    default = default_evictions(target, snapshot)
    evict = _method(policy, "evict")
    if evict is None or not default:
        return default, None
    try:
        answer = evict(target, snapshot)
        if isinstance(answer, str | bytes) or not hasattr(answer, "__iter__"):
            problem = f"evict answered {answer!r}, not a list of model names"
            return default, _instead(problem, "not a list of names")
        given = []
        for name in answer:
            given.append(name)
            if len(given) > MAX_EVICTIONS:
                return default, _instead("evict answered endless names", "endless")
        chosen = [_plain(name) for name in given]
        if None in chosen:
            problem = f"evict answered {given!r}: not every one is a model name"
            return default, _instead(problem, "not names")
        found = _evictions_problem(chosen, target, snapshot)  # type: ignore[arg-type]
    except BaseException as exc:  # whatever a plug-in raises, llmux stays up
        problem = f"evict failed ({_shown(exc)})"
        return default, Checked(Stay(), problem, f"raised {type(exc).__name__}", "default", exc)
    if found is not None:
        return default, _instead(*found)
    return chosen, None


def _plain(name: object) -> str | None:
    """A name as a plain str (a str subclass may not even hash), or None if it is no str."""
    return str.__str__(name) if isinstance(name, str) else None


def _finite(when: object) -> float | None:
    """A time as a finite float, or None (bool is no time; 10**400 is not finite)."""
    if not isinstance(when, int | float) or isinstance(when, bool):
        return None
    try:
        value = float(when)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _instead(problem: str, kind: str) -> Checked:
    return Checked(Stay(), problem, kind, "default")


def _evictions_problem(
    chosen: list[str], target: str, snapshot: Snapshot
) -> tuple[str, str] | None:
    """What is wrong with an eviction answer, and its kind; None if nothing."""
    views = snapshot.models
    for name in chosen:
        if name == target or name not in views or views[name].state is not ModelState.ACTIVE:
            return f"evict answered {chosen!r}: {name!r} is not another awake model", "not awake"
    if len(set(chosen)) != len(chosen):
        return f"evict answered {chosen!r}: a model named twice", "a model named twice"
    kept = held(snapshot, {target, *chosen})
    if kept + views[target].size > snapshot.capacity + ROOM_EPSILON:
        return f"evict answered {chosen!r}, which does not make room for {target}", "too little"
    return None


def checked_depth(
    policy: Policy, model: str, waiting: int, snapshot: Snapshot
) -> tuple[int, Checked | None]:
    """The depth to put `model` to sleep at (`sleep_level = "auto"`): the policy's
    `sleep_depth(model, waiting, snapshot)` if it has one and answers 1 or 2, else the
    default (core/depth.py)."""
    default = default_sleep_depth(model, waiting, snapshot)
    choose = _method(policy, "sleep_depth")
    if choose is None:
        return default, None
    try:
        answer = choose(model, waiting, snapshot)
        if type(answer) is int and answer in LEVELS:
            return answer, None
        problem = f"sleep_depth answered {answer!r} for {model}, not 1 or 2"
        return default, _instead(problem, "not a depth")
    except BaseException as exc:  # whatever a plug-in raises, llmux stays up
        problem = f"sleep_depth failed ({_shown(exc)})"
        return default, Checked(Stay(), problem, f"raised {type(exc).__name__}", "default", exc)


def _method(policy: Policy, name: str) -> Callable[..., object] | None:
    """A policy's optional method; one whose lookup raises counts as absent."""
    try:
        found = getattr(policy, name, None)
    except BaseException:  # a property or __getattr__ of a plug-in's that fails
        return None
    return found  # type: ignore[no-any-return]


def _shown(thing: object) -> str:
    """repr() of what a plug-in raised or answered, whatever its __repr__ does."""
    try:
        shown = repr(thing)
    except BaseException:
        return f"<a {type(thing).__name__} whose repr fails>"
    return shown if isinstance(shown, str) else f"<a {type(thing).__name__}>"


def choose_evictions(policy: Policy, target: str, snapshot: Snapshot) -> list[str]:
    """`checked_evictions` without the problem: what the core would put to sleep."""
    return checked_evictions(policy, target, snapshot)[0]
