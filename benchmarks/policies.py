"""The policy grid: the default policy against the faithful FIFO, replayed on real traces.

    python -m benchmarks.policies [--traces-dir ../shared/data/traces] [--quick [--check]]

Cells: the Azure code+conv pair and Alibaba top-4 and top-8 (its busiest 12 hours, thinned by
user group), each in both service models, at offered loads 0.3, 0.6 and 0.9, with constant
switch costs of 2, 10 and 30 s. Each cell is averaged over three thinning seeds. Prints a
Markdown table (each policy's mean and p99 latency, their ratios to FIFO, the mean's ratio to
the zero-switch-cost ideal, switches, the longest wait before a request was forwarded), then
the cells that miss the targets. `--quick` runs four cells in seconds; with `--check` it exits
1 if the default policy is more than 10% worse than FIFO in any of them (the runs are seeded,
so this is a regression check, not a noisy one).
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
from llmux.policy import CostAwarePolicy, load_policy
from llmux.sim import simulate, traces
from llmux.sim.simulator import Result, ServiceModel, Simulator

LOADS = (0.3, 0.6, 0.9)
COSTS = (2.0, 10.0, 30.0)
SEEDS = (1, 2, 3)
WINDOW_HOURS = 12
TRACES = (("azure", 0), ("alibaba", 4), ("alibaba", 8))
QUICK = (
    ("azure", 0, "sequential", 0.6, 30.0),
    ("azure", 0, "batching", 0.3, 10.0),
    ("alibaba", 4, "sequential", 0.6, 10.0),
    ("alibaba", 8, "sequential", 0.9, 30.0),
)
CHECK_WORST_RATIO = 1.10
MAX_WAIT_SECS = CostAwarePolicy().max_wait


@dataclass(frozen=True)
class Figures:
    mean: float
    p99: float
    switches: float
    max_wait: float  # arrival to forwarding, the longest in the run
    over_bound: float  # requests that waited longer than max_wait_secs


@dataclass(frozen=True)
class Cell:
    trace: str
    top: int
    kind: str
    load: float
    cost: float
    fifo: Figures
    other: Figures
    ideal_mean: float

    @property
    def name(self) -> str:
        return f"alibaba top-{self.top}" if self.trace == "alibaba" else "azure"

    @property
    def mean_ratio(self) -> float:
        return self.other.mean / self.fifo.mean

    @property
    def p99_ratio(self) -> float:
        return self.other.p99 / self.fifo.p99

    @property
    def ideal_ratio(self) -> float:
        return self.other.mean / self.ideal_mean

    @property
    def fifo_ideal_ratio(self) -> float:
        return self.fifo.mean / self.ideal_mean


def figures(result: Result) -> Figures:
    latencies = result.latencies()
    waits = [r.started - r.arrival for r in result.requests if r.started is not None]
    return Figures(
        mean=statistics.fmean(latencies),
        p99=simulate.percentile(latencies, 0.99),
        switches=len(result.switches),
        max_wait=max(waits),
        over_bound=sum(1 for w in waits if MAX_WAIT_SECS is not None and w > MAX_WAIT_SECS),
    )


def run_cell(job: tuple[str, int, str, float, float, str, str]) -> Cell:
    trace, top, kind, load, cost, policy, traces_dir = job
    service = ServiceModel(kind)
    base = simulate.load_trace(trace, top, Path(traces_dir), WINDOW_HOURS, service)
    runs: dict[str, list[Figures]] = {"fifo": [], "other": []}
    ideal_means = []
    for seed in SEEDS:
        requests = traces.scale_to_load(base, load, service, seed)
        models = sorted({r.model for r in requests})
        free, paid = traces.constant_cost(0.0), traces.constant_cost(cost)
        fifo = load_policy("fifo", {}, Path("."))
        ideal = Simulator(requests, models, fifo, free, service).run()
        ideal_means.append(statistics.fmean(ideal.latencies()))
        for label, name in (("fifo", "fifo"), ("other", policy)):
            chosen = load_policy(name, {}, Path("."))
            runs[label].append(figures(Simulator(requests, models, chosen, paid, service).run()))
    fifo_figures, other_figures = (_mean_of(runs[label]) for label in ("fifo", "other"))
    return Cell(
        trace, top, kind, load, cost, fifo_figures, other_figures, statistics.fmean(ideal_means)
    )


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
    f, o = cell.fifo, cell.other
    return (
        f"| {cell.name} | {cell.kind} | {cell.load} | {cell.cost:g} "
        f"| {f.mean:.1f} / {f.p99:.1f} | {o.mean:.1f} / {o.p99:.1f} "
        f"| {cell.mean_ratio:.2f} | {cell.p99_ratio:.2f} "
        f"| {cell.fifo_ideal_ratio:.2f} / {cell.ideal_ratio:.2f} "
        f"| {f.switches:.0f} / {o.switches:.0f} | {f.max_wait:.0f} / {o.max_wait:.0f} "
        f"| {f.over_bound:.0f} / {o.over_bound:.0f} |"
    )


def misses(cell: Cell) -> list[str]:
    """The issue's targets this cell does not meet."""
    found = []
    if cell.mean_ratio > 1.05 or cell.p99_ratio > 1.05:
        found.append("more than 5% worse than FIFO")
    if cell.cost >= 10 and cell.load <= 0.6 and (cell.mean_ratio > 0.6 or cell.p99_ratio > 0.8):
        floor = (
            " (0.6x FIFO is below FIFO with free switches)"
            if cell.fifo_ideal_ratio < 1 / 0.6
            else ""
        )
        found.append(f"mean above 0.6x or p99 above 0.8x FIFO{floor}")
    if cell.load == 0.9 and (cell.mean_ratio > 0.9 or cell.p99_ratio > 0.9):
        floor = (
            " (0.9x FIFO is below FIFO with free switches)"
            if cell.fifo_ideal_ratio < 1 / 0.9
            else ""
        )
        found.append(f"mean or p99 above 0.9x FIFO at load 0.9{floor}")
    if cell.cost == 2 and cell.load <= 0.6 and cell.ideal_ratio > 1.5:
        found.append("mean above 1.5x the ideal")
    if cell.other.over_bound > cell.fifo.over_bound:
        found.append("more requests waited past max_wait_secs than under FIFO")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces-dir", default="../shared/data/traces")
    parser.add_argument("--quick", action="store_true", help="four cells, seconds")
    parser.add_argument("--check", action="store_true", help=f"fail above {CHECK_WORST_RATIO}x")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    args = parser.parse_args()
    p = args.policy
    print(
        f"| trace | service | load | C (s) | FIFO mean / p99 (s) | {p} mean / p99 (s) "
        f"| mean ratio | p99 ratio | mean / ideal FIFO / {p} | switches FIFO / {p} "
        f"| longest wait FIFO / {p} (s) | waits > {MAX_WAIT_SECS:g} s FIFO / {p} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cells = []
    with ProcessPoolExecutor() as pool:
        for cell in pool.map(run_cell, jobs(args.quick, p, args.traces_dir)):
            print(row(cell), flush=True)
            cells.append(cell)
    print("\nTargets missed:")
    for cell in cells:
        for miss in misses(cell):
            print(f"- {cell.name}, {cell.kind}, load {cell.load}, C {cell.cost:g} s: {miss}")
    worst = max(max(c.mean_ratio, c.p99_ratio) for c in cells)
    print(f"\nworst ratio to FIFO (mean or p99): {worst:.2f}")
    if args.check and worst > CHECK_WORST_RATIO:
        print(f"FAIL: {p} is more than {CHECK_WORST_RATIO}x FIFO in a quick cell", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
