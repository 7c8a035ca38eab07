"""Beyond one model at a time: co-residency within a group's capacity, eviction after a drain,
groups switching in parallel, idle sleep (ttl_secs) and preload. Fake backends are processes,
hooks are shell commands, llmux listens on a real socket."""

from __future__ import annotations

from functools import partial

import trio

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    stream_all,
    write_config,
)


def groups_table(**groups: tuple[float | None, list[str]]) -> str:
    lines = []
    for name, (capacity, models) in groups.items():
        lines.append(f"[groups.{name}]")
        if capacity is not None:
            lines.append(f"capacity = {capacity}")
        lines.append("models = [" + ", ".join(f'"{m}"' for m in models) + "]")
    return "\n".join(lines) + "\n"


async def states(client) -> dict[str, str]:
    return {m["id"]: m["llmux"]["state"] for m in (await client.get("/v1/models")).json()["data"]}


async def settle(client, expected: dict[str, str], within: float = 3.0) -> None:
    """Wait until the models are in the expected states (start-up work runs in the background)."""
    with trio.move_on_after(within):
        while await states(client) != expected:
            await trio.sleep(0.05)
    assert await states(client) == expected


async def test_two_models_that_fit_serve_at_once_without_switching(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05, token_interval=0.05)
    blocks = fake_model_block(a, memory_gb=30) + fake_model_block(b, memory_gb=40)
    path = write_config(tmp_path, groups_table(gpu0=(80, ["a", "b"])) + blocks)
    async with llmux_running(path) as (_, client):
        results = {}

        async def stream(model: str) -> None:
            results[model] = await stream_all(client, model, 20)  # 1 s of tokens

        together = False

        async def watch() -> None:
            nonlocal together
            while True:
                models = (await client.get("/v1/models")).json()["data"]
                in_flight = {m["id"]: m["llmux"]["in_flight"] for m in models}
                together = together or in_flight == {"a": 1, "b": 1}
                await trio.sleep(0.05)

        async with trio.open_nursery() as watcher:
            watcher.start_soon(watch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, "a")
                nursery.start_soon(stream, "b")
            watcher.cancel_scope.cancel()
        status = (await client.get("/llmux/status")).json()
        metrics = (await client.get("/metrics")).text
    assert all(code == 200 and text.count('"content"') == 20 for code, text in results.values())
    assert together, "the two streams did not run side by side"
    assert a.state()["sleeps"] == b.state()["sleeps"] == 0
    assert status["active_models"] == ["a", "b"]
    assert status["groups"]["gpu0"] == {
        "capacity": 80, "used": 70, "models": ["a", "b"], "active_models": ["a", "b"],
        "switch": None, "gpus": [], "gpu_free_gb": None, "gpu_total_gb": None,
    }  # fmt: skip
    assert metric_value(metrics, "llmux_group_capacity", group="gpu0") == 80
    assert metric_value(metrics, "llmux_group_used", group="gpu0") == 70
    assert metric_value(metrics, "llmux_group_model_info", group="gpu0", model="b") == 1


async def test_a_model_that_does_not_fit_evicts_the_least_recently_used(fakes, tmp_path):
    a, b, c = fakes.start("a", "b", "c", wake_delay=0.05)
    blocks = "".join(fake_model_block(f, memory_gb=30) for f in (a, b)) + fake_model_block(
        c, memory_gb=40
    )
    path = write_config(tmp_path, groups_table(gpu0=(80, ["a", "b", "c"])) + blocks)
    async with llmux_running(path) as (_, client):
        for model in "aab":
            await client.post("/v1/chat/completions", json=chat(model, max_tokens=1))
        response = await client.post("/v1/chat/completions", json=chat("c", max_tokens=1))
        after = await states(client)
    assert response.status_code == 200
    assert after == {"a": "asleep", "b": "active", "c": "active"}
    assert a.state()["sleeps"] == 1 and b.state()["sleeps"] == 0


async def test_two_groups_switch_in_parallel(fakes, tmp_path):
    a, b, c, d = fakes.start("a", "b", "c", "d", wake_delay=1.0, sleep_delay=0.0)
    blocks = "".join(fake_model_block(f) for f in (a, b, c, d))
    path = write_config(
        tmp_path, groups_table(gpu0=(None, ["a", "b"]), gpu1=(None, ["c", "d"])) + blocks
    )
    fake = {"a": a, "b": b, "c": c, "d": d}
    async with llmux_running(path) as (_, client):

        async def both(first: str, second: str) -> bool:
            """Whether the two wakes were seen running at one moment."""
            together = False

            async def watch() -> None:
                nonlocal together
                while True:
                    seen = await trio.to_thread.run_sync(
                        lambda: {fake[m].state()["state"] for m in (first, second)}
                    )
                    together = together or seen == {"waking"}
                    await trio.sleep(0.05)

            async with trio.open_nursery() as watcher:
                watcher.start_soon(watch)
                async with trio.open_nursery() as nursery:
                    for model in (first, second):
                        nursery.start_soon(
                            partial(client.post, "/v1/chat/completions", json=chat(model))
                        )
                watcher.cancel_scope.cancel()
            return together

        cold = await both("a", "c")
        switched = await both("b", "d")
        after = await states(client)
    # Each wake takes 1 s: the two groups' wakes run at the same time, not one after the other.
    assert cold and switched
    assert after == {"a": "asleep", "b": "active", "c": "asleep", "d": "active"}


async def test_preload_wakes_models_in_order_within_capacity(fakes, tmp_path, caplog):
    a, b, c = fakes.start("a", "b", "c", wake_delay=0.05)
    blocks = (
        fake_model_block(a, memory_gb=30)
        + fake_model_block(b, memory_gb=30)
        + fake_model_block(c, memory_gb=40)
    )
    path = write_config(
        tmp_path,
        groups_table(gpu0=(80, ["a", "b", "c"])) + blocks,
        top='preload = ["c", "a", "b"]',
    )
    async with llmux_running(path) as (_, client):
        # c (40) and a (30) fit in 80; b (30) would not, and is left asleep.
        await settle(client, {"a": "active", "b": "asleep", "c": "active"})
    assert a.state()["wakes"] == c.state()["wakes"] == 1 and b.state()["wakes"] == 0
    assert "preload: b does not fit" in caplog.text


async def test_preload_in_a_one_at_a_time_group(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b), top='preload = ["b"]')
    async with llmux_running(path) as (_, client):
        await settle(client, {"a": "asleep", "b": "active"})
        response = await client.post("/v1/chat/completions", json=chat("b", max_tokens=1))
    assert response.status_code == 200 and b.state()["wakes"] == 1
