"""Build only the parts of a model that a process's roles need, and read only their tensors.

An encode-only process needs the vision tower (or the audio encoder: the "vision" part is whatever
encoder the family has) and nothing of the language model; a prefill or decode process needs the
language model and nothing of the encoder. Building the whole model and then
deleting a part would peak at the whole model, so instead:

  1. transformers builds its own model class on the `meta` device (shapes and dtypes, no storage);
  2. the parts the roles do not need are cut off (their module slots become None);
  3. the checkpoint's tensor names are read from the safetensors headers, renamed to module names
     (checkpoints come in two layouts, see the family's `checkpoint_renames`), and only the tensors of
     the remaining parameters are read from the files (`safe_open`), each straight into its final
     device and dtype;
  4. tied weights (`tie_word_embeddings`) are tied again, and non-persistent buffers (the rotary
     `inv_freq`, computed from the config, never stored) are filled by transformers' own `_init_weights`,
     the same code `from_pretrained` runs for them; a sentinel checks that none was left unfilled.

Anything that cannot be matched (a parameter with no tensor, a shape that differs) is an error that says
which names, before the process serves anything.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

VISION = "vision"
TEXT = "text"
_REOPEN_BYTES = 256 * 2**20


class StageWeightsError(ValueError):
    pass


def parts_for_roles(roles: str) -> frozenset[str]:
    """The model parts a process hosting `roles` needs: the vision tower for E, the language model for P
    and D."""
    if not roles or set(roles) - set("EPD"):
        raise StageWeightsError(f"roles must be some of the letters E, P and D, not {roles!r}")
    parts = set()
    if "E" in roles:
        parts.add(VISION)
    if "P" in roles or "D" in roles:
        parts.add(TEXT)
    return frozenset(parts)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint: those its index names, else every `*.safetensors` file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def checkpoint_names(
    files: Iterable[Path], renames: Iterable[tuple[str, str]]
) -> dict[str, tuple[Path, str]]:
    """Module name -> (file, stored name) for every tensor, read from the headers only."""
    from safetensors import safe_open

    rules = [(re.compile(pattern), repl) for pattern, repl in renames]
    found: dict[str, tuple[Path, str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = f.keys()  # a safe_open handle is not iterable
        for key in keys:
            name = key
            for pattern, repl in rules:
                name = pattern.sub(repl, name)
            if name in found:
                raise StageWeightsError(
                    f"{found[name][1]!r} and {key!r} both give {name!r}: the checkpoint mixes two layouts"
                )
            found[name] = (file, key)
    return found


def load_parts(
    folder: Path,
    parts: frozenset[str],
    *,
    part_modules: Mapping[str, tuple[str, ...]],
    renames: Iterable[tuple[str, str]],
    dtype: Any,
    device: str,
    attn_implementation: dict[str, str],
    auto_class: Any = None,
) -> Any:
    """transformers' model for the checkpoint in `folder` with only `parts` built and loaded.

    `part_modules` maps each part to its module paths in the model (the family adapter knows them);
    the modules of the other parts are None in the returned model. `auto_class` is the transformers
    Auto class that builds the family's model (default: AutoModelForImageTextToText).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = (auto_class or AutoModelForImageTextToText).from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)  # {target: source}
    for part, paths in part_modules.items():
        if part not in parts:
            for path in paths:
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent), leaf, None)
    wanted = model.state_dict()  # parameters and persistent buffers, all on meta
    tied = {t: s for t, s in tied.items() if t in wanted and s in wanted}
    stored = checkpoint_names(checkpoint_files(folder), renames)
    plan = _plan(wanted.keys(), tied, stored)
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for name, (file, key) in plan.items():
        by_file[file].append((name, key))

    for file, entries in by_file.items():
        _read(model, wanted, file, entries, device)
    for target, source in tied.items():
        shared, own = model.get_parameter(source), model.get_parameter(target)
        if own.is_meta or torch.equal(own, shared):
            _assign(model, target, shared)
        # else both were saved, with different values: kept apart, as `from_pretrained` does
    _fill_computed_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise StageWeightsError(f"no value for {_few(left)}")
    return model.eval()


def _plan(
    wanted: Iterable[str], tied: Mapping[str, str], stored: Mapping[str, tuple[Path, str]]
) -> dict[str, tuple[Path, str]]:
    """Which stored tensor fills each wanted name. A tied pair is filled once, from whichever copy was
    saved; when both were, both are read (tied afterwards only if they are equal)."""
    plan, missing = {}, []
    for name in wanted:
        if name in tied:
            if name in stored and tied[name] in stored:
                plan[name] = stored[name]
            continue
        if name in stored:
            plan[name] = stored[name]
        elif target := next((t for t, s in tied.items() if s == name and t in stored), None):
            plan[name] = stored[target]  # only the tied copy was saved
        else:
            missing.append(name)
    if missing:
        raise StageWeightsError(f"the checkpoint has no tensor for {_few(missing)}")
    return plan


def _read(
    model: Any, wanted: Mapping[str, Any], file: Path, entries: list[tuple[str, str]], device: str
) -> None:
    """Read `entries` (module name, stored name) of one file into `model`, in their final device and dtype.

    safe_open maps the file: a tensor kept in its stored dtype on the CPU stays a view of the mapping
    (paged in when first read, as with `from_pretrained`), while a converted or moved one is a copy and
    the mapped pages it came from stay resident until the file is closed. Closing and reopening the file
    after every `_REOPEN_BYTES` copied bounds the load's peak to the weights plus about that much.
    """
    from safetensors import safe_open

    pending = entries[::-1]
    while pending:
        copied = 0
        with safe_open(str(file), framework="pt") as f:
            while pending and copied < _REOPEN_BYTES:
                name, key = pending.pop()
                meta, tensor = wanted[name], f.get_tensor(key)
                if tuple(tensor.shape) != tuple(meta.shape):
                    shape, want = tuple(tensor.shape), tuple(meta.shape)
                    raise StageWeightsError(f"{key} in {file.name} has shape {shape}, the model wants {want}")
                value = tensor.to(device=device, dtype=meta.dtype)
                if value is not tensor:
                    copied += tensor.numel() * tensor.element_size()
                _assign(model, name, value)


def _assign(model: Any, name: str, tensor: Any) -> None:
    import torch

    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    if leaf in module._parameters:
        param = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, False)
        module._parameters[leaf] = param
    else:
        module._buffers[leaf] = tensor


def _fill_computed_buffers(model: Any, device: str) -> None:
    """Non-persistent buffers are computed at construction, which happened on meta: compute them again."""
    import torch

    for name, module in model.named_modules():
        owned = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if not owned:
            continue
        for b in owned:
            buf = module._buffers[b]
            if not buf.is_floating_point():
                raise StageWeightsError(f"cannot compute the non-float buffer {name}.{b} of a partial model")
            module._buffers[b] = torch.full_like(buf, float("nan"), device=device)
        _owner(model, name)._init_weights(module)  # transformers' own init, as in from_pretrained
        unfilled = [b for b in owned if torch.isnan(module._buffers[b]).any()]
        if unfilled:
            raise StageWeightsError(f"transformers did not compute {_few(f'{name}.{b}' for b in unfilled)}")


def _owner(model: Any, name: str) -> Any:
    """The innermost transformers model holding module `name`: its `_init_weights` is the one that applies."""
    from transformers import PreTrainedModel

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:i]))
        if isinstance(module, PreTrainedModel):
            return module
    return model


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
