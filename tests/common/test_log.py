"""With EPD_LOG_JSON=1 a stage process writes nothing but JSON lines to stderr: structlog and stdlib
loggers, Python warnings, and no transformers progress bar; timestamps are ISO-8601 UTC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging, warnings
from common.log import configure_logging, get_logger
configure_logging("d0", quiet_libraries=True)
get_logger("epd.test").info("structlog line", request_id="r1")
logging.getLogger("epd.stdlib").warning("stdlib line")
warnings.warn("a library warning")
from transformers.utils import logging as hf_logging
for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
    pass
"""


def test_stage_processes_write_only_json_lines_with_iso_timestamps():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "TRANSFORMERS_"))}
    env |= {"EPD_LOG_JSON": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"a stray non-JSON line: {line!r}") from None
    events = [r["event"] for r in records]
    assert "structlog line" in events and "stdlib line" in events
    assert any("a library warning" in e for e in events), events
    assert not any("Loading weights" in line for line in lines)
    for r in records:
        assert r["process"] == "d0" and r["timestamp"].endswith("Z"), r
        datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))
