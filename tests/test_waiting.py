"""Where a waiting request stands (llmux/core/waiting.py), read from a core fed events by hand:
its place in line, and the wake's time from the costs measured before, counting down."""

from __future__ import annotations

from pathlib import Path

from llmux.config import parse_config
from llmux.core import events as ev
from llmux.core.commands import Command, RunHook
from llmux.core.costs import SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.states import HookName
from llmux.core.waiting import WaitView, where_waiting
from llmux.policy import FifoPolicy


class Fed:
    """A core of two hook-driven models, a and b, and the hooks it asked to run."""

    def __init__(self) -> None:
        models = {m: {"port": port, "wake": f"wake-{m}", "sleep": f"sleep-{m}"}
                  for m, port in (("a", 9001), ("b", 9002))}  # fmt: skip
        raw = {"models": models, "policy": {"name": "fifo"}, "server": {"stream_wait_notice": True}}
        config = parse_config(raw, Path("t.toml"))
        config = config.group_config(next(iter(config.groups)))
        self.core = GroupCore(config, FifoPolicy(), SwitchCostTracker())
        self.hooks: dict[tuple[str, HookName], int] = {}
        self.feed(ev.Started(0.0))

    def feed(self, event: object) -> None:
        self.take(self.core.handle(event))  # type: ignore[arg-type]

    def take(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, RunHook):
                self.hooks[(command.model, command.hook)] = command.job

    def end_hook(self, now: float, model: str, hook: HookName, took: float = 0.0) -> None:
        job = self.hooks.pop((model, hook))
        self.feed(ev.HookDone(now, job, ev.HookOutcome(ok=True, duration=took)))


def test_position_and_an_unmeasured_wake():
    fed = Fed()
    fed.feed(ev.Arrived(1.0, 1, "a"))
    fed.feed(ev.Arrived(1.0, 2, "a"))
    expected = WaitView("a", 2, awake=False, cold=False, seconds=None)
    assert where_waiting(fed.core, 2, 1.5) == expected
    assert where_waiting(fed.core, 1, 1.5).position == 1
    fed.end_hook(5.0, "a", HookName.WAKE)
    assert where_waiting(fed.core, 1, 5.0) is None  # granted: not waiting any more
    assert where_waiting(fed.core, 99, 5.0) is None


def test_the_estimate_is_the_measured_switch_counting_down():
    fed = Fed()
    fed.feed(ev.Arrived(0.0, 1, "a"))
    fed.end_hook(4.0, "a", HookName.WAKE, took=4.0)
    fed.feed(ev.Finished(4.0, 1))
    fed.feed(ev.Arrived(10.0, 2, "b"))
    fed.end_hook(13.0, "a", HookName.SLEEP, took=3.0)
    fed.end_hook(15.0, "b", HookName.WAKE, took=2.0)
    fed.feed(ev.Finished(15.0, 2))
    fed.feed(ev.Arrived(20.0, 3, "b"))  # b serves: no wait
    fed.feed(ev.Finished(20.0, 3))
    fed.feed(ev.Arrived(30.0, 4, "a"))  # b's sleep is not measured: the whole switch is not
    assert where_waiting(fed.core, 4, 30.0).seconds is None
    fed.end_hook(32.0, "b", HookName.SLEEP, took=2.0)
    fed.end_hook(36.0, "a", HookName.WAKE, took=4.0)
    fed.feed(ev.Finished(36.0, 4))
    fed.feed(ev.Arrived(40.0, 5, "b"))  # a's sleep (3 s) and b's wake (2 s), each measured
    assert where_waiting(fed.core, 5, 40.0).seconds == 5.0
    assert where_waiting(fed.core, 5, 42.0).seconds == 3.0  # counting down from the drain's end
    assert where_waiting(fed.core, 5, 50.0).seconds == 0.0  # late: never below nothing


def test_a_body_nested_too_deep_asks_for_no_notice():
    """json.loads gives up on nesting at a depth its caller's stack decides: whatever it
    raises, the request is one that asks for no stream (and is answered as one)."""
    from llmux.http.wait_notice import asks_to_stream

    assert asks_to_stream(b'{"stream": true, "model": "a"}')
    deep = b'{"stream": true, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert not asks_to_stream(deep)
