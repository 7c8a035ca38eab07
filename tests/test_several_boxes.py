"""Several llmux boxes behind HAProxy (Debian's package), configured by `llmux haproxy`, end to
end: each model goes to one box that serves it while all are up; a box that drains (SIGTERM)
or dies (SIGKILL) hands its models to the next box that serves them; nothing is lost but the
requests in flight on the box that was killed. The front speaks for every box, in OpenAI's
JSON: /v1/models lists all their models, an unknown model's 404 names them all, and with no box
up HAProxy's own 503 is an error the SDK reads."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import PYTHON, LlmuxProcess, chat, fake_model_block, free_port, write_config

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="needs haproxy (apt-get install haproxy)")

HOSTS = {"box1": ("m1", "m2", "m3"), "box2": ("m2", "m3", "m4"), "box3": ("m3", "m4", "m5")}
ALIASES = {"m1": ["m1-alias"]}  # on box1, which lists aliases in /v1/models
CHECK = "300ms"  # health-check interval (HAProxy time); down after 2 failed checks


class Front:
    """HAProxy in the foreground, in its own process group, stopped by its pid."""

    def __init__(self, folder: Path, boxes: dict[str, LlmuxProcess]) -> None:
        self.port = free_port()
        specs = [f"{name}={llmux.url}" for name, llmux in boxes.items()]
        made = subprocess.run(
            [PYTHON, "-m", "llmux", "haproxy", *specs, "--out", str(folder),
             "--bind", f"127.0.0.1:{self.port}", "--check-interval", CHECK],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        self.config = (folder / "haproxy.cfg").read_text()
        self.process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(folder / "haproxy.cfg")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def served_by(fakes_of: dict[str, dict], model: str) -> dict[str, int]:
    """How many requests for `model` each box's backend served."""
    return {
        box: fakes[model].state()["served"] for box, fakes in fakes_of.items() if model in fakes
    }


def ask(url: str, model: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=chat(model, **extra), timeout=30)


def wait_for(condition, timeout: float = 15.0) -> float:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - began


def test_several_boxes_behind_haproxy_route_by_model_and_fail_over(fakes, tmp_path):
    fakes_of: dict[str, dict] = {}
    boxes: dict[str, LlmuxProcess] = {}
    front = None
    try:
        for box, models in HOSTS.items():
            folder = tmp_path / box
            folder.mkdir()
            started = fakes.start(*models, wake_delay=0.05, token_interval=0.05)
            fakes_of[box] = {fake.name: fake for fake in started}
            blocks = "".join(
                fake_model_block(fake, aliases=ALIASES.get(fake.name)) for fake in started
            )
            lists = {"list_aliases": True} if box == "box1" else None
            boxes[box] = LlmuxProcess(write_config(folder, blocks, server=lists))
        front = Front(tmp_path, boxes)
        wait_for(lambda: _answers(front.url))
        _the_front_speaks_for_all_boxes(front.url)

        # A long prompt whose `model` comes after `messages` routes too (beyond 16 KB).
        long = {"messages": [{"role": "user", "content": "x" * 40_000}], "model": "m5"}
        assert (
            httpx.post(front.url + "/v1/chat/completions", json=long, timeout=30).status_code == 200
        )

        # Interleaved requests for every model: each is served by one box that hosts it.
        for _ in range(4):
            for model in ("m1", "m2", "m3", "m4", "m5"):
                assert ask(front.url, model).status_code == 200
        owner = {}
        for model in ("m1", "m2", "m3", "m4", "m5"):
            counts = served_by(fakes_of, model)
            busy = [box for box, n in counts.items() if n]
            assert len(busy) == 1, (model, counts)  # no cross-box thrash
            owner[model] = busy[0]
        assert httpx.get(front.url + "/v1/models", timeout=10).status_code == 200

        # The box that serves m3 drains (SIGTERM) while one of its streams runs: m3 moves to
        # the next box that hosts it, and no request for it fails meanwhile.
        draining = owner["m3"]
        streamed: list[int] = []
        runner = threading.Thread(
            target=lambda: streamed.append(
                ask(front.url, "m3", stream=True, max_tokens=40).status_code
            )
        )
        runner.start()
        time.sleep(0.5)
        boxes[draining].proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        moved = None
        while moved is None:
            answer = ask(front.url, "m3")
            assert answer.status_code == 200, answer.text + boxes[draining].log[-6000:]
            counts = served_by({b: f for b, f in fakes_of.items() if b != draining}, "m3")
            if any(counts.values()):
                moved = time.monotonic() - began
            assert time.monotonic() - began < 15
        runner.join()
        assert streamed == [200]  # the drain let it finish
        assert boxes[draining].proc.wait(timeout=20) == 0
        print(f"drain failover: m3 served by another box {moved:.2f}s after SIGTERM")

        # Now a box is killed outright, a stream in flight on it: that stream breaks (the
        # only loss), and the box's models move on within the health checks.
        survivors = [b for b in HOSTS if b != draining]
        owning = [b for b in survivors if any(owner[m] == b for m in HOSTS[b])]
        killed = owner["m4"] if owner["m4"] in owning else owning[0]
        victim_model = next(m for m in HOSTS[killed] if owner.get(m) == killed)
        cut: list[str] = []
        runner = threading.Thread(
            target=lambda: cut.append(_stream_outcome(front.url, victim_model))
        )
        runner.start()
        wait_for(lambda: fakes_of[killed][victim_model].state()["in_flight"] == 1)
        boxes[killed].proc.send_signal(signal.SIGKILL)
        boxes[killed].proc.wait(timeout=10)
        runner.join()
        assert cut == ["cut"], cut
        began = time.monotonic()
        failures = 0
        for model in HOSTS[killed]:
            hosts = [b for b in survivors if b != killed and model in HOSTS[b]]
            if not hosts:
                continue  # served by no box that is left
            answer = ask(front.url, model)
            failures += answer.status_code != 200
        print(f"kill failover: {time.monotonic() - began:.2f}s, {failures} failed")
        assert failures == 0  # nothing was in flight there: retry-on conn-failure moved them

        # Every box gone: HAProxy answers itself, in JSON the SDK reads.
        for llmux in boxes.values():
            llmux.stop()
        _with_no_box_up_the_front_answers_json(front.url)
    finally:
        if front is not None:
            front.stop()
        for llmux in boxes.values():
            llmux.stop()


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _the_front_speaks_for_all_boxes(url: str) -> None:
    """/v1/models and an unknown model's 404 are the front's: every box's models, not the
    list of the one box that took the request; the SDK's error carries llmux's message."""
    every = ["m1", "m1-alias", "m2", "m3", "m4", "m5"]  # box1 lists its aliases, and only it
    assert sorted(model.id for model in _sdk(url).models.list()) == every
    listed = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    assert {m["id"]: m["llmux"]["boxes"] for m in listed}["m3"] == ["box1", "box2", "box3"]
    assert set(listed[0]) == {"id", "object", "created", "owned_by", "llmux"}
    assert all(m["created"] > 1_700_000_000 for m in listed)  # when the boxes were configured
    assert httpx.get(url + "/v1/models/m5", timeout=10).json()["id"] == "m5"  # on box3 only
    assert ask(url, "m1-alias").status_code == 200
    with pytest.raises(openai.NotFoundError) as missing:
        _sdk(url).chat.completions.create(model="nope", messages=[])
    known = "known models: m1, m2, m3, m4, m5"
    assert f"model 'nope' is not served here; {known}" in str(missing.value)
    assert missing.value.code == "model_not_found"
    by_path = httpx.get(url + "/v1/models/nope%2Fx", timeout=10)
    assert by_path.status_code == 404 and known in by_path.json()["error"]["message"]


def _with_no_box_up_the_front_answers_json(url: str) -> None:
    wait_for(lambda: ask(url, "m1").status_code == 503)
    with pytest.raises(openai.InternalServerError) as down:
        _sdk(url).chat.completions.create(model="m1", messages=[])
    assert down.value.status_code == 503 and down.value.code == "model_unavailable"
    assert "no box that serves model 'm1' is up (box1: down or draining)" in str(down.value)
    listing = httpx.get(url + "/v1/models", timeout=10)
    assert listing.status_code == 503
    assert listing.headers["content-type"] == "application/json"
    assert listing.json()["error"]["message"] == "no llmux box is up to take this request"


def _stream_outcome(url: str, model: str) -> str:
    """A long stream's end: "complete", or "cut" if its connection broke mid-answer."""
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions",
            json=chat(model, stream=True, max_tokens=200), timeout=30,
        ) as response:  # fmt: skip
            body = b"".join(response.iter_bytes())
    except httpx.TransportError:
        return "cut"
    return "complete" if body.endswith(b"[DONE]\n\n") else "cut"


def _answers(url: str) -> bool:
    try:
        return (
            httpx.post(url + "/v1/chat/completions", json=chat("m1"), timeout=5).status_code == 200
        )
    except httpx.HTTPError:
        return False
