"""The workers of a role set, built and released again and again in one process (services/roles.py), as
role changes do: each build names its data-plane buffers afresh and each release gives them all back,
so P -> D -> P -> D on one instance works and leaves nothing registered."""

from __future__ import annotations

import pytest

from common.dataplane import create_dataplane
from services.host_config import HostConfig
from services.models.loader import load_model
from services.roles import build_roles
from tests.services.test_workers import Router


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_every_role_change_gives_its_data_plane_buffers_back(tiny_qwen2_vl, backend):
    model = load_model(tiny_qwen2_vl, roles="PD")
    dataplane = create_dataplane(backend)
    io = Router().io("x")
    config = HostConfig(roles="P", model_dir=str(tiny_qwen2_vl), gateway_address="tcp://127.0.0.1:1",
                        kv_cache_memory=8 << 20)  # fmt: skip
    try:
        seen = []
        for generation, roles in enumerate(["P", "D", "P", "D", "PD"]):
            config.roles = roles
            built = build_roles(config, io, model=model, dataplane=dataplane, generation=generation)
            held = set(dataplane.buffers.ids())
            assert held, f"{roles} registers its destination buffers"
            assert not held & set(seen), "a peer may still map an old buffer: never reuse its id"
            seen += held
            built.release()
            assert not set(dataplane.buffers.ids()), f"releasing {roles} left {dataplane.buffers.ids()}"
    finally:
        dataplane.close()


@pytest.mark.parametrize(
    ("roles", "setting", "threaded"),
    [("EP", "auto", True), ("EPD", "auto", True), ("EP", "off", False), ("E", "on", False)],
)
def test_an_encoder_next_to_prefill_gets_its_own_thread_on_cpu(tiny_qwen2_vl, roles, setting, threaded):
    """On a CPU `auto` puts the encoder calls of a process that also prefills on a thread of their own;
    an encode-only process has no engine to overlap with, so it keeps them inline."""
    model = load_model(tiny_qwen2_vl, roles=roles)
    dataplane = create_dataplane("fake")
    config = HostConfig(roles=roles, model_dir=str(tiny_qwen2_vl), gateway_address="tcp://127.0.0.1:1",
                        kv_cache_memory=8 << 20, encoder_thread=setting)  # fmt: skip
    try:
        built = build_roles(config, Router().io("x"), model=model, dataplane=dataplane)
        assert (built.encoder_thread is not None) == threaded
        assert built.encode.encoder_thread is built.encoder_thread
        built.release()
        assert built.encoder_thread is None
    finally:
        dataplane.close()


def test_an_unknown_encoder_thread_setting_is_refused():
    with pytest.raises(ValueError, match="encoder_thread must be auto, on or off"):
        HostConfig(roles="EP", model_dir="m", gateway_address="tcp://127.0.0.1:1", encoder_thread="yes")
