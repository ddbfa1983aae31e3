"""What the planner reads: instance views from the registry, phase differences between ticks, per-role
pressures, the SLO window, and the checks of its config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.protocol import InstanceInfo, Load
from common.stage_histograms import NUM_COUNTS, PhaseSnapshot
from gateway.planner_config import PlannerConfig
from gateway.planner_signals import InstanceView, PhaseDeltas, PressureTargets, role_signals, view_of
from gateway.planner_slo import SloWindow
from gateway.registry import Instance


def snap(count: int, total: float) -> PhaseSnapshot:
    counts = [0] * NUM_COUNTS
    counts[3] = count
    return PhaseSnapshot(counts, total)


def test_view_of_a_registry_instance() -> None:
    info = InstanceInfo(instance_id="d1", roles="D", address="tcp://x", model="m")
    load = Load(running=3, free_kv_blocks=20, total_kv_blocks=100, phases={"decode_step": snap(5, 0.5)})
    view = view_of(Instance(info, last_seen=0.0, load=load))
    assert (view.id, view.roles, view.running, view.free_kv_blocks, view.total_kv_blocks) == (
        "d1",
        "D",
        3,
        20,
        100,
    )
    assert view.phases == {"decode_step": (5, 0.5)}
    assert not view.pending and view.switchable
    # the role change in flight: the attribute the gateway sets while a SetRoles is pending
    changing = SimpleNamespace(
        id="p1", info=SimpleNamespace(roles="P"), suspect=False, load=Load(), pending_roles="D"
    )
    assert view_of(changing).pending and not view_of(changing).switchable


def test_phase_deltas_are_differences_and_survive_a_restart() -> None:
    deltas = PhaseDeltas()
    v = InstanceView("d1", "D", phases={"decode_step": (10, 1.0)})
    assert deltas.step([v]) == {"d1": {"decode_step": (10, 1.0)}}
    v.phases = {"decode_step": (14, 1.2)}
    got = deltas.step([v])["d1"]["decode_step"]
    assert got[0] == 4 and got[1] == pytest.approx(0.2)
    v.phases = {"decode_step": (3, 0.3)}  # restarted: totals from zero again
    assert deltas.step([v]) == {"d1": {"decode_step": (3, 0.3)}}


def test_pressures_compare_across_roles() -> None:
    targets = PressureTargets()
    views = [
        InstanceView("e1", "E", encode_queue=8, phases={"encode_queue": (4, 2.0)}),  # 0.5 s vs 0.5 s budget
        InstanceView("p1", "P", waiting=2),
        InstanceView("p2", "P", waiting=0, suspect=True),  # not counted
        InstanceView(
            "d1", "D", running=12, free_kv_blocks=60, total_kv_blocks=100, phases={"decode_step": (10, 1.0)}
        ),  # fmt: skip
    ]
    deltas = PhaseDeltas().step(views)
    s = role_signals(views, deltas, targets, ttft_s=2.0, tpot_s=0.05)
    assert s["E"].pressure == pytest.approx(2.0)  # 8 queued / 4
    assert s["E"].signals["encode_queue_s"] == pytest.approx(0.5)
    assert (s["P"].count, s["P"].pressure) == (1, pytest.approx(0.5))
    assert s["D"].pressure == pytest.approx(2.0)  # a 100 ms step against a 50 ms TPOT
    assert s["D"].signals["kv_use"] == pytest.approx(0.4)
    # no new observations since: the step time drops out, the KV use (0.4 / 0.8) is what is left
    again = role_signals(views, {"d1": {}}, targets, 2.0, 0.05)
    assert again["D"].pressure == pytest.approx(0.5)


def test_prompts_waiting_for_features_press_the_encoders_not_the_prefill() -> None:
    targets = PressureTargets()
    views = [
        InstanceView("e1", "E"),
        InstanceView("e2", "E"),
        # 12 prompts wait at p1, 10 of them for features that took 1.5 s on average to come
        InstanceView("p1", "P", waiting=12, feature_waiting=10, phases={"feature_wait": (4, 6.0)}),
    ]
    s = role_signals(views, PhaseDeltas().step(views), targets, ttft_s=2.0, tpot_s=0.05)
    assert s["P"].signals["waiting"] == 2 and s["P"].pressure == pytest.approx(0.5)
    assert s["E"].signals["feature_waiting"] == 5  # per E instance
    assert s["E"].signals["feature_wait_s"] == pytest.approx(1.5)
    assert s["E"].pressure == pytest.approx(3.0)  # 1.5 s against the 0.5 s queue budget
    info = InstanceInfo(instance_id="p1", roles="P", address="tcp://x", model="m")
    assert (
        view_of(Instance(info, last_seen=0.0, load=Load(waiting=3, feature_waiting=2))).feature_waiting == 2
    )


def test_a_role_without_live_instances_has_no_pressure() -> None:
    s = role_signals([InstanceView("p1", "PD")], {}, PressureTargets(), 2.0, 0.05)
    assert (s["E"].count, s["E"].pressure) == (0, 0.0)
    assert s["P"].count == s["D"].count == 1


def test_slo_window_attainment_and_percentiles() -> None:
    slo = SloWindow(window_s=30, ttft_s=2.0, tpot_s=0.05)
    assert slo.attainment(0.0) is None and slo.ttft_percentile(90, 0.0) is None
    slo.record(1.0, 0.02, now=0.0)
    slo.record(3.0, 0.02, now=1.0)  # TTFT missed
    slo.record(0.5, 0.09, now=2.0)  # TPOT missed
    slo.record(0.4, None, now=3.0)  # one token: only TTFT counts
    assert slo.attainment(3.0) == pytest.approx(0.5)
    assert slo.ttft_percentile(50, 3.0) == 0.5 and slo.ttft_percentile(100, 3.0) == 3.0
    assert slo.tpot_percentile(90, 3.0) == 0.09
    assert slo.count(31.5) == 2  # the first two fell out of the window
    assert slo.attainment(31.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ttft_s"):
        SloWindow(ttft_s=0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "auto"}, "mode must be one of off, advise, on"),
        ({"interval_s": 0}, "interval_s must be positive"),
        ({"cooldown_s": -1}, "cooldown_s must be 0 or more"),
        ({"act_gap": 0.2, "stand_down_gap": 0.3}, "stand_down_gap < act_gap"),
        ({"min_per_role": {"X": 1}}, "unknown role 'X'"),
        ({"min_per_role": {"D": 0}}, "minimum for D must be at least 1"),
        ({"min_per_role": {"E": 3}, "max_per_role": {"E": 2}}, r"maximum for E \(2\) is under its minimum"),
        ({"max_per_role": {"P": -1}}, "whole number"),
    ],
)
def test_config_errors_say_what_is_wrong(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlannerConfig(**kw)


def test_config_defaults_and_moves() -> None:
    cfg = PlannerConfig(min_per_role={"E": 0})
    assert (cfg.mode, cfg.min_of("E"), cfg.min_of("P"), cfg.max_of("D")) == ("off", 0, 1, None)
    assert cfg.may_move("P", "D") and cfg.may_move("D", "P")
    assert not cfg.may_move("E", "P") and not cfg.may_move("D", "E") and not cfg.may_move("P", "P")
    assert PlannerConfig(allow_load_on_demand=True).may_move("E", "D")
