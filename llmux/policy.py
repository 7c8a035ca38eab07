"""The switch-policy interface: plain code that sees a snapshot and decides, with no I/O.

The switcher calls a policy on four kinds of event: a request arrived, a request completed, a switch
completed, or a timer the policy asked for fired. The policy answers with one decision: stay, switch
to a model now, or call again at a given time. Because a policy only reads a `Snapshot` (built from
the switcher's state, or by a simulator from a virtual clock) it can be tested and replayed without
trio, sockets or hooks.

A custom policy is any class with `decide(event, snapshot) -> Decision`, named in the config as
`package.module:Class` or `/path/to/file.py:Class`; it is built with the `[policy.options]` table
as keyword arguments, so its `__init__` validates them.
"""

from llmux.core.capacity import DEFAULT_WAKE_COST_SECS, default_evictions, held, wake_cost
from llmux.core.group_view import snapshot_of
from llmux.core.policy_answers import choose_evictions
from llmux.core.snapshot import ModelRuntimeLike, ModelView, Snapshot, oldest_waiting_model
from llmux.core.states import ModelState
from llmux.policies.adaptive import AdaptivePolicy
from llmux.policies.cost_aware import CostAwarePolicy
from llmux.policies.exhaustive import ExhaustivePolicy
from llmux.policies.fifo import FifoPolicy
from llmux.policies.interface import (
    CallAt,
    Decision,
    Event,
    Policy,
    RequestArrived,
    RequestCompleted,
    Stay,
    SwitchCompleted,
    SwitchTo,
    TimerFired,
)
from llmux.policies.loader import BUILTIN_POLICIES, PolicyLoadError, load_policy

__all__ = [
    "BUILTIN_POLICIES", "DEFAULT_WAKE_COST_SECS", "AdaptivePolicy", "CallAt", "CostAwarePolicy",
    "Decision", "Event", "ExhaustivePolicy", "FifoPolicy", "ModelRuntimeLike", "ModelState",
    "ModelView", "Policy", "PolicyLoadError", "RequestArrived", "RequestCompleted", "Snapshot",
    "Stay", "SwitchCompleted", "SwitchTo", "TimerFired", "choose_evictions", "default_evictions",
    "held", "load_policy", "oldest_waiting_model", "snapshot_of", "wake_cost",
]  # fmt: skip
