"""The policy grid: the cost-aware policy against the faithful FIFO on real traces.

    python -m benchmarks.policies [--traces-dir ../shared/data/traces] [--quick]

Cells: Azure code+conv (one-at-a-time and continuous batching), Alibaba top-4 and top-8 (its
busiest 72 hours; one-at-a-time: diffusion jobs are not token streams), at offered loads 0.3,
0.6, 0.9 and constant switch costs 2, 10, 30 s. Prints a Markdown table: each policy's mean and
p99 latency, their ratios to FIFO, and the mean's ratio to the zero-switch-cost ideal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmux import simulate, traces
from llmux.simulator import ServiceModel

LOADS = (0.3, 0.6, 0.9)
COSTS = (2.0, 10.0, 30.0)


def cells(quick: bool) -> list[tuple[str, str, int]]:
    if quick:
        return [("azure", "sequential", 0)]
    return [
        ("azure", "sequential", 0),
        ("azure", "batching", 0),
        ("alibaba", "sequential", 4),
        ("alibaba", "sequential", 8),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces-dir", default="../shared/data/traces")
    parser.add_argument("--quick", action="store_true", help="Azure one-at-a-time only")
    parser.add_argument("--policy", default="cost_aware")
    args = parser.parse_args()
    folder = Path(args.traces_dir)
    print(
        "| trace | service | load | C (s) | FIFO mean / p99 (s) | "
        f"{args.policy} mean / p99 (s) | mean ratio | p99 ratio | {args.policy} / ideal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for trace, kind, top in cells(args.quick):
        service = ServiceModel(kind)
        base = simulate.load_trace(trace, top, folder, 72, service)
        name = f"alibaba top-{top}" if trace == "alibaba" else "azure"
        for load in LOADS:
            requests = traces.scale_to_load(base, load, service, seed=1)
            for cost in COSTS:
                fifo, other = simulate.compare(
                    requests, ["fifo", args.policy], lambda c=cost: traces.constant_cost(c), service
                )
                print(
                    f"| {name} | {kind} | {load} | {cost:g} | {fifo.mean:.1f} / {fifo.p99:.1f} | "
                    f"{other.mean:.1f} / {other.p99:.1f} | {other.mean / fifo.mean:.2f} | "
                    f"{other.p99 / fifo.p99:.2f} | {other.ideal_ratio:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
