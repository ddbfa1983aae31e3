"""PNG figures of a load-shift run (bench/load_shift.py): goodput per phase, and roles against time.

The timeline is what shows the planner working: for each system, how many instances serve E, P and D
at each moment (a pending change counts for the role it leaves until it is done), over shaded phases,
with every request's TTFT as a dot at its send time (red when it missed the SLO).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.serve.plots import _pyplot


def _counts(sample: dict[str, Any], role: str) -> int:
    return sum(1 for roles in sample["roles"].values() if role in roles.split(">")[0])


def goodput_bars(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    results, phases = report["results"], report["phases"]
    labels = [f"{k + 1}: {p['name']}" for k, p in enumerate(phases)] + ["whole run"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        values = [ph["goodput"] for ph in r["phases"]] + [r["whole"]["goodput"]]
        xs = [k + (i - (len(results) - 1) / 2) * width for k in range(len(labels))]
        ax.bar(xs, values, width=width, label=r["system"])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("goodput (req/s within the SLO)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def role_timeline(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    results, phases = report["results"], report["phases"]
    slo_ms = results[0]["whole"]["slo_ttft_ms"] if results else None
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 2.4 * len(results)), squeeze=False, sharex=True)
    every = [v * 1e3 for r in results for v in r["ttfts"] if v]
    ttft_range = (min(every, default=1.0) / 1.5, max(every, default=1e4) * 1.5)  # one scale for all panels
    for ax, r in zip(axes[:, 0], results, strict=True):
        start = 0.0
        for k, phase in enumerate(phases):
            ax.axvspan(start, start + phase["seconds"], color="C7", alpha=0.08 if k % 2 else 0.0)
            start += phase["seconds"]
        ts = [s["t"] for s in r["role_samples"]]
        for role, color, nudge in (
            ("E", "C4", 0.05),
            ("P", "C0", 0.0),
            ("D", "C1", -0.05),
        ):  # apart when equal
            counts = [_counts(s, role) + nudge for s in r["role_samples"]]
            ax.step(ts, counts, where="post", color=color, label=f"{role} instances")
        ax.set_ylabel("instances")
        ax.set_ylim(0, 4)
        ax.set_title(r["system"], fontsize=9)
        twin = ax.twinx()
        ok = [(t, v * 1e3) for t, v in zip(r["sent_at"], r["ttfts"], strict=True) if v is not None]
        good = [(t, v) for t, v in ok if slo_ms is None or v <= slo_ms]
        bad = [(t, v) for t, v in ok if slo_ms is not None and v > slo_ms]
        for points, color in ((good, "0.6"), (bad, "C3")):
            if points:
                twin.scatter(*zip(*points, strict=True), s=4, color=color)
        twin.set_ylabel("TTFT (ms; red: missed the SLO)", fontsize=7)
        twin.set_yscale("log")
        twin.set_ylim(*ttft_range)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds since the first request (shaded: the text phase)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(report: dict[str, Any], directory: str) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "load_shift_goodput.png", out / "load_shift_roles.png"]
    goodput_bars(report, files[0])
    role_timeline(report, files[1])
    return files
