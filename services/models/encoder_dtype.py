"""The encoder in its own dtype: a compute-bound vision (or audio) tower in bfloat16 next to a language
model in float32.

On a CPU with AMX or AVX-512 BF16 (and on any accelerator), the encoder's large matrix products run
about twice as fast in bfloat16, while the decode step, which is a few rows against every weight,
gains nothing from it on a CPU (it was slower in bfloat16 here: docs/benchmarks.md). In a
disaggregated stack each process already picks its own dtype; this lets one process (EPD, EP) or an
`up` stack pick the encoder's apart. The features leave the tower in its dtype and are cast to the
language model's where they enter the prompt (the family's `model_inputs`), as transformers does, so
`model.generate` with the same tower cast is the exact reference.
"""

from __future__ import annotations

from typing import Any

import torch

from services.models.stage_weights import VISION

DTYPES = ("float32", "bfloat16", "float16")


def set_encoder_dtype(family: Any, dtype: str) -> None:
    """Cast the encoder part's modules (the family's `part_modules["vision"]`) of its model to
    `dtype`; modules this process did not load (a P or D process) are skipped."""
    if dtype not in DTYPES:
        raise ValueError(f"encoder dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = getattr(torch, dtype)
    for path in family.part_modules[VISION]:
        module = family.model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is None:
            continue
        if any(p.is_mkldnn and p.dtype != target for p in module.parameters()):
            raise ValueError(
                f"the encoder's linear layers are packed for oneDNN in another dtype; pass "
                f"encoder_dtype={dtype!r} to load_model, which casts before it packs"
            )
        module.to(target)
