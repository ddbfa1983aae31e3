"""Loading NIXL for the nixl backend, and undoing what its import does to the whole process.

Imported only by common/dataplane/nixl.py when a nixl plane is made (or a test asks whether one can
be): nothing else in the project loads NIXL.
"""

from __future__ import annotations

import logging
import os
from typing import Any


def load_nixl() -> Any:
    """The NIXL module, imported on first use; its logger is made to follow ours.

    Importing NIXL picks its CUDA 12 or 13 build from the CUDA version torch was built with, and with
    a CPU build of torch that means importing torch: a nixl plane belongs in a process that runs the
    model (which loads torch anyway), not in a torch-free one.
    """
    # UCX's EFA module links the system's libefa, which brings a second copy of libibverbs and libnl
    # next to the ones NIXL bundles; the process then crashes in libnl's destructor when it exits.
    # Deployments on EFA set UCX_MODULES themselves.
    os.environ.setdefault("UCX_MODULES", "^efa")
    raise_exceptions = logging.raiseExceptions
    try:
        import nixl
    except ImportError as exc:
        raise RuntimeError(f"the nixl data plane needs NIXL (pip install '.[nixl]'): {exc}") from exc
    # NIXL's import configures its own logger to print INFO lines on stdout (where our child processes
    # answer their parents) and switches off logging's error reports: hand both back.
    logging.raiseExceptions = raise_exceptions
    nixl_log = logging.getLogger("nixl")
    for handler in list(nixl_log.handlers):
        nixl_log.removeHandler(handler)
    nixl_log.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_log.setLevel(logging.WARNING)
    return nixl


def unavailable_reason() -> str | None:
    """Why this backend cannot run here (NIXL does not import), or None when it can."""
    try:
        load_nixl()
    except RuntimeError as exc:
        return str(exc)
    return None
