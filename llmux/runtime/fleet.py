"""The fleet: one switcher per group of models, behind the one face the app talks to.

Groups share nothing but llmux's process: each has its own switcher (states, queues, lifecycle
lock) and its own policy instance, so a switch on one GPU never waits for a switch on another.
The fleet routes each call to the group of the model it names, and runs, shuts down and reloads
all of them together.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from llmux.config import GIB, Config
from llmux.core.costs import SwitchCostTracker
from llmux.core.host_ram import HostRam
from llmux.core.records import ModelRecord, ReloadSummary, SwitchView
from llmux.core.states import ModelState
from llmux.core.waiting import WaitView
from llmux.errors import LlmuxError
from llmux.observe.logs import log_event
from llmux.observe.metrics import Metrics
from llmux.policies.interface import Policy
from llmux.runtime.backends import PerModelDriver, ShellHooks
from llmux.runtime.builtin_driver import BuiltinDriver
from llmux.runtime.driver import GroupDriver, Slot, WaitTicket
from llmux.runtime.gpus import GpuMemory, GpuReading
from llmux.runtime.hook_registry import HookRegistry
from llmux.runtime.machine import host_ram_gb
from llmux.runtime.server_processes import ServerProcesses
from llmux.runtime.state_dir import StateDir

log = logging.getLogger("llmux.servers")


class GroupsChanged(Exception):
    """A reload that adds or removes groups, or moves a model between them: needs a restart."""


class Fleet:
    def __init__(
        self,
        config: Config,
        make_policy: Callable[[], Policy],
        metrics: Metrics,
        costs: SwitchCostTracker,
        state: StateDir,
        gpus: GpuMemory,
    ) -> None:
        self.config = config
        self.costs = costs
        self.metrics = metrics
        self.gpus = gpus  # the driver's figures of GPU memory, for the groups that name GPUs
        self.hook_registry = HookRegistry(state, config.path)
        self.servers = ServerProcesses(state, self.hook_registry, config.hook_dir)
        backends = PerModelDriver(
            ShellHooks(config.hook_dir, self.hook_registry), BuiltinDriver(state, self.servers)
        )
        backends.on_exit(self.report_exit)  # a `cmd` server died: it serves nothing from now
        # One machine: the groups share its host RAM (level-1 sleepers' weights), not its GPUs.
        self.host_ram = HostRam(host_ram_gb(config))
        self.switchers = {
            name: GroupDriver(
                config.group_config(name), make_policy(), metrics, costs, backends, self.host_ram
            )
            for name in config.groups
        }
        for switcher in self.switchers.values():
            switcher.on_record_forgotten = self._stop_servers_left_behind
            switcher.read_gpu_free_gb = self.gpus.free_gb_each
        metrics.describe_groups(config)

    # ----- running -----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open NVML if a group names GPUs, stop hooks a crashed llmux left running, then run
        every group's switcher."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gpus.keep_open, lambda: self.config.gpus)
            # Before any group asks its backends what is awake.
            await self.hook_registry.stop_survivors()
            await nursery.start(self.servers.run)
            for switcher in self.switchers.values():
                await nursery.start(switcher.run)
            task_status.started()

    async def shutdown(self, timeout: float) -> None:
        async with trio.open_nursery() as nursery:
            for switcher in self.switchers.values():
                nursery.start_soon(switcher.shutdown, timeout)

    def reconfigure(
        self, config: Config, make_policy: Callable[[], Policy] | None
    ) -> ReloadSummary:
        """Apply a reloaded config group by group; raise GroupsChanged (changing nothing) when
        groups were added or removed or a model moved to another group."""
        if set(config.groups) != set(self.config.groups):
            raise GroupsChanged("groups were added or removed: restart llmux to apply that")
        for name, model in config.models.items():
            old = self.config.models.get(name)
            if old is not None and old.group != model.group:
                raise GroupsChanged(
                    f"model {name!r} moved from group {old.group!r} to {model.group!r}: "
                    "restart llmux to apply that"
                )
        summaries = [
            switcher.reconfigure(config.group_config(group), make_policy() if make_policy else None)
            for group, switcher in self.switchers.items()
        ]
        self.config = config
        self.host_ram.capacity_gb = host_ram_gb(config)
        self._say_if_host_ram_is_over()
        self.metrics.describe_groups(config)
        self._stop_servers_left_behind()
        return ReloadSummary(
            added=[n for s in summaries for n in s.added],
            removed=[n for s in summaries for n in s.removed],
            changed=[n for s in summaries for n in s.changed],
        )

    def _say_if_host_ram_is_over(self) -> None:
        """A reload that lowers `ram_gb` under what sleepers hold evicts nothing (they sleep
        on as they are); new level-1 sleeps go to level 2 until the rest fits again."""
        held, room = self.host_ram.held_gb(), self.host_ram.capacity_gb
        if room is not None and held > room:
            log_event(
                log, "host_ram_over", f"models asleep at level 1 hold {held:.3g} GiB of host "
                f"RAM, more than [machine] ram_gb = {room:g}: they sleep on; new sleeps go to "
                "level 2 until theirs fit", logging.WARNING, held_gb=held, ram_gb=room,
            )  # fmt: skip

    def _stop_servers_left_behind(self) -> None:
        """After a reload (and when a retired record is done with), a `cmd` server of a model
        held asleep that the config would not start as it runs (its model removed, or its
        command line, port or environment changed) is stopped now: nothing wakes it as it is,
        and asleep it still holds memory (a level-1 vLLM keeps its weights in RAM). A server of
        a model not asleep, or whose record a reload retired, is left to the core: its
        retirement drains it, then stops it."""
        held = {
            record.name
            for switcher in self.switchers.values()
            for record in (*switcher.core.retiring, *switcher.models.values())
            if record.retiring or record.state is not ModelState.ASLEEP
        }
        for name in self.servers.models():
            backend = self.config.models.get(name)
            if name in held or (backend is not None and self.servers.running_as(backend)):
                continue
            log_event(
                log, "server_left_behind", f"stopping the server of {name}: it sleeps, and the "
                "reloaded config would not start it as it runs", model=name,
            )  # fmt: skip
            self.servers.stop_soon(name)

    # ----- requests -----

    def switcher_of(self, model: str) -> GroupDriver:
        return self.switchers[self.config.models[model].group]

    @asynccontextmanager
    async def serving(self, model: str, ticket: WaitTicket | None = None) -> AsyncIterator[Slot]:
        group = self._group_holding(model)
        async with self.switchers[group].serving(model, ticket) as slot:
            yield slot

    async def where(self, ticket: WaitTicket) -> WaitView | None:
        """Where the request `ticket` was handed to `serving()` with waits (None: it does not).
        Asked with an await, as a worker asks the controller (workers/slots.py)."""
        await trio.lowlevel.checkpoint()
        if ticket.rid is None:
            return None
        return self.switchers[self._group_holding(ticket.model)].where(ticket.rid)

    def _group_holding(self, model: str) -> str:
        cfg = self.config.models.get(model)
        if cfg is not None:
            return cfg.group
        # Removed by a reload: let a group refuse it with its own error.
        return next(iter(self.switchers))

    def refusal(self, model: str) -> LlmuxError | None:
        """Why a request for `model` would be refused at once (queue full, shutting down)."""
        return self.switchers[self._group_holding(model)].refusal(model)

    def report_unreachable(self, model: str) -> None:
        """The proxy could not connect to `model`'s backend: its group checks it."""
        config = self.config.models.get(model)
        if config is None:
            return  # a reload removed it since its request was granted: it is being retired
        self.switchers[config.group].report_unreachable(model)

    def report_exit(self, model: str, port: int | None = None) -> None:
        """The server llmux started for `model` exited on its own: its group acts at once."""
        config = self.config.models.get(model)
        group = config.group if config is not None else None
        for name, switcher in self.switchers.items():
            if group is None or name == group:
                switcher.report_exit(model, port)  # a removed model's may still be retiring

    async def put_to_sleep(self, model: str) -> None:
        await self.switcher_of(model).put_to_sleep(model)

    async def sleep_all(self) -> None:
        """Every group puts its awake models to sleep; all are tried, the first error raised."""
        errors: list[LlmuxError] = []

        async def sleep_group(switcher: GroupDriver) -> None:
            try:
                await switcher.sleep_all()
            except LlmuxError as error:
                errors.append(error)

        async with trio.open_nursery() as nursery:
            for switcher in self.switchers.values():
                nursery.start_soon(sleep_group, switcher)
        if errors:
            raise errors[0]

    # ----- state -----

    def read_gpus(self) -> dict[str, GpuReading | None]:
        """Each group's GPU memory now, and the gauges set to it (a scrape or a status asks);
        None for a group that names no GPUs or whose GPUs cannot be read."""
        return {name: self.gpus.read(group.gpus) for name, group in self.config.groups.items()}

    def show_host_ram(self) -> None:
        """The host RAM gauges, set when a scrape asks (it changes only with sleeps and wakes,
        not worth a sum over every model on each request's events)."""
        ram = self.host_ram
        self.metrics.host_ram_held.set(ram.held_gb() * GIB)
        if ram.capacity_gb is not None:
            self.metrics.host_ram_capacity.set(ram.capacity_gb * GIB)

    def show_start_backoffs(self) -> None:
        """Each model's start back-off gauge: the seconds left now (a scrape asks; they run
        down with time, not with events)."""
        now = trio.current_time()
        for name, model in self.models.items():
            self.metrics.start_backoff.labels(name).set(model.start_backoff.left(now))

    @property
    def models(self) -> dict[str, ModelRecord]:
        """Every model's runtime, in config order."""
        runtimes = {}
        for switcher in self.switchers.values():
            runtimes.update(switcher.models)
        return {name: runtimes[name] for name in self.config.models if name in runtimes}

    @property
    def closing(self) -> bool:
        return any(switcher.closing for switcher in self.switchers.values())

    @property
    def current_switches(self) -> dict[str, SwitchView]:
        """The switch running in each group that has one."""
        return {
            group: switcher.current_switch
            for group, switcher in self.switchers.items()
            if switcher.current_switch is not None
        }

    async def wait_for_lifecycle_change(self) -> None:
        """Return after a model's state or a switch changes in any group."""
        async with trio.open_nursery() as nursery:

            async def first(switcher: GroupDriver) -> None:
                await switcher.wait_for_lifecycle_change()
                nursery.cancel_scope.cancel()

            for switcher in self.switchers.values():
                nursery.start_soon(first, switcher)
