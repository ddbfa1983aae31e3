"""`epd-serve ask`: stream one answer from a running server, printing text as it arrives.

A tiny OpenAI chat client on the standard library, so a fresh install can talk to `epd-serve up`
without anything else.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
import urllib.error
import urllib.request


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ask",
        help="ask a running server a question (with images), streaming the answer",
        description="Send one chat request to an OpenAI-compatible server and stream the answer to stdout.",
    )
    p.add_argument("question", help="the text of the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image; repeat for more")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="server base URL (default: local `up`)")
    p.add_argument("--model", help="model name (default: the first the server lists)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(run=run)


def _data_uri(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    try:
        model = args.model
        if not model:
            with urllib.request.urlopen(f"{base}/models", timeout=10) as r:
                model = json.load(r)["data"][0]["id"]
        content = [{"type": "image_url", "image_url": {"url": _data_uri(p)}} for p in args.image]
        content.append({"type": "text", "text": args.question})
        body = {
            "model": model, "stream": True, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "messages": [{"role": "user", "content": content}],
        }  # fmt: skip
        req = urllib.request.Request(
            f"{base}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    print(f"\nepd-serve ask: error: {event['error']['message']}", file=sys.stderr)
                    return 1
                for choice in event.get("choices", []):
                    print(choice["delta"].get("content") or "", end="", flush=True)
        print()
        return 0
    except urllib.error.HTTPError as exc:
        print(f"epd-serve ask: error: {exc.code}: {exc.read().decode()}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"epd-serve ask: error: {exc}", file=sys.stderr)
    return 1
