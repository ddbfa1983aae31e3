"""Each stage worker times its own phases (common/stage_histograms.py) and the stage process sends them,
with the encoder's cache counts, in its heartbeat's Load: the split workers in one process, a
prefill that decodes too, and requests that leave before a step runs them."""

from __future__ import annotations

from common.dataplane import create_dataplane
from common.protocol import Prefill
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.host import Host, HostConfig
from services.phase_watch import ScheduleWatch
from services.prefill.worker import PrefillWorker
from tests.reference import make_image
from tests.services.test_workers import Router, build, loaded, request, run  # noqa: F401  (a fixture)


def counts(worker) -> dict[str, int]:
    return {phase: s.count for phase, s in worker.phases.snapshot().items()}


def test_split_workers_time_every_phase_and_count_cache_hits(loaded):  # noqa: F811
    router, dp, enc, pre, dec = build(loaded)
    data, h, item, ids, params = request(loaded, "a", make_image(140, 100))
    assert run(router, enc, pre, dec, loaded, dp, "a", data, h, item, ids, params)
    assert run(router, enc, pre, dec, loaded, dp, "b", data, h, item, ids, params)  # the same image

    assert counts(enc) == {"encode_queue": 1, "encode": 1}, "the repeat came from the cache"
    assert enc.cache_counts.hits == {"image": 1} and enc.cache_counts.misses == {"image": 1}
    assert counts(pre) == {"feature_wait": 2, "prefill_queue": 2, "prefill": 2}
    decode = counts(dec)
    assert decode["kv_transfer"] == 2 and decode["decode_queue"] == 2 and decode["decode_step"] >= 9
    assert set(decode) == {"kv_transfer", "decode_queue", "decode_step"}
    assert not pre.unscheduled and not dec.unscheduled
    prefill = pre.phases.snapshot()["prefill"]
    assert 0 < prefill.sum < 60

    host = Host(HostConfig(roles="EP", model_dir="m", gateway_address="tcp://127.0.0.1:1"))
    host.encode, host.prefill, host.engine, host.dataplane = enc, pre, pre.engine, dp["P"]
    load = host.load()
    assert {p: s.count for p, s in load.phases.items()} == {**counts(enc), **counts(pre)}
    assert load.cache_hits == {"image": 1} and load.cache_misses == {"image": 1}


def test_a_prefill_that_decodes_times_its_decode_steps(loaded):  # noqa: F811
    fam = loaded.family
    engine = Engine(fam, loaded.eos_token_ids, EngineConfig(num_blocks=64, max_model_len=1024))
    pre = PrefillWorker(fam, engine, Router().io("PD"), create_dataplane("fake"), decodes=True)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    pre.on_prefill(Prefill(request_id="t", token_ids=[1, 2, 3, 4], params=params, decode_id="PD"))
    while pre.has_work():
        pre.step()
    assert counts(pre) == {"prefill_queue": 1, "prefill": 1, "decode_step": 4}, "no images: no feature wait"


def test_a_request_that_leaves_before_its_first_step_is_not_timed(loaded):  # noqa: F811
    fam = loaded.family
    engine = Engine(fam, loaded.eos_token_ids, EngineConfig(num_blocks=64, max_model_len=1024))
    pre = PrefillWorker(fam, engine, Router().io("PD"), create_dataplane("fake"), decodes=True)
    params = SamplingParams(max_tokens=2)
    for rid in ("gone", "kept"):
        pre.on_prefill(Prefill(request_id=rid, token_ids=[1, 2, 3], params=params, decode_id="PD"))
    assert len(pre.unscheduled) == 2
    pre.on_abort("gone")
    pre.step()
    assert len(pre.unscheduled) == 0 and counts(pre)["prefill_queue"] == 1


def test_a_sequence_finished_by_its_first_step_still_counts_as_scheduled() -> None:
    class Phases:
        def __init__(self) -> None:
            self.seen: list[tuple[str, float]] = []

        def observe(self, phase: str, seconds: float) -> None:
            self.seen.append((phase, seconds))

    class Scheduler:
        requests: dict = {}

    phases = Phases()
    watch = ScheduleWatch(Scheduler(), phases, "decode_queue")  # type: ignore[arg-type]
    watch.queued("r")
    assert watch.scheduled(began=watch._since["r"] + 0.25) == ["r"]
    assert phases.seen == [("decode_queue", 0.25)] and len(watch) == 0
