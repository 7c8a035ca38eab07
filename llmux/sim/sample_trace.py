"""The sample trace `llmux simulate` uses when none is given: synthetic, made here, so that it
can ship inside the package and the one-file binary. Regenerate it with
`python -m llmux.sim.sample_trace > llmux/sim/data/sample.csv` (seeded: the same file each time).

Three models with unequal, bursty demand over 30 minutes: a busy chat model, a code model whose
requests come in sessions, and a rarely used large one, each request with its token counts. It
shows the CSV format `--trace my.csv` takes. Real traces (Azure LLM inference 2023, Alibaba
GenAI 2026) are not shipped: see `--trace azure` and `--trace alibaba`.
"""

from __future__ import annotations

import random
import sys
from importlib.resources import files
from pathlib import Path

SECONDS = 1800.0
SEED = 2026


def sample_path() -> Path:
    """The shipped sample, inside the package (or the one-file binary's unpacked copy)."""
    return Path(str(files("llmux.sim") / "data" / "sample.csv"))


def rows(seed: int = SEED) -> list[tuple[float, str, int, int]]:
    rng = random.Random(seed)
    found: list[tuple[float, str, int, int]] = []
    # chat: steady Poisson arrivals, about one every 6 s.
    at = 0.0
    while (at := at + rng.expovariate(1 / 6.0)) < SECONDS:
        found.append((at, "chat", rng.randint(50, 2000), rng.randint(20, 200)))
    # code: sessions of 5 to 30 quick requests, one session every 3 minutes or so.
    start = 0.0
    while (start := start + rng.expovariate(1 / 180.0)) < SECONDS:
        at = start
        for _ in range(rng.randint(5, 30)):
            at += rng.uniform(2.0, 15.0)
            if at < SECONDS:
                found.append((at, "code", rng.randint(500, 6000), rng.randint(10, 100)))
    # large: now and then, long answers.
    at = 0.0
    while (at := at + rng.expovariate(1 / 150.0)) < SECONDS:
        found.append((at, "large", rng.randint(200, 4000), rng.randint(100, 600)))
    return sorted(found)


def main() -> None:
    out = sys.stdout
    out.write("arrival,model,prompt_tokens,output_tokens\n")
    for at, model, prompt, output in rows():
        out.write(f"{at:.3f},{model},{prompt},{output}\n")


if __name__ == "__main__":
    main()
