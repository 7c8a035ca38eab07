"""A `cmd` server that fails to start (llmux/core/start_backoff.py): started once per OpenAI SDK
call, not once per SDK retry; not started again before its back-off ends, requests meanwhile
refused at once; seen in /llmux/status and /metrics; ended by a reload that changes it."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import trio

from llmux.config import Config, parse_config
from llmux.core import events as ev
from llmux.core import start_backoff
from llmux.core.commands import Grant, Refuse, RunHook
from llmux.core.costs import SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.states import HookName
from llmux.errors import ServerNotStarted, ShuttingDown
from llmux.policy import FifoPolicy
from tests.conftest import chat, llmux_running, metric_value, write_config
from tests.test_builtin_drivers import FAKE_SERVER, cmd_block

CONFIG = Path("start-backoff.toml")

# ----- the core, in its own time -----


def _core() -> GroupCore:
    config: Config = parse_config({"models": {"a": {"port": 9000, "cmd": "serve-a"}}}, CONFIG)
    core = GroupCore(config.group_config("default"), FifoPolicy(), SwitchCostTracker())
    asked = core.handle(ev.Started(0.0))
    _end(core, asked, 0.0, ok=False)  # its alive check: no server runs
    assert core.ready
    return core


def _ask(core: GroupCore, now: float, rid: int) -> list[object]:
    return core.handle(ev.Arrived(now, rid, "a"))


def _end(core: GroupCore, commands: list[object], now: float, **outcome: object) -> list[object]:
    (hook,) = [c for c in commands if isinstance(c, RunHook)]
    return core.handle(ev.HookDone(now, hook.job, ev.HookOutcome(**outcome)))  # type: ignore[arg-type]


def _fail_start(core: GroupCore, now: float, rid: int) -> Refuse:
    """A request wakes `a`, whose server exits as it starts; its clean-up sleep succeeds."""
    wake = _ask(core, now, rid)
    assert [c.hook for c in wake if isinstance(c, RunHook)] == [HookName.WAKE]
    cleanup = _end(core, wake, now, ok=False, cold=True, failure="exit 3: no weights")
    (refused,) = [c for c in _end(core, cleanup, now, ok=True) if isinstance(c, Refuse)]
    return refused


def test_the_back_off_doubles_per_failed_start_and_a_success_ends_it():
    core = _core()
    first = _fail_start(core, 100.0, 1)
    assert isinstance(first.error, ServerNotStarted)
    assert dict(first.error.headers()) == {b"retry-after": b"10", b"x-should-retry": b"false"}
    assert "no weights" in first.error.message
    # Within it: refused at once, no hook, Retry-After the time left.
    (meanwhile,) = _ask(core, 106.5, 2)
    assert isinstance(meanwhile, Refuse) and meanwhile.error.retry_after == 4  # type: ignore[attr-defined]
    # After it: started again; failing again doubles the pause.
    assert _fail_start(core, 110.0, 3).error.retry_after == 20  # type: ignore[attr-defined]
    assert isinstance(_ask(core, 129.9, 4)[0], Refuse)
    wake = _ask(core, 130.0, 5)
    assert any(isinstance(c, Grant) for c in _end(core, wake, 131.0, ok=True, cold=True))
    core.handle(ev.Finished(131.5, 5))
    assert core.models["a"].start_backoff.failures == 0, "a success ends it"


def test_the_pause_is_capped():
    pauses = [start_backoff.pause_after(n) for n in range(1, 8)]
    assert pauses == [10, 20, 40, 80, 160, 300, 300]
    assert start_backoff.pause_after(10**6) == start_backoff.MAX_SECS


def test_shutting_down_says_when_to_come_back():
    assert dict(ShuttingDown("llmux is shutting down").headers())[b"retry-after"] == b"5"


# ----- through llmux and the OpenAI SDK -----


async def test_a_server_that_cannot_start_is_started_once_per_sdk_call(tmp_path, monkeypatch):
    monkeypatch.setattr(start_backoff, "FIRST_SECS", 2.0)  # 2 s, then 4 s
    starts = tmp_path / "starts"
    broken = f"echo start >> {starts}; echo 'weights not found' >&2; exit 3"
    path = write_config(tmp_path, cmd_block("a", broken))
    async with llmux_running(path) as (server, client):

        def sdk_call() -> openai.APIStatusError:
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")  # 2 retries
            try:
                sdk.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
            except openai.APIStatusError as error:
                return error
            raise AssertionError("a server that cannot start answered")

        error = await trio.to_thread.run_sync(sdk_call)
        assert error.status_code == 503 and "weights not found" in error.message
        assert error.response.headers["x-should-retry"] == "false"
        assert error.response.headers["retry-after"] == "2"
        assert starts.read_text().count("start") == 1, "the SDK's retries started it again"

        # Within the back-off: answered at once, nothing started.
        began = trio.current_time()
        again = await client.post("/v1/chat/completions", json=chat("a"))
        assert again.status_code == 503 and trio.current_time() - began < 1.0
        assert "not started again for" in again.json()["error"]["message"]
        assert starts.read_text().count("start") == 1
        shown = (await client.get("/llmux/status")).json()["models"]["a"]["start_backoff"]
        assert shown["failures"] == 1 and 0 < shown["seconds_left"] <= 2
        assert "weights not found" in shown["last_failure"]
        metrics = (await client.get("/metrics")).text
        left = metric_value(metrics, "llmux_model_start_backoff_seconds", model="a")
        assert left is not None and 0 < left <= 2

        # After it: started again, and the next pause is twice as long.
        await trio.sleep(math.ceil(shown["seconds_left"]) + 0.2)
        third = await client.post("/v1/chat/completions", json=chat("a"))
        assert third.status_code == 503 and third.headers["retry-after"] == "4", third.text
        assert starts.read_text().count("start") == 2

        # A reload that changes it ends the back-off: the new command starts at once.
        path.write_text(path.read_text().replace(broken, FAKE_SERVER))
        assert await server.reload()
        status = (await client.get("/llmux/status")).json()
        assert status["models"]["a"]["start_backoff"] is None
        fixed = await client.post("/v1/chat/completions", json=chat("a"))
        assert fixed.status_code == 200, fixed.text
