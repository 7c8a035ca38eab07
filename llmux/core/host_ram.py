"""Host RAM as a capacity: what the weights of models asleep at level 1 may fill, shared by
every group of one llmux (the groups are on one machine; their GPUs are not).

vLLM's level-1 sleep copies a model's weights to host RAM so that its wake is fast; eight 8B
models asleep so hold ~176 GiB, more than many GPU boxes have, and since the victims of a
switch sleep before its target wakes, the peak is every sleeper's weights at once. So before a
model is put to sleep at level 1, its weights must fit beside what the others hold; a sleep
that would not fit goes to level 2 (the weights are dropped and reloaded at the wake) rather
than stopping a server (a cold start costs far more than a level-2 wake).

Each group's core registers what it holds; the ledger only adds them up. No I/O: what the
machine has is read once outside the core (runtime/machine.py) and given here as a number.
"""

from __future__ import annotations

from collections.abc import Callable

ROOM_EPSILON = 1e-9


class HostRam:
    """`capacity_gb`: what level-1 sleepers may hold together (None: no limit)."""

    def __init__(self, capacity_gb: float | None = None) -> None:
        self.capacity_gb = capacity_gb
        self._holders: list[Callable[[], float]] = []
        self._known: list[Callable[[], float]] = []

    def register(self, holder: Callable[[], float], known: Callable[[], float]) -> None:
        """`holder()` says how many GiB a group's level-1 sleepers hold now, `known()` the
        largest weights it has measured or been told of (0: none)."""
        self._holders.append(holder)
        self._known.append(known)

    def largest_known_gb(self) -> float:
        """What a model whose weights are not known yet is taken to hold at level 1."""
        return max((known() for known in self._known), default=0.0)

    def held_gb(self) -> float:
        return sum(holder() for holder in self._holders)

    def fits(self, gb: float) -> bool:
        """Whether `gb` more fits beside what is held now."""
        if self.capacity_gb is None or gb <= 0:
            return True
        return self.held_gb() + gb <= self.capacity_gb + ROOM_EPSILON
