"""The encoder of a process that also prefills (`EPD1`, `EP1`), on a thread of its own.

Without it the process's one compute loop runs each encoder call between two engine steps, so every
running decode waits for the whole call (tens of milliseconds for one image on a CPU), and under load
the encoder's turns and the engine's add up until neither keeps pace. On a thread of its own the call
runs while the loop goes on stepping: torch releases the GIL inside its kernels, so the two overlap
as an encode process next to a prefill-decode process would (`E1 PD1`), and the features still reach
the prefill role as the same tensor, with no trip through the data plane.

The process's threads are shared out, not doubled. While the engine holds at most `light_load`
requests, the call runs inline on the loop's thread with every thread, as before: at a low rate one
image then encodes fastest and the one or two running decodes wait one call. Past that, the call
goes to the encoder thread and runs on one thread, and the engine steps take the rest (OpenMP's
thread count is per calling thread). One, because a team of its own would leave the process more
OpenMP threads than cores, and libgomp then stops spinning between parallel regions: every small
op of the engine's steps paid a wake-up (1.6x slower matmuls of decode size, measured, while such a
team was alive), which cost 4 ms of TPOT and 50 ms of TTFT at 2 req/s. Under load this is what lets
`EPD1` hold its SLO: 100% attainment at 8 req/s, against 71 to 72% with the encoder inline
(docs/benchmarks.md). Only the encoder call moves: the queue, the feature cache and every message
stay on the loop's thread, which collects a finished call's features (`EncodeWorker`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

LIGHT_LOAD = 2  # requests in the engine up to which an encoder call runs inline, with every thread


class EncoderThread:
    def __init__(
        self,
        encode: Callable[[list[Any]], list[torch.Tensor]],
        total_threads: int,
        engine_load: Callable[[], int],
        wake: Callable[[], None],
        light_load: int = LIGHT_LOAD,
    ) -> None:
        self._encode = encode
        self.total_threads = max(1, total_threads)
        self._engine_load = engine_load  # requests the engine holds, read when a call is placed
        self.light_load = light_load
        self._wake = wake  # thread-safe: ends the loop's wait when a call finishes
        # one torch thread, set once: that thread's own count (no OpenMP team); the loop's keeps its own
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="epd-encoder", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._future: Future | None = None

    def offloads(self) -> bool:
        """Whether the next call goes to the thread: the engine holds more than `light_load` requests
        (else the caller runs it inline, with every thread)."""
        return self._engine_load() > self.light_load

    @property
    def running(self) -> bool:
        """A call was submitted and its result not yet collected."""
        return self._future is not None

    def done(self) -> bool:
        """A call finished and waits to be collected."""
        return self._future is not None and self._future.done()

    def submit(self, items: list[Any]) -> None:
        if self._future is not None:
            raise RuntimeError("the encoder thread is already running a call")
        self._future = self._pool.submit(self._encode, items)
        self._future.add_done_callback(lambda _: self._wake())

    def result(self) -> list[torch.Tensor]:
        """The finished call's features, one tensor per item; raises what the call raised."""
        future, self._future = self._future, None
        if future is None:
            raise RuntimeError("no encoder call to collect")
        return future.result()

    def engine_threads(self) -> int:
        """Threads for the loop's next engine step: all but the call's one while a call runs."""
        if self._future is not None and not self._future.done():
            return max(1, self.total_threads - 1)
        return self.total_threads

    def close(self) -> None:
        """Wait for a call in flight and end the thread (a role change, or the process stopping)."""
        self._pool.shutdown(wait=True)
