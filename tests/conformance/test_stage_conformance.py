"""Conformance of a stage process to the wire protocol (docs/protocol.md), against the real gateway.

The gateway is the fixed side; the stage under test is any process that speaks the protocol. By
default it is our own `epd-serve serve --roles D`, so this suite runs in CI on every commit. To check
a stage of your own, give its command line as a template and the roles it hosts:

    EPD_CONFORMANCE_STAGE='my-stage --gateway {gateway} --model {model} --roles {roles} --id {instance_id}' \\
    EPD_CONFORMANCE_ROLES=D  python -m pytest tests/conformance -q -x

Placeholders: {gateway} the gateway's control address (tcp://127.0.0.1:PORT), {model} the checkpoint
folder (a tiny Qwen2-VL built offline), {roles} the letters of EPD_CONFORMANCE_ROLES, {instance_id}
a suggested instance id. The stack's CURVE keys are in the environment as EPD_STACK_PUBLIC_KEY and
EPD_STACK_SECRET_KEY, as our own stages get them. The roles the stage does not host are served by our
own processes (docs/protocol.md, "Writing your own stage"). Logs of every process go to pytest's
temporary folder and are printed with any failure.

The tests run in file order on one stack: the wait for "still registered after twice the heartbeat
timeout" overlaps the tests before it, and the gateway restart comes last.
"""

from __future__ import annotations

import re
import time

import openai
import pytest

from tests.conformance.conftest import HEARTBEAT_TIMEOUT_S, MAX_TOKENS, STAGE_ID, ConformanceStack
from tests.e2e.conftest import image_message
from tests.e2e.stack import wait_until

LONG = 3000  # tokens of a stream that is cut long before it could end
REGISTER_AGAIN_S = 20.0  # a stage rejoins a restarted gateway within this (ours: about 1-3 s)


def client(stack: ConformanceStack, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=timeout)


def model_name(stack: ConformanceStack) -> str:
    return stack.model.resolve().name


def ask(stack: ConformanceStack, image, **kw):
    """A greedy question about `image` through the official client (`kw` as the client takes them)."""
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    return client(stack).chat.completions.create(model=model_name(stack), messages=image_message(image), **kw)


def context(stack: ConformanceStack) -> int:
    """The context the gateway enforces: the smallest `max_model_len` its P and D instances report."""
    return client(stack).models.list().data[0].model_extra["max_model_len"]


def test_stage_registers_with_the_gateway(stack):
    status, body = stack.health()
    assert status == 200, body
    assert body["stages"]["instances"] == stack.counts, f"instances by role, expected {stack.counts}"
    stage = stack.stage_id()
    assert stack.gauge("epd_instance_suspect")[stage] == 0, "the stage is late with its heartbeats"


def test_greedy_chat_with_an_image_equals_transformers(stack, expected):
    for image, want in zip(expected["images"], expected["answers"], strict=True):
        reply = ask(stack, image)
        assert reply.choices[0].message.content == want, "greedy tokens differ from transformers'"


def test_streamed_answer_equals_the_whole_one(stack, expected):
    chunks = ask(stack, expected["images"][0], stream=True)
    text, reasons = "", []
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert text == expected["answers"][0], "the stream's text is not the whole answer's"
    assert len(reasons) == 1 and reasons[0] in ("stop", "length"), reasons


def test_usage_counts_prompt_and_completion_tokens(stack, expected):
    reply = ask(stack, expected["images"][0], extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    usage = reply.usage
    assert usage.prompt_tokens == expected["prompt_tokens"], "prompt_tokens is not the expanded prompt"
    assert usage.completion_tokens == MAX_TOKENS, "ignore_eos must produce exactly max_tokens tokens"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = ask(stack, expected["images"][0], stream=True, stream_options={"include_usage": True},
                 extra_body={"ignore_eos": True})  # fmt: skip
    last = list(chunks)[-1]
    assert last.usage is not None and last.usage.completion_tokens == MAX_TOKENS, last


def test_aborted_stream_frees_every_kv_block(stack, expected):
    stage = stack.stage_id()
    total = stack.gauge("epd_kv_total_blocks")[stage]  # 0: the stage holds no KV (an encoder)
    chunks = client(stack).chat.completions.create(
        model=model_name(stack), messages=image_message(expected["images"][1]),
        max_tokens=min(LONG, context(stack) // 2), temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    received, held = 0, False
    for _ in chunks:
        received += 1
        # a stage that holds KV shows it in a heartbeat (every 0.5 s) while the stream runs
        held = held or (total > 0 and stack.gauge("epd_kv_free_blocks")[stage] < total)
        if received >= 5 and (held or total == 0):
            break
    chunks.close()  # the client goes away mid-stream: the gateway sends Abort to every holder
    assert received >= 5 and (held or total == 0), "the stage never reported KV blocks held while it served"

    def all_free() -> bool:
        return stack.gauge("epd_kv_free_blocks")[stage] == total

    assert wait_until(all_free, 5), f"blocks still held after the abort\n{stack.log(stage)}"
    assert stack.gauge("epd_stage_inflight_requests")[stage] == 0
    assert ask(stack, expected["images"][0]).choices[0].message.content == expected["answers"][0]


def test_unservable_requests_get_a_typed_4xx(stack, expected):
    max_len = context(stack)
    assert max_len > 0, "the stage (or its peers) reported no context length"
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as too_long:
        ask(stack, expected["images"][0], max_tokens=max_len)
    assert "max_tokens" in too_long.value.message and str(max_len) in too_long.value.message
    words = " ".join(["cat"] * (max_len + 64))  # more tokens than the context, within the character limit
    with pytest.raises(openai.BadRequestError) as over:
        client(stack).chat.completions.create(
            model=model_name(stack), messages=[{"role": "user", "content": words}], max_tokens=4
        )
    assert "context" in over.value.message, over.value.message
    assert time.monotonic() - started < 10, "a refusal must be quick, not a timeout"
    assert ask(stack, expected["images"][1]).choices[0].message.content == expected["answers"][1]


def test_stage_stays_registered_past_twice_the_heartbeat_timeout(stack):
    time.sleep(max(0.0, stack.registered_at + 2 * HEARTBEAT_TIMEOUT_S + 0.5 - time.monotonic()))
    status, body = stack.health()
    assert status == 200 and body["stages"]["instances"] == stack.counts, body
    stage = stack.stage_id()
    assert stack.gauge("epd_instance_suspect")[stage] == 0, "the stage is late with its heartbeats"
    # one registration and no drop: a stage whose heartbeats stopped would have been dropped and,
    # answered "register again" on its next heartbeat, registered a second time
    gateway_log = (stack.tmp / "gateway.log").read_text()
    said = re.findall(rf"instance {re.escape(stage)} \(\w*\) (registered|stopped heartbeating)", gateway_log)
    assert said == ["registered"], f"the gateway dropped the stage or it registered again: {said}"


def test_stage_rejoins_a_restarted_gateway(stack, expected):
    stack.kill_gateway()
    stack.start_gateway()  # same HTTP and control ports, same keys: what `epd-serve up` does
    assert stack.wait_registered(REGISTER_AGAIN_S), f"the stage did not register again\n{stack.logs()}"
    assert stack.procs[STAGE_ID].poll() is None, "the stage must rejoin as the same process, not exit"
    for image, want in zip(expected["images"], expected["answers"], strict=True):
        assert ask(stack, image).choices[0].message.content == want
