"""Instances change roles and are replaced at run time under load, and no request fails.

One stack of real processes (the gateway and one `serve` per instance, with the stack's keys), built
as an operator would by hand, so instances can be added and drained: E1 P2 D2 to begin with. While
20 streams run all the time (each client starts its next request when one ends):
  1. a prefill instance becomes a decode instance and a decode instance becomes a prefill instance
     (`/admin/instances/{id}/roles`); the decode instance hands its requests, KV included, to the
     other decode instances before it rebuilds;
  2. one prefill instance is drained, which leaves E1 P1 D2, and then every decode instance is
     replaced, one at a time: a new one starts and registers, the old one is drained
     (`/admin/instances/{id}/drain`), hands its requests off and exits with status 0.
Every answer equals transformers' greedy one, and every instance ends with all its KV blocks free.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from common.stack_keys import ENV_DIR, ENV_PUBLIC, ENV_SECRET, StackKeys
from tests.e2e.conftest import image_message
from tests.e2e.stack import free_port

MAX_TOKENS = 64
CLIENTS = 20


class HandBuiltStack:
    def __init__(self, model: Path, tmp: Path) -> None:
        self.model, self.tmp = model, tmp
        self.port, self.control_port = free_port(), free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        keys = StackKeys.generate()
        self.env = {**os.environ, ENV_PUBLIC: keys.public.decode(), ENV_SECRET: keys.secret.decode(),
                    ENV_DIR: "", "EPD_INSECURE": "", "EPD_API_KEY": ""}  # fmt: skip
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start_gateway(self) -> None:
        self.spawn("gateway", "gateway", "--model", str(self.model), "--port", str(self.port),
                   "--control-port", str(self.control_port), "--no-banner")  # fmt: skip
        self.wait_until_serving()

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """The gateway binds its control port before its HTTP site, so any HTTP answer means both are
        taken: a stage started earlier could take the control port's number for its own inbox."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.root + "/health", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the gateway does not answer after {timeout} s\n{self.logs()}")

    def start_stage(self, instance_id: str, roles: str) -> None:
        self.spawn(instance_id, "serve", "--roles", roles, "--gateway", f"tcp://127.0.0.1:{self.control_port}",
                   "--model", str(self.model), "--instance-id", instance_id, "--threads", "1",
                   "--kv-cache-memory", "32")  # fmt: skip

    def admin(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.root + path, data=data, method="GET" if body is None else "POST"
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def instances(self) -> dict[str, dict]:
        try:
            return {r["id"]: r for r in self.admin("/admin/instances")["instances"]}
        except OSError:
            return {}

    def wait(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.instances()):
                return
            time.sleep(0.1)
        raise AssertionError(f"{what}: not after {timeout} s\n{self.instances()}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{(self.tmp / f'{n}.log').read_text()[-2500:]}" for n in self.procs)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def stack(tiny_qwen2_vl, tmp_path_factory):
    s = HandBuiltStack(tiny_qwen2_vl, tmp_path_factory.mktemp("orchestration"))
    s.start_gateway()
    for instance_id, roles in (("e0", "E"), ("p0", "P"), ("p1", "P"), ("d0", "D"), ("d1", "D")):
        s.start_stage(instance_id, roles)
    try:
        s.wait(lambda i: len(i) == 5, "five instances registered", timeout=120)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def expected(reference, images):
    return [reference.answer(img, MAX_TOKENS) for img in images[:4]]


async def _under_load(stack: HandBuiltStack, images, operate) -> list[tuple[int, str]]:
    """Keep CLIENTS streams running while `operate()` (blocking, run in a thread) does its work."""
    client = openai.AsyncOpenAI(base_url=f"{stack.root}/v1", api_key="none", max_retries=0, timeout=120)
    done, answers = asyncio.Event(), []

    async def one_client(k: int) -> None:
        n = k
        while not done.is_set():
            which = n % 4
            stream = await client.chat.completions.create(
                model=stack.model.name, messages=image_message(images[which]), max_tokens=MAX_TOKENS,
                temperature=0, stream=True,
            )  # fmt: skip
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            answers.append((which, text))
            n += CLIENTS

    async def operator() -> None:
        await asyncio.sleep(0.5)  # every client is streaming
        try:
            await asyncio.to_thread(operate)
        finally:
            done.set()

    try:
        await asyncio.gather(operator(), *(one_client(k) for k in range(CLIENTS)))
    except Exception as e:
        raise AssertionError(f"{e!r}\n{stack.instances()}\n{stack.logs()}") from e
    finally:
        await client.close()
    return answers


def _all_free(instances: dict[str, dict]) -> bool:
    return all(r["load"]["free_kv_blocks"] == r["load"]["total_kv_blocks"] for r in instances.values())


def test_a_prefill_becomes_decode_and_a_decode_becomes_prefill_under_load(stack, images, expected):
    before = stack.admin("/admin/instances")

    def operate() -> None:
        stack.admin("/admin/instances/p1/roles", {"roles": "D", "reason": "test"})
        # p1 must be a decode instance before d1 leaves decoding, or d1 has nowhere to hand off to
        stack.wait(lambda i: i["p1"]["roles"] == "D" and i["p1"]["pending_roles"] is None, "p1 decoding")
        stack.wait(lambda i: i["d1"]["inflight"] > 0, "d1 holding requests")
        stack.admin("/admin/instances/d1/roles", {"roles": "P", "reason": "test"})
        stack.wait(lambda i: i["p1"]["roles"] == "D" and i["d1"]["roles"] == "P"
                   and i["p1"]["pending_roles"] is None and i["d1"]["pending_roles"] is None, "roles changed")  # fmt: skip

    answers = asyncio.run(_under_load(stack, images, operate))
    assert len(answers) >= CLIENTS
    assert [text for which, text in answers] == [expected[which] for which, _ in answers]
    after = stack.admin("/admin/instances")
    # d1 moved requests that were decoding there (seen failing in CI, cause not yet known: the logs tell)
    assert after["handoffs"] > before["handoffs"], f"{after}\n{stack.logs()}"
    stack.wait(lambda i: _all_free(i) and all(r["inflight"] == 0 for r in i.values()), "all KV free")
    assert all(p.poll() is None for p in stack.procs.values())  # nobody restarted or died


def test_every_decode_instance_is_replaced_one_at_a_time_under_load(stack, images, expected):
    stack.admin("/admin/instances/d1/drain", {})  # d1 is a prefill instance now: E1 P1 D2 is left
    stack.wait(lambda i: "d1" not in i, "d1 drained")
    assert stack.procs["d1"].wait(timeout=10) == 0
    before = stack.admin("/admin/instances")

    def operate() -> None:
        for old, new in (("d0", "d2"), ("p1", "d3")):  # p1 decodes since the test above
            stack.start_stage(new, "D")
            stack.wait(lambda i, new=new: new in i, f"{new} registered")
            stack.wait(lambda i, old=old: i[old]["inflight"] > 0, f"{old} holding requests")
            stack.admin(f"/admin/instances/{old}/drain", {})
            stack.wait(lambda i, old=old: old not in i, f"{old} drained")
            assert stack.procs[old].wait(timeout=10) == 0

    answers = asyncio.run(_under_load(stack, images, operate))
    assert len(answers) >= CLIENTS
    assert [text for which, text in answers] == [expected[which] for which, _ in answers]
    after = stack.admin("/admin/instances")
    assert sorted(after["instances"], key=lambda r: r["id"]) and after["handoffs"] > before["handoffs"]
    assert {r["id"]: r["roles"] for r in after["instances"]} == {"e0": "E", "p0": "P", "d2": "D", "d3": "D"}
    stack.wait(lambda i: _all_free(i) and all(r["inflight"] == 0 for r in i.values()), "all KV free")
