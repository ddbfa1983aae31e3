"""The engine and placement flags of `up`, `serve` and `bench`: stated defaults, refusals before anything
starts, and the `serve` command each stage process of `up` gets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli.main import build_parser
from cli.stack import Stack, StackConfig
from common.stack_keys import StackKeys
from common.topology import parse_topology


def epd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=60
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", ["up", "serve", "bench"])
def test_help_states_every_new_default(command):
    out = epd(command, "--help")
    assert out.returncode == 0, out.stderr
    text = one_line(out.stdout)
    assert "--kv-cache-memory MiB" in text and "(default auto:" in text and "256 MiB on cpu" in text
    assert "--gpu-memory-utilization F" in text and "(default 0.9; 0 < F <= 1)" in text
    assert "--attention-backend {auto,sdpa,flex,cpu}" in text and "auto (default:" in text
    assert "cpu (a C kernel reading decode rows' blocks in place" in text
    assert "--linear-backend {auto,onednn,torch}" in text and "auto (default) and onednn pack" in text
    assert (
        "--encoder-thread {auto,on,off}" in text and "auto (default): on for cpu, off on accelerators" in text
    )
    assert "--enforce-eager" in text and "no CUDA graphs" in text and "(default: graphs and compiled" in text
    assert (
        "--swap-space GiB" in text and "host memory" in text and "(default 4, as vLLM; 0: never swap)" in text
    )
    stack = command != "serve"
    assert ("--devices LIST" in text and "(default 0: every process shares one device)" in text) == stack
    assert ("--devices-for ROLES=LIST" in text and "(repeatable; default: --devices)" in text) == stack


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--roles", "E", "--gateway", "tcp://x:1", "--model", "m", "--gpu-memory-utilization", "0"],
         "bad --gpu-memory-utilization '0'"),
        (["serve", "--roles", "E", "--gateway", "tcp://x:1", "--model", "m", "--gpu-memory-utilization", "1.5"],
         "a fraction above 0 and at most 1"),
        (["up", "--kv-cache-memory", "0"], "bad --kv-cache-memory '0': a whole number of MiB, or auto"),
        (["up", "--attention-backend", "flash"], "invalid choice: 'flash'"),
        (["serve", "--roles", "E", "--gateway", "tcp://x:1", "--model", "m", "--linear-backend", "mkl"],
         "invalid choice: 'mkl'"),
        (["up", "--encoder-thread", "maybe"], "invalid choice: 'maybe'"),
        (["up", "--swap-space", "-1"], "bad --swap-space '-1': GiB of host memory, a number >= 0"),
        (["bench", "--swap-space", "nan"], "bad --swap-space 'nan'"),
        (["up", "--device", "cuda", "--devices", "0,x"], "write device indices like 0 or 0,1,2"),
        (["up", "--device", "cuda", "--devices-for", "PD=1"], "no process hosts exactly the roles PD"),
        (["up", "--devices", "1"], "with --device cpu there is nothing to place"),
        (["up", "--device", "cuda:1"], "write --device cuda --devices 1"),
        (["bench", "--topologies", "EPD1,E1 P1 D1", "--device", "cuda", "--devices-for", "PD=1"],
         "--devices-for PD: no process of EPD1, E1 P1 D1 hosts exactly the roles PD"),
        (["bench", "--topologies", "EPD1", "--device", "cuda", "--devices", "0,0"], "device 0 is listed twice"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_before_anything_starts(args, message):
    out = epd(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in one_line(out.stderr), out.stderr


def test_bench_applies_role_lists_to_the_topologies_that_have_them():
    # D=1 names a process of "E1 P1 D1" only; EPD1 runs on the default list: accepted by the checks
    from bench.serve.runner import _check
    from bench.serve.target import applicable

    parser = build_parser()
    args = parser.parse_args(
        ["bench", "--topologies", "EPD1,E1 P1 D1", "--device", "cuda", "--devices-for", "d=1"]
    )
    assert _check(args) is None
    assert applicable(args.devices_for, ["EPD"]) == [] and applicable(args.devices_for, ["D"]) == [("D", [1])]


def serve_args(stack: Stack, index: int):
    """The stage process's command as its own parser reads it."""
    roles = stack.placements[index].roles
    cmd = stack.serve_command(index, roles, "tcp://127.0.0.1:5555")
    assert cmd[:4] == [sys.executable, "-m", "cli.main", "serve"]
    return build_parser().parse_args(cmd[3:])


def test_up_places_each_stage_process_and_passes_the_flags_on():
    config = StackConfig(
        "model", parse_topology("E1 P1 D2"), device="cuda", devices=[0], devices_for=[("D", [1, 2])],
        gpu_memory_utilization=0.9, attention_backend="flex", enforce_eager=True, kv_cache_memory=None,
    )  # fmt: skip
    stack = Stack(config)
    parsed = [serve_args(stack, i) for i in range(4)]
    assert [a.roles for a in parsed] == ["E", "P", "D", "D"]
    assert {a.device for a in parsed} == {"cuda"}  # index 0 inside each child
    assert [a.gpu_memory_utilization for a in parsed] == [0.45, 0.45, 0.9, 0.9]  # E and P share device 0
    assert all(
        a.kv_cache_memory is None and a.attention_backend == "flex" and a.enforce_eager for a in parsed
    )
    visible = [env and env.get("CUDA_VISIBLE_DEVICES") for env in stack.envs]
    assert visible == ["0", "0", "1", "2"]
    assert all("PATH" in env for env in stack.envs), "the child keeps the rest of the environment"


def test_up_on_cpu_keeps_the_environment_and_mib():
    stack = Stack(StackConfig("model", parse_topology("EP1 D1"), kv_cache_memory=16))
    parsed = [serve_args(stack, i) for i in range(2)]
    assert [(a.device, a.kv_cache_memory, a.gpu_memory_utilization) for a in parsed] == [("cpu", 16, 0.9)] * 2
    assert [a.attention_backend for a in parsed] == ["auto", "auto"] and not parsed[0].enforce_eager
    assert [a.linear_backend for a in parsed] == ["auto", "auto"]
    torch_linears = Stack(StackConfig("model", parse_topology("EP1 D1"), linear_backend="torch"))
    assert [serve_args(torch_linears, i).linear_backend for i in range(2)] == ["torch", "torch"]
    assert [a.encoder_thread for a in parsed] == ["auto", "auto"]
    inline = Stack(StackConfig("model", parse_topology("EP1 D1"), encoder_thread="off"))
    assert serve_args(inline, 0).encoder_thread == "off"  # only a process that encodes is told
    assert "--encoder-thread" not in inline.serve_command(1, "D", "tcp://127.0.0.1:5555")
    for env in stack.envs:  # this environment, plus the stack's keys; on cpu no visible-devices variable
        assert env is not None and "CUDA_VISIBLE_DEVICES" not in {**env}.keys() - os.environ.keys()
        assert StackKeys.from_environment(env) == stack.config.keys


def test_swap_space_reaches_every_stage_process_and_its_engine(monkeypatch):
    stack = Stack(StackConfig("model", parse_topology("E1 P1 D1"), swap_space=0.5))
    assert [serve_args(stack, i).swap_space for i in range(3)] == [0.5] * 3
    assert build_parser().parse_args(["up"]).swap_space == 4.0
    assert build_parser().parse_args(["bench", "--swap-space", "0"]).swap_space == 0.0

    import services.host

    seen = []
    monkeypatch.setattr(services.host, "serve", lambda config: seen.append(config) or 0)
    args = build_parser().parse_args(
        [
            "serve",
            "--roles",
            "D",
            "--gateway",
            "tcp://127.0.0.1:1",
            "--model",
            "m",
            "--insecure",
            "--swap-space",
            "0",
        ]
    )
    assert args.run(args) == 0
    assert seen[0].swap_space_bytes == 0
    args = build_parser().parse_args(
        ["serve", "--roles", "D", "--gateway", "tcp://127.0.0.1:1", "--model", "m", "--insecure"]
    )
    args.run(args)
    assert seen[1].swap_space_bytes == 4 * 2**30


def test_prefix_caching_is_on_by_default_and_the_switch_reaches_every_engine(monkeypatch):
    off = Stack(StackConfig("model", parse_topology("E1 P1 D1"), enable_prefix_caching=False))
    assert [serve_args(off, i).enable_prefix_caching for i in range(3)] == [False] * 3
    on = Stack(StackConfig("model", parse_topology("EPD1")))
    assert serve_args(on, 0).enable_prefix_caching is True
    assert build_parser().parse_args(["up"]).enable_prefix_caching is True
    assert build_parser().parse_args(["bench", "--no-enable-prefix-caching"]).enable_prefix_caching is False

    import services.host

    seen = []
    monkeypatch.setattr(services.host, "serve", lambda config: seen.append(config) or 0)
    base = ["serve", "--roles", "P", "--gateway", "tcp://127.0.0.1:1", "--model", "m", "--insecure"]
    for extra in ([], ["--no-enable-prefix-caching"]):
        args = build_parser().parse_args(base + extra)
        assert args.run(args) == 0
    assert [c.enable_prefix_caching for c in seen] == [True, False]


def test_the_encoder_dtype_reaches_only_the_processes_that_encode(monkeypatch):
    stack = Stack(StackConfig("model", parse_topology("E1 P1 D1"), encoder_dtype="bfloat16"))
    assert [serve_args(stack, i).encoder_dtype for i in range(3)] == ["bfloat16", "auto", "auto"]
    assert build_parser().parse_args(["up"]).encoder_dtype == "auto"

    import services.host

    seen = []
    monkeypatch.setattr(services.host, "serve", lambda config: seen.append(config) or 0)
    base = ["serve", "--roles", "EP", "--gateway", "tcp://127.0.0.1:1", "--model", "m", "--insecure"]
    for extra in ([], ["--encoder-dtype", "bfloat16"]):
        args = build_parser().parse_args(base + extra)
        assert args.run(args) == 0
    assert [c.encoder_dtype for c in seen] == [None, "bfloat16"]
