"""A stage process changing its roles at run time (SET_ROLES from the gateway), without a restart.

The gateway sends no new work to an instance from the moment it sends SET_ROLES, and hands the
requests it decodes to other decode instances (HANDOFF, services/decode/handoff.py). The process
finishes what it still holds (prompts being prefilled, items being encoded, hand-offs in flight);
then, holding nothing, it lets go of the old roles' workers and memory, builds the new roles'
workers, reusing the loaded weights when they serve the new roles and loading the checkpoint's
parts again otherwise, and registers again under the same id, inbox and pid, so the gateway keeps
it and learns its new roles. With no roles left (a drain) it tells the gateway it is leaving
(LEAVING) and exits with status 0, which `epd-serve up` does not restart.

Taking no new work at all while the change is pending, rather than only none for the roles being
left, keeps the rule simple: the instance is idle once what it held is done or moved, and the
rebuild never cuts a request short.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

from common.log import get_logger

log = get_logger("epd.host")


@dataclasses.dataclass(slots=True)
class PendingChange:
    roles: str  # in E, P, D order; "" to leave
    reason: str
    asked_at: float = dataclasses.field(default_factory=time.monotonic)


def rebuild(host: Any, roles: str) -> None:
    """Replace `host`'s workers with those of `roles` (it holds no request), keeping its I/O and data
    plane; its weights too when their parts serve `roles`."""
    from services.models.stage_weights import parts_for_roles
    from services.roles import build_roles

    began = time.monotonic()
    old_roles = host.config.roles
    model = host.model if parts_for_roles(roles) <= host.model.parts else None
    host.built.release()
    host.built = host.engine = host.encode = host.prefill = host.decode = None
    if model is None:
        host.model = None  # the old weights go before the new ones load
    gc.collect()
    host.generation += 1
    host.config = dataclasses.replace(host.config, roles=roles)
    built = build_roles(
        host.config, host.io, model=model, dataplane=host.dataplane, generation=host.generation
    )
    host.adopt(built)
    log.info(
        "roles changed", old=old_roles, new=host.config.roles, weights="kept" if model else "loaded",
        seconds=round(time.monotonic() - began, 3),
    )  # fmt: skip
