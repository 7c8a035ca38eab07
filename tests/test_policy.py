"""The policy interface: FIFO's decisions from snapshots, loading custom policies, and the live
switcher calling a custom policy on every kind of event (timer included)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from llmux.core.policy_answers import checked_evictions
from llmux.policy import (
    FifoPolicy,
    ModelState,
    ModelView,
    PolicyLoadError,
    RequestArrived,
    Snapshot,
    Stay,
    SwitchTo,
    choose_evictions,
    default_evictions,
    load_policy,
)
from tests.conftest import chat, fake_model_block, llmux_running, write_config


def snapshot(
    active: str | None = None, switching: bool = False, **queues: tuple[int, float]
) -> Snapshot:
    names = ["a", "b", "c"]
    models = {}
    for name in names:
        depth, oldest = queues.get(name, (0, None))
        state = ModelState.ACTIVE if name == active else ModelState.ASLEEP
        models[name] = ModelView(name, state, depth, oldest, 0)
    return Snapshot(
        now=100.0,
        models=models,
        active=active,
        active_since=90.0 if active else None,
        switching=switching,
        switch_costs={},
        cold_start_costs={},
    )


def test_fifo_switches_to_the_model_whose_oldest_request_came_first():
    fifo = FifoPolicy()
    assert fifo.decide(RequestArrived("b"), snapshot(active="a")) == Stay()
    assert fifo.decide(RequestArrived("b"), snapshot(active="a", b=(1, 99.0))) == SwitchTo("b")
    assert fifo.decide(
        RequestArrived("b"), snapshot(active="a", b=(3, 98.0), c=(1, 95.0))
    ) == SwitchTo("c")
    assert fifo.decide(RequestArrived("b"), snapshot(b=(1, 99.0))) == SwitchTo("b")


def test_fifo_never_interrupts_a_switch_in_progress():
    assert (
        FifoPolicy().decide(RequestArrived("c"), snapshot(active="a", switching=True, c=(1, 1.0)))
        == Stay()
    )


def test_snapshot_cost_for_the_next_switch():
    snap = snapshot(active="a")
    snap = Snapshot(
        **{**snap.__dict__, "switch_costs": {("a", "b"): 3.0}, "cold_start_costs": {"b": 9.0}}
    )
    assert snap.estimated_cost("b") == 3.0
    assert snap.active_for() == 10.0


def test_load_builtin_and_reject_unknown(tmp_path):
    assert isinstance(load_policy("fifo", {}, tmp_path), FifoPolicy)
    with pytest.raises(PolicyLoadError, match="unknown policy"):
        load_policy("nonsense", {}, tmp_path)
    with pytest.raises(PolicyLoadError, match="rejected"):
        load_policy("fifo", {"bogus": 1}, tmp_path)


POLICY_SOURCE = textwrap.dedent(
    """
    import json
    from llmux.policy import CallAt, FifoPolicy, RequestArrived, Stay, SwitchTo, TimerFired

    class Delayed:
        '''Waits `delay` seconds after a request for a sleeping model before switching.'''

        def __init__(self, delay, log):
            if delay < 0:
                raise ValueError("delay must be >= 0")
            self.delay = delay
            self.log = log
            self.fifo = FifoPolicy()

        def decide(self, event, snapshot):
            with open(self.log, "a") as out:
                costs = {f"{a}>{b}": c for (a, b), c in snapshot.switch_costs.items()}
                out.write(json.dumps({"event": type(event).__name__, "costs": costs}) + "\\n")
            if isinstance(event, RequestArrived) and not snapshot.switching:
                if snapshot.models[event.model].state != "active":
                    return CallAt(snapshot.now + self.delay)
            if isinstance(event, TimerFired):
                return self.fifo.decide(event, snapshot)
            return Stay()
    """
)


def test_load_from_file_and_module_with_options(tmp_path, monkeypatch):
    (tmp_path / "mypolicy.py").write_text(POLICY_SOURCE)
    from_file = load_policy("mypolicy.py:Delayed", {"delay": 1, "log": "x"}, tmp_path)
    assert from_file.delay == 1
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = load_policy("mypolicy:Delayed", {"delay": 2, "log": "x"}, tmp_path)
    assert from_module.delay == 2
    with pytest.raises(PolicyLoadError, match="invalid option"):
        load_policy("mypolicy:Delayed", {"delay": -1, "log": "x"}, tmp_path)
    with pytest.raises(PolicyLoadError, match="not found"):
        load_policy("mypolicy:Missing", {}, tmp_path)
    sys.modules.pop("mypolicy", None)


async def test_live_switcher_drives_a_custom_policy(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    (tmp_path / "delayed.py").write_text(POLICY_SOURCE)
    log = tmp_path / "events.jsonl"
    path = write_config(
        tmp_path,
        fake_model_block(a) + fake_model_block(b),
        policy={"name": f"{tmp_path}/delayed.py:Delayed"},
        top="",
    )
    path.write_text(path.read_text() + f'\n[policy.options]\ndelay = 0.6\nlog = "{log}"\n')
    async with llmux_running(path) as (_, client):
        for model in ("a", "b", "a"):
            started = trio.current_time()
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200
            assert trio.current_time() - started >= 0.6, "the policy's timer was not honoured"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert kinds >= {"RequestArrived", "RequestCompleted", "SwitchCompleted", "TimerFired"}
    assert "a>b" in events[-1]["costs"], "measured switch costs must reach the policy"


def _docs_block(first_line: str) -> str:
    """The fenced code block of the policies page that starts with `first_line`."""
    readme = (Path(__file__).parents[1] / "docs" / "policies.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    return next(block for block in blocks if block.startswith(first_line))


def test_the_readme_example_policy_and_its_test_work_as_printed(tmp_path):
    (tmp_path / "delayed.py").write_text(_docs_block("# delayed.py"))
    (tmp_path / "test_delayed.py").write_text(_docs_block("# test_delayed.py"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_delayed.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    # ... and it replays beside the built-ins, as the policies page says.
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival,model,service\n0,a,1\n0.5,b,1\n1,a,1\n4,b,1\n")
    command = [sys.executable, "-m", "llmux", "simulate", "--trace", str(trace)]
    command += ["--switch-cost", "2", "--policy", "adaptive", "delayed.py:Delayed"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split()[0] for line in run.stdout.splitlines()[2:6]]
    assert rows == ["adaptive", "delayed.py:Delayed", "fifo", "exhaustive"], run.stdout


def _capacity_snapshot() -> Snapshot:
    """75 of capacity: a (30) and b (40) awake, c (40) waiting; a is busy, b idle."""
    views = {
        "a": ModelView("a", ModelState.ACTIVE, 0, None, 1, size=30, last_used=50.0),
        "b": ModelView("b", ModelState.ACTIVE, 0, None, 0, size=40, last_used=99.0),
        "c": ModelView("c", ModelState.ASLEEP, 1, 99.0, 0, size=40),
    }
    return Snapshot(100.0, views, "b", 0.0, False, {}, {}, capacity=75.0)


def test_evictions_weigh_recency_against_the_cost_of_waking_again():
    views = {
        name: ModelView(name, ModelState.ACTIVE, 0, None, 0, size=40, last_used=used)
        for name, used in (("a", 90.0), ("b", 98.0))
    }
    views["c"] = ModelView("c", ModelState.ASLEEP, 1, 99.0, 0, size=40)
    equal = Snapshot(100.0, views, "a", 0.0, False, {}, {}, capacity=80.0)
    assert default_evictions("c", equal) == ["a"]  # least recently used
    # a was used 10 s ago but takes 60 s to wake; b, used 2 s ago, wakes in 1 s: b goes.
    costly = Snapshot(100.0, views, "a", 0.0, False, {}, {}, 80.0, {"a": 60.0, "b": 1.0})
    assert default_evictions("c", costly) == ["b"]


def test_default_evictions_spare_busy_models_and_make_just_enough_room():
    snapshot = _capacity_snapshot()
    assert default_evictions("c", snapshot) == ["b"]  # b is idle, though used more recently
    assert default_evictions("a", snapshot) == []  # already awake: nothing to do


def test_a_policy_may_choose_evictions_and_a_wrong_choice_falls_back():
    class EvictBusy:
        def __init__(self, answer):
            self.answer = answer

        def decide(self, event, snapshot):
            return Stay()

        def evict(self, target, snapshot):
            return self.answer

    snapshot = _capacity_snapshot()
    assert choose_evictions(EvictBusy(["a", "b"]), "c", snapshot) == ["a", "b"]
    assert choose_evictions(EvictBusy(["a"]), "c", snapshot) == ["b"]  # 40 + 40 > 75
    assert choose_evictions(EvictBusy(["c"]), "c", snapshot) == ["b"]  # not an awake model
    chosen, problem = checked_evictions(EvictBusy(["a"]), "c", snapshot)
    assert chosen == ["b"] and problem is not None
    assert problem.problem == "evict answered ['a'], which does not make room for c"
