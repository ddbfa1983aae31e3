"""The items' placeholder runs, found again from token ids alone, whatever placeholders the text adds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.placeholder_runs import expand_items, item_positions, item_run_starts

PAD = 9


def test_the_first_placeholders_are_the_items_and_later_ones_stay() -> None:
    assert expand_items([1, PAD, 2, PAD, 3, PAD], PAD, [[PAD, PAD], [7, PAD, 7]]) == [
        1, PAD, PAD, 2, 7, PAD, 7, 3, PAD,
    ]  # fmt: skip
    assert expand_items([1, PAD], PAD, []) == [1, PAD]
    with pytest.raises(ValueError, match="1 placeholders for 2 items"):
        expand_items([PAD, 1], PAD, [[PAD], [PAD]])


def test_runs_are_found_in_order_and_a_stray_after_them_is_text() -> None:
    ids = [1, PAD, PAD, PAD, 2, PAD, PAD, 3, PAD]  # runs of 3 and 2, then a stray
    assert item_run_starts(ids, PAD, [3, 2]) == [1, 5]
    assert item_positions(ids, PAD, [3, 2]) == [1, 2, 3, 5, 6]
    assert item_positions(ids, PAD, []) == []
    # a stray typed right after a run makes it one longer: the run's own length decides
    assert item_positions([PAD, PAD, PAD, 1], PAD, [2]) == [0, 1]


@pytest.mark.parametrize(
    ("ids", "lengths", "message"),
    [
        ([1, PAD, PAD, 2], [2, 2], "run 1 of 2 placeholders is missing"),
        ([1, PAD, 2, PAD], [2], "run 0 wants 2 placeholders at position 1, the prompt has 1"),
        ([1, PAD, PAD], [3], "run 0 wants 3 placeholders at position 1, the prompt has 2"),
    ],
)
def test_a_run_that_is_not_there_is_named(ids, lengths, message) -> None:
    with pytest.raises(ValueError, match=message):
        item_run_starts(ids, PAD, lengths)


text = st.lists(st.sampled_from([1, 2, 3, PAD]), max_size=12)


@given(st.lists(st.tuples(text, st.integers(1, 6)), max_size=4), text)
def test_expanding_then_finding_gives_back_each_items_run(pieces, tail) -> None:
    """Text (with strays anywhere) around one template placeholder per item: after expansion the
    items' runs are found exactly where expand_items wrote them."""
    ids: list[int] = []
    for chunk, _ in pieces:
        ids += [t for t in chunk if t != PAD] + [PAD]  # the template's placeholder for this item
    ids += tail  # strays live after the items' placeholders, as the first-N rule makes them
    lengths = [n for _, n in pieces]
    expanded = expand_items(ids, PAD, [[PAD] * n for n in lengths])
    where, at = [], 0
    for chunk, n in pieces:
        at += len([t for t in chunk if t != PAD])
        where += list(range(at, at + n))
        at += n
    assert item_positions(expanded, PAD, lengths) == where
