"""One keyed LRU cache with byte accounting: every model the manager keeps between requests is in one of these."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Values by key; the least recently used goes first once there are more than `max_items` or, counted by
    `size_of`, more than `max_bytes`. The most recently used one always stays, even alone over the budget: a value
    just put in is never dropped by its own put.

    Sizes are asked for each time the cache decides, not remembered from `put`: a module's packed convolution copies
    (prepack.py) are made on its first call, after it went in.
    """

    def __init__(
        self,
        name: str,
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        size_of: Callable[[V], int] | None = None,
    ):
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be 1 or more, not {max_items}")
        if max_bytes is not None and size_of is None:
            raise ValueError("a byte budget needs size_of to count each value's bytes")
        self.name = name  # what the values are, for the log ("ControlNet")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._values: OrderedDict[K, V] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: K) -> bool:
        """Whether `key` is held (asking does not count as a use)."""
        return key in self._values

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        return list(self._values)

    @property
    def bytes(self) -> int:
        """The values' bytes now (0 without `size_of`)."""
        return 0 if self.size_of is None else sum(self.size_of(v) for v in self._values.values())

    def get(self, key: K) -> V | None:
        """The value of `key`, now the most recently used; None when it is not held."""
        if key not in self._values:
            return None
        self._values.move_to_end(key)
        return self._values[key]

    def put(self, key: K, value: V, evict: bool = True) -> list[K]:
        """Hold `value` as the most recently used (replacing what `key` held), then drop what is over the limits;
        returns the dropped keys. `evict=False` leaves that to a later `evict()`: a caller that puts several values
        back and takes others out in between decides once, on what is left."""
        self._values[key] = value
        self._values.move_to_end(key)
        return self.evict() if evict else []

    def pop(self, key: K) -> V:
        """Take `key`'s value out (KeyError when it is not held)."""
        return self._values.pop(key)

    def clear(self) -> None:
        self._values.clear()

    def evict(self) -> list[K]:
        """Drop the least recently used values while over a limit and more than one is held; returns their keys."""
        dropped = []
        while len(self._values) > 1 and self._over_limits():
            key, _ = self._values.popitem(last=False)
            dropped.append(key)
            log.info("dropped %s %s from the cache", self.name, key)
        return dropped

    def _over_limits(self) -> bool:
        if self.max_items is not None and len(self._values) > self.max_items:
            return True
        return self.max_bytes is not None and self.bytes > self.max_bytes
