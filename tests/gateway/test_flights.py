"""A flight's tokens reach its stream in output order whatever connection they came on."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from gateway.backend import TokenEvent
from gateway.flights import MAX_AHEAD, Flight


def _drain(flight: Flight) -> list[TokenEvent]:
    events = []
    while not flight.queue.empty():
        events.append(flight.queue.get_nowait())
    return events


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_decode_tokens_that_overtake_the_first_token_wait_for_it() -> None:
    flight = Flight(asyncio.Queue())
    assert flight.deliver(1, TokenEvent([11, 12]))
    assert flight.deliver(3, TokenEvent([13], finished=True, finish_reason="length"))
    assert _drain(flight) == []  # nothing before the first token
    assert flight.deliver(0, TokenEvent([10], num_cached_tokens=4))
    events = _drain(flight)
    assert _tokens(events) == [10, 11, 12, 13]
    assert events[0].num_cached_tokens == 4 and events[-1].finished and not flight.ahead


def test_a_hand_offs_target_tokens_wait_for_the_sources_last_ones() -> None:
    flight = Flight(asyncio.Queue())
    for position in range(3):  # first token, then the source decodes two
        flight.deliver(position, TokenEvent([position]))
    flight.deliver(5, TokenEvent([5]))  # the target's, ahead of the source's last two
    flight.deliver(6, TokenEvent([6], finished=True))
    assert _tokens(_drain(flight)) == [0, 1, 2]
    flight.deliver(3, TokenEvent([3]))
    flight.deliver(4, TokenEvent([4]))
    assert _tokens(_drain(flight)) == [3, 4, 5, 6]


def test_a_repeated_event_is_dropped_and_nothing_after_the_last_is_queued() -> None:
    flight = Flight(asyncio.Queue())
    flight.deliver(0, TokenEvent([1]))
    flight.deliver(0, TokenEvent([1]))  # the same position again
    flight.deliver(1, TokenEvent([2], finished=True))
    flight.deliver(2, TokenEvent([3]))  # past the end: waits for ever, never reaches the stream
    assert _tokens(_drain(flight)) == [1, 2]


def test_positions_that_never_close_up_are_refused_past_the_cap() -> None:
    flight = Flight(asyncio.Queue())
    results = [flight.deliver(10 + k, TokenEvent([k])) for k in range(MAX_AHEAD + 1)]
    assert all(results[:MAX_AHEAD]) and not results[-1]
    assert flight.deliver(10 + MAX_AHEAD + 1, TokenEvent([0])), "the request fails once, not per update"
    assert not flight.ahead
    assert _drain(flight) == []


@given(st.lists(st.integers(1, 3), min_size=1, max_size=20), st.randoms(use_true_random=False))
def test_any_arrival_order_streams_the_tokens_in_order(sizes: list[int], rnd) -> None:
    events, position = [], 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        events.append((position, TokenEvent(list(range(position, position + n)), finished=last)))
        position += n
    rnd.shuffle(events)
    flight = Flight(asyncio.Queue())
    for p, e in events:
        assert flight.deliver(p, e)
    out = _drain(flight)
    assert _tokens(out) == list(range(position)) and out[-1].finished and not flight.ahead
