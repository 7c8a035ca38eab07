"""The adaptive default and the exhaustive reference: exhaustive service while the queue behind
is light, oldest-first once it is deep, a bound no steady stream can break, and fewer switches
than FIFO under overload."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmux.config import DEFAULT_POLICY
from llmux.policy import (
    BUILTIN_POLICIES,
    AdaptivePolicy,
    CallAt,
    ExhaustivePolicy,
    FifoPolicy,
    ModelState,
    ModelView,
    RequestArrived,
    Snapshot,
    Stay,
    SwitchTo,
    TimerFired,
)
from llmux.sim.simulator import Request, ServiceModel, Simulator
from llmux.sim.traces import constant_cost

PARALLEL = ServiceModel("parallel")


def simulate(policy, cost: float, requests, service: ServiceModel = PARALLEL):
    models = sorted({r.model for r in requests})
    return Simulator(requests, models, policy, constant_cost(cost), service).run()


def busy_a_with_b_waiting(now: float, waiting: int, oldest: float = 0.0) -> Snapshot:
    """`a` active since 0 with work in flight; `b` asleep with `waiting` requests."""
    views = {
        "a": ModelView("a", ModelState.ACTIVE, 0, None, in_flight=3),
        "b": ModelView("b", ModelState.ASLEEP, waiting, oldest, in_flight=0),
    }
    return Snapshot(now, views, "a", 0.0, False, {("a", "b"): 10.0}, {})


def test_adaptive_is_the_default_and_exhaustive_a_builtin():
    assert DEFAULT_POLICY == "adaptive"
    assert BUILTIN_POLICIES["adaptive"] is AdaptivePolicy
    assert BUILTIN_POLICIES["exhaustive"] is ExhaustivePolicy


def test_the_bound_shrinks_as_the_queue_behind_grows():
    policy = AdaptivePolicy()  # C = 10 s measured for a -> b
    # One waiting request: the active model may finish its burst, up to 12 C.
    assert policy.decide(RequestArrived("b"), busy_a_with_b_waiting(1.0, 1)) == CallAt(120.0)
    # 9 waiting: 24 C / 3 = 8 C.
    assert policy.decide(RequestArrived("b"), busy_a_with_b_waiting(1.0, 9)) == CallAt(80.0)
    # 100 waiting: never below 4 C.
    assert policy.decide(RequestArrived("b"), busy_a_with_b_waiting(1.0, 100)) == CallAt(40.0)
    assert policy.decide(TimerFired(), busy_a_with_b_waiting(40.0, 100)) == SwitchTo("b")
    # An idle active model is left at once; an active model keeps the GPU while nobody waits.
    idle = busy_a_with_b_waiting(1.0, 1)
    idle = Snapshot(1.0, {**idle.models, "a": ModelView("a", ModelState.ACTIVE, 0, None, 0)},
                    "a", 0.0, False, idle.switch_costs, {})  # fmt: skip
    assert policy.decide(RequestArrived("b"), idle) == SwitchTo("b")
    assert policy.decide(RequestArrived("b"), busy_a_with_b_waiting(1.0, 0)) == Stay()


def test_the_guard_keeps_a_fresh_model_serving_and_the_hard_bound_overrides_it():
    fresh = busy_a_with_b_waiting(45.0, 100, oldest=0.0)
    fresh = Snapshot(45.0, fresh.models, "a", 40.0, False, fresh.switch_costs, {})
    assert AdaptivePolicy().decide(TimerFired(), fresh) == CallAt(60.0)  # 40 + 2 C
    hard = AdaptivePolicy(max_wait_secs=50.0)  # stale at 50 - C = 40 s of waiting
    assert hard.decide(TimerFired(), fresh) == SwitchTo("b")


@pytest.mark.parametrize(
    "options",
    [{"min_wait_factor": 5, "max_wait_factor": 4}, {"guard_factor": -1}, {"max_wait_secs": 0},
     {"depth_factor": 0}],
)  # fmt: skip
def test_adaptive_refuses_bad_options(options):
    with pytest.raises(ValueError):
        AdaptivePolicy(**options)


def test_exhaustive_serves_until_idle_unless_a_request_is_past_max_wait():
    assert ExhaustivePolicy().decide(RequestArrived("b"), busy_a_with_b_waiting(500.0, 1)) == Stay()
    bounded = ExhaustivePolicy(max_wait_secs=30.0)
    assert bounded.decide(RequestArrived("b"), busy_a_with_b_waiting(1.0, 1)) == CallAt(30.0)
    assert bounded.decide(TimerFired(), busy_a_with_b_waiting(30.0, 1)) == SwitchTo("b")
    with pytest.raises(ValueError):
        ExhaustivePolicy(max_wait_secs=-1)


@settings(max_examples=150, deadline=None)
@given(
    stream_gap=st.floats(0.05, 1.0),
    service=st.floats(0.05, 1.0),
    others=st.lists(st.floats(1, 60), min_size=1, max_size=5),
    cost=st.floats(0.5, 5),
)
def test_a_steady_stream_cannot_starve_another_model(stream_gap, service, others, cost):
    """However busy `a` is, a request for `b` waits at most the bound with one request waiting
    (`max_wait_factor` switch costs) or the guard after a switch to `a` in progress, then the
    drain of `a`'s requests in flight and the switch itself."""
    stream = [Request(i * stream_gap, "a", service=service) for i in range(int(240 / stream_gap))]
    lone = [Request(at, "b", service=service) for at in others]
    policy = AdaptivePolicy(default_cost_secs=cost)
    result = simulate(policy, cost, [*stream, *lone])
    bound = max(policy.max_wait_factor * cost, cost + policy.guard_factor * cost)
    for served in (r for r in result.requests if r.model == "b"):
        assert served.started - served.arrival <= bound + service + cost + 1e-6


def test_without_the_bound_exhaustive_service_starves_the_same_request():
    stream = [Request(i * 0.1, "a", service=0.5) for i in range(2400)]
    lone = Request(5.0, "b", service=0.5)
    for policy, starved in (
        (ExhaustivePolicy(), True),
        (AdaptivePolicy(default_cost_secs=2), False),
    ):
        served = next(r for r in simulate(policy, 2.0, [*stream, lone]).requests if r.model == "b")
        assert (served.started - served.arrival > 200) is starved  # the stream lasts 240 s


@settings(max_examples=60, deadline=None)
@given(
    rates=st.lists(st.floats(0.2, 2.0), min_size=2, max_size=4),
    service=st.floats(0.5, 3.0),
    overload=st.floats(1.5, 3.0),
    cost=st.floats(1.0, 10.0),
    seed=st.integers(0, 1000),
    kind=st.sampled_from(["sequential", "batching"]),
)
def test_under_overload_it_switches_no_more_than_fifo(rates, service, overload, cost, seed, kind):
    """While requests come faster than one GPU serves them (the first 600 s), every request
    goes stale: a plain staleness bound would switch at every chance (thrash); the guard keeps
    the adaptive policy at FIFO's switch rate or below. With a batching GPU, whose drains are
    short, FIFO switches at every chance and the adaptive policy strictly less; with one request
    at a time, both wait out the same long drains and switch about as often: hypothesis found a
    run where the staleness bound fired once where FIFO's gate had not (10 switches against 9),
    so there the claim is "at most one more", which still tells no thrashing apart."""

    rng = random.Random(seed)
    scale = overload / (sum(rates) * service)  # offered load `overload` on a sequential GPU
    requests = []
    for index, rate in enumerate(rates):
        at = 0.0
        while (at := at + rng.expovariate(rate * scale)) < 600.0:
            tokens = max(1, round(service / 0.02))
            requests.append(Request(at, f"m{index}", service, 200, tokens))
    requests.sort(key=lambda r: r.arrival)
    fifo = simulate(FifoPolicy(), cost, requests, ServiceModel(kind))
    adaptive = simulate(AdaptivePolicy(default_cost_secs=cost), cost, requests, ServiceModel(kind))
    fifo_rate, adaptive_rate = (sum(at < 600.0 for *_, at in r.switches) for r in (fifo, adaptive))
    if kind == "batching":
        assert adaptive_rate < fifo_rate
    else:
        assert adaptive_rate <= fifo_rate + 1
