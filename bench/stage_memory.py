"""Resident memory of a stage process: what loading a model costs each role set, in its own process.

One fresh subprocess per role set imports torch and transformers, reads its resident memory, loads the
model with `load_model(roles=...)`, and reads it again: VmRSS after loading and VmHWM (the peak over
the whole process, loading included) from /proc/self/status. Each process loads and stops there, so
the KV pool, which the engine allocates after loading and which configuration sizes, is not in these
figures; its cost per token is reported beside them. Roles "EPD" load the whole model, which is what
every stage process loaded before stage-specific weights: it is the baseline.

    python -m bench.stage_memory --model DIR [--roles EPD,E,P,D] [--device cpu] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20


def _status() -> dict[str, int]:
    """Bytes of the memory fields of /proc/self/status (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def measure(model: str, roles: str, device: str, dtype: str | None) -> dict:
    """Load `model` for `roles` in this process and report its memory (call in a fresh process)."""
    import torch
    import transformers  # noqa: F401  (imports are part of the baseline, not of the load)

    from services.models.loader import load_model

    before, start = _status(), time.perf_counter()
    loaded = load_model(model, roles=roles, device=device, dtype=dtype)
    seconds, after = time.perf_counter() - start, _status()
    net, fam = loaded.family.model, loaded.family
    tensors = list({id(t): t for t in [*net.parameters(), *net.buffers()]}.values())
    with torch.inference_mode():
        for t in tensors:  # read every weight once, as serving does: pages of a mapped file come in
            (t.to_dense() if t.is_mkldnn else t).sum()  # a linear weight packed for oneDNN: read it out
    touched = _status()
    kv_token = 0
    if fam.language_model is not None:  # K and V of every layer for one token
        kv_token = 2 * fam.num_layers * fam.num_kv_heads * fam.head_dim * torch.finfo(fam.dtype).bits // 8
    return {
        "roles": roles,
        "parts": sorted(loaded.parts),
        "dtype": str(fam.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in {id(p): p for p in net.parameters()}.values()),
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "load_seconds": round(seconds, 2),
        "rss_before_load": before["VmRSS"],
        "rss_after_load": after["VmRSS"],
        "rss_file_after_load": after["RssFile"],
        "rss_weights_read": touched["VmRSS"],
        "peak_rss": touched["VmHWM"],
        "kv_bytes_per_token": kv_token,
    }


def run_child(args: argparse.Namespace, roles: str) -> dict:
    cmd = [sys.executable, "-m", "bench.stage_memory", "--model", args.model, "--device", args.device]
    cmd += ["--child", roles] + (["--dtype", args.dtype] if args.dtype else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"roles {roles}: the child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["roles"] == "EPD"), None)
    lines = [
        "| roles | loads | parameters | weights MiB | RSS before load | RSS after load (of it file-backed) "
        "| RSS, every weight read | peak RSS | peak vs EPD | load s | KV per token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['peak_rss'] / base['peak_rss']:.2f}x" if base else "-"
        kv = f"{r['kv_bytes_per_token'] / 1024:.0f} KiB" if r["kv_bytes_per_token"] else "-"
        lines.append(
            f"| {r['roles']} | {' + '.join(r['parts'])} | {r['parameters'] / 1e6:.1f}M "
            f"| {r['weight_bytes'] / MiB:.0f} | {r['rss_before_load'] / MiB:.0f} MiB "
            f"| {r['rss_after_load'] / MiB:.0f} MiB ({r['rss_file_after_load'] / MiB:.0f}) "
            f"| {r['rss_weights_read'] / MiB:.0f} MiB | {r['peak_rss'] / MiB:.0f} MiB | {ratio} "
            f"| {r['load_seconds']:.1f} | {kv} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stage_memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--roles", default="EPD,E,P,D", help="comma list of role sets, one process each")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="torch dtype name (default: float32 on cpu, bfloat16 elsewhere)")
    p.add_argument("--output", help="write the rows as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure these roles in this process
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.device, args.dtype)))
        return
    rows = [run_child(args, roles.strip()) for roles in args.roles.split(",") if roles.strip()]
    print(table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
