"""Faults and bad input against a running `epd-serve up`: errors are fast and clear, nothing leaks,
and the stack keeps serving."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.stage_histograms import PHASES
from tests.e2e.conftest import image_message
from tests.e2e.stack import running_stack, wait_until
from tests.reference import make_image

LONG = 3800  # tokens: a stream that runs for seconds on the tiny model


@pytest.fixture(scope="module")
def stack(tiny_qwen2_vl, tmp_path_factory):
    with running_stack(tiny_qwen2_vl, "E1 P1 D2", tmp_path_factory.mktemp("faults")) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)


def model_name(client):
    return client.models.list().data[0].id


def decode_blocks(stack) -> tuple[dict, dict]:
    free = {k: v for k, v in stack.gauge("epd_kv_free_blocks").items() if k.startswith("d")}
    total = {k: v for k, v in stack.gauge("epd_kv_total_blocks").items() if k.startswith("d")}
    return free, total


STAGE_PHASES = {
    "E": {"encode_queue", "encode"},
    "P": {"feature_wait", "prefill_queue", "prefill"},
    "D": {"kv_transfer", "decode_queue", "decode_step"},
}


def stage_figures(stack) -> tuple[dict[str, set[str]], dict[str, dict[str, float]], dict[str, dict]]:
    """From /metrics: each role's instances, each instance's phase counts, and the samples of the
    cache and transfer counters by name."""
    roles: dict[str, set[str]] = {}
    phases: dict[str, dict[str, float]] = {}
    counters: dict[str, dict] = {}
    for family in text_string_to_metric_families(stack.metrics()):
        for s in family.samples:
            if s.name == "epd_stage_queue_depth":
                roles.setdefault(s.labels["stage"], set()).add(s.labels["instance"])
            elif s.name == "epd_stage_phase_seconds_count":
                phases.setdefault(s.labels["instance"], {})[s.labels["phase"]] = s.value
            elif s.name.startswith(("epd_encoder_cache_", "epd_transfer_bytes")):
                counters.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return roles, phases, counters


def test_every_stage_times_its_phases_and_counts_cache_hits(stack, client):
    """One new image twice: a miss then a hit at the encoder, and every phase timed at an instance of
    the role that owns it (the stages' heartbeats bring them within a second)."""
    image = make_image(98, 70, seed=1234)  # no other test sends it: its first ENCODE is a miss
    for _ in range(2):
        reply = client.chat.completions.create(
            model=model_name(client), messages=image_message(image), max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("length", "stop")

    def timed() -> bool:
        roles, phases, counters = stage_figures(stack)
        at_role = {
            role: {p for inst in roles.get(role, ()) for p, n in phases.get(inst, {}).items() if n > 0}
            for role in STAGE_PHASES
        }
        hits = counters.get("epd_encoder_cache_hits_total", {})
        misses = counters.get("epd_encoder_cache_misses_total", {})
        return (
            all(at_role[r] >= want for r, want in STAGE_PHASES.items())
            and any(n > 0 and ("modality", "image") in k for k, n in hits.items())
            and any(n > 0 and ("modality", "image") in k for k, n in misses.items())
        )

    assert wait_until(timed, 10), stage_figures(stack)
    roles, phases, counters = stage_figures(stack)
    assert set().union(*STAGE_PHASES.values()) == set(PHASES)
    encoders = roles["E"]
    assert set(counters["epd_encoder_cache_hits_total"]) <= {
        (("instance", e), ("modality", "image")) for e in encoders
    }
    backends = {dict(k)["backend"] for k in counters["epd_transfer_bytes_total"]}
    assert backends and "" not in backends, counters["epd_transfer_bytes_total"]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"model": "no-such-model"}, 404, "does not exist"),
        ({"max_tokens": 0}, 400, "max_tokens must be at least 1"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "base64"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, "not an image"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "not allowed"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "maximum context length"),
        ({"messages": "hello"}, 400, "messages"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_that_names_the_problem(stack, client, images, kwargs, status, message):
    args = {"model": model_name(client), "messages": image_message(images[0]), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == status
    assert message in str(err.value)
    # and the stack still serves
    ok = client.chat.completions.create(
        model=model_name(client), messages=image_message(images[0]), max_tokens=4
    )
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_client_disconnect_frees_decode_blocks(stack, client, images):
    assert wait_until(lambda: decode_blocks(stack)[0] == decode_blocks(stack)[1], 10)
    stream = client.chat.completions.create(
        model=model_name(client), messages=image_message(images[1]), max_tokens=LONG, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 50:
            break
    assert wait_until(
        lambda: any(f < decode_blocks(stack)[1][k] for k, f in decode_blocks(stack)[0].items()), 5
    )
    stream.close()  # the client goes away mid-stream
    assert wait_until(lambda: decode_blocks(stack)[0] == decode_blocks(stack)[1], 10), decode_blocks(stack)


def test_killed_decode_fails_its_requests_fast_others_finish_and_it_rejoins(stack, client, images):
    model = model_name(client)
    results: dict[int, object] = {}
    ended: dict[int, float] = {}
    progress = {0: 0, 1: 0}

    def stream(i):
        try:
            chunks = client.chat.completions.create(
                model=model, messages=image_message(images[2 + i]), max_tokens=LONG, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in chunks:
                progress[i] += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    results[i] = chunk.choices[0].finish_reason
        except Exception as exc:  # the expected failure of the stream on the killed instance
            results[i] = exc
        ended[i] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert wait_until(lambda: min(progress.values()) > 20, 30), "both streams should be running"

    def holding() -> list[str]:  # decode instances serving a stream (from their heartbeats: wait for one)
        free, total = decode_blocks(stack)
        return [k for k in sorted(free) if free[k] < total[k]]

    assert wait_until(holding, 10), decode_blocks(stack)
    victim_id = holding()[0]
    victim = next(
        p
        for p in stack.stage_pids()
        if f"--instance-id\0{victim_id}\0" in Path(f"/proc/{p}/cmdline").read_text()
    )
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(timeout=120)
    errors = [i for i, r in results.items() if isinstance(r, Exception)]
    finished = [i for i, r in results.items() if r == "length"]
    assert len(errors) == 1 and len(finished) == 1, results
    assert ended[errors[0]] - killed_at < 10, "the stream on the dead instance must end within 10 s"
    # the gateway names the instance: "died" when its heartbeats stop first, "was restarted" when the
    # supervisor's new process registers under the same id before that (both end the stream at once)
    message = str(results[errors[0]])
    assert victim_id in message and ("died" in message or "was restarted" in message), message
    # the killed instance is started again and rejoins; new requests are served
    assert wait_until(lambda: len(decode_blocks(stack)[1]) == 2, 60)
    reply = client.chat.completions.create(model=model, messages=image_message(images[0]), max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")
