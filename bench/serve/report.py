"""What a benchmark run prints and saves: one table per load point, topologies side by side.

Ratios are against the first topology named (the baseline, usually the monolithic `EPD1`) at the same
load point, measured in the same run: absolute numbers on a shared 2-core machine drift from run to
run, ratios measured minutes apart drift much less.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (JSON field, ratio field): how each run compares with the baseline's run at the same load point
RATIOS = {
    "goodput": "goodput_ratio",
    "output_throughput": "output_throughput_ratio",
    "median_ttft_ms": "median_ttft_ratio",
    "median_tpot_ms": "median_tpot_ratio",
}


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def add_ratios(runs: Sequence[dict[str, Any]]) -> None:
    """Set each run's RATIOS fields against the first topology's run at the same load point."""
    baselines: dict[str, dict[str, Any]] = {}
    for run in runs:
        base = baselines.setdefault(run["load_label"], run)
        run["baseline"] = base["topology"]
        for field, ratio in RATIOS.items():
            run[ratio] = _ratio(run.get(field), base.get(field))


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# (header, width, how to render a run)
COLUMNS: list[tuple[str, int, Any]] = [
    ("ok", 4, lambda r: str(r["completed"])),
    ("fail", 4, lambda r: str(r["failed"])),
    ("req/s", 6, lambda r: _num(r["request_throughput"], 2)),
    ("tok/s", 7, lambda r: _num(r["output_throughput"])),
    ("TTFT p50", 9, lambda r: _num(r["median_ttft_ms"])),
    ("p99", 8, lambda r: _num(r["p99_ttft_ms"])),
    ("TPOT p50", 9, lambda r: _num(r["median_tpot_ms"])),
    ("p99", 7, lambda r: _num(r["p99_tpot_ms"])),
    ("ITL p50", 8, lambda r: _num(r["median_itl_ms"])),
    ("E2E p50", 8, lambda r: _num(r["median_e2el_ms"], 0)),
    ("p99", 7, lambda r: _num(r["p99_e2el_ms"], 0)),
    ("SLO", 5, lambda r: "-" if r["slo_attainment"] is None else f"{100 * r['slo_attainment']:.0f}%"),
    ("goodput", 8, lambda r: _num(r["goodput"], 2)),
    ("x goodput", 9, lambda r: _times(r["goodput_ratio"])),
    ("x tok/s", 7, lambda r: _times(r["output_throughput_ratio"])),
    ("x TTFT", 7, lambda r: _times(r["median_ttft_ratio"])),
    ("x TPOT", 7, lambda r: _times(r["median_tpot_ratio"])),
]


def format_tables(runs: Sequence[dict[str, Any]]) -> str:
    """One table per load point; times in ms, ratios against the first topology at that point."""
    lines: list[str] = []
    name_width = max([8, *(len(r["topology"]) for r in runs)])
    first_column = "target" if any("://" in r["topology"] for r in runs) else "topology"
    head = [f"{first_column:<{name_width}}", *(f"{h:>{w}}" for h, w, _ in COLUMNS)]
    labels = list(dict.fromkeys(r["load_label"] for r in runs))
    for label in labels:
        group = [r for r in runs if r["load_label"] == label]
        first = group[0]
        lines.append(
            f"\n{label}: {first['num_prompts']} requests each; times in ms; SLO: TTFT <= "
            f"{first['slo_ttft_ms']:g} ms and TPOT <= {first['slo_tpot_ms']:g} ms; "
            f"x: ratio to {first['baseline']} (goodput, output tok/s, TTFT p50, TPOT p50)"
        )
        lines.append("  ".join(head))
        for run in group:
            cells = [f"{run['topology']:<{name_width}}", *(f"{fn(run):>{w}}" for _, w, fn in COLUMNS)]
            lines.append("  ".join(cells))
        for run in group:
            for message, count in run.get("error_counts", {}).items():
                lines.append(f"  {run['topology']}: {count} failed: {message}")
            if run.get("exited_stages"):
                lines.append(
                    f"  {run['topology']}: stage processes exited: {', '.join(run['exited_stages'])}"
                )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """inf and nan are not JSON: written as strings, as vLLM writes `"request_rate": "inf"`."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_json_safe(report), indent=1) + "\n")
