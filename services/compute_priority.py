"""A stage's compute below its I/O in CPU priority, so messages never wait behind a step for a core.

On a CPU stack the engine keeps every core busy while a step runs: the loop's thread and torch's
OpenMP workers. The I/O thread that sends a first token out, ZeroMQ's threads and the gateway then
wait for the scheduler to hand them a core, and each hop of a message paid for it: at concurrency 1
on two cores, a first token took 3.6 ms on average from the end of its prefill step to the gateway's
first chunk. Raising the compute thread's niceness (to 5 by default) before it starts torch's thread pool (the workers,
and the encoder thread, inherit it; the I/O thread, started before, keeps its own) lets those
threads preempt a step at once: 2.2 ms. With nothing else to run, a nicer thread runs as fast; any
user may raise its own niceness. Linux only (a thread's niceness is its own there); elsewhere this
does nothing.

The GIL is the other wait: the I/O thread woken by a `send` needs it, and the loop holds it through
the Python between two torch calls. A switch interval of 0.5 ms (Python's default is 5 ms) bounds
that wait; it took the compute-to-I/O hand-off from 0.74 to 0.22 ms on average.
"""

from __future__ import annotations

import os
import sys
import threading

from common.log import get_logger

log = get_logger("epd.priority")

CPU_COMPUTE_NICE = 5  # the default on a CPU device; accelerators keep 0 (their steps wait on the device)
SWITCH_INTERVAL_S = 0.0005


def default_nice(device: str) -> int:
    return CPU_COMPUTE_NICE if device == "cpu" else 0


def lower_compute_priority(nice: int) -> bool:
    """Run this thread at niceness `nice` at least (call it on the compute thread, after the I/O
    thread has started and before torch runs anything in parallel) and shorten the GIL's switch
    interval. Returns whether the niceness changed; calling it again changes nothing."""
    if nice <= 0:
        return False
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) >= nice:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # a sandbox that forbids it: serve anyway, as before
        log.warning("could not lower the compute thread's priority", error=str(exc))
        return False
    return True
