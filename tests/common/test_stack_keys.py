"""Stack keys: members talk over CURVE; a process without the key (or with another stack's) is never
connected, in either direction, and key files and the environment load what was written."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
import zmq.asyncio

from common.mailbox import Mailbox
from common.protocol import Heartbeat, Load
from common.stack_keys import KeysError, StackKeys

QUIET_S = 1.5  # long enough for a loopback CURVE handshake many times over


async def _next(box: Mailbox, timeout: float):
    try:
        return await asyncio.wait_for(box.recv(), timeout)
    except asyncio.TimeoutError:
        return None


def _exchange(sender_keys: StackKeys | None, receiver_keys: StackKeys | None, timeout: float = QUIET_S):
    """Send one message from a mailbox with `sender_keys` to one with `receiver_keys`; what arrived."""

    async def run():
        contexts = zmq.asyncio.Context(), zmq.asyncio.Context()  # one per process, as in a stack
        receiver = Mailbox(contexts[0], "receiver", keys=receiver_keys)
        sender = Mailbox(contexts[1], "sender", keys=sender_keys)
        try:
            sender.send(receiver.address, Heartbeat(load=Load(waiting=7), address=sender.address))
            return await _next(receiver, timeout)
        finally:
            sender.close()
            receiver.close()
            for ctx in contexts:
                ctx.term()

    return asyncio.run(run())


def test_members_of_one_stack_reach_each_other():
    keys = StackKeys.generate()
    got = _exchange(keys, keys, timeout=10)
    assert got is not None, "a message between two holders of the stack key did not arrive"
    msg, _ = got
    assert isinstance(msg, Heartbeat) and msg.load.waiting == 7


@pytest.mark.parametrize("sender", ["no keys", "another stack"])
def test_a_process_without_the_stack_key_is_never_heard(sender):
    keys = StackKeys.generate()
    impostor = None if sender == "no keys" else StackKeys.generate()
    assert _exchange(impostor, keys) is None, f"a sender with {sender} got a message into a member's inbox"


@pytest.mark.parametrize("receiver", ["no keys", "another stack"])
def test_a_member_never_delivers_to_a_process_without_the_stack_key(receiver):
    keys = StackKeys.generate()
    impostor = None if receiver == "no keys" else StackKeys.generate()
    assert _exchange(keys, impostor) is None, f"a receiver with {receiver} read a member's message"


def test_keys_round_trip_through_files_and_the_environment(tmp_path):
    keys = StackKeys.generate()
    secret_file = keys.write(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600, "the secret key must be owner-only"
    assert StackKeys.load(tmp_path / "keys") == keys
    assert StackKeys.load(secret_file) == keys
    assert StackKeys.from_environment({"EPD_KEYS": str(tmp_path / "keys")}) == keys
    env = {"EPD_STACK_PUBLIC_KEY": keys.public.decode(), "EPD_STACK_SECRET_KEY": keys.secret.decode()}
    assert StackKeys.from_environment(env) == keys
    assert StackKeys.from_environment({}) is None
    assert keys.secret.decode() not in repr(keys)


def test_one_context_serves_one_stack():
    async def run():
        ctx = zmq.asyncio.Context()
        keys = StackKeys.generate()
        first, second = Mailbox(ctx, "a", keys=keys), Mailbox(ctx, "b", keys=keys)  # share one handler
        try:
            with pytest.raises(KeysError, match="two stacks"):
                Mailbox(ctx, "c", keys=StackKeys.generate())
        finally:
            first.close()
            second.close()
            ctx.term()

    asyncio.run(run())


def test_bad_keys_are_refused_with_a_reason(tmp_path):
    with pytest.raises(KeysError, match="only a public key"):
        StackKeys.load(StackKeys.generate().write(tmp_path).with_name("stack.key"))
    with pytest.raises(KeysError, match="cannot read"):
        StackKeys.load(tmp_path / "missing")
    with pytest.raises(KeysError, match="both"):
        StackKeys.from_environment({"EPD_STACK_PUBLIC_KEY": StackKeys.generate().public.decode()})
    a, b = StackKeys.generate(), StackKeys.generate()
    with pytest.raises(KeysError, match="does not belong"):
        StackKeys(a.public, b.secret)
