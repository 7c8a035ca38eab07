"""The vocabulary of the switching core: model states, hook names, and the model transition table.

A model's state changes only through `TRANSITIONS`: (state, cause) -> new state. The group core
(core/group.py) names a cause; a pair missing from the table is a bug the core refuses to make.
"""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    ASLEEP = "asleep"  # not serving; a request for it waits for a switch
    WAKING = "waking"  # its wake hook is running
    ACTIVE = "active"  # serving: the only state in which requests are forwarded to it
    DRAINING = "draining"  # about to be put to sleep: new requests queue, in-flight ones finish
    SLEEPING = "sleeping"  # its sleep hook is running (or, after it failed, its alive check)
    UNKNOWN = "unknown"  # an operation on it failed midway: it holds its room, gets no request,
    # and is recovered (its alive hook asked, else drained and put to sleep) until it is known


class HookName(StrEnum):
    WAKE = "wake"
    SLEEP = "sleep"
    ALIVE = "alive"


class Cause(StrEnum):
    """Why a model's state changes."""

    ADOPTED = "adopted"  # at start-up its alive hook says it already serves
    WAKE_STARTED = "wake_started"
    WAKE_OK = "wake_ok"
    WAKE_FAILED = "wake_failed"  # its sleep hook runs to clean up
    DRAIN = "drain"  # to be put to sleep: admit nothing new
    DRAIN_CALLED_OFF = "drain_called_off"  # the switch it drained for was called off
    SLEEP_STARTED = "sleep_started"
    SLEEP_OK = "sleep_ok"
    GONE = "gone"  # its sleep hook failed, but its alive hook says it does not serve
    STILL_SERVING = "still_serving"  # its sleep hook failed and it may well still serve
    FOUND_DEAD = "found_dead"  # active, but its alive hook says it does not serve (or it exited)
    ABORTED = "aborted"  # the operation acting on it failed midway: its state is not known
    UNSURE = "unsure"  # an unknown model's sleep failed, and nothing says it does not serve
    CANCELLED = "cancelled"  # its cold start was stopped: nobody waited for it any more


_S = ModelState
TRANSITIONS: dict[tuple[ModelState, Cause], ModelState] = {
    (_S.ASLEEP, Cause.ADOPTED): _S.ACTIVE,
    (_S.ASLEEP, Cause.WAKE_STARTED): _S.WAKING,
    (_S.WAKING, Cause.WAKE_OK): _S.ACTIVE,
    (_S.WAKING, Cause.WAKE_FAILED): _S.SLEEPING,
    (_S.WAKING, Cause.CANCELLED): _S.ASLEEP,
    (_S.ACTIVE, Cause.DRAIN): _S.DRAINING,
    (_S.ACTIVE, Cause.FOUND_DEAD): _S.DRAINING,
    (_S.DRAINING, Cause.DRAIN_CALLED_OFF): _S.ACTIVE,
    (_S.DRAINING, Cause.SLEEP_STARTED): _S.SLEEPING,
    (_S.SLEEPING, Cause.SLEEP_OK): _S.ASLEEP,
    (_S.SLEEPING, Cause.GONE): _S.ASLEEP,
    (_S.SLEEPING, Cause.STILL_SERVING): _S.ACTIVE,
    (_S.SLEEPING, Cause.UNSURE): _S.UNKNOWN,
    (_S.UNKNOWN, Cause.ADOPTED): _S.ACTIVE,
    (_S.UNKNOWN, Cause.SLEEP_STARTED): _S.SLEEPING,
    (_S.UNKNOWN, Cause.GONE): _S.ASLEEP,
    # An operation that fails midway leaves every model it acted on unknown, whatever it was.
    **{(state, Cause.ABORTED): _S.UNKNOWN for state in ModelState if state is not _S.UNKNOWN},
}


class IllegalTransition(Exception):
    """The core asked for a transition the table does not have: a bug in the core."""
