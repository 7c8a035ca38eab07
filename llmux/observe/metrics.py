"""Prometheus metrics, one registry per app instance (so several apps can live in one process).

Names and meanings follow the original llmux; `llmux_model_state` and `llmux_model_dead_total` are
ours. Label values for models are always configured names (or `unknown`), never raw client input,
so clients cannot grow the series without bound.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmux import __version__
from llmux.core.states import ModelState

if TYPE_CHECKING:
    from llmux.config import Config

prometheus_client.disable_created_metrics()

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
UNKNOWN_MODEL = "unknown"


class Metrics:
    def __init__(self, model_names: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.switch_total = Counter(
            "llmux_switch_total",
            "Total model switches attempted",
            ["from", "to", "result"],
            registry=r,
        )
        self.switch_duration = Histogram(
            "llmux_switch_duration_seconds",
            "Wall-clock duration of model switches (drain + sleep + wake)",
            ["from", "to"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.switch_drain_duration = Histogram(
            "llmux_switch_drain_duration_seconds",
            "Time spent draining in-flight requests before a switch",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_active_duration = Histogram(
            "llmux_model_active_duration_seconds",
            "How long a model stayed active before being switched out",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.sleep_seconds = Histogram(
            "llmux_sleep_seconds",
            "Duration of each sleep that succeeded (hook or built-in step), per model and the "
            "sleep level it was put to sleep at",
            ["model", "level"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.wake_seconds = Histogram(
            "llmux_wake_seconds",
            "Duration of each wake that succeeded, per model and the sleep level it woke "
            "from (level=cold: the wake started the model's server)",
            ["model", "level"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.host_ram_held = Gauge(
            "llmux_host_ram_sleeping_bytes",
            "Host RAM held by the weights of models asleep at level 1 (or going to sleep at it)",
            registry=r,
        )
        self.host_ram_capacity = Gauge(
            "llmux_host_ram_capacity_bytes",
            "Host RAM the weights of models asleep at level 1 may fill ([machine] ram_gb)",
            registry=r,
        )
        self.switch_cost_ema = Gauge(
            "llmux_switch_cost_ema_seconds",
            "EMA-smoothed estimated switch cost per (from, to) pair (sleep + wake hooks)",
            ["from", "to"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "llmux_request_queue_depth",
            "Number of requests waiting for a model to become active",
            ["model"], registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "llmux_request_queue_wait_seconds",
            "Time a request spent queued waiting for model readiness",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "llmux_model_in_flight", "Current in-flight requests per model", ["model"], registry=r
        )
        self.requests_total = Counter(
            "llmux_requests_total", "Total requests processed", ["model", "status"], registry=r
        )
        self.internal_errors = Counter(
            "llmux_internal_errors_total",
            "Requests that failed on a bug of llmux's (answered 500, or cut; logged with a "
            "traceback as internal_error)",
            registry=r,
        )
        self.request_duration = Histogram(
            "llmux_request_duration_seconds",
            "End-to-end request duration (time to first byte)",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.hook_duration = Histogram(
            "llmux_hook_duration_seconds", "Hook script execution time",
            ["model", "hook"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.hook_failures = Counter(
            "llmux_hook_failures_total", "Total hook script failures", ["model", "hook"], registry=r
        )
        self.model_state = Gauge(
            "llmux_model_state",
            "1 for the state each model is in now, 0 for the others",
            ["model", "state"], registry=r,
        )  # fmt: skip
        self.model_dead = Counter(
            "llmux_model_dead_total",
            "Times an active model was found not serving (its alive hook failed, or the server "
            "llmux started for it exited) and put to sleep",
            ["model"], registry=r,
        )  # fmt: skip
        self.start_backoff = Gauge(
            "llmux_model_start_backoff_seconds",
            "Seconds left before llmux starts the model's `cmd` server again after it failed "
            "to start (requests for it are refused until then); 0 when it may be started",
            ["model"], registry=r,
        )  # fmt: skip
        self.policy_errors = Counter(
            "llmux_policy_errors_total",
            "Answers of the switch policy that were not sound (or raised) and were replaced "
            "by the default answer",
            ["group", "answer"], registry=r,
        )  # fmt: skip
        self.switch_in_progress = Gauge(
            "llmux_switch_in_progress",
            "Unix time the switch now running started; present only while a switch runs",
            ["from", "to"], registry=r,
        )  # fmt: skip
        self.switch_last_time = Gauge(
            "llmux_switch_last_time_seconds",
            "Unix time the latest switch from->to with this result ended",
            ["from", "to", "result"], registry=r,
        )  # fmt: skip
        self.last_switch_duration = Gauge(
            "llmux_model_last_switch_duration_seconds",
            "Duration of the latest successful switch to this model (drain + sleep + wake)",
            ["model"], registry=r,
        )  # fmt: skip
        self.active_since = Gauge(
            "llmux_model_active_since_seconds",
            "Unix time the model became active; 0 while it is not active",
            ["model"], registry=r,
        )  # fmt: skip
        self.group_model = Gauge(
            "llmux_group_model_info",
            "Always 1: which group each model belongs to",
            ["group", "model"], registry=r,
        )  # fmt: skip
        self.group_capacity = Gauge(
            "llmux_group_capacity",
            "The group's capacity (memory_gb or size units; 1 when one model is awake at a time)",
            ["group"], registry=r,
        )  # fmt: skip
        self.group_used = Gauge(
            "llmux_group_used",
            "Capacity held now by the group's models that are not asleep",
            ["group"], registry=r,
        )  # fmt: skip
        self.group_gpu = Gauge(
            "llmux_group_gpu_info",
            "Always 1: the GPUs (NVML indices) each group names",
            ["group", "gpu"], registry=r,
        )  # fmt: skip
        self.gpu_free = Gauge(
            "llmux_gpu_free_bytes",
            "Free memory of a GPU a group names, as the driver (NVML) said at the latest read",
            ["gpu"], registry=r,
        )  # fmt: skip
        self.gpu_total = Gauge(
            "llmux_gpu_total_bytes",
            "Total memory of a GPU a group names, as the driver (NVML) said at the latest read",
            ["gpu"], registry=r,
        )  # fmt: skip
        self.gpu_memory_not_freed = Counter(
            "llmux_gpu_memory_not_freed_total",
            "Switches whose wake found too little free GPU memory after this model was put to "
            "sleep for it (its sleep did not free its memory); the wake waits, then fails",
            ["model"], registry=r,
        )  # fmt: skip
        self.connections_open = Gauge(
            "llmux_connections_open", "Client connections open now", registry=r
        )
        self.connections_refused = Counter(
            "llmux_connections_refused_total",
            "Connections answered 503 and closed because server.max_connections were open",
            registry=r,
        )
        self.client_send_timeouts = Counter(
            "llmux_client_send_timeouts_total",
            "Requests cut because their client took nothing for client_send_timeout_secs",
            ["model"], registry=r,
        )  # fmt: skip
        self.backend_timeouts = Counter(
            "llmux_backend_timeouts_total",
            "Requests cut because the backend sent nothing for first_byte_timeout_secs "
            "(phase first_byte) or idle_timeout_secs (phase idle)",
            ["model", "phase"], registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            "llmux_build_info", "Always 1; the version of llmux serving", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self.start_time = Gauge("llmux_start_time_seconds", "Unix time llmux started", registry=r)
        self.start_time.set(time.time())
        for name in model_names:
            self.add_model(name)

    def describe_groups(self, config: Config) -> None:
        """(Re)state which models and GPUs belong to which group, and each group's capacity.
        GPU memory is dropped until the next read, which sets what the groups name now."""
        for gauge in (self.group_model, self.group_gpu, self.gpu_free, self.gpu_total):
            gauge.clear()
        for group in config.groups.values():
            self.group_capacity.labels(group.name).set(group.room)
            for model in group.models:
                self.group_model.labels(group.name, model).set(1)
            for gpu in group.gpus:
                self.group_gpu.labels(group.name, str(gpu)).set(1)

    def set_gpu_memory(self, gpu: int, total: int, free: int) -> None:
        self.gpu_total.labels(str(gpu)).set(total)
        self.gpu_free.labels(str(gpu)).set(free)

    def forget_gpu(self, gpu: int) -> None:
        """A GPU that could not be read has no figure: absent, not its last one (stale)."""
        for gauge in (self.gpu_free, self.gpu_total):
            with contextlib.suppress(KeyError):
                gauge.remove(str(gpu))

    def add_model(self, name: str) -> None:
        """Create a model's gauges at zero, so dashboards see it before its first request."""
        self.queue_depth.labels(name).set(0)
        self.in_flight.labels(name).set(0)
        self.set_state(name, ModelState.ASLEEP)

    def forget_model(self, name: str) -> None:
        """Drop the gauges of a model a reload removed (its counters stay: they are history)."""
        for gauge in (self.queue_depth, self.in_flight, self.active_since, self.start_backoff):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        for state in ModelState:
            with contextlib.suppress(KeyError):
                self.model_state.remove(name, state.value)

    def set_state(self, model: str, state: ModelState) -> None:
        for candidate in ModelState:
            self.model_state.labels(model, candidate.value).set(1 if candidate is state else 0)
        self.active_since.labels(model).set(time.time() if state is ModelState.ACTIVE else 0)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
