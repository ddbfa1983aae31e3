"""A stalled decode instance (SIGSTOP for longer than the heartbeat timeout) against a running
`epd-serve up`: the stream it serves fails fast, the stream on the other decode instance finishes,
and when the stalled process wakes it stops working on the request the gateway already failed (the
gateway asks it to register again, and it drops everything it held first): its KV blocks are all
free as soon as it is back, and new requests get transformers' answers."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import ask_concurrently, image_message
from tests.e2e.stack import running_stack
from tests.e2e.test_faults import LONG, decode_blocks, model_name, wait_until

STALL_S = 6.0  # twice the gateway's heartbeat timeout (3 s)


@pytest.fixture(scope="module")
def stack(tiny_qwen2_vl, tmp_path_factory):
    with running_stack(tiny_qwen2_vl, "E1 P1 D2", tmp_path_factory.mktemp("stall")) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=120)


def busy_decodes(stack) -> set[str]:
    free, total = decode_blocks(stack)
    return {k for k, f in free.items() if f < total.get(k, 0)}


def pid_of(stack, instance_id: str) -> int:
    for pid in stack.stage_pids():
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if instance_id.encode() in args and b"--instance-id" in args:
            return pid
    raise AssertionError(f"no process for instance {instance_id}")


class Stream(threading.Thread):
    """One long greedy stream; records its progress, how it ended and when."""

    def __init__(self, client, model, image) -> None:
        super().__init__(daemon=True)
        self.client, self.model, self.image = client, model, image
        self.chunks = 0
        self.result: object = None
        self.ended = 0.0

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=image_message(self.image), max_tokens=LONG, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in stream:
                self.chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.result = chunk.choices[0].finish_reason
        except Exception as exc:  # the expected failure of the stream on the stalled instance
            self.result = exc
        self.ended = time.monotonic()


def test_a_stalled_decode_fails_its_stream_fast_and_drops_it_when_it_wakes(stack, client, images, reference):
    model = model_name(client)
    assert wait_until(lambda: len(decode_blocks(stack)[1]) == 2 and not busy_decodes(stack), 30)
    other_stream = Stream(client, model, images[3])  # the stream that must finish
    other_stream.start()
    assert wait_until(lambda: other_stream.chunks > 20 and busy_decodes(stack), 60), "the first stream runs"
    [other] = busy_decodes(stack)
    victim_stream = Stream(client, model, images[2])  # placed on the other, idle decode instance
    victim_stream.start()
    # the newer stream is the victim: the most of its tokens are still to come when the stall begins,
    # also on a machine busy with other tests (the older one may be near its end by then)

    def victim_decoding() -> bool:
        # on the idle instance; or on either one, if the first stream ended before it was placed. Read
        # on the server's side (blocks held), not by the victim's chunks: on a busy machine its client
        # reads far behind the decode, and by its first chunks the decode may be over
        busy = busy_decodes(stack)
        return victim_stream.is_alive() and bool(busy - {other} or (other_stream.result and busy))

    assert wait_until(victim_decoding, 60), (
        f"victim chunks {victim_stream.chunks}, first stream {other_stream.result!r}, {decode_blocks(stack)}"
    )
    busy = busy_decodes(stack)
    [victim] = busy - {other} or busy
    assert victim_stream.is_alive(), "the victim's stream ended before the stall could begin"

    pid = pid_of(stack, victim)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        victim_stream.join(timeout=STALL_S)
    finally:
        time.sleep(max(0.0, stopped_at + STALL_S - time.monotonic()))
        os.kill(pid, signal.SIGCONT)
    assert isinstance(victim_stream.result, Exception), victim_stream.result
    assert victim_stream.ended - stopped_at < 10, "the stream on the stalled instance must end within 10 s"
    assert "died" in str(victim_stream.result)

    # awake again: it registers anew, and nothing of the failed request is left on it
    assert wait_until(lambda: decode_blocks(stack)[1].get(victim, 0) > 0, 30), "the instance did not rejoin"
    assert wait_until(lambda: victim not in busy_decodes(stack), 2), (
        f"{victim} is still decoding the request the gateway failed: {decode_blocks(stack)}"
    )
    other_stream.join(timeout=180)
    assert other_stream.result == "length", other_stream.result
    assert wait_until(lambda: not busy_decodes(stack), 10), decode_blocks(stack)

    answers = ask_concurrently(stack.base_url, model, images, 16)  # spread over both decodes
    assert answers == [reference.answer(img, 16) for img in images]
    assert pid in stack.stage_pids(), "the stalled process was replaced instead of woken"
