"""Per-key state bounded in memory: capacity with LRU eviction, and a TTL on event time.

Per-user and per-item state (recent items, rolling aggregates, candidate
sets, predictions waiting for labels) must stay flat when millions of
distinct keys pass through. Time is the events' ``ts`` (epoch ms), never
the wall clock, so replays evict exactly like live runs.

>>> d = BoundedDict(capacity=2, ttl_ms=1000)
>>> d.put("a", 1, ts=0); d.put("b", 2, ts=10); d.put("c", 3, ts=20)
>>> "a" in d, d.evicted_capacity
(False, 1)
>>> d.get("b", ts=500)
2
>>> d.get("c", ts=5000) is None, d.evicted_ttl
(True, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["BoundedDict"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(Generic[K, V]):
    """An LRU map with at most ``capacity`` keys whose entries expire
    ``ttl_ms`` after their last write (``None``: no TTL).

    ``on_evict(key, value, reason)`` is called for every entry pushed out,
    reason ``capacity`` or ``ttl``; delayed-label joining uses it to learn
    from predictions whose label window closed.
    """

    __slots__ = ("_data", "capacity", "evicted_capacity", "evicted_ttl", "on_evict", "ttl_ms")

    def __init__(
        self,
        capacity: int,
        ttl_ms: int | None = None,
        on_evict: Callable[[K, V, str], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.ttl_ms = ttl_ms
        self.on_evict = on_evict
        self.evicted_capacity = 0
        self.evicted_ttl = 0
        # key -> (value, last write ts); order = least recently written first.
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def get(self, key: K, ts: int | None = None) -> V | None:
        """The value of ``key``, or None if absent or expired at ``ts``."""
        item = self._data.get(key)
        if item is None:
            return None
        if ts is not None and self.ttl_ms is not None and ts - item[1] > self.ttl_ms:
            del self._data[key]
            self.evicted_ttl += 1
            if self.on_evict is not None:
                self.on_evict(key, item[0], "ttl")
            return None
        return item[0]

    def put(self, key: K, value: V, ts: int) -> None:
        data = self._data
        if key in data:
            data.move_to_end(key)
        data[key] = (value, ts)
        if len(data) > self.capacity:
            old_key, (old_value, _) = data.popitem(last=False)
            self.evicted_capacity += 1
            if self.on_evict is not None:
                self.on_evict(old_key, old_value, "capacity")

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[0]

    def expire(self, ts: int) -> int:
        """Evict every entry older than the TTL at ``ts``; returns how many.
        Oldest writes are first, so this stops at the first live entry."""
        if self.ttl_ms is None:
            return 0
        data = self._data
        n = 0
        horizon = ts - self.ttl_ms
        while data:
            key, (value, written) = next(iter(data.items()))
            if written >= horizon:
                break
            del data[key]
            n += 1
            if self.on_evict is not None:
                self.on_evict(key, value, "ttl")
        self.evicted_ttl += n
        return n

    def items(self) -> Iterator[tuple[K, V]]:
        for key, (value, _) in self._data.items():
            yield key, value
