"""The sleep-depth grid: `sleep_level = "auto"` against the fixed depths, per cell.

    python -m benchmarks.tiers [--traces-dir ../shared/data/traces] [--quick [--check]]

Each cell replays one trace through the live core in the simulator (llmux/sim/simulator.py),
every model a vLLM server llmux starts whose steps cost what a profile says (sim/tier_costs.py:
A and B, measured 8B-class models; the first wake of each is a cold start), under the default
policy. Four depth choices run on the same requests:

- L1: fixed level 1 (today's default), host RAM not limited: in a cell whose RAM is limited it
  needs more than the box has (its peak is shown), so it is no candidate there;
- L2: fixed level 2;
- L1 fit: level 1 while the weights fit in host RAM, else 2 (what llmux does with a fixed
  level 1 and a limit);
- auto: chosen per sleep (core/depth.py), within the same limit.

Cells: on/off tenants, Azure code+conv, Alibaba top-8 (busiest 12 hours) x profiles A, B x
sequential/batching x offered load 0.1/0.3/0.7 x ttl unset/10 s x host RAM unlimited / half the
models' weights. Prints a Markdown table (mean / p99 latency in seconds, auto's ratios to the
best feasible fixed choice), the cells that miss a target, and a summary per target.
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
from llmux.sim.simulator import Request, Result, ServiceModel, Simulator, Tiers
from llmux.sim.tier_costs import load_costs

TRACES = (("onoff", 0), ("azure", 0), ("alibaba", 8))
PROFILES = ("A", "B")
SERVICES = ("sequential", "batching")
LOADS = (0.1, 0.3, 0.7)
TTLS = (0.0, 10.0)
RAMS = ("unlimited", "half")
WINDOW_HOURS = 12
SEED = 1
CHOICES = ("L1", "L2", "L1 fit", "auto")
QUICK = (
    ("onoff", 0, "A", "sequential", 0.3, 10.0, "half"),
    ("azure", 0, "B", "batching", 0.1, 0.0, "unlimited"),
    ("alibaba", 8, "A", "sequential", 0.7, 0.0, "half"),
    ("alibaba", 8, "B", "sequential", 0.1, 10.0, "unlimited"),
)
MEAN_TARGET, P99_TARGET, GAIN_TARGET = 1.05, 1.10, 0.90
CHECK_WORST_RATIO = 1.10  # --check: seeded runs, so a regression check, not a noisy one


@dataclass(frozen=True)
class Figures:
    mean: float
    p99: float
    sleeps: dict[int, int]
    peak_ram_gb: float


@dataclass(frozen=True)
class Cell:
    trace: str
    top: int
    profile: str
    kind: str
    load: float
    ttl: float
    ram: str
    ram_gb: float | None
    runs: dict[str, Figures]

    @property
    def name(self) -> str:
        return {"alibaba": f"alibaba top-{self.top}"}.get(self.trace, self.trace)

    def feasible(self, choice: str) -> bool:
        """Within the cell's host RAM (fixed level 1 ignores the limit, so may not be)."""
        peak = self.runs[choice].peak_ram_gb
        return self.ram_gb is None or peak <= self.ram_gb + 1e-9

    def best_fixed(self, metric: str) -> tuple[float, str]:
        fixed = [c for c in ("L1", "L2", "L1 fit") if self.feasible(c)]
        return min((getattr(self.runs[c], metric), c) for c in fixed)

    def ratio(self, metric: str) -> float:
        return getattr(self.runs["auto"], metric) / self.best_fixed(metric)[0]

    @property
    def vs_fit(self) -> float:
        """auto's mean against "level 1 while it fits" (the RAM-limited target)."""
        return self.runs["auto"].mean / self.runs["L1 fit"].mean

    @property
    def vs_l1(self) -> float:
        """auto's mean against today's default, fixed level 1 (RAM unlimited)."""
        return self.runs["auto"].mean / self.runs["L1"].mean


def base_requests(trace: str, top: int, service: ServiceModel, traces_dir: str) -> list[Request]:
    if trace == "onoff":
        return on_off_requests(SEED)
    return simulate.load_trace(trace, top, Path(traces_dir), WINDOW_HOURS, service)


def figures(result: Result) -> Figures:
    latencies = result.latencies()
    return Figures(
        statistics.fmean(latencies),
        simulate.percentile(latencies, 0.99),
        result.sleeps,
        result.peak_host_ram_gb,
    )


def run_cell(job: tuple) -> Cell:
    trace, top, profile, kind, load, ttl, ram, traces_dir = job
    service = ServiceModel(kind)
    requests = traces.scale_to_load(
        base_requests(trace, top, service, traces_dir), load, service, SEED
    )
    models = sorted({r.model for r in requests})
    costs = load_costs(profile)
    ram_gb = None if ram == "unlimited" else 0.5 * sum(costs.of(m).weights_gb for m in models)
    tiers = {
        "L1": Tiers(costs, 1, None, ttl),
        "L2": Tiers(costs, 2, ram_gb, ttl),
        "L1 fit": Tiers(costs, 1, ram_gb, ttl),
        "auto": Tiers(costs, "auto", ram_gb, ttl),
    }
    runs = {}
    for choice, tier in tiers.items():
        if choice == "L1 fit" and ram_gb is None:
            runs[choice] = runs["L1"]  # the same thing when nothing limits it
            continue
        policy = load_policy(DEFAULT_POLICY, {}, Path("."))
        simulator = Simulator(
            requests, models, policy, traces.constant_cost(0.0), service, tiers=tier
        )
        runs[choice] = figures(simulator.run())
    return Cell(trace, top, profile, kind, load, ttl, ram, ram_gb, runs)


def jobs(quick: bool, traces_dir: str) -> Iterator[tuple]:
    if quick:
        yield from ((*cell, traces_dir) for cell in QUICK)
        return
    for trace, top in TRACES:
        for profile in PROFILES:
            for kind in SERVICES:
                for load in LOADS:
                    for ttl in TTLS:
                        for ram in RAMS:
                            yield trace, top, profile, kind, load, ttl, ram, traces_dir


def row(cell: Cell) -> str:
    def pair(choice: str) -> str:
        run = cell.runs[choice]
        text = f"{run.mean:.1f} / {run.p99:.1f}"
        return text if cell.feasible(choice) else f"({text}, {run.peak_ram_gb:g} GiB)"

    def mark(value: float, target: float) -> str:
        return f"**{value:.2f}**" if value > target else f"{value:.2f}"

    auto = cell.runs["auto"]
    depths = " / ".join(f"{auto.sleeps.get(level, 0)}" for level in (1, 2))
    return (
        f"| {cell.name} | {cell.profile} | {cell.kind} | {cell.load} | {cell.ttl:g} "
        f"| {cell.ram} | {pair('L1')} | {pair('L2')} | {pair('L1 fit')} | {pair('auto')} "
        f"| {mark(cell.ratio('mean'), MEAN_TARGET)} | {mark(cell.ratio('p99'), P99_TARGET)} "
        f"| {cell.vs_l1:.2f} | {depths} |"
    )


def misses(cell: Cell) -> list[str]:
    found = []
    if cell.ratio("mean") > MEAN_TARGET:
        found.append(
            f"mean {cell.ratio('mean'):.2f}x the best fixed ({cell.best_fixed('mean')[1]})"
        )
    if cell.ratio("p99") > P99_TARGET:
        found.append(f"p99 {cell.ratio('p99'):.2f}x the best fixed ({cell.best_fixed('p99')[1]})")
    if cell.ram_gb is not None and cell.vs_fit > 1.0 + 1e-9:
        found.append(f"mean {cell.vs_fit:.2f}x level 1 while it fits")
    return found


def summary(cells: list[Cell]) -> list[str]:
    within = [c for c in cells if c.ratio("mean") <= MEAN_TARGET and c.ratio("p99") <= P99_TARGET]
    limited = [c for c in cells if c.ram_gb is not None]
    worst_mean, worst_p99 = (max(c.ratio(metric) for c in cells) for metric in ("mean", "p99"))
    lines = [
        f"auto within {MEAN_TARGET}x mean and {P99_TARGET}x p99 of the best fixed choice: "
        f"{len(within)} of {len(cells)} cells; worst mean {worst_mean:.2f}x, worst p99 "
        f"{worst_p99:.2f}x",
    ]
    over = [
        f"{c.name} {c.profile} {c.kind} {c.load} ttl {c.ttl:g} ({choice})"
        for c in cells
        for choice in ("L2", "L1 fit", "auto")
        if not c.feasible(choice)
    ]
    lines.append(
        f"cells where L2, L1 fit or auto held more host RAM than the cell has: {len(over)}"
    )
    lines.extend(f"  {cell}" for cell in over)
    if limited:
        fine = sum(1 for c in limited if c.vs_fit <= 1.0 + 1e-9)
        lines.append(
            f"host RAM limited: auto's mean no worse than level 1 while it fits in {fine} of "
            f"{len(limited)} cells (worst {max(c.vs_fit for c in limited):.2f}x)"
        )
    low_ttl = [c for c in cells if c.ttl > 0 and c.load <= 0.1]
    if low_ttl:
        gains = sum(1 for c in low_ttl if c.ratio("mean") <= GAIN_TARGET)
        lines.append(
            f"low load with a ttl: auto >= {1 - GAIN_TARGET:.0%} better than the best fixed "
            f"choice (mean) in {gains} of {len(low_ttl)} cells"
        )
    for profile in sorted({c.profile for c in cells}):
        part = [c.vs_l1 for c in cells if c.profile == profile]
        lines.append(
            f"profile {profile}: auto's mean against today's default (fixed level 1, RAM "
            f"unlimited): {statistics.fmean(part):.2f}x on average, {min(part):.2f}x at best, "
            f"{max(part):.2f}x at worst"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces-dir", default="../shared/data/traces")
    parser.add_argument("--quick", action="store_true", help="four cells")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 if auto is above {CHECK_WORST_RATIO}x the best fixed choice (mean or p99) "
        "in a cell, or a choice within the limit held more host RAM than it",
    )
    args = parser.parse_args()
    print(
        "| trace | profile | service | load | ttl (s) | host RAM | L1 mean / p99 (s) | L2 | "
        "L1 fit | auto | auto mean / best fixed | auto p99 / best fixed | auto / L1 mean "
        "| auto's sleeps at L1 / L2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cells = []
    with ProcessPoolExecutor() as pool:
        for cell in pool.map(run_cell, jobs(args.quick, args.traces_dir)):
            print(row(cell), flush=True)
            cells.append(cell)
    print("\nCells that miss a target:")
    for cell in cells:
        for miss in misses(cell):
            print(
                f"- {cell.name}, {cell.profile}, {cell.kind}, load {cell.load}, ttl "
                f"{cell.ttl:g}, RAM {cell.ram}: {miss}"
            )
    print()
    for line in summary(cells):
        print(line)
    if args.check:
        worst = max(max(c.ratio("mean"), c.ratio("p99")) for c in cells)
        over = [c for c in cells for x in ("L2", "L1 fit", "auto") if not c.feasible(x)]
        if worst > CHECK_WORST_RATIO or over:
            print(f"FAIL: auto at {worst:.2f}x the best fixed choice; {len(over)} over RAM")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
