"""A synthetic traffic shape the real traces lack: bursty on/off tenants, heavy-tailed work.

Each tenant (one model) alternates between ON periods (exponential, mean `ON_MEAN_SECS`),
during which its requests arrive as a Poisson stream, and OFF periods drawn from a Pareto
distribution (shape 1.5: mostly short pauses, now and then a very long one). Token counts are
log-normal with a heavy tail, so a few requests cost tens of times the median. Tenants differ in
rate, burst length and request size. Everything comes from one seed, so a run is reproducible;
the policy benchmark holds this shape out (nothing was tuned on it).
"""

from __future__ import annotations

import math
import random

from llmux.sim.simulator import Request, ServiceModel

HOURS = 6.0
ON_MEAN_SECS = 240.0
OFF_SHAPE = 1.5  # Pareto: infinite variance, a finite mean
OFF_SCALE_SECS = 120.0
TENANTS = (  # name, requests/s while on, median prompt tokens, median output tokens
    ("chat", 0.8, 800, 180),
    ("code", 0.5, 3000, 120),
    ("agent", 0.3, 6000, 400),
    ("bulk", 0.15, 1500, 900),
)
TOKEN_SIGMA = 1.0  # log-normal spread: the p99 is about 10x the median


def on_off_requests(seed: int, hours: float = HOURS) -> list[Request]:
    """Requests of the on/off tenants over `hours`, sorted by arrival, with one-at-a-time
    service times filled in from their tokens (as the CSV traces are)."""
    rng = random.Random(seed)
    end = hours * 3600.0
    found: list[Request] = []
    for name, rate, prompt, output in TENANTS:
        at = rng.uniform(0.0, OFF_SCALE_SECS)
        while at < end:
            on_until = min(end, at + rng.expovariate(1.0 / ON_MEAN_SECS))
            while (at := at + rng.expovariate(rate)) < on_until:
                found.append(_request(rng, at, name, prompt, output))
            at = on_until + OFF_SCALE_SECS * rng.paretovariate(OFF_SHAPE)
    found.sort(key=lambda r: r.arrival)
    one = ServiceModel("batching")
    for request in found:
        request.service = one.solo_time(request)
    return found


def _request(rng: random.Random, at: float, model: str, prompt: int, output: int) -> Request:
    def heavy(median: int) -> int:
        return max(1, round(median * math.exp(rng.gauss(0.0, TOKEN_SIGMA))))

    return Request(
        arrival=at, model=model, prompt_tokens=heavy(prompt), output_tokens=heavy(output)
    )
