"""The `/llmux/status` report: llmux's state as JSON, for scripts and load balancers."""

from __future__ import annotations

import time
from typing import Any

import trio

from llmux import __version__
from llmux.config import Config
from llmux.core.costs import SwitchCostTracker
from llmux.core.records import SwitchView
from llmux.core.start_backoff import StartBackoff
from llmux.core.states import ModelState
from llmux.runtime.fleet import Fleet


def status_report(config: Config, fleet: Fleet, started_wall: float) -> dict[str, Any]:
    models = fleet.models
    active = [name for name, m in models.items() if m.state is ModelState.ACTIVE]
    switches = fleet.current_switches
    if switches:
        state = "switching"
    elif active:
        state = "active"
    else:
        state = "idle"
    costs = [
        {"from": source, "to": target, "seconds": seconds}
        for source, target, seconds in fleet.costs.table()
    ]
    groups = {}
    gpus = fleet.read_gpus()
    for name, group in config.groups.items():
        members = [models[m] for m in group.models if m in models]
        reading = gpus.get(name)
        groups[name] = {
            "capacity": group.capacity,
            "used": sum(m.size for m in members if m.state is not ModelState.ASLEEP),
            "models": list(group.models),
            "active_models": [m.name for m in members if m.state is ModelState.ACTIVE],
            "switch": _switch(switches.get(name)),
            "gpus": list(group.gpus),
            # As the driver says now; null when no GPUs are named or they cannot be read.
            "gpu_free_gb": None if reading is None else round(reading.free_gb, 3),
            "gpu_total_gb": None if reading is None else round(reading.total_gb, 3),
        }
    return {
        "version": __version__,
        "uptime_seconds": round(time.time() - started_wall, 3),
        "state": state,
        "active_model": active[0] if active else None,  # the first; all are in active_models
        "active_models": active,
        "switch": _switch(next(iter(switches.values()), None)),
        "shutting_down": fleet.closing,
        "groups": groups,
        "machine": {
            "ram_gb": fleet.host_ram.capacity_gb,  # what level-1 sleepers may fill
            "sleeping_weights_gb": round(fleet.host_ram.held_gb(), 3),
        },
        "models": {
            name: {
                "state": model.state.value,
                "queue_depth": len(model.queue),
                "in_flight": model.in_flight,
                "last_alive": model.last_alive,
                "port": model.config.port,
                "group": model.config.group,
                "aliases": list(model.config.aliases),
                "slept_level": model.slept_level,
                "steps": _steps(fleet.costs, name),
                "start_backoff": _start_backoff(model.start_backoff),
            }
            for name, model in models.items()
        },
        "switch_costs": costs,
        "policy": {
            "name": config.policy.name,
            "options": config.policy.options,
            "request_timeout_secs": config.policy.request_timeout_secs,
            "drain_before_switch": config.policy.drain_before_switch,
            "min_active_secs": config.policy.min_active_secs,
        },
    }


def _switch(switch: SwitchView | None) -> dict[str, Any] | None:
    if switch is None:
        return None
    return {
        "from": switch.from_label,
        "to": switch.target,
        "evicting": list(switch.evicting),
        "elapsed_seconds": round(trio.current_time() - switch.started, 3),
    }


def _start_backoff(backoff: StartBackoff) -> dict[str, Any] | None:
    """Its `cmd` server's failed starts in a row (null: none since it last served or its config
    changed): seconds left before it is started again (0: at the next request), and the
    failure as clients are told it."""
    if not backoff.failures:
        return None
    return {
        "failures": backoff.failures,
        "seconds_left": round(backoff.left(trio.current_time()), 3),
        "last_failure": backoff.message,
    }


def _steps(costs: SwitchCostTracker, model: str) -> dict[str, dict[str, float]]:
    """A model's measured sleeps and wakes (EMA seconds), per sleep level ("cold": a wake that
    started its server)."""
    sleeps = {str(level): s for (name, level), s in costs.sleep_steps.items() if name == model}
    wakes = {str(level): s for (name, level), s in costs.wake_steps.items() if name == model}
    return {"sleep": sleeps, "wake": wakes}
