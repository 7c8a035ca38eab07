"""A short chaos run in CI, through real sockets, hooks and a killed backend (the soak runs
longer: python -m tests.chaos --requests 2000). The rules themselves are proven faster and
harder by the stateful test of the core (tests/test_core.py)."""

from __future__ import annotations

from tests.chaos import run_chaos


async def test_chaos_short_seed_loses_nothing(tmp_path):
    report = await run_chaos(tmp_path, requests=100, seed=1)
    print(report.summary())
    assert report.violations == []
    assert report.outcomes["ok"] > 20
    assert report.faults["wake_failed"] + report.faults["wake_hung_and_killed"] > 0
    assert report.faults["backend_killed_mid_stream"] == 1


async def test_chaos_with_groups_and_capacity_loses_nothing(tmp_path):
    report = await run_chaos(tmp_path, requests=70, seed=2, grouped=True)
    print(report.summary())
    assert report.violations == []
    assert report.outcomes["ok"] > 15
    assert report.faults["wake_failed"] + report.faults["wake_hung_and_killed"] > 0


async def test_chaos_with_servers_llmux_starts_loses_nothing(tmp_path):
    """kind = "vllm" + cmd: busy servers killed with SIGKILL are noticed and started again on
    demand, and none outlives llmux."""
    report = await run_chaos(tmp_path, requests=100, seed=3, servers=True)
    print(report.summary())
    assert report.violations == []
    assert report.outcomes["ok"] > 20
    assert report.faults["server_killed_mid_stream"] >= 1


async def test_chaos_with_two_workers_loses_nothing(tmp_path):
    """The same run with `[server] workers = 2`, and one worker SIGKILLed mid-run: what it
    held is released, it is started again, and none outlives llmux."""
    report = await run_chaos(tmp_path, requests=100, seed=1, workers=2)
    print(report.summary())
    assert report.violations == []
    assert report.outcomes["ok"] > 20
    assert report.faults["worker_killed"] == 1
    assert report.faults["backend_killed_mid_stream"] == 1
