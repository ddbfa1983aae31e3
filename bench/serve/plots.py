"""PNG figures of a run: latency CDFs per topology and goodput against load, per topology.

A CDF shows what a mean hides: the tail that decides an SLO. Goodput against the offered load shows
where each topology stops keeping up. matplotlib is imported here only, with the Agg backend (no
display needed), and only when plots are asked for: it is an optional dependency (`[bench]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install 'epd-serve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values_ms: Sequence[float], label: str) -> None:
    xs = sorted(values_ms)
    if not xs:
        return
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label)


def latency_cdfs(
    runs: Sequence[dict[str, Any]], field: str, title: str, slo_ms: float | None, path: Path
) -> None:
    """One panel per load point, one line per topology; `field` lists seconds per request."""
    plt = _pyplot()
    labels = list(dict.fromkeys(r["load_label"] for r in runs))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for run in (r for r in runs if r["load_label"] == label):
            _cdf(ax, [v * 1e3 for v in run[field] if v is not None], run["topology"])
        if slo_ms is not None:
            ax.axvline(slo_ms, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_title(label)
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goodput_vs_load(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Goodput (and request throughput, dotted) per topology across the load points, in sweep order."""
    plt = _pyplot()
    xs = list(dict.fromkeys(r["load_x"] for r in runs))
    closed = bool(runs) and runs[0]["closed_loop"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for topology in dict.fromkeys(r["topology"] for r in runs):
        mine = {r["load_x"]: r for r in runs if r["topology"] == topology}
        pos = [i for i, x in enumerate(xs) if x in mine]
        line = ax.plot(pos, [mine[xs[i]]["goodput"] for i in pos], marker="o", label=f"{topology} goodput")
        ax.plot(
            pos,
            [mine[xs[i]]["request_throughput"] for i in pos],
            linestyle=":",
            color=line[0].get_color(),
            label=f"{topology} throughput",
        )
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel("clients (closed loop)" if closed else "offered load (requests/s)")
    ax.set_ylabel("requests/s")
    ax.set_title("goodput (meets the SLO) and throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(runs: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Every figure of the run into `out_dir`; returns the files written."""
    if not runs:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slo = runs[0]
    files = [out / "ttft_cdf.png", out / "tpot_cdf.png", out / "goodput.png"]
    latency_cdfs(runs, "ttfts", "TTFT", slo.get("slo_ttft_ms"), files[0])
    latency_cdfs(runs, "tpots", "TPOT", slo.get("slo_tpot_ms"), files[1])
    goodput_vs_load(runs, files[2])
    return files
