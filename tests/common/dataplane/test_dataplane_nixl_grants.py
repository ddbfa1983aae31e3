"""The nixl consumer's grant book: what may be written where, and when a freed buffer's memory may go.

Plain Python (no NIXL): registrations are stand-in strings, so these run wherever the suite does.
"""

from __future__ import annotations

import pytest

from common.dataplane.nixl_grants import Destination, GrantBook, Refused


def always(_: str) -> bool:
    return True


def never(_: str) -> bool:
    return False


def book_with(*names: str, size: int = 4096) -> GrantBook:
    book = GrantBook(ttl=10.0)
    for name in names:
        book.add(name, Destination(memoryview(bytearray(size)), 1000, f"reg-{name}"))
    return book


def test_a_grant_names_the_buffers_addresses_and_sizes():
    book = book_with("kv", "feat")
    grant, buffers = book.grant("t", [("kv", 0, 100), ("kv", 200, 100), ("feat", 0, 4096)], always, 0.0)
    assert grant > 0 and buffers == {"kv": (1000, 4096), "feat": (1000, 4096)}
    assert book.landed(grant, "t", "kv") == (0.0, None)


def test_out_of_bounds_and_unknown_buffers_are_refused_and_fail_the_transfer():
    book = book_with("kv")
    with pytest.raises(Refused, match="outside") as outside:
        book.grant("t", [("kv", 4000, 200)], always, 0.0)
    with pytest.raises(Refused, match="unknown buffer") as unknown:
        book.grant("t", [("nope", 0, 1)], always, 0.0)
    assert outside.value.fatal and unknown.value.fatal
    assert len(book) == 0


def test_finished_or_aborted_transfers_are_refused_at_once_and_at_renewal():
    book = book_with("kv")
    with pytest.raises(Refused, match="aborted") as refused:
        book.grant("t", [("kv", 0, 1)], never, 0.0)
    assert not refused.value.fatal, "the consumer already knows its transfer is over"
    grant, _ = book.grant("t", [("kv", 0, 1)], always, 0.0)
    book.renew(grant, "t", always, 1.0)
    with pytest.raises(Refused, match="aborted"):
        book.renew(grant, "t", never, 2.0)
    with pytest.raises(Refused, match="never given"):
        book.renew(grant, "other", always, 2.0)


def test_a_freed_buffer_stays_registered_until_the_grant_naming_it_closes():
    book = book_with("kv", "spare")
    grant, _ = book.grant("t", [("kv", 0, 64)], always, 0.0)
    assert book.remove("spare") == ["reg-spare"], "a buffer nobody writes is released at once"
    assert book.remove("kv") == [], "a producer may still be writing into it"
    assert book.close(grant) == ["reg-kv"]
    assert book.remove("kv") == []


def test_a_silent_producers_grant_expires_and_releases_what_it_held():
    book = book_with("kv")
    grant, _ = book.grant("t", [("kv", 0, 64)], always, 0.0)
    book.remove("kv")
    assert book.expire(5.0) == []
    assert book.expire(11.0) == ["reg-kv"]
    with pytest.raises(Refused):
        book.renew(grant, "t", always, 12.0)


def test_bytes_reported_for_a_buffer_freed_and_allocated_again_are_refused():
    book = book_with("b")
    grant, _ = book.grant("t", [("b", 0, 64)], always, 3.0)
    book.remove("b")
    book.add("b", Destination(memoryview(bytearray(64)), 2000, "reg-b2"))
    began, problem = book.landed(grant, "t", "b")
    assert began == 3.0 and "freed" in (problem or "")
    assert book.landed(grant, "other", "b")[1] is not None
    assert book.landed(grant + 100, "t", "b")[1] is not None


def test_the_version_moves_with_every_change_of_destinations():
    book = book_with("a")
    v1, spans = book.snapshot()
    book.add("b", Destination(memoryview(bytearray(8)), 3000, None))
    v2, spans2 = book.snapshot()
    book.remove("a")
    v3, spans3 = book.snapshot()
    assert v1 < v2 < v3 and spans == [(1000, 4096)] and spans3 == [(3000, 8)] and len(spans2) == 2
    with pytest.raises(ValueError, match="already registered"):
        book.add("b", Destination(memoryview(bytearray(8)), 3000, None))
    assert book.clear() == [None]
