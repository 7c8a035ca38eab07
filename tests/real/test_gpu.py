"""llmux against real vLLM servers on an NVIDIA GPU: sleep levels 1 and 2, `sleep_level =
"auto"`, and the check of the GPU's free memory (NVML) before each wake.

Runs only where there is a GPU and a GPU build of vLLM (this project's CI machines have
neither; the CPU build refuses `--enable-sleep-mode`, see test_vllm.py). Opt-in like the rest of
tests/real: `python -m pytest -m real -s tests/real/test_gpu.py`, with `LLMUX_GPU_VLLM` (the
`vllm` executable, default the one on PATH) and `LLMUX_GPU_MODEL` (default
Qwen/Qwen2.5-0.5B-Instruct, fetched by vLLM). Prints each model's measured sleep and wake per
level, which `llmux simulate --costs` takes as a profile.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.real.test_vllm import (
    ANSWER_BOUND_SECS,
    Llmux,
    session_members,
    sleeping,
    switch_figures,
)

VLLM = os.environ.get("LLMUX_GPU_VLLM") or shutil.which("vllm")
MODEL = os.environ.get("LLMUX_GPU_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
SHARE = 0.25  # of GPU 0's memory per server (--gpu-memory-utilization), three at most awake


def _gpu_zero_gib() -> float | None:
    """GPU 0's total memory in GiB as NVML tells it, or None: no driver, no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


TOTAL_GIB = _gpu_zero_gib()

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(TOTAL_GIB is None, reason="no NVIDIA GPU (NVML cannot read GPU 0)"),
    pytest.mark.skipif(VLLM is None, reason="no vllm executable (set LLMUX_GPU_VLLM)"),
]

LEVELS = {"gpu-l1": "1", "gpu-l2": "2", "gpu-auto": '"auto"'}


def test_levels_auto_and_the_gpu_check_on_a_real_gpu(tmp_path):
    """Each server started by llmux on GPU 0, then switched round: after every switch exactly
    the active model is awake, the wake was checked against NVML's free memory, and each
    model's sleeps and wakes were measured at the levels it slept at."""
    import openai

    assert TOTAL_GIB is not None
    memory = round(TOTAL_GIB * SHARE, 1)
    blocks = ""
    for name, level in LEVELS.items():
        command = (
            f"exec {VLLM} serve {MODEL} --served-model-name {name} --port ${{PORT}} "
            f"--enable-sleep-mode --gpu-memory-utilization {SHARE} --max-model-len 2048"
        )
        blocks += (
            f'[models.{name}]\nkind = "vllm"\nsleep_level = {level}\nmemory_gb = {memory}\n'
            f'cmd = "{command}"\n'
        )
    path = tmp_path / "config.toml"
    path.write_text(
        '[policy]\nname = "fifo"\nrequest_timeout_secs = 900\n'
        "[defaults]\nwake_timeout_secs = 600\n"
        f'[groups.gpu0]\ncapacity = {memory}\nmodels = {list(LEVELS)!r}\ngpus = [0]\n'
        .replace("'", '"') + blocks
    )  # fmt: skip
    llmux = Llmux(path)
    try:
        client = openai.OpenAI(
            base_url=llmux.url + "/v1", api_key="unused", timeout=ANSWER_BOUND_SECS * 5,
            max_retries=0,
        )  # fmt: skip
        for model in [*LEVELS, *LEVELS, *LEVELS]:  # cold starts, then two rounds of switches
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
            )
            assert answer.choices[0].finish_reason in ("length", "stop")
            status = llmux.status()
            assert status["groups"]["gpu0"]["active_models"] == [model]
            ports = {n: m["port"] for n, m in status["models"].items()}
            for name, port in ports.items():
                assert sleeping(port) == (name != model), f"{name} awake state after {model}"
            assert status["groups"]["gpu0"]["gpu_free_gb"] is not None, "NVML was not read"
        steps = {name: llmux.status()["models"][name]["steps"] for name in LEVELS}
        assert set(steps["gpu-l1"]["sleep"]) == {"1"} and set(steps["gpu-l2"]["sleep"]) == {"2"}
        assert steps["gpu-auto"]["sleep"], "auto's sleeps were measured"
        assert {"1", "2"} >= set(steps["gpu-auto"]["sleep"])
        short = [e for e in llmux.events if e.get("event") == "gpu_memory_not_freed"]
        print("\nreal GPU, vLLM sleep mode through llmux:")
        print("\n".join(switch_figures(llmux)))
        for name, measured in steps.items():
            print(f"{name}: sleep {measured['sleep']} s, wake {measured['wake']} s")
        print(f"wakes held for GPU memory a sleeper kept: {len(short)}")
        free = httpx.get(llmux.url + "/metrics", timeout=10).text
        assert "llmux_gpu_free_bytes" in free
    finally:
        assert llmux.stop() == 0
    for event in [e for e in llmux.events if e.get("event") == "server_started"]:
        assert not session_members(event["pid"]), "llmux stopped the servers it started"
