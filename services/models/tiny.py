"""Offline random-weight Qwen2-VL / Qwen2.5-VL / Qwen2-Audio checkpoints for tests, demos and benchmarks.

There is no model hub here, yet every stage (encode, prefill, decode) must run the real transformers
code path. These checkpoints are ordinary `save_pretrained` folders (config, safetensors weights,
tokenizer, PIL image processor, generation config), so they load through the same `from_pretrained`
calls as a downloaded model. Weights are random but reproducible: the same family, preset and seed
give byte-identical files.

This module builds, saves and caches the checkpoints; what a checkpoint is (presets, token ids, the
transformers config of each family) lives in services/models/tiny_configs.py and is re-exported here.

Loading the image processor: saved configs name `Qwen2VLImageProcessor`, and `AutoImageProcessor`
picks the torchvision class when torchvision is installed. We never depend on torchvision, so loaders
should call `Qwen2VLImageProcessorPil.from_pretrained(dir)` (or `AutoImageProcessor` with
`backend="pil"`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Re-exported: callers import the families, presets and config builder from this module.
from services.models.tiny_configs import (
    _PRESETS,
    _TOKENS,
    FAMILIES,
    PRESETS,
    _check,
    build_config,
    mrope_section,
)

__all__ = [
    "FAMILIES", "FORMAT_VERSION", "MARKER_FILE", "PRESETS", "build_config", "count_parameters",
    "default_model_dir", "ensure_tiny_model", "make_tiny_model", "mrope_section", "parameter_count",
]  # fmt: skip

# Bump when the tokenizer, presets or file layout change, so cached checkpoints get rebuilt.
FORMAT_VERSION = 3  # 2: video_preprocessor_config.json; 3: qwen2_audio
MARKER_FILE = "tiny_model.json"


def make_tiny_model(
    family: str,
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Build a random-weight checkpoint into `out_dir` and return its path.

    The checkpoint is written into a temporary folder beside `out_dir` and renamed into place at the
    end, so an interrupted build never leaves half a checkpoint. An existing non-empty `out_dir` is an
    error unless `overwrite` is set.
    """
    _check(family, preset)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        if progress:
            print(f"[make-tiny-model] {message}", file=sys.stderr, flush=True)

    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging

    from services.models.tiny_tokenizer import build_tokenizer

    audio = family == "qwen2_audio"
    say("training tokenizer")
    tokenizer = build_tokenizer(audio=audio)
    config = build_config(family, preset, tokenizer)
    say(f"initialising {family} {preset} weights (seed {seed})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if audio:  # no Auto class maps qwen2_audio to image-text-to-text
            from transformers import Qwen2AudioForConditionalGeneration

            model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    end_ids = [tokenizer.convert_tokens_to_ids(_TOKENS["im_end"]), tokenizer.pad_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    p = _PRESETS[preset]
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=p["min_pixels"],
        max_pixels=p["max_pixels"],
        patch_size=16 if family == "qwen3_vl" else 14,
        merge_size=2,
        temporal_patch_size=2,
    )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        say(f"saving to {out}")
        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        if audio:
            from services.models.tiny_audio import save_audio_processor

            save_audio_processor(tmp, tokenizer)
        else:
            image_processor.save_pretrained(tmp)
            _save_video_config(tmp, image_processor, p)
            if family == "qwen3_vl":
                from services.models.tiny_qwen3_vl import save_qwen3_vl_video_config

                save_qwen3_vl_video_config(tmp, image_processor, p)
        marker = {"family": family, "preset": preset, "seed": seed, "format_version": FORMAT_VERSION}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        # mkdtemp makes the folder 0700 and safetensors leaves the weights 0600: make it shareable
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done: {count_parameters(model):,} parameters")
    return out


def _save_video_config(folder: Path, image_processor: Any, preset: dict[str, Any]) -> None:
    """Qwen2-VL's video processor settings, written by hand: its class needs torchvision to be built.

    Frames are kept small (a quarter of the image budget, 64 frames at most) so video tests stay fast.
    """
    config = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "do_sample_frames": True, "fps": 2.0, "min_frames": 4, "max_frames": 64,
        "size": {"shortest_edge": preset["min_pixels"], "longest_edge": preset["max_pixels"] // 4},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "do_rescale": True, "rescale_factor": image_processor.rescale_factor,
        "do_normalize": True, "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std), "resample": 3,
    }  # fmt: skip
    (folder / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished `src` to `dst`; an old `dst` is moved aside first and removed after."""
    if not dst.exists():
        src.rename(dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def count_parameters(model: Any) -> int:
    """Parameters of a loaded model."""
    return sum(p.numel() for p in model.parameters())


def parameter_count(checkpoint: str | os.PathLike[str]) -> int:
    """Parameters of a saved checkpoint, read from the safetensors headers without loading weights."""
    total = 0
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def default_model_dir(family: str = "qwen2_vl", preset: str = "tiny") -> Path:
    """Where `ensure_tiny_model` keeps a checkpoint: `$EPD_SERVE_CACHE/models/{family}-{preset}`,
    with `EPD_SERVE_CACHE` defaulting to `~/.cache/epd-serve`."""
    _check(family, preset)
    root = os.environ.get("EPD_SERVE_CACHE") or Path.home() / ".cache" / "epd-serve"
    return Path(root).expanduser() / "models" / f"{family}-{preset}"


def _is_current(path: Path, family: str, preset: str) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    expected = {"family": family, "preset": preset, "format_version": FORMAT_VERSION}
    return all(marker.get(k) == v for k, v in expected.items())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_model(family: str = "qwen2_vl", preset: str = "tiny") -> Path:
    """Return the cached checkpoint for `family`/`preset`, building it (seed 0) on first use.

    A file lock beside the folder makes concurrent processes wait for one build instead of racing;
    a checkpoint left by an older format version is rebuilt.
    """
    path = default_model_dir(family, preset)
    if _is_current(path, family, preset):
        return path
    with _file_lock(path.parent / f".{path.name}.lock"):
        if not _is_current(path, family, preset):
            make_tiny_model(family, path, preset=preset, seed=0, overwrite=True)
    return path
