"""From request timelines to the numbers a serving benchmark reports.

Names follow vLLM's `bench serve` JSON where they mean the same (`request_throughput`,
`output_throughput`, `mean_ttft_ms`, `p99_itl_ms`, `mean_e2el_ms`, ...), so results can sit next to
vLLM's in one notebook. Ours on top: `slo_attainment` (the share of all issued requests that finished
within both the TTFT and the TPOT bound) and `goodput` (such requests per second), the figures of
merit of disaggregated serving: raw throughput hides requests that finished too late to be useful.

A failed request counts against the SLO and in `failed`, never in the latency distributions (its
timings describe an error path, not the service). A request with one output token has no TPOT; it
meets the TPOT bound vacuously.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.serve.client import RequestRecord

PERCENTILES = (90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")  # vLLM's names; e2el is end-to-end latency


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objective per request, in milliseconds (defaults: the design's TTFT 2 s, TPOT 50 ms)."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 50.0

    def met(self, record: RequestRecord) -> bool:
        if not record.success or record.ttft is None or record.ttft * 1e3 > self.ttft_ms:
            return False
        tpot = record.tpot
        return tpot is None or tpot * 1e3 <= self.tpot_ms


def distribution(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std and the PERCENTILES of `seconds`, in ms, keyed like vLLM (`p99_ttft_ms`).

    An empty sample gives None for each: "no data" must not read as "0 ms".
    """
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if not seconds:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    values = [ms.mean(), np.median(ms), ms.std(), *np.percentile(ms, PERCENTILES)]
    return {f"{k}_{name}_ms": float(v) for k, v in zip(keys, values, strict=True)}


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per latency kind over the successful requests (ITL: every gap of every request)."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [t for r in ok if (t := r.ttft) is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2el": [r.e2e for r in ok],
    }


def summarize(records: Sequence[RequestRecord], duration: float, slo: Slo) -> dict[str, Any]:
    """The summary of one run: counts, throughputs over `duration` seconds, latencies, SLO, goodput."""
    ok = [r for r in records if r.success]
    seconds = max(duration, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(1 for r in records if slo.met(r))
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / seconds,
        "output_throughput": output_tokens / seconds,
        "total_token_throughput": (input_tokens + output_tokens) / seconds,
    }
    for name, values in latency_samples(records).items():
        out.update(distribution(name, values))
    out.update(
        slo_ttft_ms=slo.ttft_ms,
        slo_tpot_ms=slo.tpot_ms,
        slo_met=good,
        slo_attainment=good / len(records) if records else None,
        goodput=good / seconds,
        error_counts=dict(Counter(r.error for r in records if not r.success).most_common(10)),
    )
    return out


def details(records: Sequence[RequestRecord]) -> dict[str, list[Any]]:
    """Per-request values (seconds), as vLLM's `--save-detailed`: enough to redraw any plot later."""
    return {
        "input_lens": [r.prompt_tokens for r in records],
        "output_lens": [r.output_tokens for r in records],
        "ttfts": [r.ttft if r.success else None for r in records],
        "tpots": [r.tpot if r.success else None for r in records],
        "e2els": [r.e2e if r.success else None for r in records],
        "itls": [r.itls if r.success else [] for r in records],
        "num_images": [r.images for r in records],
        "errors": [r.error for r in records],
    }
