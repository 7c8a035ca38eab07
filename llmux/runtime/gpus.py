"""How much memory a group's GPUs really have free, as the driver (NVML) says, or "cannot tell".

llmux counts memory from the sizes it is given, but a server asleep may still hold some (vLLM at
sleep level 1 has been seen to keep ~16 GB on the GPU, vLLM issue #32714), so a wake can meet a
GPU fuller than the count says. This module reads the driver's figure for whoever asks: a scrape
of /metrics, /llmux/status, and the check before a wake.

Reads call NVML on the trio thread: each is an ioctl to the driver, microseconds, cheaper than a
hop to a worker thread. Only opening NVML runs in a thread (`keep_open`): on a box whose GPUs
are not in persistence mode the driver initialises them first, which can take seconds, and a
wedged driver must not hold the event loop or llmux's start.

With no `nvidia-ml-py`, no driver, or a GPU the driver does not know, a read answers None and the
reason is logged once (event `gpu_unreadable`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import trio

from llmux.config import GIB
from llmux.observe.logs import log_event
from llmux.observe.metrics import Metrics

log = logging.getLogger("llmux.gpus")

START_WAIT_SECS = 5.0  # llmux starts serving after this even if NVML has not opened yet
RETRY_OPEN_SECS = 60.0  # NVML that could not open is tried again this often (a late driver)


class GpuUnreadable(Exception):
    """NVML, or one GPU, cannot be read; the message says why, for the log."""


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU's memory in bytes, as the driver counts it (other processes' use included)."""

    total: int
    free: int


@dataclass(frozen=True)
class GpuReading:
    """Some GPUs' memory, read together at `at` (Unix time)."""

    at: float
    devices: dict[int, DeviceMemory]

    @property
    def free_gb(self) -> float:
        """GiB free on all of them together. A model split over them (tensor parallel) needs
        its share on each: `devices` has each one's figure."""
        return sum(device.free for device in self.devices.values()) / GIB

    @property
    def total_gb(self) -> float:
        return sum(device.total for device in self.devices.values()) / GIB


class GpuBackend(Protocol):
    """Where the figures come from: the driver (NvmlBackend), or a test's file
    (llmux.testing.fake_nvml). Both raise GpuUnreadable when they cannot answer."""

    name: str

    def open(self) -> None: ...

    def memory(self, gpu: int) -> DeviceMemory: ...


class NvmlBackend:
    """The NVIDIA driver's NVML, through nvidia-ml-py's ctypes binding (module `pynvml`)."""

    name = "NVML"

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._count = 0

    def open(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise GpuUnreadable("the nvidia-ml-py package is not installed") from None
        try:
            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as error:
            raise GpuUnreadable(f"NVML: {error}") from None
        self._nvml = pynvml

    def memory(self, gpu: int) -> DeviceMemory:
        nvml = self._nvml
        assert nvml is not None, "read before open"
        if gpu >= self._count:  # also keeps a large index from wrapping in a C unsigned int
            raise GpuUnreadable(f"no GPU {gpu}: the driver sees {self._count}")
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(gpu))
        except nvml.NVMLError as error:
            raise GpuUnreadable(f"GPU {gpu}: NVML: {error}") from None
        return DeviceMemory(total=int(info.total), free=int(info.free))


class GpuMemory:
    """Reads GPUs' memory for whoever asks, sets the gauges `llmux_gpu_free_bytes` and
    `llmux_gpu_total_bytes` to each read, and says once why it cannot read."""

    def __init__(self, backend: GpuBackend, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.opened = False  # set by the thread that opened the backend; read by the loop
        self._opening = threading.Lock()
        self._said: set[str] = set()

    # ----- opening -----

    def open(self) -> bool:
        """Open the backend; blocking, seconds at worst: `keep_open` runs it in a thread.
        False when it cannot be opened (the reason is said once)."""
        with self._opening:
            if not self.opened:
                try:
                    self.backend.open()
                except GpuUnreadable as error:
                    self._say(str(error))
                    return False
                self.opened = True
                log.info("reading GPU memory through %s", self.backend.name)
            return True

    async def keep_open(
        self,
        wanted: Callable[[], Sequence[int]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open once `wanted()` names GPUs (the config may gain some on a reload), and again
        every RETRY_OPEN_SECS while it cannot. Started after the first try, or START_WAIT_SECS
        at most: reads before it has opened answer None."""
        limit = START_WAIT_SECS
        while True:
            if wanted() and not self.opened:
                with trio.move_on_after(limit):
                    await trio.to_thread.run_sync(self.open, abandon_on_cancel=True)
            if limit != math.inf:
                task_status.started()
                limit = math.inf  # later tries wait as long as the driver takes
            if self.opened:
                return
            await trio.sleep(RETRY_OPEN_SECS)

    # ----- reading -----

    def read(self, gpus: Sequence[int]) -> GpuReading | None:
        """Each of `gpus`' memory now (and into the gauges). None when NVML is not open or
        one of them cannot be read: then the caller cannot tell."""
        if not gpus or not self.opened:
            return None
        devices: dict[int, DeviceMemory] = {}
        complete = True
        for gpu in gpus:
            try:
                devices[gpu] = memory = self.backend.memory(gpu)
            except GpuUnreadable as error:
                complete = False
                self._say(str(error))
                if self.metrics is not None:
                    self.metrics.forget_gpu(gpu)
                continue
            if self.metrics is not None:
                self.metrics.set_gpu_memory(gpu, memory.total, memory.free)
        return GpuReading(time.time(), devices) if complete else None

    def free_gb(self, gpus: Sequence[int]) -> float | None:
        """GiB free on `gpus` together; None when that cannot be told."""
        reading = self.read(gpus)
        return None if reading is None else reading.free_gb

    def free_gb_each(self, gpus: Sequence[int]) -> tuple[float, ...] | None:
        """GiB free on each of `gpus`, in their order; None when that cannot be told."""
        reading = self.read(gpus)
        if reading is None:
            return None
        return tuple(reading.devices[gpu].free / GIB for gpu in gpus)

    def _say(self, reason: str) -> None:
        if reason in self._said:
            return
        self._said.add(reason)
        log_event(
            log, "gpu_unreadable", f"cannot read GPU memory ({reason}): llmux cannot tell how "
            "much the GPUs have free, and counts only the configured sizes",
            logging.WARNING, reason=reason,
        )  # fmt: skip
