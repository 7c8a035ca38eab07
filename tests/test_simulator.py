"""The simulator and the cost-aware policy: the same decisions as the live switcher, every
request served, a starvation bound that holds, and the faithful FIFO's gating."""

from __future__ import annotations

import logging

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from llmux.policy import (
    AdaptivePolicy,
    CostAwarePolicy,
    ExhaustivePolicy,
    FifoPolicy,
    RequestArrived,
    Stay,
)
from llmux.sim.simulator import Request, ServiceModel, Simulator, StrandedRequests
from llmux.sim.traces import constant_cost
from tests.conftest import chat, fake_model_block, llmux_running, write_config

TOKEN_SECS = 0.02
# (arrival s, model, tokens): interleaved so that FIFO's gating decides the order of switches.
SCENARIO = [
    (0.0, "a", 10), (0.1, "b", 5), (0.2, "a", 5), (0.3, "c", 5), (0.35, "b", 5),
    (2.5, "c", 10), (2.6, "a", 5), (2.7, "b", 5), (2.8, "c", 5),
    (5.0, "b", 5), (5.1, "a", 5), (5.15, "b", 5),
]  # fmt: skip
# `a` busy while `b` waits: FIFO switches away and back, cost_aware serves `a` until it is idle.
# No decision falls near one of cost_aware's timers (quantum 8 s, staleness 6 s).
SCENARIO_HOLD = [
    (0.0, "a", 10), (0.3, "a", 20), (0.5, "b", 5), (0.6, "a", 20), (0.9, "a", 20),
    (1.2, "a", 20), (1.5, "a", 20), (1.8, "a", 20),
    (5.0, "b", 50), (5.2, "c", 5), (5.4, "a", 5), (5.5, "c", 5),
]  # fmt: skip
HOLD_OPTIONS = {"default_cost_secs": 2.0}
# Two of three 40 GB models fit in 80 GB: `b` wakes beside `a` without a switch; then each
# newcomer evicts the least recently used awake model.
SCENARIO_CAPACITY = [
    (0.0, "a", 5), (0.1, "a", 5), (0.2, "a", 5), (0.25, "a", 5), (0.3, "b", 5),
    (1.0, "c", 5), (2.0, "b", 5), (3.0, "c", 5), (3.1, "a", 5),
]  # fmt: skip
SIZES = {"a": 40.0, "b": 40.0, "c": 40.0}  # with capacity 80, two fit; with 120, all three


PARALLEL = ServiceModel("parallel")


def simulate(
    policy, cost: float, requests, service: ServiceModel = PARALLEL, capacity: float | None = None
):
    models = sorted({r.model for r in requests})
    sizes = SIZES if capacity else None
    return Simulator(
        requests, models, policy, constant_cost(cost), service, capacity=capacity, sizes=sizes
    ).run()


@pytest.mark.parametrize("policy", ["fifo"])  # the others: tests/test_driver.py, on a virtual clock
async def test_live_switcher_and_simulator_agree_on_the_switches(
    fakes, tmp_path, caplog, policy: str
):
    scenario = {"fifo": SCENARIO, "cost_aware": SCENARIO_HOLD}.get(policy, SCENARIO_CAPACITY)
    capacity = 80.0 if policy == "fifo with capacity" else None
    caplog.set_level(logging.INFO)
    backends = fakes.start(
        "a", "b", "c", wake_delay=0.0, sleep_delay=0.0, token_interval=TOKEN_SECS
    )
    sizes = {"memory_gb": 40} if capacity else {}
    blocks = "".join(
        fake_model_block(f, wake=f"sleep 0.3; {f.ctl('wake')}", **sizes) for f in backends
    )
    if capacity:
        blocks = f'[groups.gpu]\ncapacity = {capacity:g}\nmodels = ["a", "b", "c"]\n' + blocks
    if policy == "cost_aware":
        options = "".join(f"{key} = {value}\n" for key, value in HOLD_OPTIONS.items())
        blocks = "[policy.options]\n" + options + blocks
    path = write_config(tmp_path, blocks, policy={"name": policy.split()[0]})
    async with llmux_running(path) as (_, client):
        started = trio.current_time()

        async def send(at: float, model: str, tokens: int) -> None:
            await trio.sleep_until(started + at)
            response = await client.post(
                "/v1/chat/completions", json=chat(model, max_tokens=tokens)
            )
            assert response.status_code == 200

        async with trio.open_nursery() as nursery:
            for at, model, tokens in scenario:
                nursery.start_soon(send, at, model, tokens)
    live = [
        (r.fields["from"], r.fields["to"])
        for r in caplog.records
        if getattr(r, "event", None) == "model_activated" and "to" in r.fields
    ]
    measured = [
        r.fields["cost_seconds"]
        for r in caplog.records
        if getattr(r, "event", None) == "model_activated" and "cost_seconds" in r.fields
    ]
    requests = [Request(at, model, service=tokens * TOKEN_SECS) for at, model, tokens in scenario]
    chosen = CostAwarePolicy(**HOLD_OPTIONS) if policy == "cost_aware" else FifoPolicy()
    cost = sum(measured) / len(measured)
    result = simulate(chosen, cost, requests, capacity=capacity)
    simulated = [(source or "idle", target) for source, target, _ in result.switches]
    assert live == simulated, (live, simulated)
    assert len(live) >= 4
    if policy == "cost_aware":  # the scenario tells the policies apart
        fifo = [(s or "idle", t) for s, t, _ in simulate(FifoPolicy(), cost, requests).switches]
        assert fifo != simulated


def test_fifo_releases_every_waiting_request_with_one_switch():
    # Gated, not global FCFS: a b a b ... arriving while a serves costs one switch to b, not four.
    requests = [Request(0.0, "a", service=1.0)]
    requests += [Request(0.1 + 0.01 * i, "ab"[i % 2], service=0.1) for i in range(8)]
    result = simulate(FifoPolicy(), 5.0, requests, ServiceModel("sequential"))
    assert [target for _, target, _ in result.switches] == ["a", "b"]
    assert all(r.finished is not None for r in result.requests)


traces_strategy = st.lists(
    st.tuples(st.floats(0, 60), st.sampled_from(["a", "b", "c"]), st.floats(0.05, 3)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    trace=traces_strategy,
    cost=st.floats(0, 5),
    kind=st.sampled_from(["parallel", "sequential", "batching"]),
    capacity=st.sampled_from([None, 80.0, 120.0]),
)
def test_every_request_is_served_once(trace, cost, kind, capacity):
    """Whatever the trace, every request is served, once, and never by a model that is not
    awake: with a capacity, the awake models' sizes never exceed it."""
    requests = [
        Request(at, model, service=s, prompt_tokens=100, output_tokens=max(1, int(s * 20)))
        for at, model, s in trace
    ]
    policies = (
        FifoPolicy(),
        CostAwarePolicy(max_wait_secs=20),
        AdaptivePolicy(),
        ExhaustivePolicy(),
    )
    for policy in policies:
        result = simulate(policy, cost, requests, ServiceModel(kind), capacity=capacity)
        assert len(result.requests) == len(requests)
        assert all(r.finished is not None and r.finished >= r.arrival for r in result.requests)
        assert result.peak_held <= (capacity or 1.0) + 1e-9


@settings(max_examples=150, deadline=None)
@given(
    stream_gap=st.floats(0.05, 1.0),
    service=st.floats(0.05, 1.0),
    other_at=st.floats(1, 30),
    cost=st.floats(0.5, 5),
    max_wait=st.floats(1, 20),
)
def test_max_wait_bounds_a_request_against_a_steady_stream(
    stream_gap, service, other_at, cost, max_wait
):
    """A never-ending stream to `a` must not starve one request for `b`: it waits at most the
    bound, or else the rest of a switch in progress and the guard (the active model serves
    `guard_factor` switch costs first), then the drain and the switch itself."""
    stream = [Request(i * stream_gap, "a", service=service) for i in range(int(120 / stream_gap))]
    lone = Request(other_at, "b", service=service)
    # The guard uses the policy's cost estimate: here the true cost, as after one measurement.
    policy = CostAwarePolicy(
        quantum_factor=1000, wait_factor=None, max_wait_secs=max_wait, default_cost_secs=cost
    )
    result = simulate(policy, cost, [*stream, lone])
    served = next(r for r in result.requests if r.model == "b")
    guard = policy.guard_factor * cost
    assert served.started - served.arrival <= max(max_wait, cost + guard) + service + cost + 1e-6


def test_without_the_bound_the_same_stream_starves_the_request():
    stream = [Request(i * 0.1, "a", service=0.5) for i in range(1200)]
    lone = Request(5.0, "b", service=0.5)
    result = simulate(
        CostAwarePolicy(quantum_factor=1000, wait_factor=None, max_wait_secs=None),
        2.0,
        [*stream, lone],
    )
    served = next(r for r in result.requests if r.model == "b")
    assert served.started - served.arrival > 100  # it waits out the whole stream


def test_a_policy_that_strands_requests_is_reported():
    class SwitchOnlyOnArrival:
        """Forgets a request that arrives during a switch (answers Stay when it completes)."""

        def decide(self, event, snapshot):
            fifo = FifoPolicy().decide(event, snapshot)
            return fifo if isinstance(event, RequestArrived) else Stay()

    requests = [Request(0.0, "a", service=1.0), Request(0.5, "b", service=1.0)]
    with pytest.raises(StrandedRequests, match=r"left 1 of 2 requests unserved .*'b'"):
        simulate(SwitchOnlyOnArrival(), 2.0, requests)


def policy_row(printed: str, policy: str) -> list[str]:
    """The columns of `policy`'s row in `llmux simulate`'s table."""
    for line in printed.splitlines():
        if line.split()[:1] == [policy]:
            return line.split()
    raise AssertionError(f"no row for {policy!r} in:\n{printed}")


def test_simulate_cli_with_groups_and_capacity(tmp_path):
    import subprocess
    import sys

    trace = tmp_path / "trace.csv"
    rows = [f"{i * 0.5},{'abc'[i % 3]},0.2" for i in range(60)]
    trace.write_text("arrival,model,service\n" + "\n".join(rows) + "\n")
    base = [sys.executable, "-m", "llmux", "simulate", "--trace", str(trace), "--policy", "fifo"]
    base += ["--switch-cost", "0.1"]  # cheap: FIFO switches for nearly every request

    def switches(*extra: str) -> int:
        run = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return int(policy_row(run.stdout, "fifo")[5])  # the fifo row's switch count

    one_at_a_time = switches()
    all_fit = switches("--capacity", "3", "--sizes", "a=1,b=1,c=1")
    three_gpus = switches("--groups", "3")
    assert one_at_a_time > 30 and all_fit == 3 and three_gpus == 3
    refused = subprocess.run([*base, "--sizes", "a=1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--sizes needs --capacity" in refused.stderr


def test_simulate_runs_out_of_the_box_on_its_shipped_sample(tmp_path):
    import subprocess
    import sys

    from llmux.sim.sample_trace import main as write_sample
    from llmux.sim.sample_trace import sample_path

    # The shipped file is what its generator makes (seeded), so it can be rebuilt and trusted.
    out = tmp_path / "again.csv"
    with open(out, "w") as handle:
        saved, sys.stdout = sys.stdout, handle
        try:
            write_sample()
        finally:
            sys.stdout = saved
    assert out.read_text() == sample_path().read_text()
    run = subprocess.run(
        [sys.executable, "-m", "llmux", "simulate", "--policy", "fifo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("475 requests, 3 models, offered load 0.62")
    missing = subprocess.run(
        [sys.executable, "-m", "llmux", "simulate", "--trace", "azure", "--traces-dir", "."],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "the azure trace is not shipped with llmux: get it from https://github.com/Azure" in (
        missing.stderr
    )


def test_simulate_measures_every_policy_against_the_best_simple_one(tmp_path):
    import subprocess
    import sys

    # A steady stream on `a` and a trickle on `b`, with switches that cost 5 s.
    rows = [f"{i * 0.7:.1f},a,0.5" for i in range(300)] + [
        f"{i * 9.0:.1f},b,0.5" for i in range(23)
    ]
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival,model,service\n" + "\n".join(rows) + "\n")
    command = [sys.executable, "-m", "llmux", "simulate", "--trace", str(trace)]
    run = subprocess.run(
        [*command, "--switch-cost", "5"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    table = {name: policy_row(run.stdout, name) for name in ("adaptive", "fifo", "exhaustive")}
    mean = {name: float(cols[1]) for name, cols in table.items()}
    p99 = {name: float(cols[3]) for name, cols in table.items()}
    best_mean, best_p99 = min(mean["fifo"], mean["exhaustive"]), min(p99["fifo"], p99["exhaustive"])
    for name, cols in table.items():  # mean/best and p99/best (from figures printed to 0.1 s)
        assert float(cols[9]) == pytest.approx(mean[name] / best_mean, rel=0.03)
        assert float(cols[10]) == pytest.approx(p99[name] / best_p99, rel=0.03)
    best_line = next(line for line in run.stdout.splitlines() if line.startswith("best simple"))
    winner = min(("fifo", "exhaustive"), key=mean.get)
    assert f"mean {best_mean:.1f} ({winner})" in best_line, run.stdout


def test_the_onoff_trace_is_seeded_bursty_and_heavy_tailed():
    import itertools

    from llmux.sim.onoff import OFF_SCALE_SECS, TENANTS, on_off_requests

    first, again, other = (
        on_off_requests(1, hours=2),
        on_off_requests(1, hours=2),
        on_off_requests(2, hours=2),
    )
    assert [(r.arrival, r.model) for r in first] == [(r.arrival, r.model) for r in again]
    assert [(r.arrival, r.model) for r in first] != [(r.arrival, r.model) for r in other]
    assert {r.model for r in first} == {name for name, *_ in TENANTS}
    for name, rate, *_ in TENANTS:  # each tenant pauses for longer than its bursts' gaps
        times = [r.arrival for r in first if r.model == name]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) > OFF_SCALE_SECS > 10 / rate
    services = sorted(r.service for r in first)
    median, p99 = services[len(services) // 2], services[int(len(services) * 0.99)]
    assert p99 > 8 * median  # a few requests cost many times the typical one


def test_a_long_policy_name_keeps_the_report_s_columns_apart():
    from llmux.sim.simulate import Summary, render

    def summary(policy: str) -> Summary:
        return Summary(policy, 10, 2.0, 1.0, 3.0, 4.0, {"chat": 3.0}, 2, 0.5, 1.2)

    long = "delayed.py:Delayed"
    lines = render([summary("fifo"), summary(long)]).splitlines()
    row = next(line for line in lines if line.startswith(long))
    assert row.split()[0] == long and row.split()[1] == "2.0"
    assert any(line.split()[:2] == [long, "chat"] for line in lines)
