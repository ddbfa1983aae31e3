"""`up` runs the gateway as a supervised child: the command and environment it is started with (read
back by the real parsers), ports fixed before the first start and kept over restarts, and the
supervisor's restarts. The real thing (kill -9 of the gateway mid-stream) is tests/e2e/test_gateway_restart.py."""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import threading

import pytest

from cli.gateway_process import GatewayProcess, gateway_command, read_health
from cli.key_options import ENV_API_KEY
from cli.main import build_parser
from cli.stack import Stack, StackConfig
from common.stack_keys import StackKeys
from common.topology import parse_topology


@pytest.fixture
def model_dir(tmp_path):
    """Enough of a checkpoint for the torch-free checks of `up` and `gateway`."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return str(tmp_path)


def child_args(stack: Stack):
    """The gateway child's command as its own parser reads it."""
    cmd = stack.gateway_child().command
    assert cmd[:4] == [sys.executable, "-m", "cli.main", "gateway"]
    return build_parser().parse_args(cmd[3:])


def test_the_gateway_child_gets_the_stacks_flags_on_fixed_ports(model_dir):
    config = StackConfig(
        model_dir, parse_topology("E1 P1 D1"), host="0.0.0.0", port=0, control_port=0, max_model_len=2048,
        allowed_local_media_dirs=["/srv/a", "/srv/b"], api_key="sesame", gateway_process=True,
    )  # fmt: skip
    stack = Stack(config)
    args = child_args(stack)
    assert (args.model, args.host, args.max_model_len) == (model_dir, "0.0.0.0", 2048)
    assert args.allowed_local_media_path == ["/srv/a", "/srv/b"]
    assert args.port > 0 and args.control_port > 0, "a restart must find the same ports: never 0"
    assert args.control_host == "127.0.0.1"  # a wildcard HTTP host keeps the control port on loopback
    assert args.no_banner, "`up` prints the banner once every stage has joined, not the child"
    assert not args.insecure and args.keys is None and args.api_key is None
    assert "sesame" not in " ".join(stack.gateway_child().command), "secrets stay off the command line"


def test_given_ports_are_used_and_the_stages_are_pointed_at_the_childs_control_port(model_dir):
    config = StackConfig(
        model_dir, parse_topology("EP1 D1"), port=18123, control_port=18124, gateway_process=True
    )
    stack = Stack(config)
    stack.gateway = stack.gateway_child()
    args = build_parser().parse_args(stack.gateway.command[3:])
    assert (args.port, args.control_port) == (18123, 18124)
    assert stack.port == 18123 and stack.control_address == "tcp://127.0.0.1:18124"
    assert stack.gateway.health_url == "http://127.0.0.1:18123/health"
    serve = stack.serve_command(0, "EP", stack.control_address)
    assert serve[serve.index("--gateway") + 1] == "tcp://127.0.0.1:18124"


def test_the_child_reads_the_stacks_keys_and_api_key_from_its_environment(model_dir, monkeypatch):
    """What the child's own `run` makes of its environment: the stack's keys, the API key, a banner
    left to `up`. An EPD_KEYS or API key of the outer environment does not leak in."""
    monkeypatch.setenv("EPD_KEYS", "/nowhere")
    monkeypatch.setenv(ENV_API_KEY, "outer")
    seen = []

    async def serve_forever(self):
        seen.append(self.config)
        return 0

    monkeypatch.setattr(Stack, "serve_forever", serve_forever)
    for insecure, api_key in ((False, "sesame"), (True, None)):
        config = StackConfig(
            model_dir, parse_topology("E1 P1 D1"), insecure=insecure, api_key=api_key, gateway_process=True
        )
        stack = Stack(config)
        child = stack.gateway_child()
        assert child.env[ENV_API_KEY] == (api_key or "")
        with monkeypatch.context() as m:
            for name, value in child.env.items():
                m.setenv(name, value)
            args = build_parser().parse_args(child.command[3:])
            assert args.run(args) == 0
        got = seen.pop()
        assert got.topology is None and not got.banner and got.api_key == api_key
        assert got.insecure == insecure and got.keys == config.keys
        if not insecure:
            assert StackKeys.from_environment(child.env) == config.keys


def test_up_runs_the_gateway_as_a_child(model_dir, monkeypatch):
    seen = []

    async def serve_forever(self):
        seen.append(self.config)
        return 0

    monkeypatch.setattr(Stack, "serve_forever", serve_forever)
    args = build_parser().parse_args(["up", "--model", model_dir, "--topology", "EPD1"])
    assert args.run(args) == 0
    assert seen[0].gateway_process and seen[0].banner and seen[0].restart
    args = build_parser().parse_args(["up", "--model", model_dir, "--no-restart"])
    assert args.run(args) == 0 and not seen[1].restart
    with pytest.raises(ValueError, match="topology"):
        StackConfig(model_dir, None, gateway_process=True)


class FakeChild:
    def __init__(self, code: int | None = None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.code = -15


def test_a_gateway_that_exits_is_restarted_with_the_same_command():
    spawned: list[tuple[list[str], dict]] = []

    def spawn(cmd, env):
        spawned.append((cmd, env))
        return FakeChild()

    child = GatewayProcess(["gw", "--port", "1"], {"K": "v"}, "", port=1, control_address="", spawn=spawn)
    child.start()
    assert child.restart_if_exited() is None and len(spawned) == 1  # running: left alone
    child.proc.code = -9
    assert child.restart_if_exited() == -9 and child.restarts == 1
    assert spawned[1] == spawned[0] and child.exit_code() is None


@pytest.mark.parametrize(
    ("restart", "stopping", "restarted"), [(True, False, 1), (False, False, 0), (True, True, 0)]
)
def test_the_supervisor_restarts_the_gateway_unless_told_not_to(model_dir, restart, stopping, restarted):
    stack = Stack(StackConfig(model_dir, parse_topology("E1 P1 D1"), restart=restart, gateway_process=True))
    stack.stopping = stopping
    stack.gateway = GatewayProcess([], {}, "", port=1, control_address="", spawn=lambda c, e: FakeChild())
    stack.gateway.start()
    stack.gateway.proc.code = 1

    async def run():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stack._supervise(), 0.8)

    asyncio.run(run())
    assert stack.gateway.restarts == restarted


class Health(http.server.BaseHTTPRequestHandler):
    """A gateway's /health before every stage joined: 503, with the instance counts."""

    counts = {"E": 1, "P": 1, "D": 0}

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        body = json.dumps({"status": "unavailable", "stages": {"instances": self.counts}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_up_reads_instance_counts_from_a_503_health_and_notices_a_dead_child():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        assert read_health(url)["stages"]["instances"] == Health.counts
        child = GatewayProcess([], {}, url, port=1, control_address="", spawn=lambda c, e: FakeChild())
        child.start()

        async def run():
            await child.wait_answering(5)  # a 503 answers
            assert await child.wait_for({"E": 1, "P": 1}, 1)
            assert not await child.wait_for({"E": 1, "D": 1}, 0.5)

        asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    assert read_health(url, timeout=0.5) is None  # nothing answers
    dead = GatewayProcess([], {}, url, port=1, control_address="", spawn=lambda c, e: FakeChild(2))
    dead.start()
    with pytest.raises(RuntimeError, match="exit code 2"):
        asyncio.run(dead.wait_answering(5))


def test_gateway_command_without_optional_flags():
    config = StackConfig("m", parse_topology("EPD1"), gateway_process=True)
    cmd = gateway_command(config, 8000, "127.0.0.1", 5555)
    assert "--max-model-len" not in cmd and "--allowed-local-media-path" not in cmd
