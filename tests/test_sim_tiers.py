"""The simulator with step costs per model and sleep depth (`llmux simulate --costs`): each
sleep and wake costs what the file says for its depth, a first wake is a cold start, host RAM
bounds level-1 sleepers, and the shipped profiles name their sources."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmux.policy import FifoPolicy
from llmux.sim.simulator import Request, ServiceModel, Simulator, Tiers
from llmux.sim.tier_costs import CostsFileError, load_costs
from llmux.sim.traces import constant_cost

COSTS = """
name = "test"
[default]
sleep = { 1 = 3.0, 2 = 1.0 }
wake = { 1 = 0.5, 2 = 2.0 }
cold_start = 5.0
weights_gb = 10.0
[models.b]
wake = { 1 = 0.25, 2 = 4.0 }
"""


def _costs(tmp_path, text=COSTS):
    path = tmp_path / "costs.toml"
    path.write_text(text)
    return load_costs(path)


def _run(requests, tiers):
    models = sorted({r.model for r in requests})
    service = ServiceModel("sequential")
    simulator = Simulator(requests, models, FifoPolicy(), constant_cost(99.0), service, tiers=tiers)
    return simulator.run()


def _latencies(result):
    return [round(r.latency, 6) for r in sorted(result.requests, key=lambda r: r.arrival)]


# a, then b long after, then a again: a cold start each first time, then a switch back.
ALTERNATING = [Request(0.0, "a", 1.0), Request(100.0, "b", 1.0), Request(200.0, "a", 1.0)]


def test_each_step_costs_what_the_file_says_for_its_depth(tmp_path):
    costs = _costs(tmp_path)
    # Level 1: a's cold start; a's sleep (3) then b's cold start; b's sleep (3), a's wake (0.5).
    level1 = _run(ALTERNATING, Tiers(costs, 1))
    assert _latencies(level1) == [6.0, 9.0, 4.5]
    assert level1.sleeps == {1: 2} and level1.cold_starts == 2
    # Level 2: sleeps of 1, a's wake from level 2 takes 2; b's own figures override the default.
    level2 = _run(ALTERNATING, Tiers(costs, 2))
    assert _latencies(level2) == [6.0, 7.0, 4.0]
    again = [*ALTERNATING, Request(300.0, "b", 1.0)]
    assert _latencies(_run(again, Tiers(costs, 2)))[-1] == 1.0 + 4.0 + 1.0
    assert _latencies(_run(again, Tiers(costs, 1)))[-1] == 3.0 + 0.25 + 1.0
    # The old cost function (99 s per switch) is not used once steps are costed.
    assert max(_latencies(level1)) < 99


def test_host_ram_bounds_level_1_sleepers_and_the_rest_sleep_at_level_2(tmp_path):
    costs = _costs(tmp_path)
    requests = [Request(t * 50.0, m, 1.0) for t, m in enumerate("abcabcabc")]
    free = _run(requests, Tiers(costs, 1))
    # At a switch the victim sleeps before the target wakes: all three hold their weights.
    assert free.peak_host_ram_gb == 30.0 and free.sleeps == {1: 8}
    bounded = _run(requests, Tiers(costs, 1, host_ram_gb=10.0))
    assert bounded.peak_host_ram_gb <= 10.0
    assert bounded.sleeps.get(1) and bounded.sleeps.get(2), "some sleeps went to level 2"
    auto = _run(requests, Tiers(costs, "auto", host_ram_gb=10.0))
    assert auto.peak_host_ram_gb <= 10.0
    assert sum(auto.sleeps.values()) == 8


def test_a_ttl_puts_idle_models_to_sleep_in_the_simulation(tmp_path):
    costs = _costs(tmp_path)
    requests = [Request(0.0, "a", 1.0), Request(100.0, "a", 1.0)]
    kept = _run(requests, Tiers(costs, 2))
    slept = _run(requests, Tiers(costs, 2, ttl_secs=10.0))
    assert kept.sleeps == {} and _latencies(kept)[-1] == 1.0
    assert slept.sleeps == {2: 2} and _latencies(slept)[-1] == 2.0 + 1.0  # asleep after each


def test_the_shipped_profiles_carry_their_figures_and_sources():
    a, b = load_costs("A"), load_costs("b")
    assert (a.default.sleep, a.default.wake) == ({1: 10.57, 2: 0.31}, {1: 2.19, 2: 6.53})
    assert (b.default.sleep, b.default.wake) == ({1: 35.9, 2: 0.3}, {1: 1.2, 2: 8.2})
    assert "48337" in a.source and "validate" in b.source


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("name = 'x'", "no [default] table"),
        (COSTS.replace("cold_start = 5.0\n", ""), "cold_start is missing"),
        (COSTS.replace("{ 1 = 3.0, 2 = 1.0 }", "{ 1 = 3.0 }"), "default.sleep"),
        (COSTS.replace("weights_gb = 10.0", "weights_gb = -1"), "a number from 0 to 1e"),
        (COSTS.replace("cold_start = 5.0", "cold_start = inf"), "a number from 0 to 1e"),
        (COSTS.replace("{ 1 = 3.0, 2 = 1.0 }", "{ 1 = 1e300, 2 = 1.0 }"), "default.sleep.1"),
        ("models = [1]\n" + COSTS.replace("[models.b]", "[other]"), "unknown key 'other'"),
        ("models = 'x'\n" + COSTS.split("[models.b]")[0], "models: [models.NAME]"),
        (COSTS.replace("[models.b]", "[models.b]\nsleeps = 1"), "unknown key 'sleeps'"),
        ("[default", "not valid TOML"),
    ],
)
def test_a_bad_costs_file_is_named_with_what_is_wrong(tmp_path, text, says):
    with pytest.raises(CostsFileError, match=says.replace("[", r"\[")):
        _costs(tmp_path, text)


def test_simulate_with_costs_compares_the_depths(tmp_path):
    trace = tmp_path / "trace.csv"
    rows = [f"{t * 40.0},{m},1.0" for t, m in enumerate("abcabcabcabc")]
    trace.write_text("arrival,model,service\n" + "\n".join(rows) + "\n")
    base = [sys.executable, "-m", "llmux", "simulate", "--trace", str(trace)]
    run = subprocess.run(
        [*base, "--costs", "A", "--host-ram", "22", "--ttl", "10"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = {line[:9].strip(): line for line in run.stdout.splitlines()}
    assert "48337" in run.stdout and "host RAM 22 GiB" in run.stdout
    assert "(over)" in lines["L1"], "fixed level 1 needs more host RAM than 22 GiB"
    for within in ("L2", "auto"):
        assert "(over)" not in lines[within]
    bad = subprocess.run(
        [*base, "--costs", str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "cannot read costs file" in bad.stderr
