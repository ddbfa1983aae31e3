"""The role planner's decisions, on synthetic instance views and a hand-stepped clock.

Targets are the defaults (gateway/planner_signals.py): an E instance with 4 queued images, a P
instance with 4 waiting prompts and a D instance with 80 % of its KV in use are each at pressure 1.
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.planner import Decision, Planner
from gateway.planner_config import PlannerConfig
from gateway.planner_loop import PlannerLoop
from gateway.planner_signals import InstanceView
from gateway.planner_slo import SloWindow


def e(id_: str, queue: int = 0, **kw) -> InstanceView:
    return InstanceView(id_, kw.pop("roles", "E"), encode_queue=queue, **kw)


def p(id_: str, waiting: int = 0, **kw) -> InstanceView:
    return InstanceView(id_, kw.pop("roles", "P"), waiting=waiting, **kw)


def d(id_: str, kv_use: float = 0.0, running: int = 0, **kw) -> InstanceView:
    total = 1000
    free = round(total * (1 - kv_use))
    return InstanceView(
        id_, kw.pop("roles", "D"), running=running, free_kv_blocks=free, total_kv_blocks=total, **kw
    )


def planner(**kw) -> Planner:
    kw.setdefault("mode", "advise")
    kw.setdefault("stable_s", 10.0)
    kw.setdefault("cooldown_s", 30.0)
    return Planner(PlannerConfig(**kw))


def run(pl: Planner, views: list[InstanceView], start: float, end: float) -> list[Decision]:
    """Tick once a second over [start, end); the decisions taken."""
    out: list[Decision] = []
    t = start
    while t < end:
        out += pl.tick(t, views, SloWindow())
        t += 1.0
    return out


def moves(decisions: list[Decision]) -> list[tuple[float, str, str, str]]:
    return [(x.at, x.instance_id, x.from_role, x.to_role) for x in decisions]


def test_balanced_load_moves_nothing() -> None:
    pl = planner(allow_load_on_demand=True, stable_s=0, cooldown_s=0)
    views = [e("e1", 2), e("e2", 2), p("p1", 2), p("p2", 2), d("d1", 0.4), d("d2", 0.4)]
    assert run(pl, views, 0, 60) == []
    assert {r: round(s.pressure, 3) for r, s in pl.last_signals.items()} == {"E": 0.5, "P": 0.5, "D": 0.5}


def test_idle_cluster_moves_nothing() -> None:
    pl = planner(allow_load_on_demand=True, stable_s=0, cooldown_s=0)
    assert run(pl, [e("e1"), p("p1"), p("p2"), d("d1"), d("d2")], 0, 30) == []


def test_encode_heavy_then_decode_heavy_moves_after_stable_s_and_not_before() -> None:
    pl = planner(allow_load_on_demand=True)
    # phase 1: images pile up at the one encoder; two idle prefill instances, p2 the less busy one
    phase1 = [e("e1", 12), p("p1", 1), p("p2", 0), d("d1", 0.4)]
    assert run(pl, phase1, 0, 10) == [], "moved before the gap had lasted stable_s"
    first = run(pl, phase1, 10, 11)
    assert moves(first) == [(10.0, "p2", "P", "E")]
    assert first[0].gap == pytest.approx(3.0 - 0.125)
    # the change went through: p2 is an encoder now; then the load turns to decode
    phase2 = [e("e1", 0), e("p2", 0), p("p1", 0), d("d1", 0.95, running=60)]
    assert run(pl, phase2, 11, 40) == [], "moved within the cooldown"
    # cooldown over at 40, but arming restarted after the move (armed again at 11: ready at 21)
    second = run(pl, phase2, 40, 41)
    # P -> D would leave no prefill instance (minimum 1): the idle encoder goes
    assert moves(second) == [(40.0, "e1", "E", "D")]


def test_without_load_on_demand_only_prefill_and_decode_trade() -> None:
    pl = planner(stable_s=0, cooldown_s=0)
    views = [e("e1", 40), e("e2", 0), p("p1"), p("p2"), d("d1", 0.2)]
    assert run(pl, views, 0, 20) == [], "E traded with P/D without --planner-load-on-demand"
    assert pl.last_desired["E"] == 10  # two encoders at pressure 5 (20 images each / 4)
    views = [e("e1"), p("p1"), p("p2"), d("d1", 0.96)]
    assert moves(run(pl, views, 20, 21)) == [(20.0, "p1", "P", "D")]


def test_cooldown_is_respected() -> None:
    pl = planner(stable_s=0, cooldown_s=30)
    views = [e("e1"), p("p1"), p("p2"), p("p3"), d("d1", 0.9)]  # advise: nothing changes in between
    decided = [x.at for x in run(pl, views, 0, 70)]
    assert decided == [0.0, 30.0, 60.0]


def test_hysteresis_holds_above_stand_down_and_drops_below() -> None:
    cfg = {"stable_s": 5.0, "act_gap": 0.5, "stand_down_gap": 0.2}
    for later_kv, expect in ((0.24, 1), (0.12, 0)):  # gaps 0.3 (still armed) and 0.15 (stood down)
        pl = planner(**cfg)
        run(pl, [e("e1"), p("p1"), p("p2"), d("d1", 0.48)], 0, 1)  # gap 0.6: armed at 0
        later = run(pl, [e("e1"), p("p1"), p("p2"), d("d1", later_kv)], 1, 6)
        assert len(later) == expect, f"kv use {later_kv}: {moves(later)}"


def test_minimum_and_maximum_are_respected() -> None:
    hot_d = [e("e1"), p("p1"), p("p2"), d("d1", 0.95), d("d2", 0.95)]
    assert run(planner(stable_s=0, min_per_role={"P": 2}), hot_d, 0, 20) == []
    assert run(planner(stable_s=0, max_per_role={"D": 2}), hot_d, 0, 20) == []
    assert len(run(planner(stable_s=0, max_per_role={"D": 3}), hot_d, 0, 1)) == 1
    assert run(planner(stable_s=0), [e("e1"), p("p1"), d("d1", 0.99)], 0, 20) == [], "left no P"


def test_colocated_suspect_and_pending_instances_are_never_switched() -> None:
    pl = planner(stable_s=0, cooldown_s=0, allow_load_on_demand=True)
    views = [
        e("ep1", roles="EP"),
        p("pd1", roles="PD"),
        p("p1", suspect=True),
        e("epd1", roles="EPD"),
        d("d1", 0.99),
    ]
    assert run(pl, views, 0, 20) == []
    # one change already pending anywhere: no other one, even with a free donor
    views = [e("e1"), p("p1"), p("p2"), p("p3", pending=True), d("d1", 0.99)]
    assert run(pl, views, 20, 40) == []


def test_a_move_that_would_arm_the_reverse_move_is_not_taken() -> None:
    # two P at 0.5 -> one P at 1.0; D at 1.0 over one instance -> 0.5: P would then be 0.5 above D
    pl = planner(stable_s=0, act_gap=0.45, stand_down_gap=0.1)
    assert run(pl, [e("e1"), p("p1", 2), p("p2", 2), d("d1", 0.8)], 0, 10) == []


def test_desired_counts_follow_pressure_inside_the_limits() -> None:
    pl = planner(max_per_role={"E": 2})
    run(pl, [e("e1", 12), p("p1"), p("p2"), d("d1", 0.96), d("d2", 0.96)], 0, 1)
    # E: 1 x 3.0 -> 3, capped at 2; P idle: 1 (the minimum); D: 2 x 1.2 -> 3
    assert pl.last_desired == {"E": 2, "P": 1, "D": 3}


def test_advise_counts_and_logs_but_never_acts(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, str, str]] = []
    pl = planner(mode="advise", stable_s=0)
    now = [0.0]
    views = [e("e1"), p("p1"), p("p2"), d("d1", 0.95)]
    loop = PlannerLoop(pl, lambda: views, SloWindow(), lambda *a: calls.append(a), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="epd.gateway.planner"):
        assert len(loop.run_once()) == 1
    assert calls == []
    assert pl.metrics.decisions.labels(from_role="P", to_role="D", mode="advise")._value.get() == 1
    line = next(r.getMessage() for r in caplog.records if r.name == "epd.gateway.planner")
    for field in ("mode=advise", "instance=p1", "from_role=P", "to_role=D", "D.kv_use=0.95"):
        assert field in line, f"{field} missing from {line!r}"


def test_on_mode_calls_the_actuator_and_survives_its_failure() -> None:
    calls: list[tuple[str, str, str]] = []
    pl = planner(mode="on", stable_s=0, cooldown_s=0)
    views = [e("e1"), p("p1"), p("p2"), d("d1", 0.95)]
    loop = PlannerLoop(pl, lambda: views, SloWindow(), lambda *a: calls.append(a), clock=lambda: 0.0)
    loop.run_once()
    assert [c[:2] for c in calls] == [("p1", "D")] and calls[0][2].startswith("planner: D pressure")

    def refuse(*_: str) -> None:
        raise KeyError("gone")

    loop = PlannerLoop(pl, lambda: views, SloWindow(), refuse, clock=lambda: 1.0)
    assert len(loop.run_once()) == 1
    assert pl.metrics.actuation_errors._value.get() == 1


def test_off_mode_decides_nothing() -> None:
    pl = planner(mode="off", stable_s=0)
    assert run(pl, [e("e1"), p("p1"), p("p2"), d("d1", 0.99)], 0, 5) == []


def test_metrics_appear_in_the_exposition() -> None:
    pl = planner(stable_s=0)
    run(pl, [e("e1", 6), p("p1"), p("p2"), d("d1", 0.95)], 0, 1)
    registry = CollectorRegistry(auto_describe=True)
    for collector in pl.collectors():
        registry.register(collector)
    text = generate_latest(registry).decode()
    for sample in (
        'epd_planner_decisions_total{from_role="P",mode="advise",to_role="D"} 1.0',
        'epd_planner_desired_instances{role="E"} 2.0',
        'epd_planner_pressure{role="E"} 1.5',
        'epd_planner_mode{mode="advise"} 1.0',
        'epd_planner_mode{mode="on"} 0.0',
        "epd_planner_slo_attainment NaN",
    ):
        assert sample in text, f"{sample!r} not in the exposition:\n{text}"
