"""The runtime's keyed LRU cache: which value goes first, the byte budget and the count limit."""

from __future__ import annotations

import logging

import pytest

from cldm.runtime.cache import LRUCache


def _sized(max_bytes: int) -> LRUCache[str, bytes]:
    """A cache of byte strings whose size is their length."""
    return LRUCache("blob", max_bytes=max_bytes, size_of=len)


def test_the_least_recently_used_goes_first_and_a_get_counts_as_a_use():
    cache = LRUCache("thing", max_items=3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # "a" is now the most recent: "b" is the oldest
    assert cache.put("d", "D") == ["b"]
    assert cache.keys() == ["c", "a", "d"]
    assert cache.get("b") is None and "b" not in cache
    assert cache.put("e", "E") == ["c"]
    assert cache.keys() == ["a", "d", "e"] and len(cache) == 3


def test_asking_whether_a_key_is_held_is_not_a_use():
    cache = LRUCache("thing", max_items=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert "a" in cache
    assert cache.put("c", 3) == ["a"]


def test_the_byte_budget_drops_the_oldest_until_the_rest_fits():
    cache = _sized(10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.bytes == 8 and cache.keys() == ["a", "b"]
    assert cache.put("c", b"123456") == ["a"]  # 14 bytes: without "a" it is 10, which fits exactly
    assert cache.keys() == ["b", "c"] and cache.bytes == 10
    assert cache.put("d", b"1") == ["b"]
    assert cache.keys() == ["c", "d"] and cache.bytes == 7


def test_a_value_larger_than_the_budget_stays_alone():
    cache = _sized(10)
    cache.put("a", b"12")
    cache.put("b", b"34")
    assert cache.put("big", b"x" * 25) == ["a", "b"]  # everything older goes, the new one is kept even so
    assert cache.keys() == ["big"] and cache.get("big") == b"x" * 25
    assert cache.put("small", b"1") == ["big"]
    assert cache.keys() == ["small"]


def test_putting_an_existing_key_again_replaces_it_and_makes_it_the_most_recent():
    cache = _sized(10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.put("a", b"12") == []
    assert cache.keys() == ["b", "a"] and cache.get("a") == b"12" and cache.bytes == 6
    assert cache.put("a", b"123456789") == ["b"]  # now 13 bytes: the other key goes, not the one just put
    assert cache.keys() == ["a"] and len(cache) == 1


def test_sizes_are_counted_when_the_cache_decides():
    """A value that grows after it went in (a module's packed copies) counts at its size now."""
    cache = _sized(10)
    grows = bytearray(b"12")
    cache.put("grows", grows)
    cache.put("b", b"1234")
    grows.extend(b"345678")
    assert cache.bytes == 12
    assert cache.evict() == ["grows"]
    assert cache.keys() == ["b"]


def test_puts_without_evicting_wait_for_one_evict():
    """The manager puts the last request's ControlNets back, takes the next one's out, then evicts once."""
    cache = _sized(10)
    for key in "abc":
        assert cache.put(key, b"1234", evict=False) == []
    assert cache.bytes == 12 and len(cache) == 3
    assert cache.pop("a") == b"1234"
    assert cache.evict() == []  # what is left fits: nothing was dropped on the way
    assert cache.keys() == ["b", "c"]
    cache.put("d", b"1234", evict=False)
    assert cache.evict() == ["b"]


def test_count_and_byte_limits_together():
    cache = LRUCache("blob", max_items=2, max_bytes=100, size_of=len)
    cache.put("a", b"1")
    cache.put("b", b"1")
    assert cache.put("c", b"1") == ["a"]  # the count limit, well under the bytes
    assert cache.put("d", b"x" * 99) == ["b"]  # 100 bytes in two: fits both limits
    assert cache.put("e", b"12") == ["c", "d"]


def test_pop_clear_and_what_a_cache_refuses():
    cache = LRUCache("thing", max_items=1)
    cache.put("a", 1)
    assert cache.pop("a") == 1 and len(cache) == 0
    with pytest.raises(KeyError):
        cache.pop("a")
    cache.put("b", 2)
    cache.clear()
    assert cache.keys() == [] and cache.get("b") is None and cache.bytes == 0
    with pytest.raises(ValueError, match="size_of"):
        LRUCache("blob", max_bytes=10)
    with pytest.raises(ValueError, match="max_items"):
        LRUCache("thing", max_items=0)


def test_a_dropped_value_is_logged_with_its_kind_and_key(caplog):
    cache = LRUCache("ControlNet", max_items=1)
    cache.put(("canny.safetensors", None), 1)
    with caplog.at_level(logging.INFO, logger="cldm.runtime.cache"):
        cache.put(("depth.safetensors", None), 2)
    assert "dropped ControlNet ('canny.safetensors', None) from the cache" in caplog.text
