"""Placement decisions of the gateway's registry: load, cache affinity, liveness."""

from __future__ import annotations

import time

from common.protocol import InstanceInfo, Load
from gateway.registry import Registry


def info(iid: str, roles: str) -> InstanceInfo:
    return InstanceInfo(instance_id=iid, roles=roles, address=f"tcp://127.0.0.1:{len(iid)}", model="m")


def test_least_loaded_counts_placed_requests_then_reported_queues():
    reg = Registry("m")
    for iid in ("d0", "d1"):
        reg.admit(info(iid, "D"))
    reg.instances["d0"].inflight.update({"a", "b"})
    assert reg.least_loaded("D").id == "d1"
    reg.instances["d1"].inflight.update({"c", "d"})
    reg.heartbeat("d0", Load(waiting=5))
    assert reg.least_loaded("D").id == "d1"  # equal placements: the shorter reported queue wins
    assert reg.least_loaded("E") is None


def test_encoder_affinity_prefers_the_instance_that_saw_the_image():
    reg = Registry("m")
    for iid in ("e0", "e1"):
        reg.admit(info(iid, "E"))
    reg.instances["e1"].inflight.update({"x", "y", "z"})  # busier, but it holds the image
    reg.remember_encoded(["hash-1"], "e1")
    assert reg.encoder_for(["hash-1"]).id == "e1"
    assert reg.encoder_for(["hash-2"]).id == "e0"
    reg.remove("e1")
    assert reg.encoder_for(["hash-1"]).id == "e0"  # affinity never points at a gone instance


def test_instances_without_heartbeats_expire_and_rejoin_keeps_placements():
    reg = Registry("m", timeout_s=0.05)
    reg.admit(info("p0", "P"))
    reg.instances["p0"].inflight.add("r")
    assert reg.admit(info("p0", "P")) == (None, None)  # the same process again keeps its placements
    assert reg.instances["p0"].inflight == {"r"}
    time.sleep(0.1)
    assert [i.id for i in reg.expired()] == ["p0"] and not reg.instances
    assert reg.heartbeat("p0", Load()) is False  # unknown now: the cluster asks it to register again


def test_counts_by_role_include_colocated_instances():
    reg = Registry("m")
    reg.admit(info("ep0", "EP"))
    reg.admit(info("d0", "D"))
    assert reg.counts() == {"E": 1, "P": 1, "D": 1}


def test_a_new_process_under_a_known_id_replaces_the_old_one():
    reg = Registry("m")
    reg.admit(info("d0", "D"))
    reg.instances["d0"].inflight.add("r")
    restarted = InstanceInfo(instance_id="d0", roles="D", address="tcp://127.0.0.1:9", model="m", pid=42)
    reason, replaced = reg.admit(restarted)
    assert reason is None and replaced is not None and replaced.inflight == {"r"}
    assert reg.instances["d0"].inflight == set()  # what the old process held is not the new one's


def test_a_late_instance_is_suspect_gets_no_new_work_and_keeps_what_it_holds():
    reg = Registry("m", timeout_s=10.0, suspect_after_s=0.05)
    for iid in ("d0", "d1"):
        reg.admit(info(iid, "D"))
    reg.instances["d0"].inflight.add("r")
    reg.instances["d1"].inflight.update({"a", "b", "c"})
    time.sleep(0.1)
    reg.heartbeat("d1", Load())
    assert [i.id for i in reg.newly_suspect()] == ["d0"]
    assert reg.newly_suspect() == []  # reported once
    assert reg.least_loaded("D").id == "d1"  # busier, but on time
    assert reg.instances["d0"].inflight == {"r"} and not reg.expired()  # suspect is not dead
    reg.heartbeat("d0", Load())
    assert not reg.instances["d0"].suspect and reg.least_loaded("D").id == "d0"


def test_when_every_instance_of_a_role_is_suspect_the_least_loaded_still_gets_work():
    reg = Registry("m", timeout_s=10.0, suspect_after_s=0.05)
    for iid in ("e0", "e1"):
        reg.admit(info(iid, "E"))
    reg.remember_encoded(["hash-1"], "e1")
    time.sleep(0.1)
    reg.heartbeat("e0", Load())
    reg.newly_suspect()
    assert reg.encoder_for(["hash-1"]).id == "e0"  # affinity never picks a suspect over a live one
    time.sleep(0.1)
    reg.newly_suspect()
    assert reg.least_loaded("E") is not None


def test_suspicion_never_comes_after_death():
    assert Registry("m", timeout_s=1.0, suspect_after_s=5.0).suspect_after_s == 1.0
    assert Registry("m", timeout_s=3.0).suspect_after_s == 1.5
