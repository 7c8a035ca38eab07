"""Structured log events: stable names and fields, text and JSON formats, request log switch."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import trio

from llmux.observe.logs import JsonFormatter, TextFormatter, log_event
from tests.conftest import (
    LlmuxProcess,
    chat,
    fake_model_block,
    llmux_running,
    one_process_only,
    write_config,
)


def events(caplog) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for record in caplog.records:
        if getattr(record, "event", None):
            found.setdefault(record.event, []).append(record.fields)
    return found


@one_process_only("request lines are logged by the worker processes, not in this one")
async def test_switch_hook_and_request_events_carry_their_fields(fakes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a"))
        await client.post("/v1/chat/completions", json=chat("b"))
    found = events(caplog)
    assert {"from": "a", "to": "b", "evicting": ["a"]} in found["switch_started"]
    activated = next(f for f in found["model_activated"] if f["model"] == "b")
    assert activated["from"] == "a" and activated["switch_seconds"] >= activated["cost_seconds"] > 0
    wakes = [f for f in found["hook_completed"] if f["hook"] == "wake"]
    assert {f["model"] for f in wakes} == {"a", "b"} and all(f["exit_code"] == 0 for f in wakes)
    requests = [f for f in found["request"] if f["model"] == "b"]
    assert requests[0]["status"] == 200 and requests[0]["queue_wait"] > 0
    assert requests[0]["path"] == "/v1/chat/completions" and requests[0]["duration"] > 0


async def test_failure_events(fakes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    a, b = fakes.start("a", "b", wake_delay=0.05)
    blocks = fake_model_block(a, wake="echo no-gpu >&2; exit 4", sleep="true") + fake_model_block(
        b, wake="sleep 5", wake_timeout_secs=0.3, sleep="true"
    )
    path = write_config(tmp_path, blocks, policy={"request_timeout_secs": 0.2})
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a"))
        await trio.sleep(2.1)  # the backoff after a failed switch
        await client.post("/v1/chat/completions", json=chat("b"))
        await trio.sleep(1.5)
    found = events(caplog)
    failed = found["hook_failed"][0]
    assert failed["model"] == "a" and failed["exit_code"] == 4 and "no-gpu" in failed["stderr_tail"]
    assert {"model": "b", "hook": "wake"}.items() <= found["hook_timeout"][0].items()
    reasons = {(f["to"], f["reason"]) for f in found["switch_failed"]}
    assert ("a", "wake_failed") in reasons and ("b", "wake_failed") in reasons
    assert found["request_timeout"][0]["model"] in ("a", "b")


async def test_dead_model_event(fakes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a), defaults={"alive_interval_secs": 0.2})
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a"))
        await trio.to_thread.run_sync(lambda: httpx.post(a.url + "/fake/sleep"))
        await trio.sleep(1.0)
    assert events(caplog)["model_dead"] == [{"model": "a"}]


def test_formats():
    logger = logging.getLogger("llmux.test")
    record = logger.makeRecord("llmux.test", logging.INFO, "f", 1, "a -> b", (), None)
    record.event = "switch_started"
    record.fields = {"from": "a", "to": "b", "took": 1.23456, "stderr_tail": "x y"}
    payload = json.loads(JsonFormatter().format(record))
    assert (
        payload["event"] == "switch_started"
        and payload["from"] == "a"
        and payload["took"] == 1.23456
    )
    assert payload["message"] == "a -> b" and payload["level"] == "info"
    text = TextFormatter().format(record)
    assert text.endswith('[switch_started from=a to=b took=1.235 stderr_tail="x y"]')
    assert callable(log_event)


def test_json_logs_from_a_real_process_and_access_log_switch(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    for access_log in (True, False):
        path = write_config(tmp_path, fake_model_block(a), server={"access_log": access_log})
        llmux = LlmuxProcess(path, "--log-format=json")
        try:
            response = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), timeout=10)
            assert response.status_code == 200
            time.sleep(0.2)
        finally:
            code = llmux.stop()
        lines = [json.loads(line) for line in llmux.lines]  # every line is one JSON object
        names = [line["event"] for line in lines]
        assert "model_activated" in names or "switch_started" in names
        assert ("request" in names) is access_log
        assert code == 0


def test_no_client_or_hook_text_can_forge_a_log_line(fakes, tmp_path):
    """Paths, model names and hook output carry CR, LF and ESC: each record stays one line."""
    (a,) = fakes.start("a", wake_delay=0.05)
    forged = r"printf 'ok\n2026-01-01 00:00:00,000 INFO llmux.access: FORGED\r\x1b[2K\n' >&2"
    path = write_config(tmp_path, fake_model_block(a, wake=f"{forged}; exit 3"))
    llmux = LlmuxProcess(path, "--log-level=debug")
    try:
        with httpx.Client(base_url=llmux.url, timeout=10) as client:
            client.post("/v1/chat/completions", json=chat("a"))  # the hook fails: 503
            client.post("/v1/chat/completions%0a2026-01-01%20FORGED", json=chat("a"))
            client.post("/v1/chat/completions", json=chat("a\n2026-01-01 FORGED\x1b[2K"))
        time.sleep(0.2)
    finally:
        llmux.stop()
    record_start = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")
    lines = llmux.log.rstrip("\n").split("\n")  # only LF ends a line; a CR would show below
    assert any("FORGED" in line for line in lines), "the hook's stderr is logged"
    for line in lines:
        assert record_start.match(line), line
        assert "\x1b" not in line and "\r" not in line
