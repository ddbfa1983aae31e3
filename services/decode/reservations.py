"""How many KV blocks reservations may claim on a decode instance before their KV has arrived.

A KV_RESERVE costs its sender one small message and the decode instance blocks for as long as the
prompt takes to arrive (up to the worker's deadline, 30 s). Unbounded, a burst of them (a hostile
member of the stack, or a gateway that lost track) holds the whole pool and every real request waits
behind it. So the blocks claimed by reservations not yet arrived (waiting for room in the backlog, or
reserved and receiving) are capped, in total and per peer (the connection the KV_RESERVE came on:
the gateway's, in normal operation); one past a cap is refused at once with a 503, so the client
learns in milliseconds that this instance is full rather than after the deadline.

Defaults: three quarters of the pool in total, which leaves a quarter to the requests already
decoding whatever the number of peers; half of it per peer, so one peer flooding the instance always
leaves room for another. Each cap is at least one whole context (the engine's `max_model_len`), so a
single prompt of any admissible length can always be reserved, and at most the pool.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

TOTAL_SHARE = 0.75  # of the pool's blocks, for every reservation not yet arrived
PEER_SHARE = 0.5  # of the pool's blocks, for those of one peer
TOO_MANY = "decode instance has too many reservations in flight"


@dataclass(frozen=True, slots=True)
class ReservationLimits:
    total_blocks: int
    per_peer_blocks: int

    @classmethod
    def for_engine(
        cls, engine: Any, total_share: float = TOTAL_SHARE, peer_share: float = PEER_SHARE
    ) -> ReservationLimits:
        pool = engine.block_manager.num_blocks
        context = engine.block_manager.blocks_for(engine.max_model_len)

        def cap(share: float) -> int:
            return min(pool, max(context, math.ceil(share * pool)))

        return cls(cap(total_share), cap(peer_share))

    def refusal(self, ledger: ReservationLedger, peer: Any, blocks: int) -> str | None:
        """Why a reservation of `blocks` from `peer` is refused now, or None."""
        if ledger.total + blocks > self.total_blocks:
            held, cap = ledger.total, self.total_blocks
        elif ledger.of(peer) + blocks > self.per_peer_blocks:
            held, cap = ledger.of(peer), self.per_peer_blocks
        else:
            return None
        return f"{TOO_MANY} ({held} of {cap} blocks claimed, this prompt needs {blocks}); retry later"


class ReservationLedger:
    """Blocks claimed by reservations whose KV has not arrived, by request and by peer."""

    def __init__(self) -> None:
        self._claims: dict[str, tuple[Any, int]] = {}
        self._by_peer: Counter[Any] = Counter()
        self.total = 0

    def __len__(self) -> int:
        return len(self._claims)

    def of(self, peer: Any) -> int:
        return self._by_peer[peer]

    def add(self, request_id: str, peer: Any, blocks: int) -> None:
        self.remove(request_id)
        self._claims[request_id] = (peer, blocks)
        self._by_peer[peer] += blocks
        self.total += blocks

    def remove(self, request_id: str) -> None:
        """The request's KV arrived, or it ended; safe to call for any id."""
        claim = self._claims.pop(request_id, None)
        if claim is None:
            return
        peer, blocks = claim
        self.total -= blocks
        self._by_peer[peer] -= blocks
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]
