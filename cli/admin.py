"""`epd-serve instances`, `epd-serve drain` and `epd-serve roles`: the gateway's operator routes.

They call /admin/... on a running gateway (gateway/admin_api.py): list the stage instances, drain
one (it takes no new work, hands off or finishes what it holds, and exits), or change one's roles
at run time. A drain or a role change is asked, not waited for, unless --wait is given: then the
command follows /admin/instances until the instance has left or serves its new roles. Standard
library only, like `health`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from cli.key_options import ENV_API_KEY


def add_parser(subparsers) -> None:
    for name, helptext in (
        ("instances", "list the stage instances registered with a gateway, with their roles and load"),
        ("drain", "drain one stage instance: no new work, its requests handed off or finished, it exits"),
        ("roles", "change the roles of one stage instance at run time (e.g. a prefill becomes a decode)"),
    ):
        p = subparsers.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("--gateway", default="http://127.0.0.1:8000", metavar="URL",
                       help="the gateway's HTTP address (default http://127.0.0.1:8000)")  # fmt: skip
        p.add_argument("--api-key", default=None,
                       help=f"the gateway's --api-key (default: ${ENV_API_KEY}; without a key the "
                            "gateway answers these routes for local clients only)")  # fmt: skip
        if name != "instances":
            p.add_argument("instance", help="the instance id, as `epd-serve instances` lists it")
        if name == "roles":
            p.add_argument("roles", help="the roles it serves from now on: some of E, P, D, e.g. D or PD")
        if name != "instances":
            p.add_argument("--wait", type=float, default=0.0, metavar="S",
                           help="wait up to S seconds for the change to be done (default 0: return "
                                "once the gateway has asked)")  # fmt: skip
        p.set_defaults(run=run, admin=name)


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(args.gateway.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    key = args.api_key or os.environ.get(ENV_API_KEY)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _instance(args: argparse.Namespace) -> dict | None:
    rows = _call(args, "GET", "/admin/instances")["instances"]
    return next((r for r in rows if r["id"] == args.instance), None)


def run(args: argparse.Namespace) -> int:
    prog = f"epd-serve {args.admin}"
    try:
        if args.admin == "instances":
            for r in _call(args, "GET", "/admin/instances")["instances"]:
                pending = "" if r["pending_roles"] is None else f" -> {r['pending_roles'] or 'leaving'}"
                load, suspect = r["load"], "\tSUSPECT" if r["suspect"] else ""
                print(f"{r['id']}\t{r['roles']}{pending}\tin flight {r['inflight']}\twaiting {load['waiting']}"
                      f"\trunning {load['running']}\tfree KV blocks {load['free_kv_blocks']}/"
                      f"{load['total_kv_blocks']}{suspect}")  # fmt: skip
            return 0
        instance = urllib.parse.quote(args.instance, safe="")
        if args.admin == "drain":
            answer = _call(args, "POST", f"/admin/instances/{instance}/drain", {})
        else:
            answer = _call(args, "POST", f"/admin/instances/{instance}/roles", {"roles": args.roles})
        print(f"{prog}: asked {answer['instance']} to serve {answer['roles'] or 'nothing (drain)'}")
        return _wait(args, answer["roles"]) if args.wait > 0 else 0
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        print(f"{prog}: error: {exc.code}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{prog}: error: cannot reach the gateway at {args.gateway}: {exc}", file=sys.stderr)
        return 1


def _wait(args: argparse.Namespace, roles: str) -> int:
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        row = _instance(args)
        if (row is None and not roles) or (row and row["pending_roles"] is None and row["roles"] == roles):
            print(
                f"epd-serve {args.admin}: done: {args.instance} {'left' if not roles else 'serves ' + roles}"
            )
            return 0
        time.sleep(0.2)
    print(f"epd-serve {args.admin}: error: not done after {args.wait:g} s", file=sys.stderr)
    return 1
