"""Which placeholder tokens of a prompt are its items', and which are ordinary text.

A chat template writes one placeholder per image, video or audio clip; the text may hold more of the
same tokens (random or pasted text with a literal `<|image_pad|>`). As vLLM does, the first
placeholders of a kind, one per item of that kind in prompt order, are the items'; any later one, and
any placeholder of a kind the request has no items of, is an ordinary text token: its own embedding,
a text M-RoPE position, no features.

`expand_items` writes each item's run in place of its placeholder. Downstream, with the runs' lengths
known from the items' grids, `item_run_starts` finds them again from the token ids alone: the i-th run
of a kind begins at the first placeholder of that kind after the (i-1)-th run ends. Because only the
first placeholders were expanded, every stray one lies after the last item's run (or right against
it), so the walk is exact and the prompt needs no positions carried beside it. Torch-free: the
gateway, the prefill validation and the model families share it.
"""

from __future__ import annotations

from collections.abc import Sequence


def expand_items(token_ids: Sequence[int], placeholder_id: int, runs: Sequence[Sequence[int]]) -> list[int]:
    """The i-th `placeholder_id` replaced by `runs[i]` (each a list of ids); placeholders past the last
    run stay as they are. Raises ValueError if the prompt has fewer placeholders than runs."""
    out: list[int] = []
    it = iter(runs)
    left = len(runs)
    for tok in token_ids:
        if tok == placeholder_id and left:
            out.extend(next(it))
            left -= 1
        else:
            out.append(tok)
    if left:
        raise ValueError(f"the prompt has {len(runs) - left} placeholders for {len(runs)} items")
    return out


def item_run_starts(token_ids: Sequence[int], placeholder_id: int, lengths: Sequence[int]) -> list[int]:
    """Where each run of `lengths[i]` placeholders begins (in order); raises ValueError, naming the run,
    where the prompt has no such run: too few placeholders, or a run cut short by another token."""
    ids = token_ids if isinstance(token_ids, list) else list(token_ids)
    starts: list[int] = []
    i = 0
    for k, length in enumerate(lengths):
        try:
            i = ids.index(placeholder_id, i)
        except ValueError:
            raise ValueError(
                f"run {k} of {length} placeholders is missing (the prompt has {k} runs)"
            ) from None
        end = i + length
        if ids[i:end].count(placeholder_id) != length:
            got = i
            while got < len(ids) and ids[got] == placeholder_id:
                got += 1
            raise ValueError(f"run {k} wants {length} placeholders at position {i}, the prompt has {got - i}")
        starts.append(i)
        i = end
    return starts


def run_lengths(kind: str, grid_thw: Sequence[int], merge_size: int, runs_per_patch: bool) -> list[int]:
    """The placeholder runs one item takes: one of its token count, or, for a video of a family that
    writes one run per temporal patch (Qwen3-VL: timestamps and vision markers between them), t runs."""
    t, h, w = grid_thw
    per_patch = (h // merge_size) * (w // merge_size)
    if kind == "video" and runs_per_patch:
        return [per_patch] * t
    return [t * per_patch]


def item_positions(token_ids: Sequence[int], placeholder_id: int, lengths: Sequence[int]) -> list[int]:
    """Every position of the runs of `item_run_starts`, in order."""
    starts = item_run_starts(token_ids, placeholder_id, lengths)
    return [p for s, length in zip(starts, lengths, strict=True) for p in range(s, s + length)]
