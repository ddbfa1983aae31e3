"""Encoder latency per dtype, side by side in one run: the vision tower alone, on one process.

The encode stage is compute-bound; this times `family.encode` on batches of same-size images for each
dtype asked, the dtypes taking turns batch by batch so that drift of the machine falls on all of them,
and checks that each dtype's features stay close to float32's (the language model's dtype is not
involved: see services/models/encoder_dtype.py).

    python -m bench.encoder [--model DIR] [--dtypes float32,bfloat16] [--image-size 224x224] [--batch 1,4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in small Qwen2-VL)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="encoder dtypes to compare (float32 first)")
    p.add_argument("--image-size", default="224x224", help="WIDTHxHEIGHT of every image (224x224)")
    p.add_argument("--batch", default="1,4", help="images per encoder call, comma-separated (1,4)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per dtype and batch (10)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from services.models.loader import load_model
    from services.models.tiny import ensure_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(ensure_tiny_model(preset="small"))
    dtypes = args.dtypes.split(",")
    families = {}
    for dtype in dtypes:
        families[dtype] = load_model(path, roles="E", encoder_dtype=dtype).family
    w, h = (int(x) for x in args.image_size.lower().split("x"))
    rng = np.random.default_rng(0)
    report: dict = {"image_size": args.image_size, "runs": {}}
    print(f"{'batch':>5} " + " ".join(f"{d + ' ms/image':>20}" for d in dtypes) + "   max |diff| vs float32")
    for batch in (int(b) for b in args.batch.split(",")):
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(batch)]
        items = [families[dtypes[0]].preprocess(img) for img in images]
        times: dict[str, list[float]] = {d: [] for d in dtypes}
        for _ in range(2):  # warm-up
            for d in dtypes:
                families[d].encode(items)
        for _ in range(args.repeats):
            for d in dtypes:
                start = time.perf_counter()
                families[d].encode(items)
                times[d].append((time.perf_counter() - start) / batch)
        base = torch.cat(families[dtypes[0]].encode(items)).float()
        diffs = {d: float((torch.cat(families[d].encode(items)).float() - base).abs().max()) for d in dtypes}
        ms = {d: statistics.median(times[d]) * 1e3 for d in dtypes}
        report["runs"][batch] = {"ms_per_image": ms, "max_abs_diff": diffs}
        print(f"{batch:>5} " + " ".join(f"{ms[d]:>20.1f}" for d in dtypes) + "   "
              + ", ".join(f"{d} {diffs[d]:.3g}" for d in dtypes[1:]))  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
