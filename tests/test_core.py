"""The switching core, proven by a stateful test: random interleavings of every event (requests
that come, leave and finish; hooks that succeed, fail and time out; timers; reloads that move and
remove models; admin sleeps; backends that die; a policy that answers nonsense) against the
promises, with the commands the core issues as ground truth, not its own labels.

Each bug a review found in the old switcher is kept below as a named mutation of the core; each
one makes this test fail.
"""

from __future__ import annotations

import ast
import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from llmux.config import Config, ModelConfig, parse_config
from llmux.core import events as ev
from llmux.core.commands import ClearTimer, Grant, Refuse, Reply, RunHook, SetTimer
from llmux.core.costs import SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.states import TRANSITIONS, HookName, ModelState
from llmux.policy import AdaptivePolicy, CallAt, CostAwarePolicy, FifoPolicy, SwitchTo

MODELS = ("a", "b", "c")
SIZES = {"a": 1.0, "b": 1.0, "c": 2.0}  # with capacity 2: a and b fit together, c alone
Backend = tuple[str, int, str, str]  # one server: model, port, wake and sleep commands


def backend_of(config: ModelConfig) -> Backend:
    return (config.name, config.port, config.wake, config.sleep)


class ChaosPolicy:
    """A real policy whose next answer can be replaced by nonsense (or an exception)."""

    def __init__(self, inner: FifoPolicy | CostAwarePolicy | AdaptivePolicy) -> None:
        self.inner = inner
        self.next_bad: str | None = None

    def decide(self, event, snapshot):
        bad, self.next_bad = self.next_bad, None
        if bad == "raise":
            raise RuntimeError("policy bug")
        if bad == "nan":
            return CallAt(math.nan)
        if bad == "inf":
            return CallAt(math.inf)
        if bad == "past":
            return CallAt(snapshot.now - 5.0)
        if bad == "unknown":
            return SwitchTo("zzz")
        if bad == "not a decision":
            return "switch!"
        return self.inner.decide(event, snapshot)


BAD_ANSWERS = st.sampled_from(
    [None] * 6 + ["raise", "nan", "inf", "past", "unknown", "not a decision"]
)


@dataclass
class World:
    """What really happens, read from the commands the core issues and the answers it gets."""

    serving: set[Backend] = field(default_factory=set)  # servers that are up and loaded
    woken: set[Backend] = field(default_factory=set)  # woken (or found serving), not slept since
    sleeping: Counter[Backend] = field(default_factory=Counter)  # sleep hooks running
    waiting: dict[int, str] = field(default_factory=dict)  # rid -> model
    granted: dict[int, Backend] = field(default_factory=dict)  # rid -> the server it went to
    ended: set[int] = field(default_factory=set)
    hooks: dict[int, RunHook] = field(default_factory=dict)
    timers: dict[str, float] = field(default_factory=dict)
    replies: set[int] = field(default_factory=set)


@functools.lru_cache(maxsize=4096)
def _parsed(raw: str) -> Config:
    """Configs are frozen: the same document parses once (a tenth of the run's time otherwise)."""
    config = parse_config(ast.literal_eval(raw), Path("stateful.toml"))
    return config.group_config(next(iter(config.groups)))


class CoreMachine(RuleBasedStateMachine):
    core: GroupCore
    started = 0  # examples begun, for tests/mutation_power.py

    @initialize(
        capacity=st.sampled_from([None, 2.0]),
        alive=st.frozensets(st.sampled_from(MODELS)),
        ttl=st.frozensets(st.sampled_from(MODELS)),
        preload=st.lists(st.sampled_from(MODELS), unique=True, max_size=2),
        min_active=st.sampled_from([0.0, 1.0, 5.0]),
        in_flight_limit=st.sampled_from([None, 1, 2]),
        policy=st.sampled_from(["fifo", "cost_aware", "adaptive"]),
        up=st.sampled_from([(), ("a",), ("b",), ("a", "b"), ("c",)]),
    )
    def start(self, capacity, alive, ttl, preload, min_active, in_flight_limit, policy, up):
        CoreMachine.started += 1
        self.now = 0.0
        self.capacity = capacity
        self.shapes = {
            m: {"port": 9000 + i, "wake": f"wake-{m}", "sleep": f"sleep-{m}"}
            for i, m in enumerate(MODELS)
        }
        self.alive, self.ttl = set(alive), set(ttl)
        self.present = list(MODELS)
        self.preload = list(preload)
        self.server = (
            {} if in_flight_limit is None else {"max_in_flight_per_model": in_flight_limit}
        )
        self.policy_options = {"min_active_secs": min_active}
        inner = {
            "fifo": FifoPolicy,
            "cost_aware": lambda: CostAwarePolicy(default_cost_secs=1.0),
            "adaptive": lambda: AdaptivePolicy(default_cost_secs=1.0),
        }[policy]()
        self.policy = ChaosPolicy(inner)
        self.world = World()
        config = self._config()
        if capacity is None:
            up = up[:1]  # one server fits at a time
        # A server that is up at start-up without an alive hook is one llmux cannot know of.
        self.world.serving = {backend_of(config.models[m]) for m in up if m in alive}
        self.core = GroupCore(config, self.policy, SwitchCostTracker())
        self.next_rid = 1
        self.next_reply = 1
        self.fed = 0
        self._feed(ev.Started(self.now))

    # ----- the config and its reloads -----

    def _config(self) -> Config:
        models = {}
        for name in self.present:
            table = dict(self.shapes[name])
            if name in self.alive:
                table["alive"] = f"alive-{name}"
            if name in self.ttl:
                table["ttl_secs"] = 3
            if self.capacity is not None:
                table["size"] = SIZES[name]
            models[name] = table
        raw = {
            "models": models,
            "policy": self.policy_options,
            "preload": [m for m in self.preload if m in self.present],
            "server": self.server,
            "defaults": {"alive_interval_secs": 2},
        }
        if self.capacity is not None:
            raw["groups"] = {"g": {"capacity": self.capacity, "models": list(self.present)}}
        return _parsed(repr(raw))

    # ----- feeding the core, checking every command against the world -----

    def _feed(self, event) -> None:
        self.fed += 1
        self.now = event.now
        commands = self.core.handle(event)  # the core never raises
        for command in commands:
            self._check(command)

    def _check(self, command) -> None:
        world = self.world
        if isinstance(command, Grant):
            assert command.rid in world.waiting, f"grant of {command.rid}, which does not wait"
            backend = backend_of(command.backend)
            assert command.backend.name == world.waiting[command.rid]
            assert backend in world.woken, f"grant to {backend}, not woken (or slept since)"
            assert not world.sleeping[backend], f"grant to {backend} while its sleep hook runs"
            del world.waiting[command.rid]
            world.granted[command.rid] = backend
        elif isinstance(command, Refuse):
            assert command.rid in world.waiting, f"refusal of {command.rid}, which does not wait"
            del world.waiting[command.rid]
            world.ended.add(command.rid)
        elif isinstance(command, RunHook):
            backend = backend_of(command.backend)
            if command.hook is HookName.WAKE:
                others = self._held() - {backend}
                room = 1.0 if self.capacity is None else self.capacity
                size = SIZES[command.model] if self.capacity is not None else 1.0
                held = sum(self._size(b) for b in others)
                assert held + size <= room + 1e-9, (
                    f"wake of {command.model} beside {sorted(others)} exceeds the capacity"
                )
            if command.hook is HookName.SLEEP:
                world.sleeping[backend] += 1
            world.hooks[command.job] = command
        elif isinstance(command, SetTimer):
            # Strictly in the future: so a timer that fires (at or after its time) can never
            # be armed again for that same moment, and nothing spins.
            assert math.isfinite(command.at) and command.at > self.now, (
                f"timer {command.name} set for {command.at}, not after {self.now}"
            )
            world.timers[command.name] = command.at
        elif isinstance(command, ClearTimer):
            world.timers.pop(command.name, None)
        elif isinstance(command, Reply):
            assert command.reply in world.replies, f"reply {command.reply} never asked for"
            world.replies.discard(command.reply)

    def _size(self, backend: Backend) -> float:
        return 1.0 if self.capacity is None else SIZES[backend[0]]

    def _held(self) -> set[Backend]:
        """Servers that hold the GPU: up and loaded, or with requests still in flight."""
        return set(self.world.serving) | set(self.world.granted.values())

    # ----- rules: time and timers -----

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.5, 1.0, 2.5, 10.0]))
    def time_passes(self, seconds):
        self.now += seconds

    @precondition(lambda self: self.world.timers)
    @rule(data=st.data())
    def timer_due(self, data):
        name = data.draw(st.sampled_from(sorted(self.world.timers)))
        at = self.world.timers.pop(name)
        self._feed(ev.TimerDue(max(self.now, at), name))

    # ----- rules: requests -----

    @rule(model=st.sampled_from(MODELS), bad=BAD_ANSWERS)
    def request_arrives(self, model, bad):
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        self.world.waiting[rid] = model
        self.policy.next_bad = bad
        self._feed(ev.Arrived(self.now, rid, model))

    @precondition(lambda self: self.world.waiting)
    @rule(data=st.data())
    def waiting_client_leaves(self, data):
        rid = data.draw(st.sampled_from(sorted(self.world.waiting)))
        del self.world.waiting[rid]
        self.world.ended.add(rid)
        self._feed(ev.Left(self.now, rid))

    @precondition(lambda self: self.world.granted)
    @rule(data=st.data(), left=st.booleans(), bad=BAD_ANSWERS)
    def request_ends(self, data, left, bad):
        rid = data.draw(st.sampled_from(sorted(self.world.granted)))
        del self.world.granted[rid]
        self.world.ended.add(rid)
        self.policy.next_bad = bad
        self._feed((ev.Left if left else ev.Finished)(self.now, rid))

    # ----- rules: hooks and servers -----

    @precondition(lambda self: self.world.hooks)
    @rule(data=st.data(), how=st.sampled_from(["ok", "ok", "ok", "fail", "timeout"]))
    def hook_ends(self, data, how):
        job = data.draw(st.sampled_from(sorted(self.world.hooks)))
        command = self.world.hooks.pop(job)
        backend = backend_of(command.backend)
        world = self.world
        if command.hook is HookName.ALIVE:
            # An alive hook answers what is true, unless it times out.
            serving = backend in world.serving
            outcome = ev.HookOutcome(ok=serving and how != "timeout", timed_out=how == "timeout")
            if outcome.ok:
                world.woken.add(backend)
            elif not outcome.timed_out:
                world.woken.discard(backend)
        else:
            outcome = ev.HookOutcome(ok=how == "ok", timed_out=how == "timeout", duration=0.5)
            if command.hook is HookName.WAKE and outcome.ok:
                world.serving.add(backend)
                world.woken.add(backend)
            if command.hook is HookName.SLEEP:
                world.sleeping[backend] -= 1
                if outcome.ok:
                    world.serving.discard(backend)
                    world.woken.discard(backend)
        self.now += outcome.duration
        self._feed(ev.HookDone(self.now, job, outcome))

    @precondition(lambda self: self.world.serving)
    @rule(data=st.data(), noticed=st.booleans())
    def server_dies(self, data, noticed):
        backend = data.draw(st.sampled_from(sorted(self.world.serving)))
        self.world.serving.discard(backend)
        if noticed:  # the proxy could not connect to it
            self._feed(ev.Unreachable(self.now, backend[0]))

    @precondition(lambda self: self.world.granted)
    @rule(data=st.data())
    def backend_refuses_a_request(self, data):
        """The proxy cannot connect to the server a request was granted to (it is down): it
        says so, and the request ends with a 502."""
        rid = data.draw(st.sampled_from(sorted(self.world.granted)))
        backend = self.world.granted.pop(rid)
        self.world.ended.add(rid)
        self.world.serving.discard(backend)
        self._feed(ev.Unreachable(self.now, backend[0]))
        self._feed(ev.Finished(self.now, rid))

    # Hypothesis leaves a random subset of the rules out of each example (swarm testing): the
    # two rules that move things on appear twice, so that few examples lack both.
    @rule(model=st.sampled_from(MODELS), bad=BAD_ANSWERS)
    def another_request_arrives(self, model, bad):
        self.request_arrives(model, bad)

    @precondition(lambda self: self.world.hooks)
    @rule(data=st.data(), how=st.sampled_from(["ok", "ok", "ok", "fail", "timeout"]))
    def another_hook_ends(self, data, how):
        self.hook_ends(data, how)

    # ----- rules: admin, reload, shutdown -----

    @precondition(lambda self: self.fed % 3 == 0)  # now and then: it puts everything to sleep
    @rule(model=st.sampled_from([None, *MODELS]))
    def admin_sleep(self, model):
        reply, self.next_reply = self.next_reply, self.next_reply + 1
        self.world.replies.add(reply)
        self._feed(ev.SleepAsked(self.now, model, reply))

    @rule(
        change=st.sampled_from(["port", "hooks", "remove", "restore", "interval"]),
        data=st.data(),
    )
    def reload(self, change, data):
        absent = [m for m in MODELS if m not in self.present]
        if change == "remove" and len(self.present) == 1:
            change = "restore"
        if change == "restore" and not absent:
            change = "port"
        if change == "remove":
            self.present.remove(data.draw(st.sampled_from(self.present)))
        elif change == "restore":
            self.present.append(data.draw(st.sampled_from(absent)))
        else:
            model = data.draw(st.sampled_from(self.present))
            if change == "port":
                self.shapes[model]["port"] += 100
            elif change == "hooks":
                self.shapes[model]["wake"] += "!"
            else:
                self.alive ^= {model}
        self._feed(ev.Reloaded(self.now, self._config()))
        assert all(m in self.present for m in self.world.waiting.values()), (
            "a removed model's waiters are refused at once"
        )

    # Rarely (most runs should go on serving), and never as a step that does nothing.
    @precondition(lambda self: not self.core.closing and self.next_rid % 7 == 0)
    @rule()
    def shutdown(self):
        self._feed(ev.ShutdownBegun(self.now))

    # ----- what must hold after every step -----

    @invariant()
    def within_capacity(self):
        room = 1.0 if self.capacity is None else self.capacity
        held = sum(self._size(b) for b in self._held())
        assert held <= room + 1e-9, f"{sorted(self._held())} are up at once"

    @invariant()
    def in_flight_matches_the_requests_granted(self):
        records = [*self.core.models.values(), *self.core.retiring]
        assert all(r.in_flight >= 0 for r in records)
        granted = Counter(backend[0] for backend in self.world.granted.values())
        for name in MODELS:
            assert self.core.in_flight_of(name) == granted[name], name

    @invariant()
    def nothing_in_flight_is_called_asleep(self):
        """A model serving requests has not been put to sleep: what status, metrics and the
        policy are told must not say otherwise (a sleep comes only after a drain)."""
        for rid in self.world.granted:
            record = self.core.requests[rid].granted_to
            assert record is not None and record.state is not ModelState.ASLEEP, (
                f"{record.name if record else rid} is called asleep with request {rid} in flight"
            )

    @invariant()
    def queues_hold_exactly_the_waiting_requests(self):
        queued = {r.rid for m in self.core.models.values() for r in m.queue}
        assert queued == set(self.world.waiting), (queued, set(self.world.waiting))

    @invariant()
    def nothing_moves_without_a_hook_in_flight(self):
        for model in (*self.core.models.values(), *self.core.retiring):
            if model.state in (ModelState.WAKING, ModelState.SLEEPING):
                assert any(
                    backend_of(h.backend) == backend_of(model.config)
                    for h in self.world.hooks.values()
                ), f"{model.name} is {model.state} with no hook running"

    def teardown(self):
        """Afterwards, with every hook answered and every timer run, nobody is left waiting:
        nothing is stuck after a failure."""
        if not hasattr(self, "core"):
            return
        self.policy.next_bad = None
        for _ in range(400):
            world = self.world
            if not world.waiting and not world.replies and not world.granted:
                break
            if world.granted:
                rid = min(world.granted)
                del world.granted[rid]
                self._feed(ev.Finished(self.now, rid))
            elif world.hooks:
                job = min(world.hooks)
                command = world.hooks.pop(job)
                backend = backend_of(command.backend)
                ok = backend in world.serving if command.hook is HookName.ALIVE else True
                if command.hook is HookName.WAKE:
                    world.serving.add(backend)
                    world.woken.add(backend)
                elif command.hook is HookName.SLEEP:
                    world.sleeping[backend] -= 1
                    world.serving.discard(backend)
                    world.woken.discard(backend)
                elif ok:
                    world.woken.add(backend)
                self.now += 0.5
                self._feed(ev.HookDone(self.now, job, ev.HookOutcome(ok=ok, duration=0.5)))
            elif world.timers:
                name, at = min(world.timers.items(), key=lambda item: item[1])
                del world.timers[name]
                self._feed(ev.TimerDue(max(self.now, at), name))
            else:
                break
            self.within_capacity()
        assert not self.world.waiting, f"requests stuck: {self.world.waiting}"
        assert not self.world.replies, f"admin requests never answered: {self.world.replies}"


# CI runs 1,000 examples of up to 50 steps (about 15 s); LLMUX_STATEFUL_EXAMPLES=20000 soaks.
CI_SETTINGS = settings(
    max_examples=int(os.environ.get("LLMUX_STATEFUL_EXAMPLES", 1000)),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def test_the_core_keeps_its_promises():
    run_state_machine_as_test(CoreMachine, settings=CI_SETTINGS)


class _Pick:
    """Stands in for hypothesis's `data` in a replay: answers the draws given, in order."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)

    def draw(self, strategy: object) -> object:
        return self.answers.pop(0)


def _end_hook(machine: CoreMachine, hook: HookName, model: str, how: str) -> None:
    job = next(j for j, c in machine.world.hooks.items() if c.hook is hook and c.model == model)
    machine.hook_ends(_Pick(job), how)


def test_a_server_whose_sleep_failed_is_not_woken_under_its_retirement():
    """Found by a 5,000-example soak: b may serve at start-up (its alive hook timed out), its
    sleep fails and it is held as a retired record; preload then woke a new record of the same
    server, and the retirement's sleep later reached it while requests were granted to it."""
    machine = CoreMachine()
    machine.start(
        capacity=2.0, alive=frozenset(MODELS), ttl=frozenset(), preload=["b"],
        min_active=0.0, in_flight_limit=None, policy="fifo", up=("b",),
    )  # fmt: skip
    machine.request_arrives("a", None)
    _end_hook(machine, HookName.ALIVE, "b", "timeout")
    _end_hook(machine, HookName.ALIVE, "a", "ok")
    _end_hook(machine, HookName.ALIVE, "c", "ok")
    _end_hook(machine, HookName.SLEEP, "b", "fail")
    machine.admin_sleep(None)
    _end_hook(machine, HookName.ALIVE, "b", "ok")  # it serves: held, not trusted
    while machine.world.hooks:  # whatever comes next succeeds
        job = min(machine.world.hooks)
        machine.hook_ends(_Pick(job), "ok")
    for _ in range(5):  # and its timers come due, soonest first
        if machine.world.timers:
            machine.timer_due(_Pick(min(machine.world.timers, key=machine.world.timers.get)))
    machine.request_arrives("b", None)
    machine.teardown()


def test_every_transition_in_the_table_is_reachable_and_no_other():
    states = set(ModelState)
    assert {new for new in TRANSITIONS.values()} == states
    assert {old for old, _ in TRANSITIONS} == states


# ----- the six bugs of the old switcher, as mutations of the core: each must be caught -----


def _bug1_grant_keeps_the_arrival_record(monkeypatch):
    """A waiting request keeps the record it arrived on: after a reload replaced it, the
    request is sent to the old backend (put to sleep since) and counted on it forever."""
    arrived = GroupCore._on_arrived
    grant = GroupCore._grant

    def on_arrived(self, event):
        arrived(self, event)
        request = self.requests.get(event.rid)
        if request is not None:
            request.arrived_on = self.models[event.model]

    def stale_grant(self, model, request):
        grant(self, getattr(request, "arrived_on", model), request)

    monkeypatch.setattr(GroupCore, "_on_arrived", on_arrived)
    monkeypatch.setattr(GroupCore, "_grant", stale_grant)


def _bug2_stuck_victim_then_wake_beside(monkeypatch):
    """As an exception or a cancellation did in the old switcher: a switch abandoned after a
    failed sleep leaves its victim SLEEPING with nothing to move it on; the next switch finds
    no victim to evict ("fits") and wakes its target beside it."""

    def abandon(self, op, failure, reason):
        self.retry_at = self.now + 2.0
        self._fail_queue(op.target, self._hook_error(op.target, "sleep failed", failure))
        self._end_switch(op, ok=False)

    monkeypatch.setattr(GroupCore, "_abandon", abandon)
    monkeypatch.setattr(GroupCore, "_room_can_be_made", lambda self, target, victims: True)


def _bug3_alive_failure_marks_asleep_at_once(monkeypatch):
    """An alive check that fails or times out marks the model asleep at once, its requests
    still in flight, without its sleep hook."""
    done = GroupCore._alive_done

    def alive_done(self, op, outcome):
        if outcome.ok:
            done(self, op, outcome)
            return
        op.model.last_alive_check = self.now
        self._end_op()
        op.model.state = ModelState.ASLEEP
        op.model.active_since = None

    monkeypatch.setattr(GroupCore, "_alive_done", alive_done)


def _bug4_idle_timer_keeps_its_past_deadline(monkeypatch):
    """An expired idle sleep held up by a switch keeps its deadline: a timer in the past."""
    arm = GroupCore._arm_timers

    def arm_timers(self):
        arm(self)
        expiry = self._next_idle_sleep()
        if expiry is not None and expiry <= self.now and self.op is None and self.ready:
            self._armed["ttl"] = expiry
            self._out.append(SetTimer("ttl", expiry))

    monkeypatch.setattr(GroupCore, "_arm_timers", arm_timers)


def _bug5_policy_answers_trusted(monkeypatch):
    """Whatever the policy answers is carried out: CallAt(nan), SwitchTo an unknown name."""
    monkeypatch.setattr(GroupCore, "_checked", lambda self, decision: decision)


def _bug6_removed_models_looked_up(monkeypatch):
    """A model a reload removed is looked up by name, as if it were still there."""

    def on_unreachable(self, event):
        model = self.models[event.model]
        if model.state is ModelState.ACTIVE:
            model.check_requested = True

    monkeypatch.setattr(GroupCore, "_on_unreachable", on_unreachable)


MUTATIONS = {
    "1: a reload strands a waiting request": _bug1_grant_keeps_the_arrival_record,
    "2: a stuck model, then a wake beside it": _bug2_stuck_victim_then_wake_beside,
    "3: a failed alive check marks a busy model asleep": _bug3_alive_failure_marks_asleep_at_once,
    "4: the idle-sleep timer spins on a past deadline": _bug4_idle_timer_keeps_its_past_deadline,
    "5: a nonsense policy answer is carried out": _bug5_policy_answers_trusted,
    "6: a removed model is looked up by name": _bug6_removed_models_looked_up,
}
# Derandomized: the same examples every run, so whether each bug is caught never flakes.
MUTATION_SETTINGS = settings(
    CI_SETTINGS, phases=[Phase.generate], database=None, derandomize=True,
    report_multiple_bugs=False,
)  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_bug_of_the_old_switcher_is_caught(mutation, monkeypatch):
    MUTATIONS[mutation](monkeypatch)
    with pytest.raises(Exception) as caught:  # an invariant, or the core raising
        run_state_machine_as_test(CoreMachine, settings=MUTATION_SETTINGS)
    assert not isinstance(caught.value, pytest.fail.Exception)
