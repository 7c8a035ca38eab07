"""Traces for the simulator: a plain CSV, the Azure LLM 2023 pair, the Alibaba GenAI 2026 trace;
scaling a trace to a target load; switch-cost functions.

Load is the offered work divided by the span: for one-at-a-time service, the sum of service
times; for continuous batching, each request's share of a full batch (its prefill plus its
tokens at the per-sequence cost of a full step). A trace above the target load is thinned (by
group, when the trace has groups: whole users kept or dropped, as a smaller tenant mix would
look), then stretched in time by the little it overshoots; one below it is compressed in time.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from llmux.sim.simulator import Request, ServiceModel

AZURE_FILES = {"code": "AzureLLMInferenceTrace_code.csv", "conv": "AzureLLMInferenceTrace_conv.csv"}
ALIBABA_REQUESTS = "lora_request_trace.csv"
ALIBABA_LATENCIES = "basemodel_update_latency_anon.csv"


def load_csv(path: Path) -> list[Request]:
    """Columns: arrival (s), model, and service (s) or prompt_tokens and output_tokens."""
    requests = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            requests.append(
                Request(
                    arrival=float(row["arrival"]),
                    model=row["model"],
                    service=float(row.get("service") or 0.0),
                    prompt_tokens=int(row.get("prompt_tokens") or 0),
                    output_tokens=int(row.get("output_tokens") or 1),
                )
            )
    return _with_token_services(requests)


def load_azure(folder: Path) -> list[Request]:
    """The code and conversation services as two models, merged by time."""
    requests = []
    for model, name in AZURE_FILES.items():
        with open(folder / name, newline="") as handle:
            for row in csv.DictReader(handle):
                stamp = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
                requests.append(
                    Request(
                        arrival=stamp,
                        model=model,
                        prompt_tokens=int(row["ContextTokens"]),
                        output_tokens=max(1, int(row["GeneratedTokens"])),
                    )
                )
    return _with_token_services(_rebase(requests))


def load_alibaba(folder: Path, top: int) -> list[Request]:
    """Succeeded requests of the `top` most requested base models; service = exec_time. For the
    batching model, the time becomes decode tokens at one sequence's step cost (no prompts)."""
    rows = []
    with open(folder / ALIBABA_REQUESTS, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["predict_status"] == "SUCCEED":
                rows.append(row)
    popular = {
        m for m, _ in Counter(r["checkpoint_model_version_id"] for r in rows).most_common(top)
    }
    requests = []
    step = ServiceModel().step(1)
    for index, row in enumerate(rows):
        if row["checkpoint_model_version_id"] not in popular:
            continue
        service = float(row["exec_time_seconds"])
        requests.append(
            Request(
                # 1-s resolution: spread ties by their order.
                arrival=datetime.fromisoformat(row["gmt_create"]).timestamp() + index * 1e-4,
                model=row["checkpoint_model_version_id"],
                service=service,
                output_tokens=max(1, round(service / step)),
                group=row["groupId"],
            )
        )
    return _rebase(requests)


def busiest_window(requests: list[Request], hours: int, service: ServiceModel) -> list[Request]:
    """The `hours`-long window, starting on the hour, with the most work: a long bursty trace
    compressed as a whole would turn its peaks into backlogs lasting days."""
    work: dict[int, float] = {}
    for r in requests:
        slot = int(r.arrival // 3600)
        work[slot] = work.get(slot, 0.0) + service.full_batch_time(r)
    best = max(work, key=lambda s: sum(work.get(s + i, 0.0) for i in range(hours)))
    start, end = best * 3600, (best + hours) * 3600
    return _rebase([Request(**vars(r)) for r in requests if start <= r.arrival < end])


def alibaba_switch_costs(folder: Path) -> list[float]:
    with open(folder / ALIBABA_LATENCIES, newline="") as handle:
        return [float(row["value"]) / 1000 for row in csv.DictReader(handle)]


def offered_load(requests: list[Request], service: ServiceModel) -> float:
    if len(requests) < 2:
        return 0.0
    span = requests[-1].arrival - requests[0].arrival
    return sum(service.full_batch_time(r) for r in requests) / span if span > 0 else 0.0


def scale_to_load(
    requests: list[Request], target: float, service: ServiceModel, seed: int
) -> list[Request]:
    """Thin (by group when there are groups) or compress time until the offered load is `target`."""
    rng = random.Random(seed)
    load = offered_load(requests, service)
    if load > target:
        span = requests[-1].arrival - requests[0].arrival
        work: dict[str, float] = {}
        for r in requests:
            work[r.group] = work.get(r.group, 0.0) + service.full_batch_time(r)
        if len(work) > 20:  # keep whole groups (users), in random order, until the load is met
            order = sorted(work)
            rng.shuffle(order)
            kept: set[str] = set()
            total = 0.0
            for group in order:
                kept.add(group)
                total += work[group]
                if total / span >= target:
                    break
            requests = [r for r in requests if r.group in kept]
        else:
            keep = target / load
            requests = [r for r in requests if rng.random() < keep]
        load = offered_load(requests, service)
    if load > 0 and abs(load - target) > 1e-9:
        # Compress (or, after thinning that overshot, stretch) time to meet the load exactly.
        factor = load / target
        start = requests[0].arrival
        requests = [_moved(r, start + (r.arrival - start) * factor) for r in requests]
    return requests


def constant_cost(seconds: float) -> Callable[[str | None, str], float]:
    return lambda source, target: seconds


def matrix_cost(path: Path, default: float) -> Callable[[str | None, str], float]:
    """A CSV of from,to,seconds rows (from may be `idle`)."""
    table = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            table[(row["from"], row["to"])] = float(row["seconds"])
    return lambda source, target: table.get((source or "idle", target), default)


def sampled_cost(samples: list[float], seed: int) -> Callable[[str | None, str], float]:
    rng = random.Random(seed)
    return lambda source, target: rng.choice(samples)


def _with_token_services(requests: list[Request]) -> list[Request]:
    """One-at-a-time service time from tokens: the prefill, then one single-sequence step each."""
    one = ServiceModel("batching")
    for request in requests:
        if not request.service:
            request.service = one.solo_time(request)
    return requests


def _rebase(requests: list[Request]) -> list[Request]:
    requests.sort(key=lambda r: r.arrival)
    start = requests[0].arrival if requests else 0.0
    for request in requests:
        request.arrival -= start
    return requests


def _moved(request: Request, arrival: float) -> Request:
    copy = Request(**vars(request))
    copy.arrival = arrival
    return copy
