"""Slots on models across the channel: the controller grants them, a worker holds them.

The controller runs one `SlotService.serve` per worker. Each `acquire` becomes a task that
holds the fleet's own `serving()` slot until the worker says `release` (finished) or `leave`
(its client went away while waiting): so queues, drains, timeouts and the in-flight counts
work exactly as for a request of the controller's own. When the channel closes (the worker
exited or died), every task it had is cancelled: its waiting requests leave the queues and its
slots are released, and no drain waits for a worker that is gone. A worker may also ask
`where` one of its requests waits (its place in line, the wake's time), for a waiting stream's
notices (http/wait_notice.py): one question at a time per stream, so the channel stays bounded.

The worker side, `RemoteFleet`, offers the same `serving()`, `where()`, `report_unreachable()` and
`closing` as the fleet, so the proxy code is the same in both processes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from llmux.config import ModelConfig
from llmux.core.waiting import WaitView
from llmux.errors import LlmuxError, ShuttingDown
from llmux.runtime.driver import Slot, WaitTicket
from llmux.runtime.fleet import Fleet
from llmux.workers.channel import Channel, ChannelClosed

# What a worker needs of the backend a slot was granted on (the rest stays with the controller).
GRANTED_FIELDS = (
    "name",
    "port",
    "upstream_model",
    "backend_api_key",
    "first_byte_timeout_secs",
    "idle_timeout_secs",
)


class RelayedError(LlmuxError):
    """An error the controller answered with, passed on as it was (status, body, headers)."""

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(body.decode(errors="replace"))
        self.status = status
        self._body = body
        self._headers = headers

    def body(self) -> bytes:
        return self._body

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers


def error_message(rid: int, error: LlmuxError) -> dict[str, Any]:
    headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in error.headers()]
    return {"id": rid, "error": {"status": error.status, "body": error.body().decode(),
                                 "headers": headers}}  # fmt: skip


def relayed(error: dict[str, Any]) -> RelayedError:
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in error["headers"]]
    return RelayedError(error["status"], error["body"].encode(), headers)


@dataclass(eq=False)
class _Hold:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    released: trio.Event = field(default_factory=trio.Event)
    ticket: WaitTicket = field(default_factory=WaitTicket)  # where it waits, asked by `where`


class SlotService:
    """The controller's side of one worker's channel."""

    def __init__(
        self,
        fleet: Fleet,
        on_other: Callable[[dict[str, Any]], None] | None = None,
        answer: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.fleet = fleet
        self._on_other = on_other  # messages that are not about slots (the worker's counts)
        self._answer = answer  # requests llmux answers itself, asked for by the worker
        self.holding = 0  # slots held and requests waiting, for tests and status

    async def serve(self, channel: Channel) -> None:
        """Until the channel closes; then every slot of this worker is released."""
        holds: dict[int, _Hold] = {}
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    message = await channel.receive()
                    op, rid = message.get("op"), message.get("id")
                    if op == "acquire":
                        hold = holds[rid] = _Hold()
                        nursery.start_soon(self._hold, channel, rid, message["model"], hold, holds)
                    elif op == "release" and rid in holds:
                        holds[rid].released.set()
                    elif op == "leave" and rid in holds:
                        holds[rid].scope.cancel()
                    elif op == "where":
                        nursery.start_soon(self._where, channel, rid, holds.get(message.get("of")))
                    elif op == "unreachable":
                        self.fleet.report_unreachable(message["model"])
                    elif op == "control" and self._answer is not None:
                        nursery.start_soon(self._control, channel, rid, message["request"])
                    elif self._on_other is not None:
                        self._on_other(message)
            except ChannelClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()

    async def _control(self, channel: Channel, rid: int, request: dict[str, Any]) -> None:
        assert self._answer is not None
        answer = await self._answer(request)
        with suppress(ChannelClosed):
            await channel.send({"id": rid, "control": answer})

    async def _where(self, channel: Channel, rid: int, hold: _Hold | None) -> None:
        """Where a request of the worker's waits. A worker asks this for a waiting stream's
        notice, each time once the last answer came: so few of these are ever on the way."""
        view = await self.fleet.where(hold.ticket) if hold is not None else None
        with suppress(ChannelClosed):
            await channel.send({"id": rid, "where": None if view is None else asdict(view)})

    async def _hold(
        self, channel: Channel, rid: int, model: str, hold: _Hold, holds: dict[int, _Hold]
    ) -> None:
        self.holding += 1
        try:
            with hold.scope:
                try:
                    async with self.fleet.serving(model, hold.ticket) as slot:
                        backend = {name: getattr(slot.backend, name) for name in GRANTED_FIELDS}
                        await channel.send({"id": rid, "granted": backend, "waited": slot.waited})
                        await hold.released.wait()
                except LlmuxError as error:
                    await channel.send(error_message(rid, error))
        except ChannelClosed:
            pass
        finally:
            self.holding -= 1
            holds.pop(rid, None)


@dataclass(eq=False)
class _Reply:
    done: trio.Event = field(default_factory=trio.Event)
    message: dict[str, Any] = field(default_factory=dict)


class ControllerGone(ShuttingDown):
    """The controller is gone or stopping: so is this worker (Retry-After as for any shutdown)."""


class RemoteFleet:
    """The worker's side: slots on the controller's fleet, one round trip each way."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._ids = itertools.count(1)
        self._pending: dict[int, _Reply] = {}
        self.closing = False  # set when the controller is gone or says it shuts down
        # Messages sent without waiting (from code that cannot await), in order.
        self._outbox, self._outbox_reader = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.on_other: Callable[[dict[str, Any]], None] | None = None  # reloads, shutdown
        self.in_flight = 0  # slots granted here and not yet released
        self._released = trio.Event()
        self.gone = trio.Event()  # the controller closed the channel

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the controller's messages until the channel closes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_outbox)
            task_status.started()
            try:
                while True:
                    message = await self._channel.receive()
                    reply = self._pending.get(message.get("id", -1))
                    if reply is not None:
                        reply.message = message
                        reply.done.set()
                    elif "id" not in message and self.on_other is not None:
                        self.on_other(message)
            except ChannelClosed:
                self.closing = True
                self.gone.set()
                for reply in self._pending.values():
                    reply.message = {"error": None}
                    reply.done.set()
            nursery.cancel_scope.cancel()

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """One round trip: the controller's answer to `message` (empty if it is gone)."""
        rid = next(self._ids)
        reply = self._pending[rid] = _Reply()
        try:
            await self._channel.send({**message, "id": rid})
            await reply.done.wait()
        except ChannelClosed:
            return {}
        finally:
            self._pending.pop(rid, None)
        return reply.message

    def refusal(self, model: str) -> LlmuxError | None:
        """Queue limits are the controller's: they are answered when the slot is asked for."""
        return None

    async def wait_for_release(self) -> None:
        await self._released.wait()

    async def _send_outbox(self) -> None:
        async for message in self._outbox_reader:
            try:
                await self._channel.send(message)
            except ChannelClosed:
                return

    def send_soon(self, message: dict[str, Any]) -> None:
        self._outbox.send_nowait(message)

    async def where(self, ticket: WaitTicket) -> WaitView | None:
        """Where the request `ticket` was handed to `serving()` with waits, as the controller
        knows (None: it does not wait, or the controller is gone)."""
        if ticket.rid is None:
            return None
        view = (await self.ask({"op": "where", "of": ticket.rid})).get("where")
        return None if view is None else WaitView(**view)

    @asynccontextmanager
    async def serving(self, model: str, ticket: WaitTicket | None = None) -> AsyncIterator[Slot]:
        if self.closing:
            raise ControllerGone("llmux is shutting down")
        rid = next(self._ids)
        if ticket is not None:
            ticket.model, ticket.rid = model, rid
        reply = self._pending[rid] = _Reply()
        try:
            await self._channel.send({"op": "acquire", "id": rid, "model": model})
            await reply.done.wait()
        except ChannelClosed:
            raise ControllerGone("llmux is shutting down") from None
        except BaseException:  # the client went away while it waited
            with trio.CancelScope(shield=True), suppress(ChannelClosed):
                await self._channel.send({"op": "leave", "id": rid})
            raise
        finally:
            self._pending.pop(rid, None)
        message = reply.message
        if "error" in message:
            if message["error"] is None:
                raise ControllerGone("llmux is shutting down")
            raise relayed(message["error"])
        backend = ModelConfig(**message["granted"])
        self.in_flight += 1
        try:
            yield Slot(message["waited"], backend)
        finally:
            self.in_flight -= 1
            self._released.set()
            self._released = trio.Event()
            with trio.CancelScope(shield=True), suppress(ChannelClosed):
                await self._channel.send({"op": "release", "id": rid})

    def report_unreachable(self, model: str) -> None:
        """Said to the controller without waiting (its alive check decides)."""
        self.send_soon({"op": "unreachable", "model": model})
