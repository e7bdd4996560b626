"""Model sync: merging the global parameters that tasks learn apart.

When P tasks each learn from their own partitions (each task a full set of
learners), parameters that are global by nature drift apart: a linear model's
weights see only a Pth of the stream in each task, a label counter counts a
Pth of the labels. A ``Merger`` (one per learner) merges them every so often,
the way Monolith and Flink ML merge parameter updates. A learner describes its
global parameters as ``Params``, three families merged differently:

* ``weights`` (linear weights and intercepts, item latent vectors): each task's *delta*, its values
  minus those it was last given, is added to its *contribution*; the global
  value is the sum of the contributions (``mode = "sum"``: what sequential SGD
  over everybody's updates does to first order, updates of disjoint data add
  up) or their mean (``"average"``: federated averaging, steadier, slower);
* ``counts`` (label counters, scaler moments ``n, sum x, sum x^2``, co-click
  counts, ...): contributions always summed, so the merged count is exactly
  the count of one model that saw everything;
* ``decayed`` (forward-decayed counts, ``weight * exp((ts - ref_ms) / tau_ms)``,
  such as item popularity): summed like counts, after bringing every
  contribution to the newest reference time (a factor <= 1: no overflow).

A contribution is cumulative and per task, so the latest one of every task is
all a merge needs: re-sending it is idempotent, and a compacted topic keyed by
task holds the whole model sync (``stream.sync_topic``). A task the merger
knows nothing about (never given merged values) contributes by ``fresh``:
``"zero"``, everything it holds it learned itself (a new model), or
``"own"``, nothing: it adopts the merged values (its state was restored and its
learning is already in an earlier contribution). A task whose contribution was
read back (``replace``) before it is updated is always treated as ``"own"``.

>>> from river import linear_model
>>> a, b = linear_model.LinearRegression(), linear_model.LinearRegression()
>>> merger = Merger(mode="sum")
>>> a.learn_one({"x": 1.0}, 2.0); b.learn_one({"y": 1.0}, 2.0)
>>> merged = merger.merge({0: model_params(a), 1: model_params(b)})
>>> assign_model_params(a, merged); assign_model_params(b, merged)
>>> a.weights == b.weights and sorted(a.weights) == ["x", "y"]
True
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from river import compose, linear_model, preprocessing

__all__ = [
    "GlobalParams",
    "HSTWindow",
    "Merger",
    "Mode",
    "Params",
    "Table",
    "Value",
    "assign_count_params",
    "assign_hst_params",
    "assign_model_params",
    "count_params",
    "hst_params",
    "linear_parts",
    "model_params",
    "scalar",
    "scaler_parts",
]



@dataclass(slots=True)
class Table:
    """Vectors keyed by id held as one matrix (item latent factors): merged row by row as if each
    id were a key of its own, in array operations instead of thousands of small ones.

    >>> t = Table(["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> _table_add(t, Table(["b", "c"], np.ones((2, 2))), 1.0).ids
    ['a', 'b', 'c']
    """

    ids: list[str]
    #: One row per id.
    matrix: np.ndarray

    def index(self) -> dict[str, int]:
        return {i: r for r, i in enumerate(self.ids)}

    def __sub__(self, other: Any) -> Table:
        return _table_minus(self, other) if isinstance(other, Table) else self

    def __rsub__(self, other: Any) -> Table:  # 0 - table (a key the reference lacks)
        return Table(list(self.ids), -self.matrix)


#: A parameter: a number, a vector (float64, one dimension) or a table of vectors.
Value = float | np.ndarray | Table


def scalar(value: Value) -> float:
    """A parameter that must be a number (a counter, a weight)."""
    if isinstance(value, Table):
        raise TypeError("a table where a number was expected")
    return float(value)


def _table_minus(current: Table, reference: Table) -> Table:
    """Row by row ``current - reference`` over the ids ``current`` holds (new ids: from zero)."""
    ref = reference.index()
    rows = np.fromiter((ref.get(i, -1) for i in current.ids), dtype=np.intp, count=len(current.ids))
    out = current.matrix.copy()
    known = rows >= 0
    if known.any():
        out[known] -= reference.matrix[rows[known]]
    return Table(list(current.ids), out)


def _table_add(into: Table | None, delta: Table, scale: float) -> Table:
    """``into + scale * delta`` row by row, appending the ids ``into`` lacks (a new table)."""
    step = delta.matrix * scale if scale != 1.0 else delta.matrix
    if into is None:
        return Table(list(delta.ids), step.copy())
    index = into.index()
    ids = list(into.ids)
    rows = []
    for i in delta.ids:
        r = index.get(i)
        if r is None:
            r = index[i] = len(ids)
            ids.append(i)
        rows.append(r)
    matrix = np.zeros((len(ids), into.matrix.shape[1]))
    matrix[: len(into.ids)] = into.matrix
    np.add.at(matrix, rows, step)
    return Table(ids, matrix)
Mode = Literal["sum", "average"]
Fresh = Literal["zero", "own"]

_LINEAR = (linear_model.LinearRegression, linear_model.LogisticRegression)


@dataclass(slots=True)
class Params:
    """One learner's global parameters, by family (see the module doc). Keys are strings."""

    weights: dict[str, Value] = field(default_factory=dict)
    counts: dict[str, Value] = field(default_factory=dict)
    decayed: dict[str, float] = field(default_factory=dict)
    #: Reference time (ms) and time constant of ``decayed`` (0: no decayed values).
    ref_ms: float = 0.0
    tau_ms: float = 0.0

    def __len__(self) -> int:
        return len(self.weights) + len(self.counts) + len(self.decayed)

    def update(self, other: Params) -> None:
        """Take ``other``'s values next to (and over) these (several parts of one learner)."""
        self.weights.update(other.weights)
        self.counts.update(other.counts)
        if other.decayed:
            self.decayed.update(rescaled(other.decayed, other.ref_ms, self.ref_ms or other.ref_ms, other.tau_ms))
            self.ref_ms, self.tau_ms = self.ref_ms or other.ref_ms, other.tau_ms


#: The merged parameters of every learner, by learner name.
GlobalParams = dict[str, Params]


def rescaled(values: Mapping[str, float], ref_ms: float, to_ms: float, tau_ms: float) -> dict[str, float]:
    """Forward-decayed ``values`` at ``ref_ms`` expressed at ``to_ms``.

    >>> rescaled({"a": 2.0}, 0.0, 1000.0, 1000.0)["a"] == 2.0 * math.exp(-1.0)
    True
    """
    if ref_ms == to_ms or not values:
        return dict(values)
    factor = math.exp((ref_ms - to_ms) / tau_ms)
    return {k: v * factor for k, v in values.items()}


def _add(into: dict[str, Value], delta: Mapping[str, Value], scale: float = 1.0) -> None:
    for k, d in delta.items():
        if isinstance(d, Table):
            before = into.get(k)
            into[k] = _table_add(before if isinstance(before, Table) else None, d, scale)
        else:
            into[k] = into.get(k, 0.0) + (d * scale if scale != 1.0 else d)  # type: ignore[operator]


def _minus(current: Mapping[str, Value], reference: Mapping[str, Value]) -> dict[str, Value]:
    """``current - reference`` over the keys ``current`` holds (a key it no longer holds, an
    evicted item, changes nothing; a key it holds that ``reference`` lacks started at zero)."""
    out: dict[str, Value] = {}
    for k, v in current.items():
        r = reference.get(k)
        out[k] = v if r is None else v - r  # type: ignore[operator]
    return out


class _Task:
    __slots__ = ("contribution", "reference")

    def __init__(self) -> None:
        #: Cumulative: the task's weights, counts and decayed deltas, summed.
        self.contribution = Params()
        #: What the task held right after it was last given merged values (None: never).
        self.reference: Params | None = None


class Merger:
    """Merges one learner's ``Params`` across tasks (see the module doc)."""

    def __init__(self, mode: Mode = "sum", fresh: Fresh = "zero") -> None:
        self.mode: Mode = mode
        self.fresh: Fresh = fresh
        self.merges = 0
        self._tasks: dict[int, _Task] = {}

    def tasks(self) -> list[int]:
        return sorted(self._tasks)

    def contribution(self, task: int) -> Params:
        """The task's cumulative contribution (what a sync topic stores under its key)."""
        return self._tasks[task].contribution

    def replace(self, task: int, contribution: Params) -> None:
        """Take ``contribution`` as the task's (read back from a sync topic: a newer one replaces the
        older; another instance's task, or a task this instance takes over)."""
        state = self._tasks.setdefault(task, _Task())
        state.contribution = contribution

    def update(self, task: int, current: Params) -> None:
        """Add what the task learned since it was last given merged values to its contribution."""
        state = self._tasks.get(task)
        if state is None:
            state = self._tasks[task] = _Task()
            if self.fresh == "own":
                state.reference = current
        elif state.reference is None and len(state.contribution):
            state.reference = current  # read back: its learning is already in the contribution
        c = state.contribution
        ref = state.reference or Params()
        _add(c.weights, _minus(current.weights, ref.weights))
        _add(c.counts, _minus(current.counts, ref.counts))
        if current.decayed:
            to = max(c.ref_ms, current.ref_ms, ref.ref_ms)
            tau = current.tau_ms
            mine = rescaled(c.decayed, c.ref_ms, to, tau) if c.decayed else {}
            now = rescaled(current.decayed, current.ref_ms, to, tau)
            before = rescaled(ref.decayed, ref.ref_ms, to, tau) if ref.decayed else {}
            _add(mine, _minus(now, before))  # type: ignore[arg-type]
            c.decayed, c.ref_ms, c.tau_ms = mine, to, tau  # type: ignore[assignment]

    def applied(self, task: int, held: Params) -> None:
        """What the task holds right after it was given merged values: its next delta's reference."""
        self._tasks.setdefault(task, _Task()).reference = held

    def merged(self) -> Params:
        """The merged parameters: the contributions of every task known, by family."""
        out = Params()
        parts = [t.contribution for t in self._tasks.values()]
        with_weights = [p for p in parts if p.weights]
        scale = 1.0 / len(with_weights) if self.mode == "average" and with_weights else 1.0
        for p in with_weights:
            _add(out.weights, p.weights, scale)
        for p in parts:
            _add(out.counts, p.counts)
        decayed = [p for p in parts if p.decayed]
        if decayed:
            to = max(p.ref_ms for p in decayed)
            acc: dict[str, Value] = {}
            for p in decayed:
                _add(acc, rescaled(p.decayed, p.ref_ms, to, p.tau_ms))
            out.decayed, out.ref_ms, out.tau_ms = acc, to, decayed[0].tau_ms  # type: ignore[assignment]
        return out

    def merge(self, current: Mapping[int, Params]) -> Params:
        """Update every task of ``current`` and return the merged parameters (one process: the
        caller gives them to the tasks, then reports what they hold with ``applied``)."""
        for task, params in current.items():
            self.update(task, params)
        self.merges += 1
        return self.merged()


# -- River models ----------------------------------------------------------------------------


def linear_parts(model: Any) -> Iterator[Any]:
    """The linear models inside ``model``: itself, a pipeline's steps, an adaptive model's current one."""
    if isinstance(model, compose.Pipeline):  # first: a pipeline passes isinstance for its last step's class
        for step in model.steps.values():
            yield from linear_parts(step)
    elif isinstance(model, _LINEAR):
        yield model
    elif hasattr(model, "current"):  # stream.drift.AdaptiveModel: the model that serves
        yield from linear_parts(model.current)


def scaler_parts(model: Any) -> Iterator[preprocessing.StandardScaler]:
    """The (unwindowed) standard scalers inside ``model``, as ``linear_parts`` finds linear models."""
    if isinstance(model, compose.Pipeline):
        for step in model.steps.values():
            yield from scaler_parts(step)
    elif isinstance(model, preprocessing.StandardScaler):
        if model.window_size is None:  # a rolling scaler's moments are not additive
            yield model
    elif hasattr(model, "current"):
        yield from scaler_parts(model.current)


def model_params(model: Any) -> Params:
    """The linear weights and intercepts (``weights``) and the scalers' moments (``counts``: count,
    sum and sum of squares per feature, so pooling them is exact) of a River model. Only string
    feature names are synced (they round-trip through a key); the ``i``-th part is ``l<i>|``."""
    out = Params()
    w = out.weights
    for i, part in enumerate(linear_parts(model)):
        prefix = f"l{i}|"
        for feature, value in part._weights.items():
            if isinstance(feature, str):
                w[prefix + feature] = float(value)
        w[prefix] = float(part.intercept)  # features are never "": the intercept's slot
    c = out.counts
    for j, scaler in enumerate(scaler_parts(model)):
        means, variances = scaler.means, scaler.vars
        for feature, n in scaler.counts.items():
            if isinstance(feature, str) and n:
                m = means[feature]
                c[f"s{j}n|{feature}"] = float(n)
                c[f"s{j}s|{feature}"] = n * m
                c[f"s{j}q|{feature}"] = n * (variances[feature] + m * m)
    return out


def assign_model_params(model: Any, params: Params) -> None:
    """Set what ``model_params`` reads from ``params`` (keys of other parts are ignored)."""
    by_part: dict[str, dict[str, Value]] = {}
    for key, value in params.weights.items():
        head, sep, feature = key.partition("|")
        if sep and head[:1] == "l":
            by_part.setdefault(head, {})[feature] = value
    for i, part in enumerate(linear_parts(model)):
        values = by_part.get(f"l{i}")
        if not values:
            continue
        weights = part._weights
        for feature, value in values.items():
            if feature:
                weights[feature] = scalar(value)
            else:
                part.intercept = scalar(value)
    moments: dict[str, dict[str, list[float]]] = {}
    for key, value in params.counts.items():
        head, sep, feature = key.partition("|")
        if sep and head[:1] == "s" and len(head) >= 3:
            slot = moments.setdefault(head[:-1], {}).setdefault(feature, [0.0, 0.0, 0.0])
            slot["nsq".index(head[-1])] = scalar(value)
    for j, scaler in enumerate(scaler_parts(model)):
        for feature, (n, s, q) in moments.get(f"s{j}", {}).items():
            if n < 0.5:
                continue
            m = s / n
            scaler.counts[feature] = round(n)
            scaler.means[feature] = m
            scaler.vars[feature] = max(q / n - m * m, 0.0)


def count_params(counters: Mapping[str, float]) -> Params:
    """Plain counters (label counts, outcomes) as ``counts`` keyed ``c|<name>``.

    >>> count_params({"labels": 3}).counts
    {'c|labels': 3.0}
    """
    return Params(counts={f"c|{name}": float(v) for name, v in counters.items()})


def assign_count_params(params: Params, names: Iterator[str] | tuple[str, ...]) -> dict[str, float]:
    """The merged counters named ``names`` that ``params`` holds (read back what ``count_params`` wrote)."""
    out: dict[str, float] = {}
    for name in names:
        v = params.counts.get(f"c|{name}")
        if v is not None:
            out[name] = scalar(v)
    return out


# -- Half-Space Trees ---------------------------------------------------------------------------

_L_MASS, _R_MASS = operator.attrgetter("l_mass"), operator.attrgetter("r_mass")

#: The counter of a detector whose windows the sync closes: River's own pivot (at
#: ``counter == window_size``) never comes.
_NEVER = -(2**62)


@dataclass(slots=True)
class HSTWindow:
    """Where the current window of a synced ``river.anomaly.HalfSpaceTrees`` starts: the merged
    cumulative masses (one array over every node of every tree) and sample count at its start."""

    masses: np.ndarray
    count: float
    #: Which trees (``_hst_key``) and their nodes, found once (the trees never change shape).
    key: str
    nodes: list[Any]


def _nodes(detector: Any) -> list[Any]:
    return [node for tree in detector._tree_nodes for node in tree]


def _hst_key(nodes: list[Any]) -> str:
    """Masses merge only between identical trees (same seed and features): the key says which."""
    shape = repr([(getattr(n, "feature", None), getattr(n, "threshold", None)) for n in nodes]).encode()
    return f"h|{zlib.crc32(shape):08x}"


def hst_params(detector: Any, window: HSTWindow | None) -> Params:
    """A Half-Space Trees detector's masses as cumulative counts (additive across tasks, whatever
    window each task is in): ``h|<trees>`` the masses learned since the start, ``h|<trees>|n`` how
    many samples. Before its first sync (``window`` None) a detector holds its reference window and
    its current one (older windows are gone, and do not matter: only differences are used)."""
    nodes = window.nodes if window is not None else _nodes(detector)
    if not nodes:
        return Params()
    key = window.key if window is not None else _hst_key(nodes)
    current = np.fromiter(map(_L_MASS, nodes), dtype=np.float64, count=len(nodes))
    if window is None:
        first = detector._first_window
        if not first:
            current += np.fromiter(map(_R_MASS, nodes), dtype=np.float64, count=len(nodes))
        count = float(detector.counter + (0 if first else detector.window_size))
        return Params(counts={key: current, key + "|n": count})
    return Params(counts={key: window.masses + current, key + "|n": window.count + float(detector.counter - _NEVER)})


def assign_hst_params(detector: Any, params: Params, window: HSTWindow | None) -> HSTWindow | None:
    """Set the detector's window from the merged masses (what ``hst_params`` wrote, summed over the
    tasks): once the merged window holds ``window_size`` samples it becomes the reference (scaled to
    ``window_size`` samples, as one detector's would hold) and a new window starts. From then on the
    sync closes the windows, for every task at once. Returns the window to pass next time."""
    nodes = window.nodes if window is not None else _nodes(detector)
    if not nodes:
        return window
    key = window.key if window is not None else _hst_key(nodes)
    total, count = params.counts.get(key), params.counts.get(key + "|n")
    if not isinstance(total, np.ndarray) or total.shape != (len(nodes),) or count is None:
        return window
    start = window if window is not None else HSTWindow(np.zeros(len(nodes)), 0.0, key, nodes)
    masses, n = total - start.masses, scalar(count) - start.count
    size = detector.window_size
    if n >= size:
        reference = masses * (size / n)
        for node, r in zip(nodes, reference.tolist(), strict=True):
            node.r_mass = r
            node.l_mass = 0.0
        detector._first_window = False
        start, n = HSTWindow(np.array(total, dtype=np.float64), scalar(count), key, nodes), 0.0
    else:
        for node, m in zip(nodes, masses.tolist(), strict=True):
            node.l_mass = m
    detector.counter = _NEVER + round(n)
    return start
