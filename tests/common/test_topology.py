import pytest

from common.topology import parse_topology


@pytest.mark.parametrize(
    ("text", "processes"),
    [
        ("E1 P1 D1", ["E", "P", "D"]),
        ("EP1 D1", ["EP", "D"]),
        ("E1 PD1", ["E", "PD"]),
        ("EPD1", ["EPD"]),
        ("E2 P1 D2", ["E", "E", "P", "D", "D"]),
        ("pe1, d1", ["EP", "D"]),
    ],
)
def test_valid_topologies(text, processes):
    assert parse_topology(text).processes() == processes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("E1 P1", "no process for D"),
        ("X1", "roles are E, P and D"),
        ("EE1 PD1", "each at most once"),
        ("E0 PD1", "at least 1"),
        ("EP", "roles then a count"),
        ("ED1 P1", "need P too"),
    ],
)
def test_invalid_topologies_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_topology(text)
