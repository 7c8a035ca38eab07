"""A policy's answers are checked before the core acts on them, and nothing a plug-in answers or
raises gets past the check (answers found by trying to break it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmux.config import parse_config
from llmux.core import events as ev
from llmux.core.commands import Grant, Observe, RunHook
from llmux.core.costs import SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.policy_answers import checked_decision, checked_evictions
from llmux.core.records import Request
from llmux.policy import (
    CallAt,
    FifoPolicy,
    ModelState,
    ModelView,
    RequestArrived,
    Snapshot,
    Stay,
    SwitchTo,
    snapshot_of,
)


class PluginExit(BaseException):
    pass


class UnhashableName(str):
    __hash__ = None  # type: ignore[assignment]


class Answers:
    def __init__(self, decision=None, evict=None) -> None:
        self.decision, self.evicts = decision, evict

    def decide(self, event, snapshot):
        if isinstance(self.decision, BaseException):
            raise self.decision
        return self.decision

    def evict(self, target, snapshot):
        return self.evicts(target, snapshot)


@dataclass
class Runtime:
    """What the core keeps per model, as far as a snapshot reads it."""

    name: str
    state: ModelState
    last_used: float | None = None
    queue: list[Request] = field(default_factory=list)
    in_flight: int = 0
    active_since: float | None = 0.0
    size: float = 40.0
    starts_cold: bool = False


def _snapshot() -> Snapshot:
    """Capacity 80: a and b (40 each) awake, c (40) waiting; built as the core builds it."""
    models = [
        Runtime("a", ModelState.ACTIVE, last_used=1.0),
        Runtime("b", ModelState.ACTIVE, last_used=2.0),
        Runtime("c", ModelState.ASLEEP, queue=[Request(1, "c", 3.0)], active_since=None),
    ]
    return snapshot_of(10.0, models, False, {}, {}, capacity=80.0)


def _decided(decision) -> tuple[object, str]:
    checked = checked_decision(Answers(decision), RequestArrived("c"), _snapshot(), {"a", "b", "c"})
    return checked.decision, checked.kind


def test_decisions_that_would_break_a_plain_check_are_replaced():
    assert _decided(CallAt(10**400)) == (Stay(), "call at a time that is not finite")
    assert _decided(CallAt(True)) == (Stay(), "call at a time that is not finite")
    assert _decided(CallAt(12)) == (CallAt(12.0), "")
    decision, kind = _decided(SwitchTo(UnhashableName("c")))
    assert (decision, kind) == (SwitchTo("c"), "") and type(decision.model) is str
    assert _decided(SwitchTo(UnhashableName("zzz")))[1] == "switch to an unknown model"
    fifo = FifoPolicy().decide(RequestArrived("c"), _snapshot())
    assert _decided(PluginExit("bye")) == (fifo, "raised PluginExit")
    assert _decided(SystemExit(3)) == (fifo, "raised SystemExit")


def test_evictions_are_checked_against_what_the_policy_cannot_change():
    snapshot = _snapshot()

    def mutate(target, seen):
        seen.models[target] = ModelView(target, ModelState.ACTIVE, 0, None, 0, size=0)
        return []

    def interrupted(target, seen):
        yield "a"
        raise KeyboardInterrupt

    default = checked_evictions(Answers(), "c", snapshot)[0]
    assert default == ["a"]  # least recently used
    for evict, kind in (
        (mutate, "raised TypeError"),
        (interrupted, "raised KeyboardInterrupt"),
        (lambda target, seen: [UnhashableName("a"), UnhashableName("a")], "a model named twice"),
        (lambda target, seen: [1.5], "not names"),
        (lambda target, seen: iter(lambda: "a", None), "endless"),
    ):
        chosen, problem = checked_evictions(Answers(evict=evict), "c", snapshot)
        assert chosen == default and problem is not None and problem.kind == kind, kind
    assert snapshot.models["c"].size == 40, "the snapshot is read-only"
    chosen, problem = checked_evictions(
        Answers(evict=lambda target, seen: [UnhashableName("b")]), "c", snapshot
    )
    assert chosen == ["b"] and type(chosen[0]) is str and problem is None


class RaisesWithTheTime:
    """A policy whose exceptions carry values: each message differs."""

    def decide(self, event, snapshot):
        raise ValueError(f"not ready at {snapshot.now:.3f}")


def test_a_mistake_is_said_once_at_error_level_however_its_message_varies():
    raw = {"models": {m: {"port": 9000 + i, "wake": "w", "sleep": "s"} for i, m in enumerate("ab")}}
    config = parse_config(raw, Path("answers.toml"))
    core = GroupCore(config.group_config("default"), RaisesWithTheTime(), SwitchCostTracker())
    commands: list[object] = []

    def feed(event: ev.Event) -> None:
        """The event, then every hook it runs succeeds."""
        done = core.handle(event)
        commands.extend(done)
        for hook in [c for c in done if isinstance(c, RunHook)]:
            feed(ev.HookDone(event.now, hook.job, ev.HookOutcome(ok=True)))

    feed(ev.Started(0.0))
    for rid in range(1, 13):
        feed(ev.Arrived(float(rid), rid, "ab"[rid % 2]))
        feed(ev.Finished(float(rid), rid))
    told = [c for c in commands if isinstance(c, Observe) and c.name == "policy_failed"]
    assert len(told) >= 12
    loud = [c for c in told if c.level == "error"]
    assert len(loud) == 1 and isinstance(loud[0].fields["error"], ValueError)
    assert "policy adaptive" in loud[0].message  # the configured name, not an object's repr
    assert sum(isinstance(c, Grant) for c in commands) == 12, "FIFO decided meanwhile: all served"
