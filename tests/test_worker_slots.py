"""Slots across the worker channel, against a real fleet: what a worker holds is held in the
controller's switcher, and what a worker that goes away held is released."""

from __future__ import annotations

import pytest
import trio

from llmux.errors import LlmuxError
from llmux.workers.channel import Channel
from llmux.workers.slots import RelayedError, RemoteFleet, SlotService
from tests.conftest import fake_model_block, llmux_running, write_config


async def wait_until(condition, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def linked(nursery: trio.Nursery, service: SlotService) -> tuple[RemoteFleet, Channel]:
    """A worker's RemoteFleet wired to the service by a real socket pair."""
    ours, theirs = trio.socket.socketpair()
    controller_end = Channel(ours)
    worker_end = Channel(theirs)
    nursery.start_soon(service.serve, controller_end)
    remote = RemoteFleet(worker_end)
    await nursery.start(remote.run)
    return remote, worker_end


def test_a_slot_held_by_a_worker_is_held_by_the_switcher(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a))

    async def main():
        async with llmux_running(path) as (server, _), trio.open_nursery() as nursery:
            fleet = server.app.fleet
            remote, _ = await linked(nursery, SlotService(fleet))
            async with remote.serving("a") as slot:
                assert slot.backend.port == a.port and slot.backend.name == "a"
                assert fleet.models["a"].in_flight == 1
                assert fleet.models["a"].state.value == "active"
            await wait_until(lambda: fleet.models["a"].in_flight == 0)
            with pytest.raises(RelayedError) as refused:
                async with remote.serving("nope"):
                    pass
            assert refused.value.status == 404 and b"model_not_found" in refused.value.body()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_what_a_worker_that_died_held_is_released(fakes, tmp_path):
    """One request in flight and one waiting behind a slow wake: the worker's channel closes
    (it died); the slot is released and the waiter leaves the queue, so no drain waits."""
    a, b = fakes.start("a", "b", wake_delay=1.0)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))

    async def main():
        async with llmux_running(path) as (server, _), trio.open_nursery() as nursery:
            fleet = server.app.fleet
            service = SlotService(fleet)
            remote, worker_end = await linked(nursery, service)
            held = trio.Event()

            async def hold_a() -> None:
                async with remote.serving("a"):
                    held.set()
                    await trio.sleep_forever()

            async def wait_for_b() -> None:
                with pytest.raises(LlmuxError):
                    async with remote.serving("b"):
                        pass

            nursery.start_soon(hold_a)
            await held.wait()
            nursery.start_soon(wait_for_b)
            await wait_until(lambda: len(fleet.models["b"].queue) == 1)
            assert fleet.models["a"].in_flight == 1
            await worker_end.aclose()  # as the worker's death closes its end
            await wait_until(lambda: fleet.models["a"].in_flight == 0 and service.holding == 0)
            assert not fleet.models["b"].queue
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_client_that_leaves_while_waiting_leaves_the_queue(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=2.0)
    path = write_config(tmp_path, fake_model_block(a))

    async def main():
        async with llmux_running(path) as (server, _), trio.open_nursery() as nursery:
            fleet = server.app.fleet
            service = SlotService(fleet)
            remote, _ = await linked(nursery, service)
            with trio.move_on_after(0.5):
                async with remote.serving("a"):
                    raise AssertionError("granted before its wake finished")
            await wait_until(lambda: not fleet.models["a"].queue and service.holding == 0)
            nursery.cancel_scope.cancel()

    trio.run(main)
