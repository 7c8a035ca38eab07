"""The trio driver on a virtual clock, with servers in memory: the rules that take seconds of
waiting end to end (quanta, minimum active times, idle sleeps, eviction order) run here in
milliseconds, through the very driver `llmux serve` runs. And the driver and the simulator, two
executors of one core, make the same switches."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from llmux.config import ModelConfig, parse_config
from llmux.core.costs import SwitchCostTracker
from llmux.errors import ModelUnavailable
from llmux.observe.metrics import Metrics
from llmux.policy import AdaptivePolicy, CostAwarePolicy, FifoPolicy, load_policy
from llmux.runtime.driver import GroupDriver
from llmux.runtime.hooks import HookResult
from llmux.sim.simulator import Request, ServiceModel, Simulator
from llmux.sim.traces import constant_cost


class Servers:
    """Model servers in memory, on trio's clock: each hook takes its time and does what it is
    told; a request sent to a sleeping server, or a sleep with requests in flight, is counted."""

    def __init__(
        self,
        wake_secs: float = 0.5,
        sleep_secs: float = 0.1,
        slow: Mapping[str, float] | None = None,
        failing: set[tuple[str, str]] | None = None,
    ) -> None:
        self.wake_secs, self.sleep_secs = wake_secs, sleep_secs
        self.slow = dict(slow or {})
        self.failing = failing or set()
        self.awake: set[str] = set()
        self.busy: Counter[str] = Counter()
        self.log: list[tuple[float, str, str]] = []
        self.violations: list[str] = []

    def _done(self, hook: str, model: str, ok: bool, began: float) -> HookResult:
        return HookResult(
            hook=hook, model=model, exit_code=0 if ok else 1, timed_out=False,
            duration=trio.current_time() - began, stdout_tail="",
            stderr_tail="" if ok else f"{hook} of {model} failed",
        )  # fmt: skip

    async def wake(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        began = trio.current_time()
        self.log.append((began, "wake", backend.name))
        await trio.sleep(self.slow.get(backend.name, self.wake_secs))
        ok = (backend.name, "wake") not in self.failing
        if ok:
            self.awake.add(backend.name)
        return self._done("wake", backend.name, ok, began)

    async def sleep(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        began = trio.current_time()
        self.log.append((began, "sleep", backend.name))
        if self.busy[backend.name]:
            self.violations.append(f"{backend.name} put to sleep with requests in flight")
        await trio.sleep(self.sleep_secs)
        ok = (backend.name, "sleep") not in self.failing
        if ok:
            self.awake.discard(backend.name)
        return self._done("sleep", backend.name, ok, began)

    async def alive(self, backend: ModelConfig) -> HookResult:
        return self._done("alive", backend.name, backend.name in self.awake, trio.current_time())

    async def stop(self, backend: ModelConfig) -> None:
        pass

    def on_exit(self, callback: Any) -> None:
        pass

    def hooks(self, kind: str) -> list[str]:
        return [model for _, hook, model in self.log if hook == kind]


@asynccontextmanager
async def driven(
    models: dict[str, dict[str, Any]], servers: Servers, chosen: Any = None, **top: Any
) -> AsyncIterator[GroupDriver]:
    """A group driver over `servers` for these models (and top-level config tables)."""
    raw = {"models": {n: {"port": 9000 + i, "wake": "w", "sleep": "s", **t}
                      for i, (n, t) in enumerate(models.items())}, **top}  # fmt: skip
    config = parse_config(raw, Path("driven.toml"))
    group = config.group_config(next(iter(config.groups)))
    chosen = chosen or load_policy(config.policy.name, config.policy.options, Path("."))
    driver = GroupDriver(group, chosen, Metrics(config.models), SwitchCostTracker(), servers)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        yield driver
        nursery.cancel_scope.cancel()


async def ask(driver: GroupDriver, servers: Servers, model: str, seconds: float = 0.1) -> float:
    """One request that holds its slot `seconds`; returns how long it waited for it."""
    async with driver.serving(model) as slot:
        if model not in servers.awake:
            servers.violations.append(f"a request reached {model} while it was asleep")
        servers.busy[model] += 1
        try:
            await trio.sleep(seconds)
        finally:
            servers.busy[model] -= 1
    assert slot.backend.name == model
    return slot.waited


async def test_min_active_keeps_serving_the_active_model(autojump_clock):
    servers = Servers()
    fifo = {"name": "fifo", "min_active_secs": 1.5}
    async with driven({"a": {}, "b": {}}, servers, policy=fifo) as driver:
        await ask(driver, servers, "a")
        activated = trio.current_time() - 0.1
        done: dict[str, float] = {}

        async def for_b() -> None:
            await ask(driver, servers, "b")
            done["b"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(for_b)
            await trio.sleep(0.3)
            # b waits, but a has not served its minimum yet: a request for a goes straight in.
            assert await ask(driver, servers, "a") == 0.0
        assert done["b"] - activated >= 1.5
    assert servers.violations == []


async def test_cost_aware_serves_the_active_model_for_its_quantum_then_switches(autojump_clock):
    """While `a` is busy, a request for `a` goes straight in and `b` waits; but a never-idle
    `a` keeps `b` waiting no longer than the quantum (4 x the switch cost) plus a drain."""
    servers = Servers(wake_secs=0.0, sleep_secs=0.0)
    policy = CostAwarePolicy(default_cost_secs=0.5)
    async with driven({"a": {}, "b": {}}, servers, policy) as driver:
        await ask(driver, servers, "a", 0.0)
        activated = trio.current_time()
        waited: dict[str, float] = {}

        async def for_b() -> None:
            waited["b"] = await ask(driver, servers, "b", 0.0)
            waited["b_done"] = trio.current_time() - activated

        async with trio.open_nursery() as nursery:

            async def keep_a_busy() -> None:
                while "b" not in waited:  # overlapping 0.5 s requests: a is never idle
                    nursery.start_soon(ask, driver, servers, "a", 0.5)
                    await trio.sleep(0.25)

            nursery.start_soon(keep_a_busy)
            await trio.sleep(0.3)
            nursery.start_soon(for_b)
            await trio.sleep(0.5)
            assert await ask(driver, servers, "a", 0.0) == 0.0, "a request for a queued"
        assert waited["b"] > 1.2, "b was switched to while a still had its quantum"
        assert waited["b_done"] < 2.0 + 0.5 + 0.1, "b waited past the quantum and a drain"
    assert servers.violations == []


CAPACITY = {"groups": {"gpu": {"capacity": 80, "models": ["a", "b", "c"]}}}


async def test_a_model_slow_to_wake_again_is_kept_longer(autojump_clock):
    servers = Servers(wake_secs=0.1, slow={"a": 1.5})  # waking a again costs 15 times b
    models = {"a": {"memory_gb": 30}, "b": {"memory_gb": 30}, "c": {"memory_gb": 40}}
    async with driven(models, servers, **CAPACITY) as driver:
        for model in "ab":
            await ask(driver, servers, model, 0.0)
        await trio.sleep(0.3)  # close in recency: least recently used alone would evict a
        await ask(driver, servers, "c", 0.0)
        states = {n: m.state.value for n, m in driver.models.items()}
    assert states == {"a": "active", "b": "asleep", "c": "active"}


async def test_eviction_prefers_an_idle_model_and_drains_a_busy_one(autojump_clock):
    servers = Servers()
    models = {name: {"memory_gb": 40} for name in "abc"}
    async with driven(models, servers, **CAPACITY) as driver:
        for model in "aaabbb":
            await ask(driver, servers, model, 0.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, driver, servers, "a", 2.0)  # a long stream
            await trio.sleep(0.2)
            # a is busy, b is idle (though used more recently): b goes, a keeps streaming.
            await ask(driver, servers, "c", 0.0)
            assert driver.models["a"].state.value == "active"
        assert servers.hooks("sleep") == ["b"]
        # Both awake models idle: c, used before a's stream ended, is least recently used.
        await ask(driver, servers, "b", 0.0)
        assert {n: m.state.value for n, m in driver.models.items()} == {
            "a": "active", "b": "active", "c": "asleep",
        }  # fmt: skip
        # Only busy models to evict: the one chosen is drained first, its request whole.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, driver, servers, "a", 2.0)
            nursery.start_soon(ask, driver, servers, "b", 2.0)
            await trio.sleep(0.2)
            await ask(driver, servers, "c", 0.0)
    assert servers.violations == []


async def test_an_idle_model_goes_to_sleep_after_its_ttl(autojump_clock):
    servers = Servers()
    async with driven({"a": {"ttl_secs": 0.6}, "b": {}}, servers) as driver:
        await ask(driver, servers, "a", 1.0)  # busy longer than its ttl: busy is not idle
        assert driver.models["a"].state.value == "active"
        await trio.sleep(0.3)
        assert driver.models["a"].state.value == "active"
        await trio.sleep(0.5)
        assert driver.models["a"].state.value == "asleep"
        assert servers.hooks("sleep") == ["a"]
        await ask(driver, servers, "b", 0.0)  # b has no ttl: it stays awake
        await trio.sleep(60)
        assert driver.models["b"].state.value == "active"
        await ask(driver, servers, "a", 0.0)  # the next request for a wakes it again
    assert servers.violations == []


async def test_a_failed_eviction_leaves_the_other_victims_serving(autojump_clock):
    servers = Servers(failing={("a", "sleep")})
    models = {"a": {"memory_gb": 40}, "b": {"memory_gb": 40}, "c": {"memory_gb": 80}}
    async with driven(models, servers, **CAPACITY) as driver:
        for model in "ab":  # a, the least recently used, is the first to go
            await ask(driver, servers, model, 0.0)
        with pytest.raises(ModelUnavailable):
            await ask(driver, servers, "c", 0.0)
        assert {n: m.state.value for n, m in driver.models.items()} == {
            "a": "active", "b": "active", "c": "asleep",
        }  # fmt: skip
        assert await ask(driver, servers, "b", 0.0) == 0.0
    assert servers.hooks("sleep") == ["a"] and servers.hooks("wake") == ["a", "b"]


SCENARIO = [
    (0.0, "a", 0.2), (0.1, "b", 0.1), (0.2, "a", 0.1), (0.3, "c", 0.1), (0.35, "b", 0.1),
    (2.5, "c", 0.2), (2.6, "a", 0.1), (2.7, "b", 0.1), (2.8, "c", 0.1),
    (5.0, "b", 0.1), (5.1, "a", 0.1), (5.15, "b", 0.1),
]  # fmt: skip


async def _driver_switches(policy: Any, caplog: Any, capacity: bool) -> list[tuple[str, str]]:
    servers = Servers(wake_secs=0.3, sleep_secs=0.0)
    sizes = {"memory_gb": 40} if capacity else {}
    top = CAPACITY if capacity else {}
    caplog.clear()
    async with driven({m: dict(sizes) for m in "abc"}, servers, policy, **top) as driver:
        began = trio.current_time()

        async def send(at: float, model: str, seconds: float) -> None:
            await trio.sleep_until(began + at)
            await ask(driver, servers, model, seconds)

        async with trio.open_nursery() as nursery:
            for at, model, seconds in SCENARIO:
                nursery.start_soon(send, at, model, seconds)
    return [
        (r.fields["from"], r.fields["to"])
        for r in caplog.records
        if getattr(r, "event", None) == "model_activated" and "switch_seconds" in r.fields
    ]


@pytest.mark.parametrize("policy", ["fifo", "cost_aware", "adaptive", "fifo with capacity"])
async def test_the_driver_and_the_simulator_make_the_same_switches(autojump_clock, caplog, policy):
    """Two executors of one core: on the same arrivals and costs, the same switches."""
    caplog.set_level(logging.INFO)
    capacity = policy.endswith("capacity")

    def chosen() -> Any:
        if policy == "cost_aware":
            return CostAwarePolicy(default_cost_secs=2.0)
        return AdaptivePolicy(default_cost_secs=0.3) if policy == "adaptive" else FifoPolicy()

    live = await _driver_switches(chosen(), caplog, capacity)
    requests = [Request(at, model, service=seconds) for at, model, seconds in SCENARIO]
    simulated = Simulator(
        requests, ["a", "b", "c"], chosen(), constant_cost(0.3), ServiceModel("parallel"),
        capacity=80.0 if capacity else None, sizes={m: 40.0 for m in "abc"} if capacity else None,
    ).run()  # fmt: skip
    assert live == [(s or "idle", t) for s, t, _ in simulated.switches]
    assert len(live) >= 3
