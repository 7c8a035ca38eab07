"""`llmux top`: frames rendered from a real llmux's metrics, `--once` end to end, quantiles."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from functools import partial

import pytest
import trio
from rich.console import Console

from llmux.observe.top import Dashboard, Poll, _quantile
from llmux.testing.fake_nvml import FAKE_NVML_ENV, write_fake_nvml
from tests.conftest import PYTHON, chat, fake_model_block, llmux_running, write_config


def render(dashboard: Dashboard, width: int = 80) -> str:
    console = Console(record=True, width=width, height=24, color_system=None)
    console.print(dashboard.render(console.width))
    return console.export_text()


async def _switched_llmux(fakes, tmp_path, extra_blocks: str = ""):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b) + extra_blocks)
    return path


async def test_frame_from_a_real_llmux_shows_state_rates_costs_and_switches(fakes, tmp_path):
    path = await _switched_llmux(fakes, tmp_path)
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        first = (await client.get("/metrics")).text
        for _ in range(4):
            await client.post("/v1/chat/completions", json=chat("b", max_tokens=1))
        second = (await client.get("/metrics")).text
    dashboard = Dashboard("http://127.0.0.1:3000")
    dashboard.update(Poll.parse(first, 1000.0))
    dashboard.update(Poll.parse(second, 1002.0))
    frame = render(dashboard)
    lines = frame.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    assert "active b" in frame
    model_lines = frame.split("switch cost EMA")[0].splitlines()
    table = {
        line.split()[0]: line.split() for line in model_lines if line.split()[:1] in (["a"], ["b"])
    }
    assert table["b"][1] == "active" and table["a"][1] == "asleep"
    assert table["b"][4] == "2.0", "4 requests over 2 s between polls"
    assert "switch a→b ok" in frame and "switch idle→a ok" in frame
    # Stamped with the time llmux recorded for the switch, not the time of the poll (1000 s).
    ended = Poll.parse(second, 0).value("llmux_switch_last_time_seconds", to="b")
    assert ended and f"{time.strftime('%H:%M:%S', time.localtime(ended))} switch a→b" in frame
    cost_rows = [line for line in lines if line.startswith("a ") and "·" in line]
    assert cost_rows, frame


async def test_once_prints_the_active_model_and_latest_switch(fakes, tmp_path):
    path = await _switched_llmux(fakes, tmp_path)
    async with llmux_running(path) as (server, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        await client.post("/v1/chat/completions", json=chat("b", max_tokens=1))
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [PYTHON, "-m", "llmux", "top", "--once", "--url", server.url, "--interval", "0.2"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        )
    assert result.returncode == 0, result.stderr
    assert "active b" in result.stdout
    assert "switch a→b ok" in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


async def test_once_on_a_narrow_terminal_fits_it(fakes, tmp_path):
    """In a terminal, `--once` draws for the terminal's width (in a pipe, for 80 columns)."""
    import fcntl
    import struct
    import termios

    path = await _switched_llmux(fakes, tmp_path)
    async with llmux_running(path) as (server, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        leader, follower = os.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
        try:
            args = [PYTHON, "-m", "llmux", "top", "--once", "--url", server.url]
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            code = await trio.to_thread.run_sync(
                lambda: subprocess.run(args, stdout=follower, env=env, timeout=30).returncode
            )
            os.close(follower)
            output = b""
            while chunk := _read_available(leader):
                output += chunk
        finally:
            os.close(leader)
    lines = output.decode().replace("\r", "").splitlines()
    assert code == 0 and any(line.startswith("model ") for line in lines), lines
    assert max(len(line) for line in lines) <= 50, lines


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end is closed and everything was read
        return b""


def test_once_against_nothing_says_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [PYTHON, "-m", "llmux", "top", "--once", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"llmux top: http://127.0.0.1:{port} is unreachable (connection refused)"
    )


def test_url_may_be_host_port_or_the_api_url():
    from llmux.observe.top import base_url

    assert base_url("127.0.0.1:3000") == "http://127.0.0.1:3000"
    assert base_url("http://gpu-box:3000/v1") == "http://gpu-box:3000"
    assert base_url("https://gpu-box/llmux/v1/") == "https://gpu-box/llmux"
    assert base_url("http://127.0.0.1:3000/") == "http://127.0.0.1:3000"
    result = subprocess.run(
        [PYTHON, "-m", "llmux", "top", "--once", "--url", "ftp://x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("llmux top: 'ftp://x' is not an http URL")


def _poll(start: float, at: float, requests: float, switch_state: str = "") -> Poll:
    text = (
        f"llmux_start_time_seconds {start}\n"
        f'llmux_model_state{{model="m",state="active"}} 1\n'
        f'llmux_requests_total{{model="m",status="200"}} {requests}\n'
        f"{switch_state}"
    )
    return Poll.parse(text, at)


def test_restart_is_noticed_and_counters_start_over():
    dashboard = Dashboard("u")
    dashboard.update(_poll(start=100, at=200, requests=500))
    dashboard.update(_poll(start=300, at=301, requests=3))
    frame = render(dashboard)
    assert "llmux restarted" in frame
    assert "-" in frame.split("m ", 1)[1]  # no rate from a poll before the restart


def test_switch_in_progress_shows_elapsed_time():
    dashboard = Dashboard("u")
    running = 'llmux_switch_in_progress{from="m",to="n"} 190\n'
    dashboard.update(_poll(start=100, at=200, requests=1, switch_state=running))
    assert "switching m → n (10s)" in render(dashboard)


def test_quantile_interpolates_inside_buckets_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)]
    assert _quantile(0.5, buckets) == pytest.approx(0.5)
    assert _quantile(0.25, buckets) == pytest.approx(0.3)
    assert _quantile(0.95, buckets) == pytest.approx(0.95)
    assert _quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


async def test_status_reports_a_switch_in_progress(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a, wake=f"sleep 1; {a.ctl('wake')}"))
    async with llmux_running(path) as (_, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/v1/chat/completions", json=chat("a")))
            await trio.sleep(0.5)
            during = (await client.get("/llmux/status")).json()
            nursery.cancel_scope.cancel()
        await client.post("/v1/chat/completions", json=chat("a"))
        after = (await client.get("/llmux/status")).json()
    assert during["state"] == "switching"
    assert during["switch"]["from"] == "idle" and during["switch"]["to"] == "a"
    assert during["models"]["a"]["state"] == "waking"
    assert after["state"] == "active" and after["active_model"] == "a"
    steps = after["models"]["a"].pop("steps")
    assert after["models"]["a"] == {
        "state": "active", "queue_depth": 0, "in_flight": 0, "last_alive": None, "port": a.port,
        "group": "default", "aliases": [], "slept_level": None, "start_backoff": None,
    }  # fmt: skip
    assert steps["sleep"] == {} and list(steps["wake"]) == ["1"]  # woken from level 1, measured
    assert 1.0 <= steps["wake"]["1"] < 5
    assert after["groups"] == {
        "default": {
            "capacity": None, "used": 1.0, "models": ["a"], "active_models": ["a"], "switch": None,
            "gpus": [], "gpu_free_gb": None, "gpu_total_gb": None,
        },
    }  # fmt: skip
    assert after["policy"]["name"] == "adaptive"
    assert [c["from"] for c in after["switch_costs"]] == ["idle"]
    assert after["version"] and after["uptime_seconds"] >= 0


async def test_grafana_dashboard_queries_only_metrics_llmux_exposes(fakes, tmp_path):
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/llmux.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\bllmux_[a-z_]+", expr)}
    path = await _switched_llmux(fakes, tmp_path)
    async with llmux_running(path) as (_, client):
        exposed_text = (await client.get("/metrics")).text
    families = set(re.findall(r"^# TYPE (llmux_[a-z_]+) (\w+)", exposed_text, re.M))
    exposed = set()
    for name, kind in families:
        exposed |= {name, name + "_total"} if kind == "counter" else {name}
        if kind == "histogram":
            exposed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert queried, "no queries found"
    assert queried <= exposed, queried - exposed


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("LLMUX_REQUIRE_PROMTOOL"),
    reason="promtool not installed (Debian package prometheus)",
)
async def test_promtool_finds_nothing_to_lint(fakes, tmp_path):
    path = await _switched_llmux(fakes, tmp_path)
    async with llmux_running(path) as (_, client):
        for model in ("a", "b", "nope"):
            await client.post("/v1/chat/completions", json=chat(model, max_tokens=1))
        text = (await client.get("/metrics")).text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", (
        result.stdout + result.stderr
    )


async def test_token_is_sent_from_flag_or_environment(nursery, tmp_path):
    """A /metrics behind a bearer token: top sends --token, or $LLMUX_TOKEN."""
    import hypercorn.trio
    from hypercorn.config import Config as HypercornConfig

    from llmux.http.asgi import answer_lifespan, send_bytes
    from llmux.observe.metrics import Metrics

    exposition = Metrics(["m"]).exposition()

    async def guarded(scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        authorized = (b"authorization", b"Bearer s3cret") in scope["headers"]
        body = exposition if authorized else b"no"
        await send_bytes(send, 200 if authorized else 401, body, b"text/plain")

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    urls = await nursery.start(
        lambda task_status: hypercorn.trio.serve(guarded, config, task_status=task_status)
    )

    def top(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
        args = [
            PYTHON,
            "-m",
            "llmux",
            "top",
            "--once",
            "--interval",
            "0.1",
            "--url",
            urls[0],
            *extra,
        ]
        return subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)

    without = {k: v for k, v in os.environ.items() if k != "LLMUX_TOKEN"}
    refused = await trio.to_thread.run_sync(lambda: top(env=without))
    assert refused.returncode == 1, refused.stdout
    assert refused.stdout == (
        f"llmux top: {urls[0]} wants one of its API keys (HTTP 401): give it with --token or "
        "$LLMUX_TOKEN\n"
    )
    wrong = await trio.to_thread.run_sync(lambda: top("--token", "guess", env=without))
    assert "refuses the API key top sent (HTTP 401; from --token or $LLMUX_TOKEN)" in wrong.stdout
    by_flag = await trio.to_thread.run_sync(top, "--token", "s3cret")
    assert by_flag.returncode == 0 and "idle" in by_flag.stdout
    by_env = await trio.to_thread.run_sync(lambda: top(env={**os.environ, "LLMUX_TOKEN": "s3cret"}))
    assert by_env.returncode == 0


def test_groups_get_a_line_each_and_a_column():
    text = "".join(
        f'llmux_group_model_info{{group="{g}",model="{m}"}} 1\n'
        f'llmux_model_state{{model="{m}",state="{state}"}} 1\n'
        for g, m, state in [
            ("gpu0", "a", "active"), ("gpu0", "b", "active"),
            ("gpu1", "c", "asleep"), ("gpu1", "d", "waking"),
        ]
    )  # fmt: skip
    text += 'llmux_group_capacity{group="gpu0"} 80\nllmux_group_used{group="gpu0"} 70\n'
    text += 'llmux_group_capacity{group="gpu1"} 1\nllmux_group_used{group="gpu1"} 1\n'
    text += 'llmux_switch_in_progress{from="idle",to="d"} 195\nllmux_start_time_seconds 100\n'
    dashboard = Dashboard("u")
    dashboard.update(Poll.parse(text, 200))
    frame = render(dashboard)
    assert "gpu0 70/80  active a, b" in frame
    assert "gpu1 1/1  switching idle → d (5s)" in frame
    row = next(line for line in frame.splitlines() if line.lstrip().startswith("c "))
    assert "gpu1" in row and "asleep" in row


def test_a_model_whose_server_failed_to_start_shows_its_back_off():
    text = "".join(
        f'llmux_model_state{{model="{m}",state="asleep"}} 1\n'
        f'llmux_model_start_backoff_seconds{{model="{m}"}} {left}\n'
        for m, left in [("a", 7.2), ("b", 0)]
    )
    dashboard = Dashboard("u")
    dashboard.update(Poll.parse(text + "llmux_start_time_seconds 100\n", 200))
    rows = {line.split(" ")[0]: line for line in render(dashboard).splitlines()}
    assert "backoff 8s" in rows["a"], "refused until then: its state alone would not say why"
    assert "asleep" in rows["b"] and "backoff" not in rows["b"]


async def test_group_lines_show_free_gpu_memory_read_from_a_real_llmux(
    fakes, tmp_path, monkeypatch
):
    a, b = fakes.start("a", "b")
    groups = '[groups.gpus01]\nmodels = ["a"]\ngpus = [0, 1]\n'
    groups += '[groups.gpu2]\nmodels = ["b"]\ngpus = [2]\n'
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b) + groups)
    nvml = tmp_path / "gpus.json"
    write_fake_nvml(nvml, (80, 12.5), (80, 80))  # GPU 2 is unknown to the driver
    monkeypatch.setenv(FAKE_NVML_ENV, str(nvml))
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        text = (await client.get("/metrics")).text
    dashboard = Dashboard("http://127.0.0.1:3000")
    dashboard.update(Poll.parse(text, time.time()))
    lines = render(dashboard).splitlines()
    assert "gpus01 1/1  active a  GPU 92.5/160 GiB free" in lines
    assert "gpu2 0/1  idle" in lines  # cannot tell: nothing said
    assert max(len(line) for line in lines) <= 80


def _busy_poll(at: float, requests: float, waits_fast: float, waits_slow: float) -> Poll:
    """A poll of one model: `requests` done, queue waits split between two buckets."""
    bucket = "llmux_request_queue_wait_seconds_bucket"
    text = (
        "llmux_start_time_seconds 1\n"
        'llmux_model_state{model="m",state="active"} 1\n'
        f'llmux_requests_total{{model="m",status="200"}} {requests}\n'
        f'{bucket}{{model="m",le="0.025"}} {waits_fast}\n'
        f'{bucket}{{model="m",le="5.0"}} {waits_fast + waits_slow}\n'
        f'{bucket}{{model="m",le="+Inf"}} {waits_fast + waits_slow}\n'
    )
    return Poll.parse(text, at)


def _row(frame: str, model: str) -> dict[str, str]:
    lines = frame.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    row = next(line for line in lines if line.startswith(model + " "))
    return dict(zip(header.split(), row.split(), strict=True))


def test_rates_and_waits_cover_a_sliding_window_not_the_last_poll():
    dashboard = Dashboard("u")
    dashboard.update(_busy_poll(at=0, requests=0, waits_fast=0, waits_slow=0))
    dashboard.update(_busy_poll(at=10, requests=300, waits_fast=100, waits_slow=200))
    # A quiet half second: with a two-poll figure, req/s would drop to 0 and the waits vanish.
    dashboard.update(_busy_poll(at=10.5, requests=300, waits_fast=100, waits_slow=200))
    row = _row(render(dashboard), "m")
    assert row["req/s"] == "28.6"  # 300 requests over the 10.5 s seen so far
    assert row["wait95"].endswith("s") and row["wait95"] != "-"
    assert "over the last 10s" in render(dashboard)
    # 40 s later the burst is out of the 30 s window.
    dashboard.update(_busy_poll(at=50, requests=300, waits_fast=100, waits_slow=200))
    dashboard.update(_busy_poll(at=51, requests=330, waits_fast=130, waits_slow=200))
    row = _row(render(dashboard), "m")
    assert row["req/s"] == "0.7"  # 30 requests over the 41 s since the poll at 10 s
    assert row["wait95"] == "24ms"  # only the fast waits of the window


def test_a_narrow_terminal_drops_whole_columns_never_cuts_values():
    text = "llmux_start_time_seconds 100\n"
    for group, model in (("gpu0", "llama-3.1-8b-instruct"), ("gpu1", "qwen")):
        text += f'llmux_group_model_info{{group="{group}",model="{model}"}} 1\n'
        text += f'llmux_model_state{{model="{model}",state="active"}} 1\n'
        text += f'llmux_model_last_switch_duration_seconds{{model="{model}"}} 0.016\n'
    dashboard = Dashboard("u")
    dashboard.update(Poll.parse(text, 200))
    dashboard.update(Poll.parse(text, 201))
    wide, narrow = render(dashboard, width=120), render(dashboard, width=50)
    assert _row(wide, "qwen")["switch"] == "16ms" and _row(wide, "qwen")["group"] == "gpu1"
    header = next(line for line in narrow.splitlines() if line.startswith("model "))
    assert max(len(line) for line in narrow.splitlines()) <= 50
    assert "…" not in header, "headings are whole or absent"
    kept = header.split()
    assert kept[:4] == ["model", "state", "queue", "infl"], "the most useful columns stay"
    assert "active" not in kept and "group" not in kept, "the least useful go first"
    for value in _row(narrow, "qwen").values():
        assert "…" not in value
    assert "llama-3.1-8b-inst…" in narrow  # a long model name is the one value shortened


def test_switches_before_top_started_carry_their_own_times():
    text = (
        "llmux_start_time_seconds 100\n"
        'llmux_model_state{model="a",state="active"} 1\n'
        'llmux_switch_total{from="idle",to="a",result="ok"} 1\n'
        'llmux_switch_total{from="b",to="a",result="ok"} 3\n'
        'llmux_switch_last_time_seconds{from="idle",to="a",result="ok"} 1000\n'
        'llmux_switch_last_time_seconds{from="b",to="a",result="ok"} 5000\n'
    )
    dashboard = Dashboard("u")
    dashboard.update(Poll.parse(text, 9000))
    lines = [line for line in render(dashboard).splitlines() if line[9:16] == "switch "]
    stamp = lambda at: time.strftime("%H:%M:%S", time.localtime(at))  # noqa: E731
    assert lines == [
        f"{stamp(1000)} switch idle→a ok",
        f"{stamp(5000)} switch b→a ok x3 since start",
    ]


def test_a_failed_step_is_named_without_calling_it_a_hook():
    """A wake that failed may be a hook's or a built-in driver's (starting a `cmd` server):
    the event names the step, not a hook the model may not have."""
    metric = "llmux_hook_failures_total"
    before = Poll.parse(f'{metric}{{model="broken",hook="wake"}} 0\n', at=1.0)
    after = Poll.parse(f'{metric}{{model="broken",hook="wake"}} 2\n', at=2.0)
    dashboard = Dashboard("http://127.0.0.1:3000")
    dashboard.update(before)
    dashboard.update(after)
    texts = [event.text for event in dashboard.events]
    assert texts == ["wake failed for broken x2"]
