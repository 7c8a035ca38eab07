"""Co-residency against one model at a time, replayed on the Alibaba trace.

    python -m benchmarks.coresidency [--traces-dir ../shared/data/traces]

One 80 GB GPU; each model's size is drawn between 25 and 40 GB (seeded), so two always fit and
three fit when they are small. Alibaba top-4 and top-8 (busiest 12 hours, thinned by user group)
at offered loads 0.3, 0.6 and 0.9, with switch costs of 10 s, 30 s and sampled from Alibaba's
measured model-load latencies, or 1 s per GB of the model woken (so models differ in what
evicting them costs), one request at a time on the shared GPU (co-resident models take
turns: co-residency saves switches, not compute). Each cell averages three seeds. Prints a
Markdown table of the default policy's mean and p99 latency and switches per request in both
layouts, FIFO's mean with co-residency, and the default policy's mean when evictions follow
least-recently-used alone (a custom `evict`), to measure the eviction order itself.
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from llmux.config import DEFAULT_POLICY
from llmux.policy import AdaptivePolicy, ModelState, Snapshot, held, load_policy
from llmux.sim import simulate, traces
from llmux.sim.simulator import ServiceModel

CAPACITY = 80.0
SIZES = "uniform:25-40"
LOADS = (0.3, 0.6, 0.9)
COSTS = ("10", "30", "alibaba", "by-size")
BY_SIZE_SECS_PER_GB = 1.0  # "by-size": waking a model takes 1 s per GB (a 40 GB model, 40 s)
SEEDS = (1, 2, 3)
WINDOW_HOURS = 12


class LeastRecentlyUsed(AdaptivePolicy):
    """The default policy with llama-swap-style evictions: the least recently used go first."""

    def evict(self, target: str, snapshot: Snapshot) -> list[str]:
        views = snapshot.models
        awake = [v for v in views.values() if v.state is ModelState.ACTIVE and v.name != target]
        excess = held(snapshot, {target}) + views[target].size - snapshot.capacity
        victims = []
        for view in sorted(awake, key=lambda v: v.last_used or 0.0):
            if excess <= 1e-9:
                break
            victims.append(view.name)
            excess -= view.size
        return victims


def make(policy: str):
    if policy == "lru":
        return LeastRecentlyUsed
    return lambda: load_policy(policy, {}, Path("."))


def run_cell(job: tuple[int, float, str, str]) -> str:
    top, load, cost_spec, traces_dir = job
    folder = Path(traces_dir)
    service = ServiceModel("sequential")
    base = simulate.load_trace("alibaba", top, folder, WINDOW_HOURS, service)
    figures: dict[str, list[tuple[float, float, float]]] = {}
    for seed in SEEDS:
        requests = traces.scale_to_load(base, load, service, seed)
        models = simulate.by_demand(requests)
        layouts = {
            "one": simulate.Layout(),
            "co": simulate.layout_from(models, 1, CAPACITY, SIZES, seed),
        }
        runs = [("one", DEFAULT_POLICY), ("co", DEFAULT_POLICY), ("co", "fifo"), ("co", "lru")]
        for layout_name, policy in runs:
            layout = layouts[layout_name]
            if cost_spec == "by-size":
                sizes = layouts["co"].sizes

                def cost(source: str | None, target: str, sizes=sizes) -> float:
                    return BY_SIZE_SECS_PER_GB * sizes[target]

            else:
                cost = simulate.cost_factory(cost_spec, folder, seed)()
            result = simulate.run_layout(requests, layout, make(policy), cost, service, 0.0, policy)
            latencies = result.latencies()
            figures.setdefault(f"{layout_name}/{policy}", []).append(
                (
                    statistics.fmean(latencies),
                    simulate.percentile(latencies, 0.99),
                    len(result.switches) / len(latencies),
                )
            )
    avg = {
        key: [statistics.fmean(v[i] for v in runs) for i in range(3)]
        for key, runs in figures.items()
    }
    one, co = avg[f"one/{DEFAULT_POLICY}"], avg[f"co/{DEFAULT_POLICY}"]
    cost_label = {"alibaba": "sampled", "by-size": "1 s/GB"}.get(cost_spec, f"{cost_spec} s")
    return (
        f"| top-{top} | {load} | {cost_label} | {one[0]:.0f} / {one[1]:.0f} "
        f"| {co[0]:.0f} / {co[1]:.0f} "
        f"| {co[0] / one[0]:.2f} / {co[1] / one[1]:.2f} | {one[2]:.2f} / {co[2]:.2f} "
        f"| {avg['co/fifo'][0]:.0f} | {avg['co/lru'][0]:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces-dir", default="../shared/data/traces")
    args = parser.parse_args()
    p = DEFAULT_POLICY
    print(
        f"| trace | load | switch cost | one at a time: {p} mean / p99 (s) "
        f"| co-resident: {p} mean / p99 (s) | ratio mean / p99 | switches per request one / co "
        f"| co-resident: fifo mean (s) | co-resident: {p} with LRU evictions, mean (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    jobs = [
        (top, load, cost, args.traces_dir) for top in (4, 8) for load in LOADS for cost in COSTS
    ]
    with ProcessPoolExecutor() as pool:
        for line in pool.map(run_cell, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
