import random

from services.prefill.arena import Arena


def test_alloc_free_and_coalesce_back_to_one_range():
    arena = Arena(1024, align=64)
    a, b, c = arena.alloc(100), arena.alloc(64), arena.alloc(200)
    assert (a, b, c) == (0, 128, 192)
    assert arena.alloc(1024) is None
    arena.free(b)
    assert arena.alloc(64) == 128  # first fit reuses the hole
    for off in (a, 128, c):
        arena.free(off)
    assert arena.bytes_free == 1024 and arena.alloc(1024) == 0


def test_random_churn_never_overlaps_and_returns_everything():
    rng = random.Random(0)
    arena = Arena(1 << 16)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.5:
            off = rng.choice(list(live))
            arena.free(off)
            del live[off]
        else:
            n = rng.randint(1, 4096)
            off = arena.alloc(n)
            if off is not None:
                assert all(off + n <= o or o + m <= off for o, m in live.items())
                live[off] = n
    for off in list(live):
        arena.free(off)
    assert arena.bytes_free == 1 << 16
