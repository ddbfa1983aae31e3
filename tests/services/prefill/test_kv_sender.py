from services.prefill.kv_sender import _runs


def test_kv_block_runs_merge_only_blocks_consecutive_on_both_sides():
    assert _runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert _runs([1, 2, 3], [7, 9, 10]) == [(1, 7, 1), (2, 9, 2)]
    assert _runs([], []) == []
