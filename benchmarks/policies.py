"""The policy grid: the default policy against the better of the two simple ones, per cell.

    python -m benchmarks.policies [--traces-dir ../shared/data/traces] [--quick [--check]]

Two simple policies bracket what a switch policy can do: `fifo` (gated oldest-first) and
`exhaustive` (serve the active model until it is idle). Each cell runs both and the default, on
the same requests and switch costs, and divides the default's mean and p99 latency by the better
of the two on each metric (which may come from different policies).

Cells: the Azure code+conv pair, Alibaba top-4 and top-8 (busiest 12 hours, thinned by user
group) and the synthetic on/off tenants (`llmux.sim.onoff`), each in both service models, at
offered loads 0.3, 0.6 and 0.9, with constant switch costs of 2, 10 and 30 s, each averaged over
three seeds. The default's constants were chosen on the Azure and Alibaba top-4 cells only
("tuned"); Alibaba top-8 and the on/off tenants were held out ("held out").

Prints a Markdown table, then the cells that miss 1.05x with why, then a summary. `--quick` runs
six cells in seconds; with `--check` it exits 1 if the default is more than CHECK_WORST_RATIO
times the best simple policy in any of them (the runs are seeded: a regression check, not a
noisy one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llmux.config import DEFAULT_POLICY
from llmux.policy import load_policy
from llmux.sim import simulate, traces
from llmux.sim.onoff import on_off_requests
from llmux.sim.simulator import Request, Result, ServiceModel, Simulator

LOADS = (0.3, 0.6, 0.9)
COSTS = (2.0, 10.0, 30.0)
SEEDS = (1, 2, 3)
WINDOW_HOURS = 12
TRACES = (("azure", 0), ("alibaba", 4), ("alibaba", 8), ("onoff", 0))
TUNED = {("azure", 0), ("alibaba", 4)}
QUICK = (
    ("azure", 0, "sequential", 0.6, 30.0),
    ("azure", 0, "batching", 0.6, 10.0),
    ("alibaba", 4, "sequential", 0.6, 10.0),
    ("alibaba", 8, "sequential", 0.9, 30.0),
    ("alibaba", 8, "batching", 0.3, 2.0),
    ("onoff", 0, "sequential", 0.3, 10.0),
)
TARGET = 1.05
CHECK_WORST_RATIO = 1.10
MAX_WAIT_SECS = 120.0  # the bound a default must not break where FIFO keeps it
SIMPLE = ("fifo", "exhaustive")


@dataclass(frozen=True)
class Figures:
    mean: float
    p99: float
    switches: float
    over_bound: float  # requests that waited longer than MAX_WAIT_SECS before forwarding


@dataclass(frozen=True)
class Cell:
    trace: str
    top: int
    kind: str
    load: float
    cost: float
    fifo: Figures
    exhaustive: Figures
    default: Figures

    @property
    def name(self) -> str:
        return {"alibaba": f"alibaba top-{self.top}"}.get(self.trace, self.trace)

    @property
    def tuned(self) -> bool:
        return (self.trace, self.top) in TUNED

    @property
    def best_mean(self) -> tuple[float, str]:
        return min((self.fifo.mean, "fifo"), (self.exhaustive.mean, "exhaustive"))

    @property
    def best_p99(self) -> tuple[float, str]:
        return min((self.fifo.p99, "fifo"), (self.exhaustive.p99, "exhaustive"))

    @property
    def mean_ratio(self) -> float:
        return self.default.mean / self.best_mean[0]

    @property
    def p99_ratio(self) -> float:
        return self.default.p99 / self.best_p99[0]

    @property
    def worst_ratio(self) -> float:
        return max(self.mean_ratio, self.p99_ratio)


def figures(result: Result) -> Figures:
    latencies = result.latencies()
    waits = [r.started - r.arrival for r in result.requests if r.started is not None]
    return Figures(
        mean=statistics.fmean(latencies),
        p99=simulate.percentile(latencies, 0.99),
        switches=len(result.switches),
        over_bound=sum(1 for wait in waits if wait > MAX_WAIT_SECS),
    )


def base_requests(trace: str, top: int, seed: int, service: ServiceModel, traces_dir: str):
    if trace == "onoff":  # generated: each seed is a different draw of the same shape
        return on_off_requests(seed)
    return simulate.load_trace(trace, top, Path(traces_dir), WINDOW_HOURS, service)


def run_cell(job: tuple[str, int, str, float, float, str, str]) -> Cell:
    trace, top, kind, load, cost, policy, traces_dir = job
    service = ServiceModel(kind)
    runs: dict[str, list[Figures]] = {name: [] for name in (*SIMPLE, policy)}
    base: list[Request] | None = None
    for seed in SEEDS:
        if trace == "onoff" or base is None:
            base = base_requests(trace, top, seed, service, traces_dir)
        requests = traces.scale_to_load(base, load, service, seed)
        models = sorted({r.model for r in requests})
        for name in runs:
            chosen = load_policy(name, {}, Path("."))
            result = Simulator(requests, models, chosen, traces.constant_cost(cost), service).run()
            runs[name].append(figures(result))
    fifo, exhaustive, default = (_mean_of(runs[name]) for name in (*SIMPLE, policy))
    return Cell(trace, top, kind, load, cost, fifo, exhaustive, default)


def _mean_of(runs: list[Figures]) -> Figures:
    fields = Figures.__dataclass_fields__
    return Figures(**{f: statistics.fmean(getattr(r, f) for r in runs) for f in fields})


def jobs(quick: bool, policy: str, traces_dir: str) -> Iterator[tuple]:
    if quick:
        yield from ((*cell, policy, traces_dir) for cell in QUICK)
        return
    for trace, top in TRACES:
        for kind in ("sequential", "batching"):
            for load in LOADS:
                for cost in COSTS:
                    yield trace, top, kind, load, cost, policy, traces_dir


def row(cell: Cell) -> str:
    f, e, d = cell.fifo, cell.exhaustive, cell.default

    def ratio(value: float) -> str:
        text = f"{value:.2f}"
        return f"**{text}**" if value > TARGET else text

    return (
        f"| {cell.name} | {'tuned' if cell.tuned else 'held out'} | {cell.kind} | {cell.load} "
        f"| {cell.cost:g} | {f.mean:.1f} / {f.p99:.1f} | {e.mean:.1f} / {e.p99:.1f} "
        f"| {d.mean:.1f} / {d.p99:.1f} | {ratio(cell.mean_ratio)} | {ratio(cell.p99_ratio)} "
        f"| {f.switches:.0f} / {e.switches:.0f} / {d.switches:.0f} "
        f"| {f.over_bound:.1f} / {d.over_bound:.1f} |"
    )


def why(cell: Cell) -> list[str]:
    """The targets this cell misses, each with what the figures say about it."""
    found = []
    (_, mean_from), (_, p99_from) = cell.best_mean, cell.best_p99
    if cell.worst_ratio > TARGET:
        missed = " and ".join(
            f"{label} {value:.2f}x"
            for label, value in (("mean", cell.mean_ratio), ("p99", cell.p99_ratio))
            if value > TARGET
        )
        alone = [name for name in SIMPLE if _simple_meets_both(cell, name)]
        if alone:
            figures = _simple_figures(cell, alone[0])
            mean, p99 = figures.mean / cell.best_mean[0], figures.p99 / cell.best_p99[0]
            too = "long" if alone[0] == "fifo" else "short"
            reason = (
                f"{alone[0]} alone is within {TARGET}x of both bests (mean {mean:.2f}x, "
                f"p99 {p99:.2f}x): the bound is too {too} here"
            )
        else:
            its_p99 = _simple_figures(cell, mean_from).p99 / cell.best_p99[0]
            its_mean = _simple_figures(cell, p99_from).mean / cell.best_mean[0]
            reason = (
                f"a trade-off: the best mean is {mean_from}'s, the best p99 {p99_from}'s; "
                f"{mean_from} has p99 {its_p99:.2f}x, {p99_from} has mean {its_mean:.2f}x"
            )
        found.append(f"{missed} ({reason})")
    if cell.fifo.over_bound == 0 and cell.default.over_bound > 0:
        found.append(
            f"{cell.default.over_bound:.1f} requests per run waited past {MAX_WAIT_SECS:g} s, "
            "where FIFO kept every wait under it"
        )
    return found


def _simple_meets_both(cell: Cell, name: str) -> bool:
    figures = _simple_figures(cell, name)
    return figures.mean <= TARGET * cell.best_mean[0] and figures.p99 <= TARGET * cell.best_p99[0]


def _simple_figures(cell: Cell, name: str) -> Figures:
    return cell.fifo if name == "fifo" else cell.exhaustive


def summary(cells: list[Cell]) -> list[str]:
    lines = []
    for label, part in (
        ("tuned", [c for c in cells if c.tuned]),
        ("held out", [c for c in cells if not c.tuned]),
        ("all", cells),
    ):
        if not part:
            continue
        within = sum(1 for c in part if c.worst_ratio <= TARGET)
        worst = max(c.worst_ratio for c in part)
        mean = statistics.fmean(c.mean_ratio for c in part)
        p99 = statistics.fmean(c.p99_ratio for c in part)
        lines.append(
            f"{label}: {within} of {len(part)} cells within {TARGET}x on both; worst "
            f"{worst:.2f}x; average ratio: mean {mean:.3f}, p99 {p99:.3f}"
        )
    for name in SIMPLE:
        meets = sum(1 for c in cells if _simple_meets_both(c, name))
        lines.append(f"{name} itself: {meets} of {len(cells)} cells within {TARGET}x on both")
    torn = [c for c in cells if not any(_simple_meets_both(c, name) for name in SIMPLE)]
    lines.append(
        f"cells where neither simple policy is within {TARGET}x of both bests itself: "
        f"{len(torn)} of {len(cells)}; the default is within it in "
        f"{sum(1 for c in torn if c.worst_ratio <= TARGET)} of those"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces-dir", default="../shared/data/traces")
    parser.add_argument("--quick", action="store_true", help="six cells, seconds")
    parser.add_argument("--check", action="store_true", help=f"fail above {CHECK_WORST_RATIO}x")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    args = parser.parse_args()
    p = args.policy
    print(
        f"| trace | part | service | load | C (s) | FIFO mean / p99 (s) "
        f"| exhaustive mean / p99 (s) | {p} mean / p99 (s) | {p} mean / best | {p} p99 / best "
        f"| switches FIFO / exh. / {p} | waits > {MAX_WAIT_SECS:g} s FIFO / {p} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cells = []
    with ProcessPoolExecutor() as pool:
        for cell in pool.map(run_cell, jobs(args.quick, p, args.traces_dir)):
            print(row(cell), flush=True)
            cells.append(cell)
    print(f"\nCells that miss {TARGET}x:")
    for cell in cells:
        for miss in why(cell):
            print(f"- {cell.name}, {cell.kind}, load {cell.load}, C {cell.cost:g} s: {miss}")
    print()
    for line in summary(cells):
        print(line)
    worst = max(c.worst_ratio for c in cells)
    print(f"worst ratio to the best simple policy (mean or p99): {worst:.2f}")
    if args.check and worst > CHECK_WORST_RATIO:
        problem = f"FAIL: {p} is more than {CHECK_WORST_RATIO}x the best simple policy"
        print(f"{problem} in a quick cell", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
