"""The compose stacks: each file is valid compose, each GPU override merges into its stacks, and the very
commands a stack names (health checks included), run as local processes with the same environment,
bring up a stack that answers a request (no Docker engine here)."""

from __future__ import annotations

import signal
import subprocess
import time

import openai
import pytest

from cli.main import build_parser
from tests.compose.compose_files import (
    COMPOSE,
    OVERRIDES,
    STACKS,
    assert_valid_stack,
    command_of,
    instance_counts,
    interpolate,
    load,
    local_processes,
    merge,
    stage_services,
    wait_healthy,
)
from tests.e2e.conftest import image_message
from tests.reference import make_image


def test_there_are_the_four_stacks_their_gpu_overrides_and_a_dockerfile():
    assert {f.name for f in COMPOSE.glob("*.yaml")} == set(STACKS) | set(OVERRIDES)
    assert set(STACKS) == {s for stacks in OVERRIDES.values() for s in stacks}, "every stack has an override"
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert "ARG BASE=" in dockerfile and 'ENTRYPOINT ["epd-serve"]' in dockerfile


@pytest.mark.parametrize("name", STACKS)
def test_compose_file_is_valid(name):
    assert_valid_stack(load(COMPOSE / name), name)


@pytest.mark.parametrize("name", STACKS)
def test_stage_settings_come_from_the_environment_and_parse(name):
    parser = build_parser()
    for svc_name, svc in stage_services(load(COMPOSE / name)).items():
        cmd = svc["command"]
        assert cmd[cmd.index("--kv-cache-memory") + 1] == "${EPD_KV_CACHE_MEMORY:-auto}", svc_name
        assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "${EPD_GPU_MEMORY_UTILIZATION:-0.9}"
        for env in ({}, {"EPD_KV_CACHE_MEMORY": "512", "EPD_GPU_MEMORY_UTILIZATION": "0.3"}):
            args = parser.parse_args([interpolate(a, env) for a in cmd])  # the real serve parser
            assert args.kv_cache_memory == (int(env["EPD_KV_CACHE_MEMORY"]) if env else None)
            assert args.gpu_memory_utilization == float(env.get("EPD_GPU_MEMORY_UTILIZATION", 0.9))
            assert args.device == "auto", "a GPU container (the override) runs on cuda, others on cpu"


@pytest.mark.parametrize("name", STACKS)
def test_every_process_holds_the_stack_keys_made_by_a_setup_service(name):
    doc = load(COMPOSE / name)
    make_keys = doc["services"]["make-keys"]
    assert make_keys["profiles"] == ["setup"] and make_keys["command"] == ["keys", "/keys"]
    members = {"gateway": doc["services"]["gateway"], **stage_services(doc)}
    parser = build_parser()
    for svc_name, svc in members.items():
        args = parser.parse_args([interpolate(a, {}) for a in svc["command"]])
        assert args.keys == "/keys" and not args.insecure, f"{svc_name} must run with the stack's keys"
        assert "${EPD_KEYS_DIR:-./keys}:/keys:ro" in svc["volumes"], (
            f"{svc_name} must mount the keys read-only"
        )


@pytest.mark.parametrize(("override", "stack"), [(o, s) for o, stacks in OVERRIDES.items() for s in stacks])
def test_gpu_override_reserves_a_device_for_each_stage(override, stack):
    gpu, base = load(COMPOSE / override), load(COMPOSE / stack)
    assert set(gpu) == {"services"}
    assert set(gpu["services"]) == set(stage_services(base)), f"{override} must cover every stage of {stack}"
    for name, svc in gpu["services"].items():
        assert set(svc) <= {"deploy", "ipc"}, f"{name}: a GPU override only reserves devices (and IPC)"
        assert svc.get("ipc", "host") == "host", f"{name}: cudaipc needs the host's IPC namespace"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert ("count" in device) != ("device_ids" in device), "count or device_ids, not both"
        ids = [interpolate(i, {}) for i in device.get("device_ids", [])]
        assert all(i.isdigit() for i in ids), ids
    merged = merge(base, gpu)
    assert_valid_stack(merged, f"{stack} + {override}")
    for name, svc in stage_services(merged).items():
        assert svc["command"] == base["services"][name]["command"]
        assert svc.get("deploy", {}).get("replicas") == base["services"][name].get("deploy", {}).get(
            "replicas"
        )
    assert "deploy" not in merged["services"]["gateway"], "the gateway needs no GPU"


def run_health(test: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command_of(test), env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("name", "scale", "instances", "settings"),
    [
        ("epd.yaml", {"decode": 2}, {"E": 1, "P": 1, "D": 2}, {}),  # docker compose up --scale decode=2
        ("ep-d.yaml", {}, {"E": 1, "P": 1, "D": 1}, {}),
        ("scaled.yaml", {}, {"E": 2, "P": 1, "D": 2}, {"EPD_KV_CACHE_MEMORY": "32"}),
        ("monolithic.yaml", {}, {"E": 1, "P": 1, "D": 1}, {"EPD_GPU_MEMORY_UTILIZATION": "0.5"}),
    ],
)
def test_compose_commands_bring_up_a_serving_stack(name, scale, instances, settings, tiny_qwen2_vl, tmp_path):
    stack = local_processes(COMPOSE / name, tiny_qwen2_vl, scale, settings)
    env, procs = stack.env, []
    try:
        for i, replica in enumerate(stack.replicas):  # the gateway first, as depends_on starts it
            with open(tmp_path / f"{i}-{replica.service}.log", "w") as log:
                procs.append(subprocess.Popen(replica.command, env=env, stdout=log, stderr=subprocess.STDOUT))
            if replica.service == "gateway":
                assert wait_healthy(stack.port, 30, status=503), "the gateway answers before stages join"
                waiting = run_health(replica.health, env)
                assert waiting.returncode == 1 and "no live instance" in waiting.stderr, waiting.stderr
                stage = run_health(stack.replicas[-1].health, env)
                assert stage.returncode == 1 and "is not registered" in stage.stderr, stage.stderr
        assert wait_healthy(stack.port, 90), (tmp_path / "0-gateway.log").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while instance_counts(stack.port) != instances and time.monotonic() < deadline:
            time.sleep(0.3)
        assert instance_counts(stack.port) == instances, "every replica registers itself"
        for replica in stack.replicas:  # every service's own health check, as Docker would run it
            result = run_health(replica.health, env)
            assert result.returncode == 0, f"{replica.service}: {result.stdout}{result.stderr}"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="none", max_retries=0, timeout=60
        )
        reply = client.chat.completions.create(
            model=tiny_qwen2_vl.name, messages=image_message(make_image(84, 84)), max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
        for client_cmd in stack.clients:  # profile services that wait for a healthy gateway (ask)
            out = subprocess.run(client_cmd, env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and out.stdout.strip(), out.stderr
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
