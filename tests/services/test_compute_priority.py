"""The compute thread runs below the I/O thread in CPU priority: its own niceness rises, threads it
starts inherit it, a thread started before keeps its own, and asking twice changes nothing."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from services.compute_priority import SWITCH_INTERVAL_S, default_nice, lower_compute_priority
from services.host_config import HostConfig

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _in_thread(fn):
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(fn()))
    t.start()
    t.join()
    return out


@linux
def test_the_compute_thread_and_its_children_drop_while_an_earlier_thread_keeps_its_priority():
    def compute() -> dict:
        io_ready, io_stop, io_tid = threading.Event(), threading.Event(), []
        io = threading.Thread(
            target=lambda: (io_tid.append(threading.get_native_id()), io_ready.set(), io_stop.wait())
        )
        io.start()
        io_ready.wait()
        base = _nice(threading.get_native_id())
        changed = lower_compute_priority(base + 3)
        again = lower_compute_priority(base + 3)
        child = _in_thread(lambda: {"child": _nice(threading.get_native_id())})["child"]
        seen = {"base": base, "changed": changed, "again": again, "mine": _nice(threading.get_native_id()),
                "child": child, "io": _nice(io_tid[0])}  # fmt: skip
        io_stop.set()
        io.join()
        return seen

    seen = _in_thread(compute)
    assert seen["changed"] and not seen["again"]
    assert seen["mine"] == seen["child"] == seen["base"] + 3
    assert seen["io"] == seen["base"]
    assert _nice(threading.get_native_id()) == seen["base"]  # the test's own thread is untouched


def test_no_niceness_changes_nothing_and_the_switch_interval_is_bounded():
    before = sys.getswitchinterval()
    try:
        assert _in_thread(lambda: {"r": lower_compute_priority(0)})["r"] is False
        _in_thread(lambda: {"r": lower_compute_priority(1)})
        assert sys.getswitchinterval() <= SWITCH_INTERVAL_S + 1e-9
    finally:
        sys.setswitchinterval(before)


def test_defaults_and_bounds():
    assert default_nice("cpu") == 5 and default_nice("cuda") == 0 and default_nice("npu:0") == 0
    with pytest.raises(ValueError, match="compute_nice must be between 0 and 19"):
        HostConfig(roles="EPD", model_dir="m", gateway_address="tcp://127.0.0.1:1", compute_nice=20)
    assert HostConfig(roles="EPD", model_dir="m", gateway_address="tcp://127.0.0.1:1").compute_nice is None
