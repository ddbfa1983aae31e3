"""How requests arrive: an open loop (Poisson arrivals at a rate) or a closed loop (N clients).

The open loop is what a service sees from many independent users: arrivals do not wait for answers,
so an overloaded server builds a queue and its latencies show it. `inf` sends everything at once (a
burst). The closed loop keeps exactly N requests in flight, each client sending its next request as
soon as its last one finished: it measures capacity at a fixed concurrency, and can never overload.

Both loops are bounded twice: by the number of requests and, when given, by a duration after which no
new request starts (those in flight finish; each request has its own timeout in the client).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bench.serve.client import RequestRecord
from bench.serve.dataset import BenchRequest

Send = Callable[[BenchRequest], Awaitable[RequestRecord]]


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """One point of a sweep: a rate (open loop) or a number of clients (closed loop)."""

    rate: float | None = math.inf  # requests per second; None: closed loop
    concurrency: int | None = None  # closed loop: clients; open loop: cap on requests in flight

    def __post_init__(self) -> None:
        if self.rate is None and not self.concurrency:
            raise ValueError("a closed loop needs a concurrency")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")

    @property
    def closed(self) -> bool:
        return self.rate is None

    @property
    def label(self) -> str:
        """Short, for tables and plot axes: '4 req/s', 'inf req/s', '8 clients'."""
        if self.rate is None:
            return f"{self.concurrency} client{'s' if self.concurrency != 1 else ''}"
        return f"{self.rate:g} req/s" + (f", <= {self.concurrency} in flight" if self.concurrency else "")

    @property
    def x(self) -> str:
        """The sweep coordinate alone, for plot ticks."""
        return str(self.concurrency) if self.rate is None else f"{self.rate:g}"

    def to_json(self) -> dict[str, float | int | str | None]:
        """vLLM's fields: `request_rate` ("inf" for a burst; None in a closed loop), `max_concurrency`."""
        rate: float | str | None = self.rate
        if rate is not None and math.isinf(rate):
            rate = "inf"
        return {"request_rate": rate, "max_concurrency": self.concurrency, "closed_loop": self.closed}


@dataclass(slots=True)
class LoadResult:
    records: list[RequestRecord]
    duration: float  # from the first send to the end of the last request


async def run_load(
    send: Send,
    requests: Sequence[BenchRequest],
    point: LoadPoint,
    *,
    seed: int = 0,
    max_duration: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Send `requests` with the arrivals of `point`; returns every record, in request order."""
    t0 = time.perf_counter()

    def out_of_time() -> bool:
        return max_duration is not None and time.perf_counter() - t0 >= max_duration

    async def one(request: BenchRequest, gate: asyncio.Semaphore | None) -> RequestRecord:
        if gate is None:
            record = await send(request)
        else:
            async with gate:
                record = await send(request)
        if on_done is not None:
            on_done(record)
        return record

    if point.closed:
        records = await _closed_loop(one, requests, point.concurrency or 1, out_of_time)
    else:
        records = await _open_loop(one, requests, point, random.Random(seed), out_of_time)
    records.sort(key=lambda r: r.index)
    end = max((r.end for r in records), default=t0)
    return LoadResult(records, end - t0)


async def _open_loop(
    one: Callable[[BenchRequest, asyncio.Semaphore | None], Awaitable[RequestRecord]],
    requests: Sequence[BenchRequest],
    point: LoadPoint,
    rng: random.Random,
    out_of_time: Callable[[], bool],
) -> list[RequestRecord]:
    gate = asyncio.Semaphore(point.concurrency) if point.concurrency else None
    rate = point.rate or math.inf
    tasks: list[asyncio.Task[RequestRecord]] = []
    next_at = time.perf_counter()
    try:
        for request in requests:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if out_of_time():
                break
            tasks.append(asyncio.create_task(one(request, gate)))
            if not math.isinf(rate):
                next_at += rng.expovariate(rate)  # Poisson process: exponential gaps
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # only left running when this coroutine was cancelled
            task.cancel()


async def _closed_loop(
    one: Callable[[BenchRequest, asyncio.Semaphore | None], Awaitable[RequestRecord]],
    requests: Sequence[BenchRequest],
    clients: int,
    out_of_time: Callable[[], bool],
) -> list[RequestRecord]:
    queue = iter(requests)  # shared by the clients: one event loop, so no lock is needed

    async def client() -> list[RequestRecord]:
        done = []
        for request in queue:
            if out_of_time():
                break
            done.append(await one(request, None))
        return done

    per_client = await asyncio.gather(*(client() for _ in range(clients)))
    return [record for records in per_client for record in records]
