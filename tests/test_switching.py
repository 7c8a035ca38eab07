"""End-to-end switching through real sockets, fake backends as processes, hooks as subprocesses."""

from __future__ import annotations

import itertools
import random

import trio

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    stream_all,
    write_config,
)

FIFO = {"name": "fifo"}


async def test_first_request_wakes_model_and_is_proxied(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.2)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200
        assert response.json()["system_fingerprint"] == "a"
        models = (await client.get("/v1/models")).json()["data"]
        assert models[0]["llmux"]["state"] == "active"
    assert a.state()["wakes"] == 1
    assert a.state()["rejected_while_asleep"] == 0


async def test_stream_is_drained_before_sleep(fakes, tmp_path):
    """The in-flight count covers a stream to its last byte: the sleep hook waits for it."""
    a, b = fakes.start("a", "b", wake_delay=0.1, token_interval=0.05)
    # FIFO decides to switch while the stream runs: the drain is what holds the sleep back.
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b), policy=FIFO)
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        results: dict[str, object] = {}

        async def long_stream() -> None:
            results["stream"] = await stream_all(client, "a", 30)

        async def other_model() -> None:
            await trio.sleep(0.3)  # the stream is mid-way
            results["b"] = await client.post("/v1/chat/completions", json=chat("b"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            nursery.start_soon(other_model)
        status, text = results["stream"]
        assert status == 200
        assert text.count('"content"') == 30 and text.endswith("data: [DONE]\n\n")
        assert results["b"].status_code == 200
    state_a = a.state()
    assert state_a["slept_while_busy"] == 0, "a was put to sleep with its stream in flight"
    assert state_a["rejected_while_asleep"] == 0
    assert state_a["sleeps"] == 1


async def test_many_clients_on_one_model_share_one_wake(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.3)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (_, client):
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await client.post("/v1/chat/completions", json=chat("a"))).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
    assert statuses == [200] * 40
    assert a.state()["wakes"] == 1
    assert a.state()["served"] == 40


async def _interleaved(fakes, tmp_path, names: list[str], requests: int) -> None:
    backends = fakes.start(*names, wake_delay=0.05, sleep_delay=0.02, token_interval=0.005)
    path = write_config(tmp_path, "".join(fake_model_block(f) for f in backends))
    rng = random.Random(7)
    plan = [(rng.choice(names), rng.random() < 0.5, rng.randint(1, 8)) for _ in range(requests)]
    answers: list[tuple[str, int, str]] = []
    async with llmux_running(path) as (_, client):

        async def one(model: str, streaming: bool, tokens: int, delay: float) -> None:
            await trio.sleep(delay)
            if streaming:
                status, text = await stream_all(client, model, tokens)
            else:
                response = await client.post(
                    "/v1/chat/completions", json=chat(model, max_tokens=tokens)
                )
                status, text = response.status_code, response.text
            answers.append((model, status, text))

        async with trio.open_nursery() as nursery:
            for index, (model, streaming, tokens) in enumerate(plan):
                nursery.start_soon(one, model, streaming, tokens, index * 0.01)
        metrics = (await client.get("/metrics")).text
    assert len(answers) == requests
    for model, status, text in answers:
        assert status == 200, text
        assert f"{model}-0" in text, "answer came from the wrong backend"
    for fake in backends:
        state = fake.state()
        assert state["rejected_while_asleep"] == 0, state
        assert state["slept_while_busy"] == 0, state
    for name in names:
        assert metric_value(metrics, "llmux_model_in_flight", model=name) == 0
        assert metric_value(metrics, "llmux_request_queue_depth", model=name) == 0
    switches = metric_value(metrics, "llmux_switch_total", result="ok")
    assert switches is not None


async def test_interleaved_clients_on_two_models(fakes, tmp_path):
    await _interleaved(fakes, tmp_path, ["a", "b"], 60)


async def test_interleaved_clients_on_three_models(fakes, tmp_path):
    await _interleaved(fakes, tmp_path, ["a", "b", "c"], 90)


async def test_hooks_of_switches_never_overlap(fakes, tmp_path):
    backends = fakes.start("a", "b", "c", wake_delay=0.05, sleep_delay=0.05, token_interval=0.002)
    log = tmp_path / "hooks.log"
    blocks = ""
    for fake in backends:
        wrap = {}
        for hook in ("wake", "sleep"):
            wrap[hook] = (
                f"echo start {hook} $LLMUX_MODEL >> {log}; {fake.ctl(hook)} >/dev/null; "
                f"rc=$?; echo end {hook} $LLMUX_MODEL >> {log}; exit $rc"
            )
        blocks += fake_model_block(fake, **wrap)
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (_, client):

        async def one(model: str, delay: float) -> None:
            await trio.sleep(delay)
            response = await client.post("/v1/chat/completions", json=chat(model, max_tokens=2))
            assert response.status_code == 200

        async with trio.open_nursery() as nursery:
            for index in range(30):
                nursery.start_soon(one, "abc"[index % 3], index * 0.02)
    lines = log.read_text().splitlines()
    assert len(lines) >= 8
    for first, second in zip(lines[::2], lines[1::2], strict=True):
        assert first.startswith("start") and second == "end" + first[len("start") :], lines
    # Wakes and sleeps alternate: never two models awake.
    hooks = [line.split()[1] for line in lines[::2]]
    assert hooks[0] == "wake"
    for previous, current in itertools.pairwise(hooks):
        assert previous != current, hooks


async def test_nothing_from_a_request_reaches_a_hook(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    dump = tmp_path / "hook-env"
    path = write_config(tmp_path, fake_model_block(a, wake=f"env > {dump}; {a.ctl('wake')}"))
    marker = "$(touch /tmp/llmux-pwned)-MARKER-7f3a"
    async with llmux_running(path) as (_, client):
        response = await client.post(
            "/v1/chat/completions",
            json=chat("a", user=marker, messages=[{"role": "user", "content": marker}]),
            headers={"x-evil": marker, "authorization": f"Bearer {marker}"},
        )
        assert response.status_code == 200
    env = dump.read_text()
    assert "LLMUX_MODEL=a" in env
    assert "MARKER-7f3a" not in env
