"""How much of the KV hand-off hides behind prefill compute, as the reference paper reports it.

For each prompt length, one prefill-only step of a single prompt, three ways:
  - compute only (no hand-off);
  - the hand-off alone: every layer's blocks written after the step into a decode pool in another
    plane of this machine (shared memory; on a GPU with cudaipc a device pool), timed until the last
    byte is in;
  - layer by layer: each layer's blocks leave as soon as the layer is computed, while the next layers
    compute, timed from the start of the step until the last byte is in.
Hidden share = (compute + hand-off - layer by layer) / hand-off: 1 when the transfer costs nothing
beyond the compute, 0 when it adds its whole time. Medians of `--repeats` runs.

    python -m bench.kv_overlap [--model DIR] [--lengths 256,1024,4096] [--dataplane shm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid


class _IO:
    """What the KV sender needs of a stage's I/O: nothing leaves this process here."""

    def send(self, *args, **kwargs) -> None:
        pass

    def wake(self, *args) -> None:
        pass


def _one(engine, sender, consumer, pool_blocks: int, length: int, mode: str) -> float:
    from common.protocol import KvDest
    from common.sampling_params import SamplingParams

    rid = uuid.uuid4().hex
    vocab = int(engine.family.config.text_config.vocab_size)
    engine.add_request(
        rid, [(7 * i) % (vocab - 200) + 100 for i in range(length)], SamplingParams(max_tokens=2)
    )
    blocks = list(range(engine.block_manager.blocks_for(length)))
    dest = KvDest(request_id=rid, block_ids=blocks, transfer_id=rid, pool_blocks=pool_blocks,
                  block_bytes=engine.kv.block_bytes, dataplane=consumer.descriptor())  # fmt: skip
    if mode != "compute":
        sender.stream_layers = mode == "layered"
        sender.start(rid, "decode", 60.0)
        sender.on_kv_dest(dest)
    start = time.perf_counter()
    engine.step(layer_hook=sender.on_layer if mode != "compute" else None)
    if mode == "after":
        start = time.perf_counter()  # the hand-off alone
        sender.flush()
    if mode != "compute":
        for handle in sender.handoffs[rid].handles:
            handle.wait(60)
        sender.drop(rid)
    elapsed = time.perf_counter() - start
    engine.abort(rid)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the small tiny-model preset)")
    p.add_argument("--lengths", default="256,1024,4096", help="prompt lengths (default 256,1024,4096)")
    p.add_argument("--dataplane", default="shm", help="data plane of the hand-off (default shm)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, npu")
    p.add_argument("--repeats", type=int, default=5, help="runs per length and mode; medians (default 5)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from common.dataplane import create_dataplane
    from services.engine.config import EngineConfig
    from services.engine.engine import Engine
    from services.engine.memory import size_kv_pool
    from services.models.loader import load_model
    from services.models.tiny import ensure_tiny_model
    from services.prefill.kv_sender import KVSender

    lengths = [int(x) for x in args.lengths.split(",")]
    model = load_model(args.model or ensure_tiny_model("qwen2_vl", "small"), device=args.device, roles="P")
    top = max(lengths)
    config = EngineConfig(
        max_model_len=top + 16, max_num_batched_tokens=top, num_blocks=-(-(top + 16) // 16) + 1
    )
    engine = Engine(model.family, model.eos_token_ids, config, prefill_only=True)
    producer, consumer = create_dataplane(args.dataplane), create_dataplane(args.dataplane)
    pool = size_kv_pool(model.family, config)
    device = torch.device(args.device)
    if device.type != "cpu" and device.type in consumer.devices:  # cudaipc: a device pool, as decode's
        consumer.register("kv", torch.zeros(pool.nbytes, dtype=torch.uint8, device=device))
    else:
        consumer.allocate("kv", pool.nbytes)
    sender = KVSender(engine, _IO(), producer)
    report = {
        "dataplane": args.dataplane,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "runs": [],
    }
    print(f"{args.dataplane}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print(
        f"{'prompt':>7} {'KV MiB':>7} {'compute ms':>11} {'hand-off ms':>12} {'layered ms':>11} {'hidden':>7}"
    )
    try:
        for length in lengths:
            for _ in range(2):  # warm-up: first-touch pages, kernel set-up
                for mode in ("compute", "after", "layered"):
                    _one(engine, sender, consumer, pool.num_blocks, length, mode)
            t = {m: statistics.median(_one(engine, sender, consumer, pool.num_blocks, length, m)
                                      for _ in range(args.repeats)) for m in ("compute", "after", "layered")}  # fmt: skip
            hidden = (t["compute"] + t["after"] - t["layered"]) / t["after"]
            kv_mib = length * engine.layout.token_bytes() / 2**20
            report["runs"].append({"prompt_tokens": length, "kv_mib": kv_mib, "compute_s": t["compute"],
                                   "handoff_s": t["after"], "layered_s": t["layered"], "hidden_share": hidden})  # fmt: skip
            print(f"{length:>7} {kv_mib:7.1f} {t['compute'] * 1e3:11.1f} {t['after'] * 1e3:12.1f} "
                  f"{t['layered'] * 1e3:11.1f} {hidden:7.0%}")  # fmt: skip
    finally:
        producer.close()
        consumer.close()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
