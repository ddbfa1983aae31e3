"""The stage process around its workers: work that comes with the registration answer is handled,
only the gateway's own answer (over the stage's connection to it) makes a stage drop its work and
register again, a burst of such answers makes it do so once, and an error no worker caught fails
that worker's requests while the loop goes on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

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


class ScriptedLine(GatewayLine):
    """Answers `get` with the batches given, one per call."""

    address = "tcp://127.0.0.1:2"

    def __init__(self, batches: list[list[Inbound]]) -> None:
        super().__init__()
        self.batches = batches

    def get(self, timeout: float) -> list[Inbound]:
        return self.batches.pop(0) if self.batches else []


class ReservingWorker(HeldWorker):
    def __init__(self) -> None:
        super().__init__()
        self.reserved: list[str] = []

    def on_kv_reserve(self, msg, peer=None) -> None:
        self.reserved.append(msg.request_id)


def test_work_that_comes_in_the_batch_of_the_registration_answer_is_handled():
    """The gateway places requests here the moment it registers us: a KV_RESERVE may come on the
    inbox before or after the answer (another connection), in the batch that brings the answer."""
    from common.protocol import KvReserve
    from common.sampling_params import SamplingParams

    def reserve(rid: str) -> Inbound:
        msg = KvReserve(request_id=rid, num_prompt_tokens=8, params=SamplingParams(), prefill_id="p",
                        prefill_address="tcp://127.0.0.1:3", sender="gateway")  # fmt: skip
        return Inbound(msg, [], b"\x00gw")

    retry = Inbound(RegisterAck(accepted=False, retry=True, reason="not yet"), [], b"")
    ack = Inbound(RegisterAck(accepted=True, heartbeat_interval=0.5), [], b"")
    host = bare_host()
    host.io = ScriptedLine([[reserve("r0"), retry], [reserve("r1"), ack, reserve("r2")]])
    host.decode = ReservingWorker()
    host.handlers = host._handlers()
    host._register(timeout_s=5)
    assert host.decode.reserved == ["r0", "r1", "r2"]
    assert [type(m).__name__ for m in host.io.sent] == ["Register", "Register"]
    assert host.io.heartbeat_interval == 0.5


def test_a_stage_told_its_own_address_as_the_gateways_stops_with_an_error_instead_of_talking_to_itself():
    """A gateway port chosen while free can be taken by a stage's own inbox before the gateway binds
    it; the stage then gets its own Register back. It must say so and stop, not refuse it forever."""
    host = bare_host()

    class Mirror(ScriptedLine):
        def get(self, timeout: float) -> list[Inbound]:
            return [Inbound(self.sent[-1], [], b"\x00self")]

    host.io = Mirror([])
    host.info = lambda: InstanceInfo(instance_id="d", roles="D", address=Mirror.address, model="m")
    with pytest.raises(SystemExit, match="own address"):
        host._register(timeout_s=5)
