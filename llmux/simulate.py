"""`llmux simulate`: replay a trace through switch policies and compare them side by side.

Each policy runs on the same requests and the same switch costs (seeded), plus an ideal
reference: FIFO with switches that cost nothing, which says how much switching still costs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmux import traces
from llmux.policy import load_policy
from llmux.simulator import Request, Result, ServiceModel, Simulator


@dataclass(frozen=True)
class Summary:
    policy: str
    requests: int
    mean: float
    p50: float
    p99: float
    max: float
    per_model_p99: dict[str, float]
    switches: int
    utilization: float
    ideal_ratio: float

    @property
    def switches_per_request(self) -> float:
        return self.switches / self.requests if self.requests else 0.0


def percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(result: Result, ideal_mean: float) -> Summary:
    latencies = result.latencies()
    models = sorted({r.model for r in result.requests})
    mean = statistics.fmean(latencies)
    return Summary(
        policy=result.policy,
        requests=len(latencies),
        mean=mean,
        p50=percentile(latencies, 0.50),
        p99=percentile(latencies, 0.99),
        max=latencies[-1],
        per_model_p99={m: percentile(result.latencies(m), 0.99) for m in models},
        switches=len(result.switches),
        utilization=result.busy_time / result.span if result.span else 0.0,
        ideal_ratio=mean / ideal_mean if ideal_mean else math.nan,
    )


def compare(
    requests: list[Request],
    policies: Sequence[str],
    cost: Callable[[], Callable[[str | None, str], float]],
    service: ServiceModel,
    min_active_secs: float = 0.0,
    options: dict[str, dict] | None = None,
) -> list[Summary]:
    """Run every policy (and the zero-cost ideal) on the same requests; `cost` makes a fresh,
    identically seeded cost function per run."""
    models = sorted({r.model for r in requests})
    fifo = load_policy("fifo", {}, Path("."))
    free = traces.constant_cost(0.0)
    ideal = Simulator(requests, models, fifo, free, service, min_active_secs, "ideal").run()
    ideal_mean = statistics.fmean(ideal.latencies())
    summaries = []
    for name in policies:
        policy = load_policy(name, (options or {}).get(name, {}), Path("."))
        result = Simulator(requests, models, policy, cost(), service, min_active_secs, name).run()
        summaries.append(summarize(result, ideal_mean))
    return summaries


def render(summaries: Sequence[Summary]) -> str:
    lines = [
        f"{'policy':<14}{'mean':>9}{'p50':>9}{'p99':>9}{'max':>9}{'switches':>10}{'sw/req':>8}"
        f"{'util':>7}{'/ideal':>8}",
    ]
    for s in summaries:
        lines.append(
            f"{s.policy:<14}{s.mean:>9.1f}{s.p50:>9.1f}{s.p99:>9.1f}{s.max:>9.1f}{s.switches:>10}"
            f"{s.switches_per_request:>8.3f}{s.utilization:>7.2f}{s.ideal_ratio:>8.2f}"
        )
    lines.append("per-model p99 (s):")
    for s in summaries:
        models = ", ".join(f"{m} {v:.1f}" for m, v in s.per_model_p99.items())
        lines.append(f"  {s.policy:<12}{models}")
    return "\n".join(lines)


def load_trace(
    trace: str, top: int, traces_dir: Path, window_hours: int, service: ServiceModel
) -> list[Request]:
    if trace == "azure":
        return traces.load_azure(traces_dir / "azure_llm_2023")
    if trace == "alibaba":
        requests = traces.load_alibaba(traces_dir / "alibaba_genai_2026", top)
        return traces.busiest_window(requests, window_hours, service) if window_hours else requests
    return traces.load_csv(Path(trace))


def cost_factory(
    spec: str, traces_dir: Path, seed: int
) -> Callable[[], Callable[[str | None, str], float]]:
    """`10` (seconds), `alibaba` (sampled from its measured load latencies), or a CSV of
    from,to,seconds rows."""
    if spec == "alibaba":
        samples = traces.alibaba_switch_costs(traces_dir / "alibaba_genai_2026")
        return lambda: traces.sampled_cost(samples, seed)
    try:
        seconds = float(spec)
    except ValueError:
        return lambda: traces.matrix_cost(Path(spec), default=10.0)
    return lambda: traces.constant_cost(seconds)
