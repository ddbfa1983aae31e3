"""The command line of `epd-serve bench`: arguments and the parsers of their list values.

Kept apart from the runner so that `epd-serve --help` builds every parser without importing aiohttp,
numpy or the gateway: this module imports only argparse, math and the engine flags that `epd-serve up`
shares with it (plain argparse too); the media bounds are checked where they are imported, lazily.
"""

from __future__ import annotations

import argparse
import math

from cli.engine_options import add_engine_arguments


def rates(text: str) -> list[float]:
    """'1,4,inf' -> [1.0, 4.0, inf]; every rate positive."""
    out = []
    for part in _parts(text):
        try:
            value = math.inf if part.lower() == "inf" else float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad rate {part!r}: a number of requests/s, or inf") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"bad rate {part!r}: must be positive")
        out.append(value)
    return out


def counts(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; each at least 1."""
    out = []
    for part in _parts(text):
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"bad count {part!r}: a whole number of at least 1")
        out.append(int(part))
    return out


def image_sizes(text: str) -> list[tuple[int, int]]:
    """'224x224,448x336' -> [(224, 224), (448, 336)] as (width, height)."""
    out = []
    for part in _parts(text):
        w, sep, h = part.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
            raise argparse.ArgumentTypeError(f"bad image size {part!r}: write WIDTHxHEIGHT, e.g. 224x224")
        out.append((int(w), int(h)))
    return out


def video_size(text: str) -> tuple[int, int]:
    """'224x224' -> (224, 224): one size, even sides (H.264's yuv420p), at most 3840x2160 pixels."""
    from bench.serve.media import video_problem

    w, sep, h = text.strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"bad video size {text!r}: write one WIDTHxHEIGHT, e.g. 224x224")
    problem = video_problem(int(w), int(h), seconds=1.0)
    if problem:
        raise argparse.ArgumentTypeError(f"bad {problem}")
    return int(w), int(h)


def video_seconds(text: str) -> float:
    from bench.serve.media import MAX_VIDEO_SECONDS, MIN_VIDEO_SECONDS

    return _seconds(text, "video", MIN_VIDEO_SECONDS, MAX_VIDEO_SECONDS)


def audio_seconds(text: str) -> float:
    from bench.serve.media import MAX_AUDIO_SECONDS, MIN_AUDIO_SECONDS

    return _seconds(text, "audio", MIN_AUDIO_SECONDS, MAX_AUDIO_SECONDS)


def _seconds(text: str, kind: str, lo: float, hi: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:  # NaN fails too
        raise argparse.ArgumentTypeError(f"bad {kind} length {text!r}: seconds from {lo:g} to {hi:g}")
    return value


def media_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"bad count {text!r}: a whole number of at least 0")
    return int(text)


def topologies(text: str) -> list[str]:
    """'EPD1,EP1 D1,E1 P1 D1' -> ['EPD1', 'EP1 D1', 'E1 P1 D1'] (commas separate topologies)."""
    from common.topology import parse_topology  # torch-free, small

    out = []
    for part in _parts(text):
        try:
            out.append(str(parse_topology(part)))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return out


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"bad fraction {text!r}: a number from 0 to 1")
    return value


def spread(text: str) -> float:
    value = fraction(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: a relative spread below 1, e.g. 0.25")
    return value


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return parts


def add_arguments(p: argparse.ArgumentParser) -> None:
    # fmt: off
    target = p.add_argument_group("target (one of)")
    where = target.add_mutually_exclusive_group()
    where.add_argument("--base-url", metavar="URL", help="a running server, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--topologies", type=topologies, metavar="LIST",
                       help='topologies to start here one after the other, comma-separated '
                            '(default: "EPD1,E1 P1 D1"); the first is the baseline of the ratios')
    target.add_argument("--model", help="with --topologies: the checkpoint folder (default: the offline tiny "
                        "model of --tiny-preset); with --base-url: the model name (default: /v1/models)")
    target.add_argument("--tiny-preset", default="small", choices=("tiny", "small", "mid"),
                        help="preset of the offline Qwen2-VL built when --model is not given (default small)")
    target.add_argument("--allow-remote", action="store_true", help="allow a --base-url that is not loopback")

    stack = p.add_argument_group("stacks started with --topologies (as `epd-serve up`)")
    stack.add_argument("--dataplane", default="auto", metavar="NAME",
                       help="auto (default), shm, tcp, torchdist")
    stack.add_argument("--device", default="cpu", help="cpu (default), cuda, npu")
    stack.add_argument("--dtype", help="float32, bfloat16, float16 (default: the device's)")
    stack.add_argument("--threads", type=int, metavar="N",
                       help="torch threads per process (default: cores / processes)")
    stack.add_argument("--cpus", action="append", default=[], metavar="LIST",
                       help="CPUs of the n-th process, e.g. --cpus 0 --cpus 1 (repeat per process)")
    stack.add_argument("--pin", action="store_true", help="pin each process to its own cores (round robin)")
    add_engine_arguments(stack, stack=True)
    stack.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                       help="most requests decoding at once per process (64)")
    stack.add_argument("--ready-timeout", type=float, default=180.0, metavar="S",
                       help="seconds to wait for start-up (180)")

    load = p.add_argument_group("load")
    loop = load.add_mutually_exclusive_group()
    loop.add_argument("--rate", type=rates, metavar="LIST",
                      help="open loop: Poisson arrivals at each of these requests/s, inf = all at once "
                           "(default inf); every topology runs at every rate")
    loop.add_argument("--concurrency", type=counts, metavar="LIST",
                      help="closed loop instead: this many clients, each sending back to back")
    load.add_argument("--max-concurrency", type=int, metavar="N",
                      help="open loop: at most N requests in flight")
    load.add_argument("--num-requests", type=int, default=100, metavar="N",
                      help="measured requests per load point (100)")
    load.add_argument("--duration", type=float, metavar="S",
                      help="start no request after S seconds of a load point")
    load.add_argument("--warmup", type=int, default=2, metavar="N",
                      help="requests per target before measuring, not counted (2)")
    load.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="per request (600)")
    load.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed of the workload and of the arrivals (0)")

    data = p.add_argument_group("synthetic workload")
    data.add_argument("--prompt-len", type=int, default=64, metavar="WORDS", help="text per request (64)")
    data.add_argument("--prompt-len-range", type=spread, default=0.0, metavar="R",
                      help="lengths uniform in [len*(1-R), len*(1+R)] (default 0)")
    data.add_argument("--output-len", type=int, default=64, metavar="TOKENS",
                      help="forced with ignore_eos (64)")
    data.add_argument("--output-len-range", type=spread, default=0.0, metavar="R",
                      help="as --prompt-len-range")
    data.add_argument("--images", type=int, default=1, metavar="N", help="images per request (1)")
    data.add_argument("--image-size", type=image_sizes, default=[(224, 224)], metavar="LIST",
                      help="WIDTHxHEIGHT sizes to draw from, e.g. 224x224,448x336 (default 224x224)")
    data.add_argument("--videos", type=media_count, default=0, metavar="N",
                      help="MP4 videos per request, as video_url data URIs (0; Qwen2-VL, Qwen2.5-VL; "
                           "a gateway takes 2 by default)")
    data.add_argument("--video-seconds", type=video_seconds, default=2.0, metavar="S",
                      help="length of each video at 4 fps, 0.5 to 60 (2)")
    data.add_argument("--video-size", type=video_size, default=(224, 224), metavar="WxH",
                      help="frame size of the videos, even sides (default 224x224)")
    data.add_argument("--audios", type=media_count, default=0, metavar="N",
                      help="16 kHz WAV clips per request, as input_audio parts (0; Qwen2-Audio; "
                           "a gateway takes 4 by default)")
    data.add_argument("--audio-seconds", type=audio_seconds, default=5.0, metavar="S",
                      help="length of each audio clip, 0.1 to 30 (5)")
    data.add_argument("--text-only-fraction", type=fraction, default=0.0, metavar="F",
                      help="share of requests without images, videos or audio (0)")
    data.add_argument("--repeat-image-fraction", type=fraction, default=0.0, metavar="F",
                      help="share of images reusing one of an earlier request (embedding cache hits; 0)")
    data.add_argument("--system-prompt-len", type=int, default=0, metavar="WORDS",
                      help="words of a system prompt every request shares, the same for the whole run "
                           "(prefix cache hits; default 0: no system message)")

    out = p.add_argument_group("SLO and output")
    out.add_argument("--slo-ttft-ms", type=float, default=2000.0, metavar="MS",
                     help="TTFT bound of the SLO (2000)")
    out.add_argument("--slo-tpot-ms", type=float, default=50.0, metavar="MS",
                     help="TPOT bound of the SLO (50)")
    out.add_argument("--output", metavar="FILE",
                     help="write every run (summary and per-request values) as JSON")
    out.add_argument("--plot-dir", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--log-level", metavar="LEVEL",
                     help="of the gateway and the stages (default: $EPD_LOG_LEVEL or WARNING)")
    # fmt: on
