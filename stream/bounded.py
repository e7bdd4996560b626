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
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["BoundedDict", "FeatureBound", "forget_feature", "model_feature_names", "model_table_sizes"]

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


# -- River model state keyed by feature name ---------------------------------------------

#: Attributes never holding per-feature state (a pipeline's steps are keyed by step name).
_NOT_PER_FEATURE = frozenset({"steps", "history", "spec", "params"})
#: How deep ``forget_feature`` looks into nested models (pipeline -> model -> optimizer).
_MAX_DEPTH = 6


def forget_feature(model: Any, name: Any) -> int:
    """Drop every entry keyed by the feature ``name`` from a River model: a linear
    model's weights (and L1 state), its optimizers' per-weight moments, a scaler's
    counts, means and variances, through pipelines and ``AdaptiveModel``s (serving
    model, candidate, fallback). Returns how many entries were dropped.

    The model then knows the feature as it knew it before it first saw it (a weight
    restarts at the initializer's value), so evicting a name that is never seen
    again changes nothing; evicting one seen again is forgetting it, like any LRU.

    >>> from river import linear_model, optim, preprocessing
    >>> model = preprocessing.StandardScaler() | linear_model.LogisticRegression(optim.AdaGrad())
    >>> model.learn_one({"price": 3.0, "cat=books": 1.0}, True)
    >>> forget_feature(model, "cat=books")    # scaler count, mean, var; weight; AdaGrad's g2
    5
    >>> sorted(model["LogisticRegression"].weights)
    ['price']
    """
    n = 0
    for table in _tables(model):
        try:
            if name in table:
                table.pop(name)
                n += 1
        except TypeError:  # a table keyed by something unhashable like the name: not per feature
            pass
    return n


def model_feature_names(model: Any) -> set[Any]:
    """Every key of the model's per-key tables (adopting a model learned without a bound)."""
    names: set[Any] = set()
    for table in _tables(model):
        names.update(table.keys())
    return names


def model_table_sizes(model: Any) -> dict[str, int]:
    """Entries in each per-key table of a River model (``forget_feature``'s tables),
    by attribute path: what a bounded vocabulary keeps bounded (tests, the bench).

    >>> from river import linear_model, optim
    >>> model = linear_model.LogisticRegression(optim.AdaGrad())
    >>> model.learn_one({"a": 1.0, "b": 2.0}, True)
    >>> model_table_sizes(model)["_weights"], model_table_sizes(model)["optimizer.g2"]
    (2, 2)
    """
    return {path: len(table) for path, table in _tables(model, with_paths=True)}


def _tables(model: Any, with_paths: bool = False) -> Iterator[Any]:
    """The mappings inside a (nested) River model: per-key state, or small fixed dicts."""
    stack: list[tuple[Any, str, int]] = [(model, "", 0)]
    seen: set[int] = set()
    while stack:
        obj, path, depth = stack.pop()
        if depth > _MAX_DEPTH or id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            attrs = vars(obj)
        except TypeError:
            continue
        for attr, value in attrs.items():
            if value is None:
                continue
            where = f"{path}{attr}"
            if attr == "steps" and hasattr(value, "items"):
                # A pipeline's steps are keyed by step name: not a table, but models.
                stack.extend((step, f"{where}.{key}.", depth + 1) for key, step in value.items())
            elif attr in _NOT_PER_FEATURE:
                continue
            elif hasattr(value, "keys") and hasattr(value, "pop"):
                yield (where, value) if with_paths else value
            elif _is_model_part(value):
                stack.append((value, where + ".", depth + 1))


def _is_model_part(value: Any) -> bool:
    """A River estimator or optimizer, or one of ours wrapping one (``AdaptiveModel``)."""
    module = type(value).__module__
    return module.startswith("river.") or module == "stream.drift"


class FeatureBound:
    """At most ``capacity`` feature names a model keeps state for, least recently
    used forgotten first (``forget_feature`` on the model ``model_of()`` returns
    at eviction, so a replaced or switched model is the one cleaned).

    For features whose names come from the data (one-hot ``category=...``):
    without a bound a model grows by a weight (and optimizer and scaler entries)
    per distinct value. ``touch(names, ts)`` every time the model may create
    state for them (learning; predicting through a scaler). ``model_of`` must be
    picklable (a bound method of the learner), as the bound is checkpointed.
    """

    __slots__ = ("_names", "expand", "model_of")

    def __init__(
        self,
        capacity: int,
        model_of: Callable[[], Any],
        ttl_ms: int | None = None,
        expand: Callable[[Any], Iterable[Any]] | None = None,
    ) -> None:
        self.model_of = model_of
        #: A tracked name may stand for several feature names (a category's one-hot and slope).
        self.expand = expand
        self._names: BoundedDict[Any, None] = BoundedDict(capacity, ttl_ms, on_evict=self._evicted)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def evicted(self) -> int:
        return self._names.evicted_capacity + self._names.evicted_ttl

    def touch(self, name: Any, ts: int = 0) -> None:
        self._names.put(name, None, ts)

    def adopt(self, names: Iterable[Any]) -> None:
        """Track ``names`` (in sorted order; a model learned without the bound)."""
        for name in sorted(names):
            self._names.put(name, None, 0)

    def _evicted(self, name: Any, _: None, reason: str) -> None:
        model = self.model_of()
        for feature in self.expand(name) if self.expand is not None else (name,):
            forget_feature(model, feature)
