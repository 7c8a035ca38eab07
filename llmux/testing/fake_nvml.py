"""A stand-in for the NVIDIA driver, for tests and machines with no GPU: GPU memory from a file.

`LLMUX_FAKE_NVML=/path/gpus.json` (for testing only) makes llmux read its GPUs' memory from that
file instead of NVML, afresh at every read, so a test changes what llmux sees by rewriting it:

    {"gpus": [{"total_gb": 80, "free_gb": 62.5}, {"total_gb": 80, "free_gb": 80}]}

A GPU's index is its place in the list. A missing file reads as a box with no driver, an index
past the list as a GPU the driver does not know.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmux.runtime.gpus import GIB, DeviceMemory, GpuUnreadable

FAKE_NVML_ENV = "LLMUX_FAKE_NVML"


class FakeNvml:
    """Reads `path` at every call; raises GpuUnreadable as the driver's binding would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"the fake NVML file {path} ({FAKE_NVML_ENV}, for tests)"

    def open(self) -> None:
        self._gpus()

    def memory(self, gpu: int) -> DeviceMemory:
        gpus = self._gpus()
        if gpu >= len(gpus):
            raise GpuUnreadable(f"no GPU {gpu}: the fake NVML file lists {len(gpus)}")
        try:
            total, free = gpus[gpu]["total_gb"], gpus[gpu]["free_gb"]
            return DeviceMemory(total=round(total * GIB), free=round(free * GIB))
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            problem = f"fake NVML: GPU {gpu} is not total_gb and free_gb: {error!r}"
            raise GpuUnreadable(problem) from None

    def _gpus(self) -> list[Any]:
        try:
            gpus = json.loads(self.path.read_text(encoding="utf-8"))["gpus"]
        except FileNotFoundError:
            raise GpuUnreadable(f"fake NVML: {self.path} not found (no driver)") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise GpuUnreadable(f"fake NVML: cannot read {self.path}: {error!r}") from None
        if not isinstance(gpus, list):
            raise GpuUnreadable(f"fake NVML: {self.path}: `gpus` is not a list")
        return gpus


def write_fake_nvml(path: Path, *gpus: tuple[float, float]) -> None:
    """Write each GPU's (total_gb, free_gb), in index order, in one step: llmux may read the
    file at any moment and must never see half of it."""
    entries = [{"total_gb": total, "free_gb": free} for total, free in gpus]
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps({"gpus": entries}), encoding="utf-8")
    os.replace(part, path)


def fake_nvml_from_env() -> FakeNvml | None:
    """The fake the environment asks for, if any."""
    path = os.environ.get(FAKE_NVML_ENV)
    return FakeNvml(Path(path)) if path else None
