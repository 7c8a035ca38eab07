"""The `/llmux/status` report: llmux's state as JSON, for scripts and load balancers."""

from __future__ import annotations

import time
from typing import Any

import trio

from llmux import __version__
from llmux.config import Config
from llmux.costs import IDLE
from llmux.switcher import Switcher


def status_report(config: Config, switcher: Switcher, started_wall: float) -> dict[str, Any]:
    active = next((m.name for m in switcher.models.values() if m.state == "active"), None)
    switch = switcher.current_switch
    if switch is not None:
        state = "switching"
    elif active is not None:
        state = "active"
    else:
        state = "idle"
    costs = [
        {"from": source, "to": target, "seconds": seconds}
        for (source, target), seconds in switcher.costs.switches.items()
    ] + [
        {"from": IDLE, "to": target, "seconds": s}
        for target, s in switcher.costs.cold_starts.items()
    ]
    return {
        "version": __version__,
        "uptime_seconds": round(time.time() - started_wall, 3),
        "state": state,
        "active_model": active,
        "switch": None
        if switch is None
        else {
            "from": switch.from_label,
            "to": switch.target,
            "elapsed_seconds": round(trio.current_time() - switch.started, 3),
        },
        "shutting_down": switcher.closing,
        "models": {
            name: {
                "state": model.state.value,
                "queue_depth": len(model.queue),
                "in_flight": model.in_flight,
                "last_alive": model.last_alive,
                "port": model.config.port,
            }
            for name, model in switcher.models.items()
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
