"""How hard the stateful test hits: for each mutation of tests/test_core.py, how many random
examples it takes to catch it, over several seeds (CI checks one derandomized seed per mutation).

    python -m tests.mutation_power --seeds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests import test_core


class _Patches:
    """The part of pytest's monkeypatch the mutations use."""

    def __init__(self) -> None:
        self.undo: list[tuple[Any, str, Any]] = []

    def setattr(self, target: Any, name: str, value: Any) -> None:
        self.undo.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def restore(self) -> None:
        for target, name, value in reversed(self.undo):
            setattr(target, name, value)


def examples_to_catch(mutation: str, cap: int) -> int | None:
    """Examples run until the mutation is caught with a fresh random seed; None if never."""
    patches = _Patches()
    test_core.MUTATIONS[mutation](patches)
    started = test_core.CoreMachine.started
    test_core.CoreMachine.started = 0
    try:
        run_state_machine_as_test(
            test_core.CoreMachine,
            settings=settings(
                test_core.CI_SETTINGS, max_examples=cap, phases=[Phase.generate],
                database=None, report_multiple_bugs=False,
            ),
        )  # fmt: skip
        return None
    except (Exception, test_core.PluginExit):  # a mutation may let a plug-in's exit escape
        return test_core.CoreMachine.started
    finally:
        test_core.CoreMachine.started = started
        patches.restore()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--cap", type=int, default=4000, help="examples per seed at most")
    args = parser.parse_args()
    for mutation in test_core.MUTATIONS:
        began = time.monotonic()
        found = [examples_to_catch(mutation, args.cap) for _ in range(args.seeds)]
        caught = sorted(n for n in found if n is not None)
        missed = len(found) - len(caught)
        median = statistics.median(caught) if caught else float("nan")
        print(
            f"{mutation}: median {median:g}, max {max(caught, default=0)}, missed {missed} of "
            f"{len(found)} ({time.monotonic() - began:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
