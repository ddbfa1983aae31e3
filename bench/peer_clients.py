"""The two load generators of the peer sweep, run on one workload against one server, with one result
shape: `vllm bench serve` (vLLM's own client, its `random-mm` dataset: random text tokens and one
random image per request) and `epd-serve bench` (ours; it can also repeat earlier images and share a
system prompt, which vLLM's random datasets cannot).

Both force the output length (`ignore_eos`), decode greedily, stream, and count TTFT from sending to
the first text and TPOT as (end-to-end - TTFT) / (output tokens - 1), each request's, then averaged.
Goodput is the requests that met both SLOs per second of the run. Both warm up alike: a separate pass
of `warmups` requests from another seed at the point's rate, then `measured()` is called (the sweep
reads the server's own counters there), then the measured pass.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.peer_systems import Peer

WARMUP_SEED = 50_000  # added to a point's seed for its warm-up pass: requests no measured one repeats


@dataclass(frozen=True)
class Workload:
    input_tokens: int = 64  # vLLM client: random text tokens
    prompt_words: int = 27  # our client: words of the prompt (about 64 tokens with the tiny tokenizer)
    output_tokens: int = 64
    image: int = 224  # one image of image x image pixels per request
    repeat_image_fraction: float = 0.0  # our client only
    system_prompt_words: int = 0  # our client only
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 50.0


@dataclass
class PointResult:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    mean_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    p99_tpot_ms: float
    goodput: float
    num_prompts: int

    @classmethod
    def of(cls, d: dict, goodput: float, num_prompts: int) -> PointResult:
        """From a result JSON: vLLM's and ours name these fields alike (goodput aside)."""
        return cls(
            completed=d["completed"], failed=d["failed"], duration_s=d["duration"],
            request_throughput=d["request_throughput"], mean_ttft_ms=d["mean_ttft_ms"],
            p99_ttft_ms=d["p99_ttft_ms"], mean_tpot_ms=d["mean_tpot_ms"], p99_tpot_ms=d["p99_tpot_ms"],
            goodput=goodput, num_prompts=num_prompts,
        )  # fmt: skip

    @property
    def attainment(self) -> float:
        """Share of the requests sent that met the SLO."""
        return self.goodput * self.duration_s / self.num_prompts if self.num_prompts else 0.0


def run_vllm_client(
    peer: Peer, model: str, model_id: str, base: str, rate: float, num_prompts: int, seed: int,
    warmups: int, work: Workload, out: Path, timeout_s: float, measured: Callable[[], None] = lambda: None,
) -> PointResult:  # fmt: skip
    def bench(n: int, s: int, extra: list[str]) -> None:
        cmd = [*peer.cli, "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
               "--base-url", base, "--model", model_id, "--tokenizer", model, "--dataset-name", "random-mm",
               "--random-input-len", str(work.input_tokens), "--random-output-len", str(work.output_tokens),
               "--random-mm-base-items-per-request", "1",
               "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
               "--random-mm-bucket-config", f"{{({work.image}, {work.image}, 1): 1.0}}",
               "--ignore-eos", "--temperature", "0", "--disable-tqdm", "--num-prompts", str(n),
               "--request-rate", str(rate), "--seed", str(s), *extra]  # fmt: skip
        with open(out.with_suffix(".log"), "ab") as log:
            subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=peer.env(), timeout=timeout_s, check=True
            )

    if warmups:  # other random images and prompts: no measured request hits a cache
        bench(warmups, seed + WARMUP_SEED, [])
    measured()
    bench(num_prompts, seed, ["--goodput", f"ttft:{work.slo_ttft_ms:g}", f"tpot:{work.slo_tpot_ms:g}",
                              "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name])  # fmt: skip
    d = json.loads(out.read_text())
    return PointResult.of(d, d.get("request_goodput") or 0.0, num_prompts)


def run_epd_client(
    model_id: str, base: str, rate: float, num_prompts: int, seed: int, warmups: int, work: Workload,
    out: Path, timeout_s: float, measured: Callable[[], None] = lambda: None,
) -> PointResult:  # fmt: skip
    def bench(n: int, s: int, dest: Path) -> None:
        cmd = [".venv/bin/epd-serve", "bench", "--base-url", base + "/v1", "--model", model_id, "--rate", f"{rate:g}",
               "--num-requests", str(n), "--warmup", "0", "--seed", str(s), "--images", "1",
               "--image-size", f"{work.image}x{work.image}", "--prompt-len", str(work.prompt_words),
               "--output-len", str(work.output_tokens), "--repeat-image-fraction", f"{work.repeat_image_fraction:g}",
               "--system-prompt-len", str(work.system_prompt_words), "--slo-ttft-ms", f"{work.slo_ttft_ms:g}",
               "--slo-tpot-ms", f"{work.slo_tpot_ms:g}", "--no-progress", "--output", str(dest)]  # fmt: skip
        with open(out.with_suffix(".log"), "ab") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=True)

    if warmups:  # as vLLM's client: another seed's requests (images, system prompt) at the point's rate
        bench(warmups, seed + WARMUP_SEED, out.with_suffix(".warmup.json"))
    measured()
    bench(num_prompts, seed, out)
    r = json.loads(out.read_text())["runs"][0]
    return PointResult.of(r, r["goodput"], num_prompts)
