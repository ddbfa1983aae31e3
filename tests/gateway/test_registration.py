"""Registration on a real gateway control plane (ZeroMQ, two processes' worth of sockets): an instance
id belongs to the connection that registered it while it lives, so another process can neither take
it over nor refresh or silence it; heartbeats from unknown ids are answered on their own connection,
and the gateway opens no socket for them; a stage accepts heartbeat intervals only within bounds."""

from __future__ import annotations

import asyncio
import math

import zmq.asyncio

from common.mailbox import Mailbox
from common.protocol import Heartbeat, InstanceInfo, Load, Register, RegisterAck
from gateway.cluster import Cluster
from services.service_io import HEARTBEAT_BOUNDS_S, bounded_interval

MODEL = "tiny"


async def _reply(box: Mailbox, gateway: str, timeout: float = 5.0):
    msg, _ = await asyncio.wait_for(box.recv_reply(gateway), timeout)
    return msg


async def _inbox(box: Mailbox, timeout: float = 5.0):
    msg, _ = await asyncio.wait_for(box.recv(), timeout)
    return msg


def _info(box: Mailbox, instance_id: str) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, roles="D", address=box.address, model=MODEL, pid=1)


def test_a_live_instance_id_cannot_be_taken_over_refreshed_or_silenced_by_another_connection():
    async def run():
        cluster = Cluster(MODEL, 4096)
        await cluster.start()
        contexts = [zmq.asyncio.Context(), zmq.asyncio.Context()]
        owner, impostor = Mailbox(contexts[0], "d0"), Mailbox(contexts[1], "d0")
        try:
            owner.send(cluster.address, Register(info=_info(owner, "d0")))
            ack = await _inbox(owner)
            assert isinstance(ack, RegisterAck) and ack.accepted
            owner.send(cluster.address, Heartbeat(load=Load(waiting=1), address=owner.address))
            await asyncio.sleep(0.2)

            impostor.send(cluster.address, Register(info=_info(impostor, "d0")))
            refused = await _reply(impostor, cluster.address)
            assert isinstance(refused, RegisterAck) and not refused.accepted and refused.retry
            assert "held by a live instance" in refused.reason
            assert cluster.registry.instances["d0"].address == owner.address, "the id was taken over"

            impostor.send(cluster.address, Heartbeat(load=Load(waiting=99), address=impostor.address))
            answered = await _reply(impostor, cluster.address)
            assert isinstance(answered, RegisterAck) and answered.retry
            assert cluster.registry.instances["d0"].load.waiting == 1, "another connection refreshed it"
            assert list(cluster.mailbox._outboxes) == [owner.address], "a socket was opened to the impostor"
        finally:
            owner.close()
            impostor.close()
            for ctx in contexts:
                ctx.term()
            await cluster.close()

    asyncio.run(run())


def test_heartbeats_from_unknown_ids_open_no_socket_and_are_answered_on_their_connection():
    async def run():
        cluster = Cluster(MODEL, 4096)
        await cluster.start()
        ctx = zmq.asyncio.Context()
        stranger = Mailbox(ctx, "stranger")
        try:
            for i in range(300):  # distinct ids and made-up addresses
                beat = Heartbeat(load=Load(), address=f"tcp://10.255.{i // 250}.{i % 250}:9")
                beat.sender = f"ghost-{i}"
                stranger.send(cluster.address, beat)
            answers = [await _reply(stranger, cluster.address) for _ in range(300)]
            assert all(isinstance(a, RegisterAck) and a.retry for a in answers)
            assert cluster.mailbox._outboxes == {}, "the gateway opened sockets for unknown ids"
            assert cluster.registry.instances == {}
        finally:
            stranger.close()
            ctx.term()
            await cluster.close()

    asyncio.run(run())


def test_a_stage_keeps_heartbeat_intervals_within_bounds():
    low, high = HEARTBEAT_BOUNDS_S
    assert bounded_interval(0) == low, "0 would silence the instance for good"
    assert bounded_interval(-5) == low
    assert bounded_interval(3600) == high, "an hour would get it dropped as dead"
    assert bounded_interval(math.nan) == high
    assert bounded_interval(0.5) == 0.5
