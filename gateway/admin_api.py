"""Operator routes: list the instances, drain one, change one's roles (`epd-serve drain`, `roles`).

  GET  /admin/instances                   every registered instance: roles, pending change, load;
                                          role changes and decode hand-offs asked so far
  POST /admin/instances/{id}/drain        stop new work for it, hand off or finish what it holds,
                                          let it exit (202: asked; it leaves on its own time)
  POST /admin/instances/{id}/roles        body {"roles": "D", "reason": "..."}: the same, then it
                                          serves those roles (gateway/role_changes.py)

With `--api-key` these need the key like /v1 does (gateway/api_key.py); without one, only clients on
the gateway's own host (loopback) may call them, since a drain is an outage to whoever else could.
A refused change answers with its reason: 404 an unknown instance, 400 bad roles, 409 a change under
way or roles it has already. A backend without instances (a test double) answers 501.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from gateway.errors import ApiError

LOOPBACK_ONLY = "admin routes answer local clients only when the gateway has no --api-key"


def _allowed(request: web.Request, api_key: str | None) -> None:
    if api_key:
        return  # the API key middleware checked it
    try:
        local = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        local = False
    if not local:
        raise ApiError(403, LOOPBACK_ONLY)


def _cluster(request: web.Request, backend, api_key: str | None):
    _allowed(request, api_key)
    if not hasattr(backend, "set_roles"):
        raise ApiError(501, "this gateway's backend has no stage instances to manage")
    return backend


def add_admin_routes(app: web.Application, backend, api_key: str | None) -> None:
    async def instances(request: web.Request) -> web.Response:
        cluster = _cluster(request, backend, api_key)
        rows = [_row(inst) for inst in cluster.registry.instances.values()]
        changes = cluster.role_changes
        return web.json_response({
            "instances": sorted(rows, key=lambda r: r["id"]),
            "role_changes": changes.changes, "handoffs": changes.handoffs,
        })  # fmt: skip

    async def drain(request: web.Request) -> web.Response:
        return _change(_cluster(request, backend, api_key), request.match_info["instance_id"], "", "drain")

    async def roles(request: web.Request) -> web.Response:
        cluster = _cluster(request, backend, api_key)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, 'the body must be JSON: {"roles": "D"}') from None
        wanted = body.get("roles") if isinstance(body, dict) else None
        if not isinstance(wanted, str) or not wanted:
            raise ApiError(400, 'roles: some of E, P, D, as a string such as "D" (a drain is /drain)')
        reason = body.get("reason", "")
        reason = reason if isinstance(reason, str) else ""
        return _change(cluster, request.match_info["instance_id"], wanted, reason or "operator")

    app.router.add_get("/admin/instances", instances)
    app.router.add_post("/admin/instances/{instance_id}/drain", drain)
    app.router.add_post("/admin/instances/{instance_id}/roles", roles)


def _change(cluster, instance_id: str, roles: str, reason: str) -> web.Response:
    from gateway.role_changes import RoleChangeError

    try:
        wanted = cluster.set_roles(instance_id, roles, reason)
    except RoleChangeError as exc:
        raise ApiError(exc.status, exc.message) from None
    return web.json_response({"instance": instance_id, "roles": wanted, "status": "asked"}, status=202)


def _row(inst) -> dict:
    load = inst.load
    return {
        "id": inst.id, "roles": inst.info.roles, "pending_roles": inst.pending_roles,
        "suspect": inst.suspect, "inflight": len(inst.inflight), "address": inst.address,
        "host": inst.info.host, "pid": inst.info.pid,
        "load": {
            "waiting": load.waiting, "running": load.running, "encode_queue": load.encode_queue,
            "free_kv_blocks": load.free_kv_blocks, "total_kv_blocks": load.total_kv_blocks,
        },
    }  # fmt: skip
