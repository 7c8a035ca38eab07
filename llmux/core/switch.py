"""A switch: drain the victims, put them to sleep one after another, wake the target.

    victims DRAINING (their new requests queue) until none has requests in flight
      (everyone waiting for the target left: called off, the victims serve on)
    -> each victim SLEEPING while its sleep hook runs, one after another
      (a hook fails and the alive hook does not say "not serving": abandoned, victims serve on)
    -> (a group naming GPUs) their free memory read until it covers the target's memory_gb
      and margin; not within 30 s (or its wake_timeout_secs): its waiters get 503, back-off;
      the sleepers that kept their memory are named
    -> target WAKING while its wake hook runs
      (fails: its sleep hook cleans up, its waiters get 503, back-off; a `cmd` server that
      failed to start backs its model off too: core/start_backoff.py)
    -> target ACTIVE: its waiters are granted in arrival order.

When it may start, and which victims it takes, the group decides (core/group.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmux.core import events as ev
from llmux.core.costs import IDLE
from llmux.core.operation import (
    FAILED_SWITCH_BACKOFF_SECS,
    Group,
    Operation,
    Phase,
    says_not_serving,
)
from llmux.core.records import ModelRecord, SwitchView
from llmux.core.states import Cause, HookName, ModelState
from llmux.errors import GpuMemoryShort, LlmuxError
from llmux.policies.interface import SwitchCompleted

# Memory a sleeper frees late (CUDA teardown: seconds) is read again this often, for at most
# GPU_ROOM_WAIT_SECS (or the target's wake_timeout_secs if shorter); then the switch fails
# rather than risk an OOM.
GPU_READ_AGAIN_SECS = 1.0
GPU_ROOM_WAIT_SECS = 30.0


@dataclass(eq=False)
class Switch(Operation):
    target: ModelRecord
    victims: list[ModelRecord]
    started: float
    phase: Phase = Phase.DRAIN  # then SLEEP (SLEEP_CHECK), WAKE (CLEANUP, CLEANUP_CHECK)
    index: int = 0  # the victim being put to sleep
    job: int | None = None
    drain_started: float = 0.0
    drain_seconds: float = 0.0
    sleep_seconds: float = 0.0
    wake_failure: str = ""
    wake_timed_out: bool = False  # a retry would wait as long again
    cold_wake: bool = False  # its wake starts the target's server (a cold start)
    cancelling: bool = False  # the cold start was asked to stop: nobody waits for it
    reading: int | None = None  # the GPU memory read it waits for
    read_again_at: float | None = None  # when to read the GPUs' free memory again
    room_since: float | None = None  # when it began to wait for room on the GPUs
    room_short_told: bool = False
    estimate: float | None = None  # its measured cost when it began (None: not measured yet)

    @classmethod
    def begin(
        cls,
        group: Group,
        target: ModelRecord,
        victims: list[ModelRecord],
        estimate: float | None = None,
    ) -> Switch:
        """Start draining the victims for `target`."""
        op = cls(target, victims, group.now, drain_started=group.now, estimate=estimate)
        labels = op.labels()
        evicting = (
            f" (putting {', '.join(v.name for v in victims)} to sleep)" if len(victims) > 1 else ""
        )
        group.observe(
            "switch_started", f"switching {labels['from']} -> {target.name}{evicting}",
            evicting=[v.name for v in victims], **labels,
        )  # fmt: skip
        for victim in victims:
            group.move(victim, Cause.DRAIN)
        return op

    @property
    def source(self) -> ModelRecord | None:
        return self.victims[0] if self.victims else None

    def view(self) -> SwitchView:
        source = self.source.name if self.source else None
        evicting = tuple(v.name for v in self.victims)
        return SwitchView(source, self.target.name, evicting, self.started)

    def remaining(self, now: float) -> float | None:
        """About how long until the target serves, from the cost measured before: all of it
        while the victims drain (a cost leaves the drain out), then less the time since."""
        if self.estimate is None or self.phase == Phase.DRAIN:
            return self.estimate
        return max(0.0, self.estimate - (now - self.drain_started - self.drain_seconds))

    def labels(self) -> dict[str, str]:
        return {"from": self.source.name if self.source else IDLE, "to": self.target.name}

    def env(self, source: ModelRecord | None = None) -> dict[str, str]:
        source = source if source is not None else self.source
        return {"LLMUX_FROM": source.name if source else "", "LLMUX_TO": self.target.name}

    def acts_on(self) -> set[ModelRecord]:
        return {self.target, *self.victims}

    # ----- moving on -----

    def step(self, group: Group) -> bool:
        if self.reading is not None:
            return False  # the GPUs' memory is being read
        if self.job is not None:
            if self.phase == Phase.WAKE and self._nobody_waits_for_a_cold_start():
                self.cancelling = True
                group.cancel(self.job)
            return False  # a hook runs
        if self.phase == Phase.DRAIN:
            return self._drain(group)
        if self.phase == Phase.SLEEP:
            if self.index == len(self.victims):
                room = group.gpu_room_needed(self.target)
                self.phase = Phase.WAKE if room is None else Phase.ROOM
                return True
            victim = self.victims[self.index]
            group.move(victim, Cause.SLEEP_STARTED)
            if victim.active_since is not None:
                group.observe_quietly(
                    "model_active_duration", model=victim.name,
                    seconds=group.now - victim.active_since,
                )  # fmt: skip
            waiting = len(self.target.queue)  # they wait through this sleep
            self.job = group.run(victim, HookName.SLEEP, self.env(victim), waiting)
            return False
        if self.phase == Phase.ROOM:
            return self._room(group)
        if self.phase == Phase.WAKE:
            target = self.target
            if group.models.get(target.name) is not target:
                # A reload removed or replaced it meanwhile: wake nothing; the policy decides
                # again (the replacement has its waiters).
                self._called_off_before_the_wake(group, "a reload changed it")
                return True
            self.cold_wake = target.starts_cold
            group.move(target, Cause.WAKE_STARTED)
            target.last_alive = None  # an answer from before the wake says nothing about now
            self.job = group.run(target, HookName.WAKE, self.env())
            return False
        return False

    def _called_off_before_the_wake(self, group: Group, why: str) -> None:
        """Its victims are asleep; wake nothing: the policy decides again."""
        group.observe(
            "switch_cancelled", f"switch to {self.target.name} called off: {why}",
            **self.labels(),
        )  # fmt: skip
        self._end(group, ok=False)

    def _room(self, group: Group) -> bool:
        """Before the wake: read the GPUs' free memory (again, once it is time)."""
        if group.models.get(self.target.name) is not self.target:
            self._called_off_before_the_wake(group, "a reload changed it")
            return True
        if not self.target.queue:  # everyone left while the memory was not free
            self._called_off_before_the_wake(group, "nobody waits for it any more")
            return True
        if self.room_since is None:
            self.room_since = group.now
        if self.read_again_at is not None and group.now < self.read_again_at:
            return False
        self.read_again_at = None
        self.reading = group.read_gpus()
        return False

    def gpu_read(self, group: Group, job: int, free_gb: tuple[float, ...] | None) -> None:
        """Each GPU's free memory (in the group's order): enough on every one (or unknown:
        nothing to check against) wakes the target; too little on one names the sleepers that
        kept theirs, and reads again a second later for GPU_ROOM_WAIT_SECS at most, then the
        switch fails: never an OOM. A GPU that cannot be read after a short reading is taken
        to be short still."""
        if job != self.reading:
            return
        self.reading = None
        needed = group.gpu_room_needed(self.target)
        if needed is None or (free_gb is None and not self.room_short_told):
            self.phase = Phase.WAKE
            return
        short = (
            [(gpu, f) for gpu, f in zip(group.group.gpus, free_gb, strict=False) if f < needed]
            if free_gb is not None
            else []
        )
        if free_gb is not None and not short:
            self.phase = Phase.WAKE
            return
        waited = group.now - (self.room_since if self.room_since is not None else group.now)
        sleepers = [v.name for v in self.victims if v.state is ModelState.ASLEEP]
        what = self._short_of_room(group, short, needed, sleepers)
        if not self.room_short_told:  # once per switch, where it is first seen
            self.room_short_told = True
            group.observe(
                "gpu_memory_not_freed", what, level="warning", model=self.target.name,
                free_gb=[f for _, f in short], needed_gb=needed, sleepers=sleepers,
            )  # fmt: skip
        if waited >= min(GPU_ROOM_WAIT_SECS, self.target.config.wake_timeout_secs):
            self._no_room(group, f"{what} after {waited:.0f} s", what)
            return
        self.read_again_at = group.now + GPU_READ_AGAIN_SECS

    def _short_of_room(
        self, group: Group, short: list[tuple[int, float]], needed: float, sleepers: list[str]
    ) -> str:
        """What is short where, and who is likely to hold it, for the log and the 503."""
        asleep = sorted(
            m.name for m in group.models.values()
            if m.state is ModelState.ASLEEP and m is not self.target
        )  # fmt: skip
        itself = self.target.server_running and self.target.slept_level is not None
        if sleepers:
            who = (
                f"{', '.join(sleepers)} did not free {'its' if len(sleepers) == 1 else 'their'} "
                "memory when put to sleep"
            )
        elif itself:  # vLLM has been seen to keep memory asleep: its own, to wake into
            who = (
                f"no model was put to sleep for it; {self.target.name}'s own server, asleep, "
                "may hold it (restart that server to free it)"
            )
        else:
            who = "no model was put to sleep for it: another process" + (
                f", or a sleeping model ({', '.join(asleep)}), holds it" if asleep else " holds it"
            )
        gpus = group.group.gpus
        where = (
            ", ".join(f"{f:.1f} GiB free on GPU {gpu}" for gpu, f in short)
            if short
            else f"GPUs {', '.join(map(str, gpus))} could not be read since a short reading"
        )
        each = " on each" if len(gpus) > 1 else ""
        return (
            f"not enough free GPU memory to wake {self.target.name}: {where}, {needed:.1f} GiB "
            f"needed{each}; {who}"
        )

    def _no_room(self, group: Group, logged: str, answered: str) -> None:
        """The wait for GPU memory is over: the target's waiters get 503, back-off."""
        group.observe(
            "switch_failed", f"switch {self.labels()['from']} -> {self.target.name} failed: "
            f"{logged}", level="error", reason="gpu_memory", **self.labels(),
        )  # fmt: skip
        self.target.active_since = None
        group.observe_quietly("switch_result", result="failed", **self.labels())
        group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
        refusal = GpuMemoryShort(f"model {self.target.name!r} unavailable: {answered}")
        group.fail_queue(self.target, refusal)
        self._end(group, ok=False)

    def _nobody_waits_for_a_cold_start(self) -> bool:
        """A cold start (tens of seconds of loading) is stopped once its last waiter has
        left; a warm wake is short and completes, and the policy decides what comes next."""
        return self.cold_wake and not self.cancelling and not self.target.queue

    def _drain(self, group: Group) -> bool:
        drained = all(v.in_flight == 0 for v in self.victims)
        if not drained and group.config.policy.drain_before_switch and self.target.queue:
            return False
        self.drain_seconds = group.now - self.drain_started
        for victim in self.victims:
            group.observe_quietly("drain_measured", model=victim.name, seconds=self.drain_seconds)
        if not self.target.queue:
            self._call_off(group)
            return True
        self.phase = Phase.SLEEP
        return True

    def _call_off(self, group: Group) -> None:
        labels = self.labels()
        group.observe(
            "switch_cancelled", f"switch {labels['from']} -> {self.target.name} called off: "
            f"nobody waits for {self.target.name} any more", **labels,
        )  # fmt: skip
        for victim in self.victims:
            group.serve_again(victim)
        self._end(group, ok=False)

    def _end(self, group: Group, ok: bool) -> None:
        group.end_op()
        group.observe_quietly("switch_ended", **self.labels())
        group.consult(SwitchCompleted(self.target.name, ok))

    # ----- hooks' ends -----

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        self.job = None
        if self.phase == Phase.SLEEP:
            victim = self.victims[self.index]
            if outcome.ok:
                group.slept(victim, outcome)
                self.sleep_seconds += outcome.duration
                self.index += 1
            elif victim.exited:  # its server is gone: nothing of it serves (rule 4)
                self._gone(group, victim)
            elif victim.config.has_alive:
                self.phase = Phase.SLEEP_CHECK
                self.wake_failure = outcome.failure
                self.job = group.run(victim, HookName.ALIVE)
            else:
                self.abandon(group, outcome.failure, "it has no alive hook to confirm")
        elif self.phase == Phase.SLEEP_CHECK:
            victim = self.victims[self.index]
            victim.last_alive = outcome.ok
            if says_not_serving(outcome) or victim.exited:
                group.observe(
                    "sleep_failed_not_serving", f"{victim.step(HookName.SLEEP)} for "
                    f"{victim.name} failed but it no longer serves; continuing",
                    level="warning", model=victim.name,
                )  # fmt: skip
                self._gone(group, victim)
            else:
                still = f"its {victim.step(HookName.ALIVE)} still passes"
                self.abandon(group, self.wake_failure, still)
        elif self.phase == Phase.WAKE:
            if outcome.ok:
                self._activated(group, outcome)
            elif outcome.cancelled:
                self._stopped(group)
            else:
                self._wake_failed(group, outcome)
        elif self.phase == Phase.CLEANUP:
            self._cleaned_up(group, outcome)
        elif self.phase == Phase.CLEANUP_CHECK:
            self.target.last_alive = outcome.ok
            if outcome.ok:  # its wake failed, yet it serves
                group.move(self.target, Cause.STILL_SERVING)
                group.activate(self.target)
                self._end(group, ok=True)
            elif outcome.timed_out:
                group.hold_unknown(self.target)
                self._wake_lost(group)
            else:
                group.move(self.target, Cause.GONE)
                self._wake_lost(group)

    def _gone(self, group: Group, victim: ModelRecord) -> None:
        group.move(victim, Cause.GONE)
        victim.active_since = None
        self.index += 1
        self.phase = Phase.SLEEP

    def abandon(self, group: Group, failure: str, reason: str) -> None:
        """A victim could not be put to sleep and may still serve: it and the victims not yet
        put to sleep serve on; the target's waiters get 503."""
        victim = self.victims[self.index]
        group.observe(
            "switch_failed", f"switch {victim.name} -> {self.target.name} abandoned: sleep "
            f"failed and {reason}", level="error", reason="sleep_failed",
            **{"from": victim.name, "to": self.target.name},
        )  # fmt: skip
        group.observe_quietly("switch_result", result="abandoned", **self.labels())
        group.move(victim, Cause.STILL_SERVING)
        group.activate(victim)
        for spared in self.victims[self.index + 1 :]:
            group.serve_again(spared)
        group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
        what = f"{victim.name} could not be put to sleep"
        group.fail_queue(self.target, group.hook_error(self.target, what, failure))
        self._end(group, ok=False)

    def _activated(self, group: Group, outcome: ev.HookOutcome) -> None:
        target = self.target
        group.move(target, Cause.WAKE_OK)
        group.activate(target)
        cost = self.sleep_seconds + outcome.duration
        took = group.now - self.started
        source = self.source.name if self.source else None
        estimate = group.woken(target, source, outcome, cost)
        labels = self.labels()
        how = " (a cold start)" if outcome.cold else ""
        group.observe(
            "model_activated", f"{labels['from']} -> {target.name}: active after {took:.2f}s{how}",
            model=target.name, switch_seconds=took, cost_seconds=cost,
            drain_seconds=self.drain_seconds, estimate=estimate, cold=outcome.cold, **labels,
        )  # fmt: skip
        self._end(group, ok=True)

    def _stopped(self, group: Group) -> None:
        """The cold start nobody waited for was stopped: no failure (no back-off, no 503, no
        cost sample); the target's server is not running."""
        target = self.target
        group.move(target, Cause.CANCELLED)
        target.server_running = False
        target.active_since = None
        group.observe(
            "switch_cancelled", f"cold start of {target.name} stopped: nobody waits for it any "
            "more", **self.labels(),
        )  # fmt: skip
        group.observe_quietly("switch_result", result="cancelled", **self.labels())
        self._end(group, ok=False)

    def _wake_failed(self, group: Group, outcome: ev.HookOutcome) -> None:
        built_in = self.target.config.built_in
        cleanup = "putting it to sleep" if built_in else "running its sleep hook"
        group.observe(
            "switch_failed", f"wake of {self.target.name} failed; {cleanup} to clean up",
            level="error", reason="wake_failed", **self.labels(),
        )  # fmt: skip
        self.wake_failure, self.wake_timed_out = outcome.failure, outcome.timed_out
        group.move(self.target, Cause.WAKE_FAILED)
        self.phase = Phase.CLEANUP
        self.job = group.run(self.target, HookName.SLEEP, self.env())

    def _cleaned_up(self, group: Group, outcome: ev.HookOutcome) -> None:
        if outcome.ok:
            group.move(self.target, Cause.SLEEP_OK)
            self._wake_lost(group)
        elif self.target.config.has_alive:
            self.phase = Phase.CLEANUP_CHECK
            self.job = group.run(self.target, HookName.ALIVE)
        else:
            group.hold_unknown(self.target)
            self._wake_lost(group)

    def _wake_lost(self, group: Group) -> None:
        self.target.active_since = None
        group.observe_quietly("switch_result", result="failed", **self.labels())
        group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
        group.fail_waiters_of(self.target, self.wake_failure, self.wake_timed_out)
        self._end(group, ok=False)

    def aborted(self, group: Group, error: LlmuxError) -> None:
        group.observe_quietly("switch_ended", **self.labels())
        group.observe_quietly("switch_result", result="failed", **self.labels())
