"""The gateway refuses over-long prompts by the context the instances hold, not only the config's."""

from __future__ import annotations

from common.protocol import InstanceInfo
from gateway.cluster import Cluster


def info(iid: str, roles: str, max_model_len: int = 0) -> InstanceInfo:
    return InstanceInfo(
        instance_id=iid, roles=roles, address=f"tcp://127.0.0.1:{len(iid)}", model="m",
        max_model_len=max_model_len,
    )  # fmt: skip


def test_context_is_the_shortest_a_prefill_or_decode_instance_reported():
    cluster = Cluster("m", 32768)  # what config.json says
    assert cluster.max_model_len == 32768, "nobody registered yet: the configured value"
    cluster.registry.admit(info("e0", "E"))  # encoders hold no KV and report none
    cluster.registry.admit(info("p0", "P", 32768))
    assert cluster.max_model_len == 32768
    cluster.registry.admit(info("d0", "D", 4672))  # its pool caps the context
    assert cluster.max_model_len == 4672
    cluster.registry.admit(info("pd0", "PD", 9000))
    assert cluster.max_model_len == 4672
    cluster.registry.remove("d0")
    assert cluster.max_model_len == 9000


def test_a_configured_context_below_the_instances_stays():
    cluster = Cluster("m", 2048)  # --max-model-len given to the gateway
    cluster.registry.admit(info("pd0", "PD", 4096))
    assert cluster.max_model_len == 2048
