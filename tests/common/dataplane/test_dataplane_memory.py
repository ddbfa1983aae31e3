"""Sources and destinations become flat byte views over the caller's memory, without copies."""

from __future__ import annotations

import numpy as np
import pytest

from common.dataplane.memory import byte_view


def test_sources_are_zero_copy_byte_views():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = byte_view(arr)
    assert view.format == "B" and view.ndim == 1 and view.nbytes == 48
    arr[0, 0] = 7.0
    assert np.frombuffer(view, np.float32)[0] == 7.0, "the view must share the array's memory"
    assert byte_view(b"abc").tobytes() == b"abc"


def test_non_contiguous_sources_are_copied_in_order():
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2]
    assert byte_view(arr).tobytes() == arr.tobytes()


def test_torch_tensors_of_any_dtype_are_viewed_as_bytes():
    torch = pytest.importorskip("torch")
    t = torch.arange(8, dtype=torch.bfloat16)
    assert byte_view(t).nbytes == 16
    dest = torch.zeros(4, dtype=torch.float16)
    view = byte_view(dest, writable=True)
    view[:2] = b"\x00\x3c"  # 1.0 in float16, little-endian
    assert dest[0].item() == 1.0


def test_destinations_must_be_writable_and_contiguous():
    with pytest.raises(ValueError, match="read-only"):
        byte_view(b"abc", writable=True)
    with pytest.raises(ValueError, match="contiguous"):
        byte_view(np.zeros((4, 4))[:, ::2], writable=True)
    ro = np.zeros(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        byte_view(ro, writable=True)
    with pytest.raises(TypeError, match="byte buffer"):
        byte_view(object())
