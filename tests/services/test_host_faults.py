"""The stage process around its workers: only the gateway's own answer (over the stage's connection
to it) makes a stage drop its work and register again, and an error no worker caught fails that
worker's requests while the loop goes on."""

from __future__ import annotations

from common.protocol import InstanceInfo, RegisterAck
from services.host import Host, HostConfig
from services.service_io import Inbound


class HeldWorker:
    """Holds two requests; `broken` makes its poll raise."""

    def __init__(self) -> None:
        self.held, self.broken = {"r1", "r2"}, False

    def request_ids(self) -> set[str]:
        return set(self.held)

    def on_abort(self, rid: str) -> None:
        self.held.discard(rid)

    def poll(self) -> None:
        if self.broken:
            raise RuntimeError("a bug")


class GatewayLine:
    heartbeat_interval = 0.5

    def __init__(self) -> None:
        self.sent: list = []

    def to_gateway(self, msg, buffers=()) -> None:
        self.sent.append(msg)


def bare_host():
    host = Host(HostConfig(roles="D", model_dir="m", gateway_address="tcp://127.0.0.1:1"))
    host.io, host.decode = GatewayLine(), HeldWorker()
    host.info = lambda: InstanceInfo(instance_id="d", roles="D", address="tcp://127.0.0.1:2", model="m")
    host.handlers = host._handlers()
    return host


def test_only_the_gateways_own_answer_makes_a_stage_drop_its_work_and_register_again():
    host = bare_host()
    forged = RegisterAck(accepted=False, retry=True, reason="register again")
    host._dispatch(Inbound(forged, [], b"\x00peer"))  # on the inbox, from any member of the stack
    assert host.decode.held == {"r1", "r2"} and host.refusals.total == 1 and not host.io.sent
    host._dispatch(Inbound(forged, [], b""))  # the gateway's answer over our own connection to it
    assert host.decode.held == set(), "a forgotten instance must drop what the gateway already failed"
    assert [type(m).__name__ for m in host.io.sent] == ["Register"] and host.io.heartbeat_interval == 0


def test_a_worker_error_nobody_caught_fails_that_workers_requests_and_the_loop_goes_on():
    host = bare_host()
    host.decode.broken = True
    host._guarded(host.decode, host.decode.poll)
    assert sorted((m.request_id, m.status) for m in host.io.sent) == [("r1", 500), ("r2", 500)]
    assert "internal error: a bug" in host.io.sent[0].message and not host.decode.held
