"""What disaggregation costs one request: TTFT of each topology at concurrency 1, measured paired.

All topologies run at once (idle ones cost nothing); every request of the workload goes to each of
them in turn, in a rotating order, so slow phases of a shared machine hit all of them alike. The
report is the median TTFT per topology and the median of the per-request differences against the
first topology (the monolithic baseline by default).

    python -m bench.overhead [--topologies "EPD1,E1 P1 D1,EP1 D1"] [--num-requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--topologies", default="EPD1,E1 P1 D1,EP1 D1", help="comma list; the first is the baseline"
    )
    p.add_argument("--model", help="checkpoint folder (default: the small tiny-model preset)")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--image-size", type=int, default=224, help="square images of this many pixels")
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--dataplane", default="auto", help="data plane of the split stacks (default auto)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, npu: every process on device 0")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON here")


async def _run(args: argparse.Namespace) -> dict:
    import aiohttp

    from bench.serve.client import send_request
    from bench.serve.dataset import DatasetConfig, build_dataset
    from bench.serve.target import StackOptions, build_tiny_model, topology_server

    names = [t.strip() for t in args.topologies.split(",") if t.strip()]
    options = StackOptions(
        model_dir=args.model or build_tiny_model(), dataplane=args.dataplane, threads=args.threads,
        device=args.device, dtype=args.dtype,
    )  # fmt: skip
    data = DatasetConfig(output_len=args.output_len, image_sizes=((args.image_size, args.image_size),))
    requests = build_dataset(data, args.num_requests + 2, args.seed)
    ttft: dict[str, list[float]] = {n: [] for n in names}
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        servers = [await stack.enter_async_context(topology_server(n, options)) for n in names]
        for i, req in enumerate(requests):
            body = json.dumps(req.payload(None)).encode()
            for k in range(len(servers)):
                server = servers[(i + k) % len(servers)]
                record = await send_request(session, server.chat_url, body, req, timeout=120)
                if not record.success:
                    raise RuntimeError(f"{server.name}: {record.error}")
                if i >= 2:  # the first two requests warm each stack up
                    ttft[server.name].append(record.ttft * 1000)
    base = names[0]
    report = {
        "requests": args.num_requests,
        "image_size": args.image_size,
        "threads": args.threads,
        "device": args.device,
        "dataplane": args.dataplane,
        "topologies": {},
    }
    for n in names:
        diffs = [a - b for a, b in zip(ttft[n], ttft[base], strict=True)]
        report["topologies"][n] = {
            "median_ttft_ms": statistics.median(ttft[n]),
            "median_paired_diff_ms": statistics.median(diffs),
            "ttfts_ms": ttft[n],
        }
    return report


def run(args: argparse.Namespace) -> int:
    report = asyncio.run(_run(args))
    names = list(report["topologies"])
    print(
        f"\nTTFT at concurrency 1, {report['requests']} paired requests, one {report['image_size']}px image each"
    )
    print(f"{'topology':<12} {'median TTFT ms':>15} {'median paired diff vs ' + names[0]:>30}")
    for n, r in report["topologies"].items():
        print(f"{n:<12} {r['median_ttft_ms']:15.1f} {r['median_paired_diff_ms']:+30.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
