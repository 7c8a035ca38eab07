"""A short chaos run in CI (the soak runs longer: python -m tests.chaos --requests 2000)."""

from __future__ import annotations

from tests.chaos import run_chaos


async def test_chaos_short_seed_loses_nothing(tmp_path):
    report = await run_chaos(tmp_path, requests=300, seed=1)
    print(report.summary())
    assert report.violations == []
    assert report.outcomes["ok"] > 150
    assert report.faults["wake_failed"] + report.faults["wake_hung_and_killed"] > 0
    assert report.faults["backend_killed_mid_stream"] == 1


async def test_chaos_with_groups_and_capacity_loses_nothing(tmp_path):
    report = await run_chaos(tmp_path, requests=200, seed=2, grouped=True)
    print(report.summary())
    assert report.violations == []
    assert report.outcomes["ok"] > 100
    assert report.faults["wake_failed"] + report.faults["wake_hung_and_killed"] > 0
