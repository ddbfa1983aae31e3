"""How a running sequence gives its blocks back when the pool has none left for the running batch.

The scheduler picks the victim, the running sequence that arrived last (first come, first served:
an old request that was preempted once and came back is never the next victim while a newer one
runs). This module decides how the victim lets go, cheapest loss first:

  SWAP       its computed KV is copied to host memory and its blocks freed, while the host swap
             space (a cap in blocks, `swap_space_bytes` in the engine config) has room for it;
             nothing is recomputed when it comes back;
  RECOMPUTE  the swap space is full: its KV is dropped, its blocks freed, and it waits again at its
             place by arrival to compute its prompt and the tokens it generated as one prefill. The
             tokens it goes on with are the same (greedy, and seeded sampling is stateless); only
             compute is lost. vLLM V1 preempts this way only;
  FAIL       the swap space is full and the sequence cannot be recomputed: its prompt's KV came
             from a remote prefill and a decode stage has neither the prompt's image features nor
             its M-RoPE positions. It ends with `FinishReason.ERROR`, a failed request the service
             reports, and every other request goes on; the engine never crashes for it (vLLM V0
             raised and stopped the whole engine when its swap space ran out).

Plain ints, no torch.
"""

from __future__ import annotations

import enum
from typing import Protocol

from services.engine.sequence import Sequence


class KVSwapper(Protocol):
    def swap_out(self, seq: Sequence) -> None:
        """Copy the KV of `seq`'s computed tokens to host memory (`seq.swapped_kv`)."""

    def swap_in(self, seq: Sequence) -> None:
        """Write `seq.swapped_kv` into the slots of `seq.block_table`, then drop the host copy."""


class Preemption(enum.Enum):
    SWAP = "swap"
    RECOMPUTE = "recompute"
    FAIL = "fail"


def choose(seq: Sequence, host_blocks_needed: int, host_blocks_free: int | None) -> Preemption:
    """How `seq` gives its blocks back: its host copy takes `host_blocks_needed` blocks of swap space,
    of which `host_blocks_free` are left (None: no cap)."""
    if host_blocks_free is None or host_blocks_needed <= host_blocks_free:
        return Preemption.SWAP
    if seq.recomputable:
        return Preemption.RECOMPUTE
    return Preemption.FAIL
