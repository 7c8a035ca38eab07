"""`llmux simulate`: replay a trace through switch policies and compare them side by side.

Each policy runs on the same requests and the same switch costs (seeded), beside the two simple
policies that bracket what a policy can do (`fifo`: gated oldest-first, best under high load;
`exhaustive`: fewest switches, best mean at moderate load), the better of the two on each metric,
and an ideal reference: FIFO with switches that cost nothing, which says how much switching
still costs.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmux.policies.interface import Policy
from llmux.policies.loader import load_policy
from llmux.sim import traces
from llmux.sim.onoff import on_off_requests
from llmux.sim.sample_trace import sample_path
from llmux.sim.simulator import Request, Result, ServiceModel, Simulator, Tiers
from llmux.sim.tier_costs import TierCosts


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
        utilization=result.busy_time / (result.span * result.gpus) if result.span else 0.0,
        ideal_ratio=mean / ideal_mean if ideal_mean else math.nan,
    )


@dataclass(frozen=True)
class Layout:
    """How models sit on GPUs: groups (each its models and capacity, None = one at a time) and
    the models' sizes. The default: one group, one model awake at a time."""

    groups: tuple[tuple[tuple[str, ...], float | None], ...] = ()
    sizes: dict[str, float] = field(default_factory=dict)

    def resolved(self, models: Sequence[str]) -> tuple[tuple[tuple[str, ...], float | None], ...]:
        return self.groups or ((tuple(models), None),)


def run_layout(
    requests: list[Request],
    layout: Layout,
    make_policy: Callable[[], Policy],
    cost: Callable[[str | None, str], float],
    service: ServiceModel,
    min_active_secs: float,
    name: str,
    tiers: Tiers | None = None,
) -> Result:
    """Simulate each group on its own GPU (groups share nothing) and merge the results."""
    models = sorted({r.model for r in requests})
    results = []
    for members, capacity in layout.resolved(models):
        own = [r for r in requests if r.model in members]
        if not own:
            continue
        simulator = Simulator(
            own, list(members), make_policy(), cost, service, min_active_secs, name,
            capacity=capacity, sizes=layout.sizes, tiers=tiers,
        )  # fmt: skip
        results.append(simulator.run())
    served = [r for result in results for r in result.requests]
    start = min(r.arrival for r in served)
    sleeps: Counter[int] = Counter()
    for result in results:
        sleeps.update(result.sleeps)
    return Result(
        policy=name,
        requests=served,
        switches=sorted((s for result in results for s in result.switches), key=lambda s: s[2]),
        busy_time=sum(result.busy_time for result in results),
        span=max(r.finished or 0.0 for r in served) - start,
        gpus=len(results),
        peak_host_ram_gb=max(result.peak_host_ram_gb for result in results),
        sleeps=dict(sorted(sleeps.items())),
        cold_starts=sum(result.cold_starts for result in results),
    )


ONOFF_SEED = 1
REFERENCES = ("fifo", "exhaustive")  # the simple policies every run is measured against


def compare(
    requests: list[Request],
    policies: Sequence[str],
    cost: Callable[[], Callable[[str | None, str], float]],
    service: ServiceModel,
    min_active_secs: float = 0.0,
    options: dict[str, dict] | None = None,
    layout: Layout = Layout(),
) -> list[Summary]:
    """Run every policy, the simple references not asked for, and the zero-cost ideal on the
    same requests; `cost` makes a fresh, identically seeded cost function per run. The
    summaries come in the order asked, then the references that were not asked for."""
    fifo = lambda: load_policy("fifo", {}, Path("."))  # noqa: E731
    free = traces.constant_cost(0.0)
    ideal = run_layout(requests, layout, fifo, free, service, min_active_secs, "ideal")
    ideal_mean = statistics.fmean(ideal.latencies())
    summaries = []
    for name in [*policies, *(r for r in REFERENCES if r not in policies)]:
        opts = (options or {}).get(name, {})
        make = lambda n=name, o=opts: load_policy(n, o, Path("."))  # noqa: E731
        result = run_layout(requests, layout, make, cost(), service, min_active_secs, name)
        summaries.append(summarize(result, ideal_mean))
    return summaries


@dataclass(frozen=True)
class Best:
    """The better of the simple policies on each metric (each may come from a different one)."""

    mean: float
    p99: float
    mean_from: str
    p99_from: str


def best_simple(summaries: Sequence[Summary]) -> Best:
    references = [s for s in summaries if s.policy in REFERENCES]
    by_mean = min(references, key=lambda s: s.mean)
    by_p99 = min(references, key=lambda s: s.p99)
    return Best(by_mean.mean, by_p99.p99, by_mean.policy, by_p99.policy)


def by_demand(requests: Sequence[Request]) -> list[str]:
    """The trace's models, most requested first."""
    return [model for model, _ in Counter(r.model for r in requests).most_common()]


def layout_from(
    models: Sequence[str], groups: int, capacity: float | None, sizes_spec: str, seed: int
) -> Layout:
    """`--groups N` (models dealt round-robin, most requested first), `--capacity` per group,
    `--sizes` as `name=size,...` or `uniform:LO-HI` (drawn per model, seeded)."""
    if sizes_spec and capacity is None:
        raise ValueError("--sizes needs --capacity (without one, a model is awake at a time)")
    sizes: dict[str, float] = {}
    if sizes_spec.startswith("uniform:"):
        low, high = (float(x) for x in sizes_spec.removeprefix("uniform:").split("-"))
        rng = random.Random(seed)
        sizes = {m: round(rng.uniform(low, high), 1) for m in models}
    elif sizes_spec:
        for item in sizes_spec.split(","):
            name, _, value = item.partition("=")
            sizes[name.strip()] = float(value)
    if capacity is not None:
        missing = [m for m in models if m not in sizes]
        if missing:
            raise ValueError(f"--capacity needs a size for every model; missing: {missing}")
        too_big = [m for m in models if sizes[m] > capacity]
        if too_big:
            raise ValueError(f"models larger than --capacity {capacity:g}: {too_big}")
    dealt: list[list[str]] = [[] for _ in range(max(1, groups))]
    for index, model in enumerate(models):
        dealt[index % len(dealt)].append(model)
    return Layout(tuple((tuple(g), capacity) for g in dealt if g), sizes)


def render(summaries: Sequence[Summary]) -> str:
    best = best_simple(summaries)
    width = max(14, *(len(s.policy) + 2 for s in summaries))  # a long name keeps the columns
    lines = [
        f"{'policy':<{width}}{'mean':>9}{'p50':>9}{'p99':>9}{'max':>9}{'switches':>10}"
        f"{'sw/req':>8}{'util':>7}{'/ideal':>8}{'mean/best':>11}{'p99/best':>10}",
    ]
    for s in summaries:
        lines.append(
            f"{s.policy:<{width}}{s.mean:>9.1f}{s.p50:>9.1f}{s.p99:>9.1f}{s.max:>9.1f}{s.switches:>10}"
            f"{s.switches_per_request:>8.3f}{s.utilization:>7.2f}{s.ideal_ratio:>8.2f}"
            f"{s.mean / best.mean:>11.2f}{s.p99 / best.p99:>10.2f}"
        )
    lines.append(
        f"best simple: mean {best.mean:.1f} ({best.mean_from}), p99 {best.p99:.1f} "
        f"({best.p99_from}); /best columns are ratios to these"
    )
    lines.append("per-model p99 (s):")
    for s in summaries:
        models = ", ".join(f"{m} {v:.1f}" for m, v in s.per_model_p99.items())
        lines.append(f"  {s.policy:<{width - 3}} {models}")
    return "\n".join(lines)


def load_trace(
    trace: str, top: int, traces_dir: Path, window_hours: int, service: ServiceModel
) -> list[Request]:
    if trace == "sample":
        return traces.load_csv(sample_path())
    if trace == "onoff":
        return on_off_requests(ONOFF_SEED)
    if trace in REAL_TRACES:
        folder = traces_dir / REAL_TRACES[trace][0]
        if not folder.is_dir():
            raise TraceMissing(
                f"the {trace} trace is not shipped with llmux: get it from {REAL_TRACES[trace][1]} "
                f"into {folder} (or pass --traces-dir), or use --trace sample or a CSV of yours"
            )
    if trace == "azure":
        return traces.load_azure(traces_dir / "azure_llm_2023")
    if trace == "alibaba":
        requests = traces.load_alibaba(traces_dir / "alibaba_genai_2026", top)
        return traces.busiest_window(requests, window_hours, service) if window_hours else requests
    return traces.load_csv(Path(trace))


REAL_TRACES = {  # name: (folder under --traces-dir, where the files come from)
    "azure": (
        "azure_llm_2023",
        "https://github.com/Azure/AzurePublicDataset (AzureLLMInferenceTrace_code.csv, _conv.csv)",
    ),
    "alibaba": (
        "alibaba_genai_2026",
        "https://github.com/alibaba/clusterdata (cluster-trace-v2026-GenAI)",
    ),
}


class TraceMissing(FileNotFoundError):
    """A real trace that is not on this machine; the message says where to get it."""


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


# ----- sleep depths (`--costs`) -----

DEPTHS = ("L1", "L2", "L1 fit", "auto")


@dataclass(frozen=True)
class DepthSummary:
    choice: str
    mean: float
    p50: float
    p99: float
    switches: int
    sleeps: dict[int, int]
    peak_host_ram_gb: float
    cold_starts: int
    within_ram: bool


def compare_depths(
    requests: list[Request],
    policy: Callable[[], Policy],
    costs: TierCosts,
    service: ServiceModel,
    host_ram_gb: float | None,
    ttl_secs: float,
    min_active_secs: float = 0.0,
    layout: Layout = Layout(),
) -> list[DepthSummary]:
    """Fixed level 1 (host RAM not limited: what it would need), fixed level 2, level 1 while
    the weights fit in `host_ram_gb`, and "auto", on the same requests and step costs."""
    choices = {
        "L1": Tiers(costs, 1, None, ttl_secs),
        "L2": Tiers(costs, 2, host_ram_gb, ttl_secs),
        "L1 fit": Tiers(costs, 1, host_ram_gb, ttl_secs),
        "auto": Tiers(costs, "auto", host_ram_gb, ttl_secs),
    }
    summaries = []
    for choice, tiers in choices.items():
        result = run_layout(
            requests, layout, policy, traces.constant_cost(0.0), service, min_active_secs,
            choice, tiers,
        )  # fmt: skip
        latencies = result.latencies()
        summaries.append(
            DepthSummary(
                choice,
                statistics.fmean(latencies),
                percentile(latencies, 0.5),
                percentile(latencies, 0.99),
                len(result.switches),
                result.sleeps,
                result.peak_host_ram_gb,
                result.cold_starts,
                host_ram_gb is None or result.peak_host_ram_gb <= host_ram_gb + 1e-9,
            )
        )
    return summaries


def render_depths(summaries: Sequence[DepthSummary], costs: TierCosts) -> str:
    lines = [
        f"step costs: {costs.name} ({costs.source})"
        if costs.source
        else f"step costs: {costs.name}",
        f"{'depth':<9}{'mean':>9}{'p50':>9}{'p99':>9}{'switches':>10}{'sleeps L1/L2':>14}"
        f"{'host RAM peak':>15}{'cold':>6}",
    ]
    for s in summaries:
        sleeps = f"{s.sleeps.get(1, 0)}/{s.sleeps.get(2, 0)}"
        ram = f"{s.peak_host_ram_gb:g} GiB" + ("" if s.within_ram else " (over)")
        lines.append(
            f"{s.choice:<9}{s.mean:>9.1f}{s.p50:>9.1f}{s.p99:>9.1f}{s.switches:>10}{sleeps:>14}"
            f"{ram:>15}{s.cold_starts:>6}"
        )
    lines.append(
        "L1: fixed level 1, host RAM not limited (what it would need); L1 fit: level 1 while "
        'the weights fit, else 2; auto: sleep_level = "auto"; latencies in seconds'
    )
    return "\n".join(lines)
