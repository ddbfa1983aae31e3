"""Where `epd-serve up` puts each stage process, and what the child is told (cli/placement.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.placement import Placement, parse_devices, parse_role_devices, place
from common.topology import parse_topology


def procs(topology: str) -> list[str]:
    return parse_topology(topology).processes()


def visible(placements: list[Placement], var: str = "CUDA_VISIBLE_DEVICES") -> list[str]:
    return [p.env[var] for p in placements]


def test_round_robin_over_devices_in_topology_order():
    placed = place(procs("E2 P1 D2"), "cuda", [0, 1, 2], environ={})
    assert [p.roles for p in placed] == ["E", "E", "P", "D", "D"]
    assert [p.index for p in placed] == [0, 1, 2, 0, 1]
    assert visible(placed) == ["0", "1", "2", "0", "1"]
    assert all(p.device == "cuda" and set(p.env) == {"CUDA_VISIBLE_DEVICES"} for p in placed)
    assert [p.sharing for p in placed] == [2, 2, 1, 2, 2]


def test_default_is_one_shared_device():
    placed = place(procs("E1 P1 D1"), "cuda", environ={})
    assert visible(placed) == ["0", "0", "0"] and {p.sharing for p in placed} == {3}


def test_per_role_lists_take_their_own_turns():
    placed = place(procs("E1 P1 D3"), "cuda", [0], devices_for=[("D", [1, 2]), ("e", [3])], environ={})
    assert [(p.roles, p.index) for p in placed] == [("E", 3), ("P", 0), ("D", 1), ("D", 2), ("D", 1)]
    assert [p.sharing for p in placed] == [1, 1, 2, 1, 2]


def test_roles_match_exactly_and_in_any_order():
    placed = place(procs("EP1 D1"), "cuda", [0], devices_for=[("PE", [1])], environ={})
    assert [(p.roles, p.index) for p in placed] == [("EP", 1), ("D", 0)]
    with pytest.raises(ValueError, match="no process hosts exactly the roles P .*EP, D"):
        place(procs("EP1 D1"), "cuda", devices_for=[("P", [1])], environ={})


def test_cpu_sets_nothing():
    placed = place(procs("E1 P1 D1"), "cpu", environ={"CUDA_VISIBLE_DEVICES": "3"})
    assert [(p.device, p.index, p.env) for p in placed] == [("cpu", None, {})] * 3
    assert placed[0].describe() == "cpu"


def test_cpu_refuses_device_lists():
    with pytest.raises(ValueError, match="--device cpu"):
        place(procs("EPD1"), "cpu", [1], environ={})
    with pytest.raises(ValueError, match="--device cpu"):
        place(procs("EPD1"), "cpu", devices_for=[("EPD", [1])], environ={})


def test_npu_uses_ascend_variable():
    placed = place(procs("E1 PD1"), "npu", [4, 5], environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert [(p.device, p.env) for p in placed] == [
        ("npu", {"ASCEND_RT_VISIBLE_DEVICES": "4"}),
        ("npu", {"ASCEND_RT_VISIBLE_DEVICES": "5"}),
    ]


def test_indices_count_the_devices_this_process_may_see():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,GPU-3f2a"}
    placed = place(procs("E1 P1 D1"), "cuda", [2, 0, 1], environ=env)
    assert visible(placed) == ["GPU-3f2a", "4", "5"]
    assert placed[0].describe() == "cuda device 2 (CUDA_VISIBLE_DEVICES=GPU-3f2a)"
    with pytest.raises(ValueError, match="device 3 is not visible: CUDA_VISIBLE_DEVICES='4,5,GPU-3f2a'"):
        place(procs("EPD1"), "cuda", [3], environ=env)
    with pytest.raises(ValueError, match=r"lets 0 device\(s\) through \(none\)"):
        place(procs("EPD1"), "cuda", environ={"CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "write device indices"),
        ("0,,1", "write device indices"),
        ("0,a", "write device indices"),
        ("-1", "write device indices"),
        ("1.5", "write device indices"),
        ("0,1,0", "device 0 is listed twice"),
    ],
)
def test_bad_device_lists_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(text)


def test_bad_role_lists_are_refused():
    assert parse_role_devices("pd=1, 2") == ("PD", [1, 2])
    for text, message in [
        ("D", "ROLES=LIST"),
        ("X=1", "bad roles"),
        ("DD=1", "bad roles"),
        ("D=", "indices"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_role_devices(text)
    with pytest.raises(ValueError, match="given twice"):
        place(procs("E1 P1 D1"), "cuda", devices_for=[("D", [0]), ("D", [1])], environ={})


def test_devices_written_as_cuda_index_are_redirected_to_the_list():
    with pytest.raises(ValueError, match="--device cuda --devices 1"):
        place(procs("EPD1"), "cuda:1", environ={})
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        place(procs("EPD1"), "tpu", environ={})


def test_placement_is_torch_free():
    code = "import sys, cli.placement, cli.engine_options, cli.health; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
