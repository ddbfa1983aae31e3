"""The stage process around its workers: only the gateway's own answer (over the stage's connection
to it) makes a stage drop its work and register again, a burst of such answers makes it do so once,
and an error no worker caught fails that worker's requests while the loop goes on."""

from __future__ import annotations

from types import SimpleNamespace

import services.host
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


def test_retries_queued_before_a_rejoin_abort_and_register_once_until_the_wait_runs_out(monkeypatch):
    """After a gateway restart every heartbeat queued while it was down is answered with a retry; the
    stage must abort and register once, yet still retry when its Register got no answer in time."""
    clock = [100.0]
    monkeypatch.setattr(services.host, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    host = bare_host()
    retry = RegisterAck(accepted=False, retry=True, reason="register again")
    aborts: list = []
    real_abort_all = host._abort_all
    host._abort_all = lambda workers, error: aborts.append(error) or real_abort_all(workers, error)

    for _ in range(3):  # three queued heartbeats, three answers
        host._dispatch(Inbound(retry, [], b""))
    assert len(aborts) == 1 and [type(m).__name__ for m in host.io.sent] == ["Register"]

    clock[0] += services.host.REJOIN_WAIT_S + 0.1  # our Register was lost: the next retry counts
    host.decode.held.add("r3")
    host._dispatch(Inbound(retry, [], b""))
    assert len(aborts) == 2 and [type(m).__name__ for m in host.io.sent] == ["Register"] * 2
    assert host.decode.held == set()

    host._dispatch(Inbound(RegisterAck(accepted=True, heartbeat_interval=0.5), [], b""))
    assert host.io.heartbeat_interval == 0.5
    host._dispatch(Inbound(retry, [], b""))  # once accepted, a new retry is a new loss: honoured at once
    assert len(aborts) == 3 and len(host.io.sent) == 3
