"""Who may join a stack: one CurveZMQ key pair that every process of the stack holds.

Every ZeroMQ socket between the gateway and the stages, and between stages (their inboxes and the
data planes' channels), runs CURVE: traffic is encrypted, and a server socket's ZAP handler admits
only clients that prove they hold the stack's secret key (the client's public key must be the stack's
public key). A process without the key never completes a handshake, so it is never connected: it
cannot register as a stage, read a prompt or image, or inject an answer. The key is made once per
stack (`epd-serve keys DIR`, or `up` for its own stack) and handed to each process as a file
(`--keys DIR`) or through the environment (EPD_KEYS, or EPD_STACK_PUBLIC_KEY / EPD_STACK_SECRET_KEY
for container secrets). Threat model and what is not covered: docs/security.md.

One key pair, not one per process: membership is what is checked, and an instance id is bound to the
connection that registered it (gateway.registry), so a member cannot take over another's id either.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

KEY_FILE = "stack.key_secret"  # the zmq certificate with both keys; `stack.key` holds the public one
ENV_DIR = "EPD_KEYS"
ENV_PUBLIC = "EPD_STACK_PUBLIC_KEY"
ENV_SECRET = "EPD_STACK_SECRET_KEY"
HANDSHAKE_S = 5.0  # a peer that has not finished the CURVE handshake by then is dropped


class KeysError(ValueError):
    """No usable stack keys where they were looked for; the message says where and what to do."""


@dataclass(frozen=True)
class StackKeys:
    public: bytes  # Z85 text, 40 characters
    secret: bytes

    def __post_init__(self) -> None:
        for name, key in (("public", self.public), ("secret", self.secret)):
            if len(key) != 40:
                raise KeysError(f"a stack {name} key is 40 Z85 characters, got {len(key)}")
        if zmq.curve_public(self.secret) != self.public:
            raise KeysError("the stack's public key does not belong to its secret key")

    def __repr__(self) -> str:  # never print the secret
        return f"StackKeys(public={self.public.decode()!r})"

    @classmethod
    def generate(cls) -> StackKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StackKeys:
        """From a folder made by `epd-serve keys` (or the `stack.key_secret` file in it)."""
        file = Path(path)
        if file.is_dir():
            file = file / KEY_FILE
        try:
            public, secret = zmq.auth.load_certificate(file)
        except (OSError, ValueError) as exc:
            raise KeysError(f"cannot read stack keys from {file}: {exc}") from None
        if secret is None:
            raise KeysError(f"{file} holds only a public key; the stack's processes need {KEY_FILE}")
        return cls(public, secret)

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> StackKeys | None:
        """EPD_KEYS (a folder or file), else the two keys themselves; None when neither is set."""
        env = os.environ if env is None else env
        if env.get(ENV_DIR):
            return cls.load(env[ENV_DIR])
        public, secret = env.get(ENV_PUBLIC, ""), env.get(ENV_SECRET, "")
        if public or secret:
            if not (public and secret):
                raise KeysError(f"set both {ENV_PUBLIC} and {ENV_SECRET}, or neither")
            return cls(public.strip().encode(), secret.strip().encode())
        return None

    def write(self, directory: str | os.PathLike) -> Path:
        """Save as zmq certificates: `stack.key_secret` (owner-only) and `stack.key` (public)."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        secret_file = folder / KEY_FILE
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_certificate(self.public, self.secret))
        (folder / "stack.key").write_text(_certificate(self.public, None))
        return secret_file

    # -- sockets --------------------------------------------------------------------------------------

    def serve(self, sock: zmq.Socket) -> None:
        """Make a socket that binds a CURVE server (before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))

    def connect(self, sock: zmq.Socket) -> None:
        """Make a socket that connects a CURVE client of a stack server (before connect)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.public
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))

    def admits(self, domain: str, client_key: bytes) -> bool:
        """The ZAP check: only holders of the stack's secret key (their public key is the stack's)."""
        return client_key == self.public

    # the name pyzmq's authenticators call
    callback = admits


class _Guard:
    """The one ZAP handler of a context (ZeroMQ allows one), shared by the sockets that need it."""

    def __init__(self, key: int, auth: Any, keys: StackKeys) -> None:
        self.key, self.auth, self.keys, self.users = key, auth, keys, 0

    def release(self) -> None:
        with _guards_lock:
            self.users -= 1
            if self.users:
                return
            _guards.pop(self.key, None)
        self.auth.stop()


_guards: dict[int, _Guard] = {}  # the context's libzmq address -> its handler
_guards_lock = threading.Lock()


def guard(context: zmq.Context, keys: StackKeys | None) -> _Guard | None:
    """Make sure `context` has the ZAP handler that checks every CURVE client of its server sockets;
    returns a handle to `release()` before the context is terminated (None when running without
    keys). Several sockets of one context share one handler, which must check one stack's keys.

    The handler runs on its own thread over a plain view of the context, for asyncio contexts too:
    pyzmq's asyncio authenticator stopped answering handshakes on a server bound again after a
    restart in the same process (a gateway restarted in-process, tests), the thread one does not.
    """
    if keys is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    key = context.underlying
    with _guards_lock:
        held = _guards.get(key)
        if held is None:
            auth = ThreadAuthenticator(zmq.Context.shadow(key))
            auth.start()
            auth.configure_curve_callback(domain="*", credentials_provider=keys)
            held = _guards[key] = _Guard(key, auth, keys)
        elif held.keys != keys:
            raise KeysError("one ZeroMQ context cannot serve two stacks' keys")
        held.users += 1
        return held


def _certificate(public: bytes, secret: bytes | None) -> str:
    lines = ["#   EPD-Serve stack key: every process of the stack holds it", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode()}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"
