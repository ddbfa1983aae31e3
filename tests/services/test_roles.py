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
