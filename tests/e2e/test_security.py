"""A live `E1 P1 D1` stack with its keys: a process without them (or with another stack's) that
registers as a decode instance, even under a live instance's id, gets no traffic and changes nothing;
a holder of the keys is heard. Clients need the API key when one is set."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import openai
import pytest
import zmq.asyncio

from common.mailbox import Mailbox
from common.protocol import InstanceInfo, Register, RegisterAck
from common.stack_keys import StackKeys
from tests.e2e.conftest import image_message
from tests.e2e.stack import running_stack

MAX_TOKENS = 12
API_KEY = "sk-test-stack"


async def _register_as_decode(
    control: str, model: str, keys: StackKeys | None, ids: list[str], wait: float, first: bool = False
):
    """Send REGISTER for each id (roles D) from a mailbox with `keys`; the messages it receives within
    `wait` seconds (with `first`, until the first one)."""
    ctx = zmq.asyncio.Context()
    box = Mailbox(ctx, "impostor", keys=keys)
    heard = []
    try:
        for instance_id in ids:
            info = InstanceInfo(instance_id=instance_id, roles="D", address=box.address, model=model)
            box.send(control, Register(info=info))
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while (left := end - loop.time()) > 0:
            try:
                heard.append((await asyncio.wait_for(box.recv(), left))[0])
            except asyncio.TimeoutError:
                break
            if first:
                break
    finally:
        box.close()
        ctx.term()
    return heard


def test_only_holders_of_the_stack_keys_join_a_live_stack(tiny_qwen2_vl, tmp_path, reference, images):
    keys_dir = tmp_path / "keys"
    keys = StackKeys.generate()
    keys.write(keys_dir)
    expected = [reference.answer(img, MAX_TOKENS) for img in images[:2]]
    model = tiny_qwen2_vl.resolve().name
    with running_stack(
        tiny_qwen2_vl, "E1 P1 D1", tmp_path, "--keys", str(keys_dir), "--api-key", API_KEY, timeout=180
    ) as stack:
        for impostor in (None, StackKeys.generate()):  # no keys; another stack's keys
            heard = asyncio.run(
                _register_as_decode(stack.control, model, impostor, ["d-impostor", "d2"], 2.0)
            )
            assert heard == [], f"the gateway answered a process without the stack's keys: {heard}"

        client = openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        for img, want in zip(images[:2], expected, strict=True):
            reply = client.chat.completions.create(
                model=model, messages=image_message(img), max_tokens=MAX_TOKENS, temperature=0
            )
            assert reply.choices[0].message.content == want, "an impostor changed what clients receive"
        assert set(stack.gauge("epd_kv_total_blocks")) == {"e0", "p1", "d2"}, "an impostor was listed"

        stranger = openai.OpenAI(base_url=stack.base_url, api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()

        # the same REGISTER from a holder of the keys is heard (the refusal above is the keys' doing)
        heard = asyncio.run(_register_as_decode(stack.control, model, keys, ["d-member"], 10.0, first=True))
        assert any(isinstance(m, RegisterAck) for m in heard), heard


def test_stage_processes_refuse_to_start_without_keys(tiny_qwen2_vl):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")}
    cmd = [sys.executable, "-m", "cli.main", "serve", "--roles", "EPD", "--gateway", "tcp://127.0.0.1:9",
           "--model", str(tiny_qwen2_vl)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no stack keys" in result.stderr, result.stderr[-2000:]
