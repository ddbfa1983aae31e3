"""Build, cache and call the CPU paged-decode kernel (`csrc/paged_decode.c`).

The kernel is plain C with OpenMP, compiled once per machine by the system C compiler (about a second)
and cached under `$EPD_SERVE_CACHE/kernels/` (`~/.cache/epd-serve/kernels/` by default), keyed by its source, its
flags, the compiler and the CPU's feature flags: it is built with `-march=native`, so a cache carried to
another CPU is rebuilt rather than trusted. Concurrent processes may build at once; each writes its own
temporary file and renames it into place, so none ever loads a half-written library. It is called
through ctypes (which releases the GIL for the call) on tensors' data pointers, after the checks below.

Where there is no compiler, or the build fails, `load()` returns None and the engine keeps the gathered
SDPA path (`sdpa`), saying why once in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-shared",
    "-fPIC",
    "-std=c11",
)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class PagedDecodeKernel:
    """`epd_paged_decode` of one loaded library, with the limits it reports."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.epd_paged_decode
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i32, _ptr, _i32]
        self._fn.argtypes += [ctypes.c_int] * 4 + [ctypes.c_float, _ptr]
        group, head_dim, block = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.epd_paged_decode_limits(ctypes.byref(group), ctypes.byref(head_dim), ctypes.byref(block))
        self.max_group, self.max_head_dim, self.max_block = group.value, head_dim.value, block.value

    def fits_pool(self, dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
        """Whether a pool of this dtype and geometry is one the kernel reads: head dims in whole
        16-lane vectors (the query heads per KV head, up to `max_group`, are checked per call)."""
        return (
            dtype in DTYPE_CODES
            and head_dim % 16 == 0
            and head_dim <= self.max_head_dim
            and block_size <= self.max_block
        )

    def __call__(
        self,
        query: torch.Tensor,  # [rows, heads, head_dim], head_dim contiguous
        k_blocks: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], contiguous
        v_blocks: torch.Tensor,
        table: torch.Tensor,  # [rows, width] int32, contiguous
        contexts: torch.Tensor,  # [rows] int32: keys each row attends to, its own included
        scale: float,
        out: torch.Tensor,  # [rows, heads, head_dim], contiguous, written
    ) -> None:
        rows, heads, head_dim = query.shape
        _, block_size, kv_heads, _ = k_blocks.shape
        if not (
            query.device.type == "cpu"
            and query.stride(2) == 1
            and k_blocks.is_contiguous()
            and v_blocks.is_contiguous()
            and table.dtype == contexts.dtype == torch.int32
            and table.is_contiguous()
            and contexts.is_contiguous()
            and out.is_contiguous()
            and query.dtype == k_blocks.dtype == v_blocks.dtype == out.dtype
            and table.shape[0] == contexts.shape[0] == out.shape[0] == rows
        ):
            raise ValueError("paged decode kernel: tensors of the wrong layout, dtype or device")
        if rows == 0:
            return
        if int(contexts.max()) > table.shape[1] * block_size:
            raise ValueError("paged decode kernel: a context is longer than its block-table row")
        rc = self._fn(
            DTYPE_CODES[query.dtype], query.data_ptr(), query.stride(0), query.stride(1),
            k_blocks.data_ptr(), v_blocks.data_ptr(), table.data_ptr(), table.shape[1],
            contexts.data_ptr(), rows, heads, kv_heads, head_dim, block_size, scale, out.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(
                f"paged decode kernel: {heads} query heads over {kv_heads} KV heads of dim {head_dim} is "
                f"outside its limits (at most {self.max_group} query heads per KV head); use sdpa"
            )


def _cache_dir() -> Path:
    root = os.environ.get("EPD_SERVE_CACHE") or Path.home() / ".cache" / "epd-serve"
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    """`$CC`, else GCC, else `cc`: GCC's -fopenmp links libgomp, the runtime torch's wheels carry (a
    Clang build would link LLVM's libomp, a second runtime beside torch's)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(compiler: str) -> Path:
    """The library for this machine, compiled unless a cached one matches; raises if the build fails."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *FLAGS, version, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        log.info("compiling the CPU paged-decode attention kernel (once per machine): %s", target)
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def load() -> PagedDecodeKernel | None:
    """The kernel, built on first use in this process; None (logged once) where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found (set CC): CPU decode attention gathers blocks (sdpa)")
        return None
    try:
        return PagedDecodeKernel(ctypes.CDLL(str(build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU paged-decode kernel unavailable, decode attention gathers blocks (sdpa): %s", e)
        return None
