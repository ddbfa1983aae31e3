"""The encoder of a process that also prefills (`EPD1`, `EP1`), on a thread of its own.

Without it the process's one compute loop runs each encoder call between two engine steps, so every
running decode waits for the whole call (tens of milliseconds for one image on a CPU), and under load
the encoder's turns and the engine's add up until neither keeps pace. On a thread of its own the call
runs while the loop goes on stepping: torch releases the GIL inside its kernels, so the two overlap
as an encode process next to a prefill-decode process would (`E1 PD1`), and the features still reach
the prefill role as the same tensor, with no trip through the data plane.

The process's threads are shared out, not doubled: OpenMP's thread count belongs to the calling
thread, so the encoder call takes all of them when the engine has nothing to do (an idle stack's
first image encodes as fast as before) and one less when it has, and the loop's engine steps take
what the call in flight leaves. Only the encoder call moves: the queue, the feature cache and every
message stay on the loop's thread, which collects a finished call's features (`EncodeWorker`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class EncoderThread:
    def __init__(
        self,
        encode: Callable[[list[Any]], list[torch.Tensor]],
        total_threads: int,
        engine_busy: Callable[[], bool],
        wake: Callable[[], None],
    ) -> None:
        self._encode = encode
        self.total_threads = max(1, total_threads)
        self._engine_busy = engine_busy  # read on the loop's thread, when a call is submitted
        self._wake = wake  # thread-safe: ends the loop's wait when a call finishes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epd-encoder")
        self._future: Future | None = None
        self._call_threads = 0  # threads of the call in flight

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
        busy = self._engine_busy()
        self._call_threads = max(1, self.total_threads - 1) if busy else self.total_threads
        self._future = self._pool.submit(_encode_with_threads, self._encode, items, self._call_threads)
        self._future.add_done_callback(lambda _: self._wake())

    def result(self) -> list[torch.Tensor]:
        """The finished call's features, one tensor per item; raises what the call raised."""
        future, self._future, self._call_threads = self._future, None, 0
        if future is None:
            raise RuntimeError("no encoder call to collect")
        return future.result()

    def engine_threads(self) -> int:
        """Threads for the loop's next engine step: what a call in flight leaves, else all of them."""
        if self._future is not None and not self._future.done():
            return max(1, self.total_threads - self._call_threads)
        return self.total_threads

    def close(self) -> None:
        """Wait for a call in flight and end the thread (a role change, or the process stopping)."""
        self._pool.shutdown(wait=True)


def _encode_with_threads(encode: Callable[[list[Any]], list[torch.Tensor]], items: list[Any], threads: int):
    torch.set_num_threads(threads)  # this thread's own OpenMP team; the loop's thread keeps its count
    return encode(items)
