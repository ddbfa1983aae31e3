"""tcp: the bytes ride the ZeroMQ channel itself, as raw frames sent straight from the source memory.

Each region is cut into chunks (`chunk_bytes`, 4 MiB by default) so a huge region never becomes one
giant message; a chunk is one message `[Header, bytes]`, sent zero-copy and tracked, with at most
`window` chunks in flight per peer so memory stays bounded and abort() takes effect between chunks. The
consumer copies each frame into its destination (one memcpy) on the receiving thread.

The producer's SUCCESS means ZeroMQ has finished with the source memory (handed to the kernel); the
consumer's own handle says when the bytes are in place. Works between any two hosts; the portable default.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import zmq

from common.dataplane import wire
from common.dataplane.channel import ChannelDataPlane
from common.dataplane.sender import Job, PeerSender


class TcpDataPlane(ChannelDataPlane):
    backend = "tcp"

    def __init__(self, *, chunk_bytes: int = 4 << 20, window: int = 8, **options: Any) -> None:
        super().__init__(**options)
        if chunk_bytes <= 0 or window <= 0:
            raise ValueError("chunk_bytes and window must be positive")
        self.chunk_bytes = chunk_bytes
        self.window = window

    def send_job(self, sender: PeerSender, job: Job) -> None:
        handle = job.handle
        in_flight: deque[tuple[Any, int]] = deque()

        def settle(limit: int) -> None:
            while len(in_flight) > limit:
                tracker, nbytes = in_flight.popleft()
                sender.wait_sent(tracker, handle)
                handle.add_bytes(nbytes, job.started)

        for view, region in job.items:
            for start in range(0, region.length, self.chunk_bytes):
                chunk = view[start : start + self.chunk_bytes]
                header = wire.Header(
                    handle.transfer_id,
                    region.buffer_id,
                    region.offset,
                    region.length,
                    "data",
                    chunk_offset=start,
                    chunk_length=chunk.nbytes,
                )
                tracker = sender.send([wire.encode(header), chunk], handle, track=True)
                in_flight.append((tracker, chunk.nbytes))
                settle(self.window)
        settle(0)

    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        if header.kind != "data":
            self.reject(header, f"tcp consumer does not take {header.kind!r} messages")
            return
        if len(payload) != 1 or payload[0].buffer.nbytes != header.chunk_length:
            self.reject(header, "payload does not match the header's chunk length")
            return
        region = header.region
        if (problem := self.buffers.problem(region)) is not None:
            self.reject(header, problem)
            return
        start = header.offset + header.chunk_offset
        end = start + header.chunk_length
        if header.chunk_offset < 0 or end > region.end:
            self.reject(header, "chunk lies outside its region")
            return
        dest = self.buffers.view(header.buffer_id, start, end)
        if dest is None:  # freed meanwhile
            self.reject(header, f"buffer {header.buffer_id!r} is gone")
            return
        source = payload[0].buffer

        def copy() -> None:
            dest[:] = source

        if self.ledger.deliver(header.transfer_id, header.buffer_id, start, end, copy):
            self.count_received(header.chunk_length)
