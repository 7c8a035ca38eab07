"""The worker channel over a real socket pair: a peer that reads nothing is given up on in
time, a frame is read whole or not at all (never misread after a cut one), and bytes that do not
parse end the channel instead of raising something else."""

from __future__ import annotations

import json

import pytest
import trio

from llmux.workers.channel import HEADER, Channel, ChannelClosed

BIG = {"op": "config", "config": "x" * 2_000_000}  # more than any socket buffer holds
SHORT_SECS = 0.3


def pair(timeout: float = SHORT_SECS) -> tuple[Channel, Channel]:
    ours, theirs = trio.socket.socketpair()
    return Channel(ours, timeout), Channel(theirs, timeout)


def raw_pair(timeout: float = SHORT_SECS) -> tuple[trio.socket.SocketType, Channel]:
    """A channel, and the bare socket at its other end (to send bytes no Channel would)."""
    ours, theirs = trio.socket.socketpair()
    return ours, Channel(theirs, timeout)


async def test_a_send_to_a_peer_that_reads_nothing_gives_up_within_its_timeout():
    sender, receiver = pair()
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(ChannelClosed):
        await sender.send(BIG)
    assert trio.current_time() - started < 2
    assert sender.broken is not None and "took no message" in sender.broken
    with trio.fail_after(5), pytest.raises(ChannelClosed):  # the cut frame is not read
        await receiver.receive()


async def test_a_send_cancelled_midway_breaks_the_channel_and_nothing_is_misread():
    """The frame is cut: what would follow it could only be misread, so nothing follows."""
    sender, receiver = pair(timeout=60)
    with trio.move_on_after(SHORT_SECS) as cut:
        await sender.send(BIG)
    assert cut.cancelled_caught and sender.broken is not None
    with pytest.raises(ChannelClosed):
        await sender.send({"op": "release", "id": 1})
    with trio.fail_after(5), pytest.raises(ChannelClosed):
        await receiver.receive()


async def test_a_send_cancelled_while_it_waits_its_turn_leaves_the_channel_whole():
    """Nothing of it was sent: the channel goes on, every message arrives whole."""
    sender, receiver = pair(timeout=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, BIG)  # blocks: nobody reads yet
        await trio.sleep(0.1)
        with trio.move_on_after(0.1) as queued:
            await sender.send({"op": "dropped"})
        assert queued.cancelled_caught and sender.broken is None
        assert (await receiver.receive()) == BIG
    await sender.send({"op": "next"})
    assert (await receiver.receive()) == {"op": "next"}


@pytest.mark.parametrize("data", [b'{"op": "config", "con', b"\xff\xfe", b"[1, 2]"])
async def test_bytes_that_do_not_parse_end_the_channel(data):
    peer, channel = raw_pair()
    await peer.send(HEADER.pack(len(data)) + data)
    with pytest.raises(ChannelClosed):
        await channel.receive()
    assert channel.broken is not None and "does not parse" in channel.broken


async def test_a_message_that_stalls_midway_ends_the_channel_within_its_timeout():
    peer, channel = raw_pair()
    data = json.dumps({"op": "config", "config": "x" * 100}).encode()
    await peer.send(HEADER.pack(len(data)) + data[:10])  # and nothing more
    with trio.fail_after(5), pytest.raises(ChannelClosed):
        await channel.receive()
    assert channel.broken is not None and "stalled" in channel.broken


async def test_a_quiet_peer_is_waited_for():
    """No deadline between messages: an idle worker sends nothing, and that is fine."""
    sender, receiver = pair()
    with trio.move_on_after(3 * SHORT_SECS) as waited:
        await receiver.receive()
    assert waited.cancelled_caught and receiver.broken is None
    await sender.send({"op": "ready"})
    assert (await receiver.receive()) == {"op": "ready"}
