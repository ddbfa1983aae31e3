"""When the gateway declares an instance dead (heartbeats stopped, or a new process took its id), the
requests it held fail at once, and every other instance that may still work on them gets an ABORT:
the prefill still computing for a dead decode, and the prefill still shipping KV after its first
token. The dead instance itself gets none."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq.asyncio

from common.mailbox import Mailbox
from common.protocol import Abort, FirstToken, Heartbeat, InstanceInfo, KvReserve, Load, Prefill, Register
from common.sampling_params import SamplingParams
from gateway.backend import BackendError, GenerateRequest
from gateway.cluster import Cluster

MODEL = "tiny"


class FakeStage:
    """A stage instance on a real inbox that registers and heartbeats until told to stop."""

    def __init__(self, ctx, instance_id: str, roles: str) -> None:
        self.box = Mailbox(ctx, instance_id)
        self.info = InstanceInfo(
            instance_id=instance_id, roles=roles, address=self.box.address, model=MODEL, pid=1
        )
        self.received: list = []
        self._tasks: list[asyncio.Task] = []

    async def join(self, gateway: str) -> None:
        self.box.send(gateway, Register(info=self.info))
        self._tasks = [asyncio.create_task(self._beat(gateway)), asyncio.create_task(self._read())]
        while not any(type(m).__name__ == "RegisterAck" for m in self.received):
            await asyncio.sleep(0.01)

    async def _beat(self, gateway: str) -> None:
        while True:
            self.box.send(gateway, Heartbeat(load=Load(), address=self.box.address))
            await asyncio.sleep(0.05)

    async def _read(self) -> None:
        while True:
            msg, _ = await self.box.recv()
            self.received.append(msg)

    def silence(self) -> None:
        self._tasks[0].cancel()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.box.close()

    def got(self, kind) -> list:
        return [m for m in self.received if isinstance(m, kind)]


async def until(condition, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < end, "timed out waiting"
        await asyncio.sleep(0.01)


async def place(cluster: Cluster, rid: str) -> asyncio.Task:
    async def consume():
        async for _ in cluster.generate(GenerateRequest(rid, [1, 2, 3], [], SamplingParams(max_tokens=100))):
            pass

    return asyncio.create_task(consume())


@contextlib.asynccontextmanager
async def split_stack():
    cluster = Cluster(MODEL, 4096, heartbeat_interval=0.1, heartbeat_timeout=0.5)
    await cluster.start()
    ctx = zmq.asyncio.Context()
    prefill, decode = FakeStage(ctx, "p0", "P"), FakeStage(ctx, "d0", "D")
    stages = [prefill, decode]
    try:
        for s in stages:
            await s.join(cluster.address)
        yield cluster, prefill, decode
    finally:
        for s in stages:
            await s.close()
        ctx.term()
        await cluster.close()


@pytest.mark.parametrize("after_first_token", [False, True])
def test_a_dead_decode_has_its_requests_aborted_at_the_prefill(after_first_token):
    async def go():
        async with split_stack() as (cluster, prefill, decode):
            client = await place(cluster, "r")
            await until(lambda: prefill.got(Prefill) and decode.got(KvReserve))
            if after_first_token:  # prefill is done computing but may still be shipping the KV
                prefill.box.send(cluster.address, FirstToken(request_id="r", token_id=7, num_prompt_tokens=3))
                await until(lambda: "r" not in cluster.registry.instances["p0"].inflight)
            decode.silence()
            with pytest.raises(BackendError) as err:
                await asyncio.wait_for(client, 5)
            await until(lambda: prefill.got(Abort))
            return err.value, [m.request_id for m in prefill.got(Abort)], decode.got(Abort)

    error, aborted_at_prefill, aborted_at_decode = asyncio.run(go())
    assert error.status == 503 and "decode instance d0" in error.message and "died" in error.message
    assert aborted_at_prefill == ["r"], "the prefill must stop working on a request that failed"
    assert aborted_at_decode == []
