"""`epd-serve health`: exit 0 when the gateway is ready, or when one stage instance is registered.

Stage processes have no HTTP port of their own (they speak ZeroMQ to the gateway), so a container
health check of a stage asks the gateway instead: the gateway's /metrics labels every live instance
with its id (`instance="..."`), and an instance stays there only while its heartbeats arrive. Without
--instance the command asks /health, which answers 200 once every stage has a live instance.

Instance ids may contain `{hostname}`, replaced by this machine's host name, so that a compose
service scaled to several replicas gives each its own id (each container has its own host name)
and its health check names that same id. Standard library only: a check runs every few seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.error
import urllib.request


def expand_instance_id(text: str) -> str:
    """'decode-{hostname}' -> 'decode-3f2a9c1b7d4e' on a host (container) of that name."""
    return text.replace("{hostname}", socket.gethostname())


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "health",
        help="check that the gateway is ready, or that one stage instance is registered with it",
        description=(
            "Exit 0 when the gateway's /health answers 200 (every stage has a live instance), or, with "
            "--instance, when that instance is registered and sending heartbeats; exit 1 otherwise, "
            "saying why. Made for container health checks."
        ),
    )
    p.add_argument("--gateway", default="http://127.0.0.1:8000", metavar="URL",
                   help="the gateway's HTTP address (default http://127.0.0.1:8000)")  # fmt: skip
    p.add_argument("--instance", metavar="ID",
                   help="succeed only when this instance is live; {hostname} is replaced by this "
                        "host's name (default: check the whole stack's /health)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait (default 5)")
    p.set_defaults(run=run)


def live_instances(metrics_text: str) -> set[str]:
    """Every instance id labelled in the gateway's Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.labels["instance"]
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if "instance" in sample.labels
    }


def check(gateway: str, instance: str | None, timeout: float) -> str | None:
    """Why the check fails, or None when it passes."""
    root = gateway.rstrip("/").removesuffix("/v1")
    try:
        if instance is None:
            with urllib.request.urlopen(f"{root}/health", timeout=timeout) as r:
                return None if r.status == 200 else f"{root}/health answered {r.status}"
        with urllib.request.urlopen(f"{root}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message") or exc.reason
        except ValueError:
            message = exc.reason
        return f"{exc.url} answered {exc.code}: {message}"
    except (OSError, ValueError) as exc:
        return f"no answer from the gateway at {root}: {exc}"
    if instance not in live_instances(text):
        return f"instance {instance!r} is not registered with the gateway at {root}"
    return None


def run(args: argparse.Namespace) -> int:
    instance = expand_instance_id(args.instance) if args.instance else None
    problem = check(args.gateway, instance, args.timeout)
    if problem:
        print(f"epd-serve health: {problem}", file=sys.stderr)
        return 1
    print(f"ok: {'instance ' + instance if instance else 'every stage has a live instance'}")
    return 0
