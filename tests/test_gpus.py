"""GPU memory read from the driver (llmux/runtime/gpus.py), here through the fake NVML file of
llmux/testing/fake_nvml.py: sums over a group's GPUs, a file rewritten between reads, NVML
absent or a GPU unknown (None, said once), opening in a thread without holding the start, and
what /metrics and /llmux/status show, in process and from a real `llmux serve`; and the check
before a switch's wake: each GPU must hold its share of the target, else the wake waits, names
the sleeper that kept its memory, and fails rather than OOM."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio

from llmux.config import parse_config
from llmux.core import events as ev
from llmux.core.commands import ReadGpuMemory, RunHook
from llmux.core.costs import SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.observe.metrics import Metrics
from llmux.policy import FifoPolicy
from llmux.runtime import gpus as gpus_module
from llmux.runtime.gpus import GIB, DeviceMemory, GpuMemory, GpuUnreadable, NvmlBackend
from llmux.testing.fake_nvml import FAKE_NVML_ENV, FakeNvml, write_fake_nvml
from tests.conftest import (
    LlmuxProcess,
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    write_config,
)


def _unreadable(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.fields["reason"] for r in caplog.records if getattr(r, "event", "") == "gpu_unreadable"
    ]


def _opened(backend: object, metrics: Metrics | None = None) -> GpuMemory:
    memory = GpuMemory(backend, metrics)  # type: ignore[arg-type]
    assert memory.open()
    return memory


def test_free_memory_is_summed_over_the_gpus_asked(tmp_path):
    path = tmp_path / "gpus.json"
    write_fake_nvml(path, (80, 62.5), (80, 80), (40, 10))
    memory = _opened(FakeNvml(path))
    reading = memory.read([0, 2])
    assert reading is not None
    assert reading.devices == {
        0: DeviceMemory(total=80 * GIB, free=round(62.5 * GIB)),
        2: DeviceMemory(total=40 * GIB, free=10 * GIB),
    }
    assert (reading.free_gb, reading.total_gb) == (72.5, 120)
    assert abs(reading.at - time.time()) < 5
    assert memory.free_gb([1]) == 80
    assert memory.free_gb([]) is None  # a group that names no GPUs: nothing to tell


def test_a_file_rewritten_between_reads_is_read_afresh(tmp_path):
    path = tmp_path / "gpus.json"
    write_fake_nvml(path, (80, 70))
    memory = _opened(FakeNvml(path))
    assert memory.free_gb([0]) == 70
    write_fake_nvml(path, (80, 16.25))  # a sleeping server kept 16 GB, say
    assert memory.free_gb([0]) == 16.25


def test_without_nvidia_ml_py_reads_answer_none_and_say_so_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    memory = GpuMemory(NvmlBackend())
    assert memory.open() is False and memory.open() is False
    assert memory.free_gb([0]) is None and memory.read([0, 1]) is None
    assert _unreadable(caplog) == ["the nvidia-ml-py package is not installed"]
    record = next(r for r in caplog.records if getattr(r, "event", "") == "gpu_unreadable")
    assert record.levelno == logging.WARNING


def test_without_a_driver_reads_answer_none(caplog):
    """The real binding on a box with no NVIDIA driver (this one, and CI)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present")
    memory = GpuMemory(NvmlBackend())
    assert memory.open() is False
    assert memory.free_gb([0]) is None
    [reason] = _unreadable(caplog)
    assert reason.startswith("NVML: ")


class _StubNvml(SimpleNamespace):
    """The calls NvmlBackend makes of pynvml, answering for two GPUs."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index == 1:
            raise self.NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=24 * GIB, free=20 * GIB, used=4 * GIB)


def test_the_nvml_backend_maps_the_bindings_answers_and_errors(monkeypatch):
    import pynvml

    stub = _StubNvml()
    for name in ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "NVMLError"):
        assert hasattr(pynvml, name), name  # the stub's calls are the real binding's
    assert hasattr(pynvml, "nvmlDeviceGetMemoryInfo")
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    backend = NvmlBackend()
    backend.open()
    assert backend.memory(0) == DeviceMemory(total=24 * GIB, free=20 * GIB)
    with pytest.raises(GpuUnreadable, match="GPU 1: NVML: GPU is lost"):
        backend.memory(1)
    with pytest.raises(GpuUnreadable, match="no GPU 2: the driver sees 2"):
        backend.memory(2)  # never handed to the driver, where a huge index would wrap
    with pytest.raises(GpuUnreadable, match="no GPU 4294967296"):
        backend.memory(2**32)


def test_an_unknown_gpu_makes_the_group_unreadable_and_drops_its_gauges(tmp_path, caplog):
    path = tmp_path / "gpus.json"
    write_fake_nvml(path, (80, 40), (80, 30))
    metrics = Metrics([])
    memory = _opened(FakeNvml(path), metrics)
    assert memory.free_gb([0, 1]) == 70
    text = metrics.exposition().decode()
    assert metric_value(text, "llmux_gpu_free_bytes", gpu="1") == 30 * GIB
    assert metric_value(text, "llmux_gpu_total_bytes", gpu="1") == 80 * GIB
    write_fake_nvml(path, (80, 45))  # GPU 1 gone
    assert memory.read([0, 1]) is None and memory.read([0, 1]) is None
    assert _unreadable(caplog) == ["no GPU 1: the fake NVML file lists 1"]
    text = metrics.exposition().decode()
    assert metric_value(text, "llmux_gpu_free_bytes", gpu="0") == 45 * GIB  # still read
    assert metric_value(text, "llmux_gpu_free_bytes", gpu="1") is None  # not its last figure
    assert metric_value(text, "llmux_gpu_total_bytes", gpu="1") is None


def test_a_missing_fake_file_reads_as_no_driver(tmp_path, caplog):
    memory = GpuMemory(FakeNvml(tmp_path / "absent.json"))
    assert memory.open() is False and memory.free_gb([0]) is None
    assert _unreadable(caplog) == [f"fake NVML: {tmp_path / 'absent.json'} not found (no driver)"]


class _CountingBackend:
    """A backend whose open fails until `ready`, and can be held inside open."""

    name = "a counting backend"

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.opens = 0
        self.release = threading.Event()
        self.release.set()

    def open(self) -> None:
        self.opens += 1
        self.release.wait(10)
        if not self.ready:
            raise GpuUnreadable("no driver yet")

    def memory(self, gpu: int) -> DeviceMemory:
        return DeviceMemory(total=8 * GIB, free=gpu * GIB)


async def test_nvml_is_opened_only_when_gpus_are_named_and_retried_until_it_opens(
    monkeypatch, caplog
):
    monkeypatch.setattr(gpus_module, "RETRY_OPEN_SECS", 0.02)
    backend = _CountingBackend(ready=False)
    memory = GpuMemory(backend)
    named: tuple[int, ...] = ()
    async with trio.open_nursery() as nursery:
        await nursery.start(memory.keep_open, lambda: named)
        await trio.sleep(0.1)
        assert backend.opens == 0  # no group names a GPU: NVML is left alone
        named = (3,)  # a reload named one
        with trio.fail_after(5):
            while backend.opens < 3:
                await trio.sleep(0.01)
        assert memory.free_gb([3]) is None
        backend.ready = True  # the driver got loaded
        with trio.fail_after(5):
            while not memory.opened:
                await trio.sleep(0.01)
        assert memory.free_gb([3]) == 3
        opens = backend.opens
        await trio.sleep(0.1)
        assert backend.opens == opens  # open: no more tries
        assert nursery.child_tasks == frozenset()  # keep_open has returned
    assert _unreadable(caplog) == ["no driver yet"]  # once, for all the failed tries


async def test_a_slow_open_does_not_hold_the_start(monkeypatch):
    monkeypatch.setattr(gpus_module, "START_WAIT_SECS", 0.1)
    backend = _CountingBackend()
    backend.release.clear()  # the driver is initialising the GPUs
    memory = GpuMemory(backend)
    try:
        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            await nursery.start(memory.keep_open, lambda: (0,))
            assert trio.current_time() - began < 2
            assert memory.free_gb([0]) is None  # not open yet: cannot tell
            backend.release.set()
            with trio.fail_after(5):
                while not memory.opened:
                    await trio.sleep(0.01)
            assert memory.free_gb([1]) == 1
            assert backend.opens == 1  # the first try, finished in its thread: no retry needed
            nursery.cancel_scope.cancel()  # keep_open would return after its retry pause
    finally:
        backend.release.set()


BIG_GROUP = '[groups.big]\nmodels = ["a"]\ngpus = [0, 1]\n'


async def test_metrics_and_status_say_what_the_driver_says(fakes, tmp_path, monkeypatch, caplog):
    a, b = fakes.start("a", "b")
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b) + BIG_GROUP)
    nvml = tmp_path / "gpus.json"
    write_fake_nvml(nvml, (80, 62.5), (80, 80), (24, 24))
    monkeypatch.setenv(FAKE_NVML_ENV, str(nvml))
    async with llmux_running(path) as (_, client):
        text = (await client.get("/metrics")).text
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="0") == 62.5 * GIB
        assert metric_value(text, "llmux_gpu_total_bytes", gpu="1") == 80 * GIB
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="2") is None  # no group names it
        assert metric_value(text, "llmux_group_gpu_info", group="big", gpu="1") == 1
        groups = (await client.get("/llmux/status")).json()["groups"]
        assert groups["big"] == {
            "capacity": None, "used": 0, "models": ["a"], "active_models": [], "switch": None,
            "gpus": [0, 1], "gpu_free_gb": 142.5, "gpu_total_gb": 160,
        }  # fmt: skip
        assert (groups["default"]["gpus"], groups["default"]["gpu_free_gb"]) == ([], None)

        write_fake_nvml(nvml, (80, 12), (80, 80))  # something took 50.5 GB of GPU 0
        text = (await client.get("/metrics")).text
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="0") == 12 * GIB
        assert (await client.get("/llmux/status")).json()["groups"]["big"]["gpu_free_gb"] == 92

        write_fake_nvml(nvml, (80, 12))  # GPU 1 is gone
        big = (await client.get("/llmux/status")).json()["groups"]["big"]
        assert (big["gpu_free_gb"], big["gpu_total_gb"]) == (None, None)
        text = (await client.get("/metrics")).text
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="1") is None
    assert _unreadable(caplog) == ["no GPU 1: the fake NVML file lists 1"]


async def test_a_reload_that_names_other_gpus_shows_those(fakes, tmp_path, monkeypatch):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a) + BIG_GROUP)
    nvml = tmp_path / "gpus.json"
    write_fake_nvml(nvml, (80, 10), (80, 20), (80, 30))
    monkeypatch.setenv(FAKE_NVML_ENV, str(nvml))
    async with llmux_running(path) as (server, client):
        text = (await client.get("/metrics")).text
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="1") == 20 * GIB
        path.write_text(path.read_text().replace("gpus = [0, 1]", "gpus = [2]"))
        assert await server.reload()
        text = (await client.get("/metrics")).text
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="2") == 30 * GIB
        assert metric_value(text, "llmux_gpu_free_bytes", gpu="1") is None
        assert metric_value(text, "llmux_group_gpu_info", group="big", gpu="1") is None
        assert (await client.get("/llmux/status")).json()["groups"]["big"]["gpus"] == [2]


def test_llmux_serve_reads_the_fake_file_named_in_its_environment(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a) + BIG_GROUP.replace("[0, 1]", "[1]"))
    nvml = tmp_path / "gpus.json"
    write_fake_nvml(nvml, (80, 80), (48, 40))
    llmux = LlmuxProcess(path, env={**os.environ, FAKE_NVML_ENV: str(nvml)})
    try:
        scrape = httpx.get(llmux.url + "/metrics", timeout=10).text
        assert metric_value(scrape, "llmux_gpu_free_bytes", gpu="1") == 40 * GIB
        write_fake_nvml(nvml, (80, 80), (48, 8))
        scrape = httpx.get(llmux.url + "/metrics", timeout=10).text
        assert metric_value(scrape, "llmux_gpu_free_bytes", gpu="1") == 8 * GIB
    finally:
        assert llmux.stop() == 0
    assert f"reading GPU memory through the fake NVML file {nvml}" in llmux.log
    assert "gpu_unreadable" not in llmux.log


GPU_GROUP = '[groups.gpu0]\ncapacity = 60\nmodels = ["a", "b"]\ngpus = [0]\n'


async def test_a_wake_waits_for_free_gpu_memory_and_names_the_sleeper_that_kept_it(
    fakes, tmp_path, monkeypatch, caplog
):
    """The check before a switch's wake: too little free memory (a sleeper kept its own) holds
    the wake, names the sleeper in a warning and a metric, and wakes once the memory is free;
    never longer than the target's wake_timeout_secs, then a 503 that says why."""
    a, b = fakes.start("a", "b")
    models = fake_model_block(a, memory_gb=40) + fake_model_block(
        b, memory_gb=40, wake_timeout_secs=1.5
    )
    path = write_config(tmp_path, models + GPU_GROUP, server={"gpu_margin_gb": 1})
    nvml = tmp_path / "gpus.json"
    write_fake_nvml(nvml, (80, 78))  # 2 of 80 taken by something else
    monkeypatch.setenv(FAKE_NVML_ENV, str(nvml))
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        write_fake_nvml(nvml, (80, 38))  # a took its 40
        # a is put to sleep for b, but its memory stays taken: 38 free, 41 needed.
        asked = trio.current_time()
        answer = await client.post("/v1/chat/completions", json=chat("b"))
        assert answer.status_code == 503
        assert answer.headers["x-should-retry"] == "false"  # a retry would wait again
        error = answer.json()["error"]["message"]
        assert "not enough free GPU memory to wake b: 38.0 GiB free on GPU 0" in error
        assert "41.0 GiB needed; a did not free its memory when put to sleep" in error
        assert trio.current_time() - asked >= 1.5  # it waited for the memory first
        assert b.state()["state"] == "asleep", "b was never woken into a full GPU"
        text = (await client.get("/metrics")).text
        assert metric_value(text, "llmux_gpu_memory_not_freed_total", model="a") == 1
        warned = [r for r in caplog.records if getattr(r, "event", "") == "gpu_memory_not_freed"]
        assert len(warned) == 1 and "a did not free its memory" in warned[0].getMessage()

        # The memory is freed while the next switch waits for it: b wakes then.
        async def free_later() -> None:
            await trio.sleep(0.5)
            write_fake_nvml(nvml, (80, 78))

        await trio.sleep(1.1)  # the back-off after the failed switch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(free_later)
            answer = await client.post("/v1/chat/completions", json=chat("b"))
        assert answer.status_code == 200 and b.state()["state"] == "awake"


def _two_gpu_core(size_key: str):
    """A core whose group names GPUs 0 and 1: a (awake) and b of 20 each, in `size_key`."""
    models = {
        name: {"port": 9000 + i, "wake": "w", "sleep": "s", "alive": "a", size_key: 20}
        for i, name in enumerate("ab")
    }
    raw = {"models": models, "groups": {"g": {"capacity": 20, "models": ["a", "b"],
                                              "gpus": [0, 1]}}}  # fmt: skip
    config = parse_config(raw, Path("gpus.toml")).group_config("g")
    core = GroupCore(config, FifoPolicy(), SwitchCostTracker())
    for hook in [c for c in core.handle(ev.Started(0.0)) if isinstance(c, RunHook)]:
        core.handle(ev.HookDone(0.0, hook.job, ev.HookOutcome(ok=hook.model == "a")))
    return core


def _switch_to_b(core):
    """Ask for b; end every hook; the commands up to the GPU read (if any)."""
    pending = core.handle(ev.Arrived(1.0, 1, "b"))
    while True:
        hooks = [c for c in pending if isinstance(c, RunHook)]
        reads = [c for c in pending if isinstance(c, ReadGpuMemory)]
        if reads or not hooks or hooks[0].hook.value == "wake":
            return pending
        pending = core.handle(ev.HookDone(2.0, hooks[0].job, ev.HookOutcome(ok=True)))


def test_each_gpu_must_hold_its_share_not_the_sum_of_them():
    core = _two_gpu_core("memory_gb")
    (read,) = [c for c in _switch_to_b(core) if isinstance(c, ReadGpuMemory)]
    assert read.gpus == (0, 1)
    # 23.5 GiB free in all, but GPU 0 cannot hold its 10 (+1 margin): no wake.
    answer = core.handle(ev.GpuMemoryRead(3.0, read.job, (0.5, 23.0)))
    assert not [c for c in answer if isinstance(c, RunHook)]
    short = [c for c in answer if getattr(c, "name", "") == "gpu_memory_not_freed"]
    assert "0.5 GiB free on GPU 0, 11.0 GiB needed on each" in short[0].message
    # Unreadable after a short reading: still short, read again.
    again = core.handle(ev.TimerDue(4.0, "gpu"))
    (read,) = [c for c in again if isinstance(c, ReadGpuMemory)]
    answer = core.handle(ev.GpuMemoryRead(4.0, read.job, None))
    assert not [c for c in answer if isinstance(c, RunHook)]
    again = core.handle(ev.TimerDue(5.0, "gpu"))
    (read,) = [c for c in again if isinstance(c, ReadGpuMemory)]
    answer = core.handle(ev.GpuMemoryRead(5.0, read.job, (11.0, 11.0)))
    assert [c.model for c in answer if isinstance(c, RunHook)] == ["b"]


def test_a_unitless_size_is_not_taken_for_gib():
    commands = _switch_to_b(_two_gpu_core("size"))
    assert not [c for c in commands if isinstance(c, ReadGpuMemory)]
    assert [c.model for c in commands if isinstance(c, RunHook)] == ["b"]
