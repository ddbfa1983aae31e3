"""Cache-aware routing: a prompt goes to the prefill instance that computed its prefix, unless that
instance is much busier than another."""

from __future__ import annotations

from common.protocol import InstanceInfo
from gateway.prefix_affinity import PrefixAffinity, placeholder_starts
from gateway.registry import Registry

W = 4


def registry(*ids: str) -> Registry:
    reg = Registry("m")
    for iid in ids:
        reg.admit(InstanceInfo(instance_id=iid, roles="P", address=f"tcp://127.0.0.1:{len(iid)}", model="m"))
    return reg


def test_placeholder_runs_are_found_in_order():
    ids = [1, 9, 9, 9, 2, 3, 9, 9, 4]
    assert placeholder_starts(ids, [3, 2]) == [1, 6]
    assert placeholder_starts(ids, [5]) == []  # no run of that length: left out


def test_keys_chain_windows_and_mix_in_the_pictures():
    aff = PrefixAffinity(window_tokens=W)
    text = list(range(100, 110))
    assert len(aff.keys(text, [])) == 2  # full windows only
    assert aff.keys(text, [])[0] == aff.keys(text[:4] + [0] * 6, [])[0]  # a shared first window
    assert aff.keys(text, [])[1] != aff.keys(text[:4] + [0] * 6, [])[1]
    picture = [1, 7, 7, 7, 7, 7, 2, 3]
    assert aff.keys(picture, [("img-a", 5)]) != aff.keys(picture, [("img-b", 5)])


def test_a_shared_prefix_goes_back_to_its_instance_unless_it_is_much_busier():
    reg = registry("p0", "p1")
    aff = PrefixAffinity(window_tokens=W, balance_slack=2)
    prompt = list(range(100, 116))
    keys = aff.keys(prompt, [])
    reg.instances["p0"].inflight.update({"x"})  # p1 is less loaded: it gets the first one
    first, matched = aff.choose(keys, reg.candidates("P"), reg.load_order)
    assert (first.id, matched) == ("p1", 0)
    aff.remember(keys, first.id)
    reg.instances["p1"].inflight.update({"a", "b"})  # now busier, within the slack
    again, matched = aff.choose(keys, reg.candidates("P"), reg.load_order)
    assert (again.id, matched) == ("p1", 4)
    reg.instances["p1"].inflight.update({"c", "d"})  # beyond it: load wins
    assert aff.choose(keys, reg.candidates("P"), reg.load_order)[0].id == "p0"
    other = aff.keys([0] * 16, [])
    assert aff.choose(other, reg.candidates("P"), reg.load_order)[0].id == "p0"  # unknown: least loaded


def test_a_gone_or_suspect_instance_is_never_chosen_for_affinity():
    reg = registry("p0", "p1")
    aff = PrefixAffinity(window_tokens=W)
    keys = aff.keys(list(range(8)), [])
    aff.remember(keys, "p1")
    reg.instances["p1"].suspect = True
    assert aff.choose(keys, reg.candidates("P"), reg.load_order)[0].id == "p0"
    reg.remove("p1")
    assert aff.choose(keys, reg.candidates("P"), reg.load_order)[0].id == "p0"


def test_memory_is_bounded():
    aff = PrefixAffinity(window_tokens=W, capacity=3)
    aff.remember(aff.keys(list(range(16)), []), "p0")
    assert len(aff._owner) == 3
