"""Prequential evaluation: how good were the predictions that were actually made.

Each learner owns one ``Evaluation``. When the outcome of a prediction is
known (at once, or when a delayed label arrives), the learner reports the
prediction and the outcome; the evaluation keeps every quality metric both
cumulative and over a rolling window of the last ``window`` outcomes, and
feeds the per-prediction error to a concept-drift detector (``stream.drift``).

Each outcome costs O(1), whatever the window: the means (MAE, RMSE, log loss,
accuracy, rates, scores) are running sums plus a ring buffer of the last
``window`` per-outcome values, and ROC AUC is counted per score bucket
(``_AUC``), where River's metric objects under ``utils.Rolling`` revert an
update through a deque per outcome (and ``ROCAUC`` updates 10 confusion
matrices). Quality is read at scrape time through ``values()``, never on the
hot path.

>>> ev = Evaluation.for_binary(window=100)
>>> for p, y in [(0.9, True), (0.2, False), (0.7, False), (0.6, True)]:
...     ev.binary(y, p, ts=0)
>>> round(ev.get("accuracy", "cumulative"), 2), round(ev.get("roc_auc", "rolling"), 2)
(0.75, 0.75)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

__all__ = ["AUC_BUCKETS", "AUC_LOGIT_RANGE", "Evaluation", "RunningMean"]

_EPS = 1e-15

#: ROC AUC buckets: uniform in log-odds over +-``AUC_LOGIT_RANGE`` (p from 1.1e-7 to 1 - 1.1e-7),
#: 1/128 of a unit of log-odds wide (odds within 0.8 % of each other may share one).
AUC_BUCKETS = 4096
AUC_LOGIT_RANGE = 16.0
_PER_LOGIT = AUC_BUCKETS / (2 * AUC_LOGIT_RANGE)


class _Stat(Protocol):
    def get(self, window: str) -> float: ...


class _Avg:
    """The mean of a per-outcome value (an absolute error, a loss, 1 for a hit), cumulative
    and over the last ``window`` values: running sums and a ring buffer, O(1) per value.

    >>> m = _Avg(window=2)
    >>> for v in (1.0, 0.0, 0.0):
    ...     m.add(v)
    >>> round(m.get("cumulative"), 3), m.get("rolling")
    (0.333, 0.0)
    """

    __slots__ = ("full", "i", "n", "ring", "ring_total", "total")

    def __init__(self, window: int) -> None:
        self.n = 0
        self.total = 0.0
        self.ring = [0.0] * window
        self.i = 0
        self.full = False
        self.ring_total = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        ring, i = self.ring, self.i
        self.ring_total += value - ring[i]
        ring[i] = value
        i += 1
        if i == len(ring):
            i = 0
            self.full = True
            self.ring_total = math.fsum(ring)  # once per window: no rounding drift from the running sum
        self.i = i

    def get(self, window: str) -> float:
        if window == "cumulative":
            return self.total / self.n if self.n else 0.0
        n = len(self.ring) if self.full else self.i
        return self.ring_total / n if n else 0.0

    def restore(self, n: float, total: float, recent: Sequence[float]) -> None:
        """Set the state: ``n`` values summing to ``total`` so far, the last of them ``recent`` (oldest first)."""
        keep = list(recent[len(recent) - len(self.ring) :] if len(recent) > len(self.ring) else recent)
        self.n, self.total = round(n), float(total)
        self.ring[: len(keep)] = keep
        self.full = len(keep) == len(self.ring)
        self.i = 0 if self.full else len(keep)
        self.ring_total = math.fsum(keep)


class _Root(_Avg):
    """The square root of the mean (RMSE from squared errors)."""

    __slots__ = ()

    def get(self, window: str) -> float:
        return math.sqrt(super().get(window))


class _AUC:
    """ROC AUC from counts of positives and negatives per score bucket, cumulative and over the
    last ``window`` outcomes: O(1) per outcome, O(``AUC_BUCKETS``) per read (scrape time).

    Buckets are uniform in log-odds, so a rare class scored near p = 0.001 is told apart as
    finely as scores near 0.5. Two outcomes in one bucket count as a tie (half a correctly
    ordered pair): the value differs from the exact AUC (Mann-Whitney, ties counted half) by
    at most half the share of positive-negative pairs that share a bucket without being tied
    (scores whose odds are within 0.8 % of each other, or both beyond p = 1.1e-7 or 1 - 1.1e-7).
    NaN while the window holds only one class.

    >>> auc = _AUC(window=2)
    >>> for y, p in [(True, 0.9), (False, 0.2), (True, 0.3), (False, 0.8)]:
    ...     auc.add(y, p)
    >>> auc.get("cumulative"), auc.get("rolling")
    (0.75, 0.0)
    """

    __slots__ = ("i", "neg", "pos", "ring", "rneg", "rpos")

    def __init__(self, window: int) -> None:
        self.pos = [0] * AUC_BUCKETS
        self.neg = [0] * AUC_BUCKETS
        self.rpos = [0] * AUC_BUCKETS
        self.rneg = [0] * AUC_BUCKETS
        #: The last ``window`` outcomes: bucket + 1 for a positive, -(bucket + 1) for a negative, 0 empty.
        self.ring = [0] * window
        self.i = 0

    def add(self, positive: bool, p: float) -> None:
        """One outcome, ``p`` strictly between 0 and 1."""
        b = int((math.log(p / (1.0 - p)) + AUC_LOGIT_RANGE) * _PER_LOGIT)  # bucket(p), inlined: per outcome
        if b < 0:
            b = 0
        elif b >= AUC_BUCKETS:
            b = AUC_BUCKETS - 1
        ring, i = self.ring, self.i
        old = ring[i]
        if old > 0:
            self.rpos[old - 1] -= 1
        elif old < 0:
            self.rneg[-old - 1] -= 1
        if positive:
            self.pos[b] += 1
            self.rpos[b] += 1
            ring[i] = b + 1
        else:
            self.neg[b] += 1
            self.rneg[b] += 1
            ring[i] = -b - 1
        i += 1
        self.i = 0 if i == len(ring) else i

    def get(self, window: str) -> float:
        pos, neg = (self.pos, self.neg) if window == "cumulative" else (self.rpos, self.rneg)
        n_pos, n_neg = sum(pos), sum(neg)
        if not n_pos or not n_neg:
            return math.nan
        below = 0
        ordered = 0.0
        for p, n in zip(pos, neg, strict=True):
            if p:
                ordered += p * (below + 0.5 * n)
            below += n
        return ordered / (n_pos * n_neg)

    def restore(self, pos: Sequence[int], neg: Sequence[int], recent: Sequence[tuple[bool, float]]) -> None:
        """Set the state: counts per bucket so far, the last outcomes ``recent`` (oldest first)."""
        self.__init__(len(self.ring))  # type: ignore[misc]
        for y, p in recent[max(0, len(recent) - len(self.ring)) :]:
            self.add(y, p)
        self.pos, self.neg = list(pos), list(neg)  # ``recent`` is part of them already


def bucket(p: float) -> int:
    """The ROC AUC bucket of probability ``p`` (0 < p < 1).

    >>> bucket(0.5) == AUC_BUCKETS // 2, bucket(1e-9), bucket(1 - 1e-9) == AUC_BUCKETS - 1
    (True, 0, True)
    """
    b = int((math.log(p / (1.0 - p)) + AUC_LOGIT_RANGE) * _PER_LOGIT)
    return min(max(b, 0), AUC_BUCKETS - 1)


class RunningMean:
    """A plain cumulative mean (River's ``stats.Mean`` is a Welford update per value)."""

    __slots__ = ("n", "total")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0

    def update(self, value: float) -> None:
        self.n += 1
        self.total += value

    def get(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def mean(self) -> float | None:
        """None before the first value."""
        return self.total / self.n if self.n else None


class Evaluation:
    """Quality metrics of one learner, plus the error stream for drift detection.

    With ``hold_ms`` (``order_outcomes``), outcomes reported with the event
    time of their prediction reach the drift monitor in *prediction* order:
    a label that arrives before its window closes (a conversion, a
    chargeback) is held until ``predicted_ts + hold_ms``, when the outcomes
    of the predictions made at the same time without a label (negatives,
    known when the window closes) arrive too. Without it, delayed labels
    put the positives of every moment ahead of its negatives, and the error
    stream swings with the traffic although the model does not change.

    A checkpoint pickled before the O(1) metrics (River metric objects) loads
    into this form (``__setstate__``): the means and their windows carry over
    exactly; the cumulative ROC AUC keeps the 10-threshold resolution River had
    for the outcomes before the upgrade, its window is counted again exactly.
    """

    _hold_ms = 0
    _held: list[tuple[int, int, float, Any]] | None = None
    _held_seq = 0
    # The statistics one kind of evaluation updates per outcome (set by its constructor).
    _auc: _AUC
    _log_loss: _Avg
    _accuracy: _Avg
    _predicted: _Avg
    _observed: _Avg
    _abs_error: _Avg
    _sq_error: _Root

    def __init__(self, window: int, drift: Any = None) -> None:
        self.window = window
        self.drift = drift
        self.n_evaluated = 0
        #: Every metric by name, in the order ``values()`` reports them.
        self._stats: dict[str, _Stat] = {}

    # -- construction ------------------------------------------------------------

    @classmethod
    def for_binary(cls, window: int, drift: Any = None) -> Evaluation:
        ev = cls(window, drift)
        ev._auc, ev._log_loss, ev._accuracy = _AUC(window), _Avg(window), _Avg(window)
        ev._predicted, ev._observed = _Avg(window), _Avg(window)
        ev._stats.update(
            roc_auc=ev._auc, log_loss=ev._log_loss, accuracy=ev._accuracy,
            predicted_rate=ev._predicted, observed_rate=ev._observed,
        )  # fmt: skip
        return ev

    @classmethod
    def for_multiclass(cls, window: int, drift: Any = None) -> Evaluation:
        ev = cls(window, drift)
        ev._accuracy, ev._log_loss = _Avg(window), _Avg(window)
        ev._stats.update(accuracy=ev._accuracy, log_loss=ev._log_loss)
        return ev

    @classmethod
    def for_regression(cls, window: int, drift: Any = None) -> Evaluation:
        ev = cls(window, drift)
        ev._abs_error, ev._sq_error = _Avg(window), _Root(window)
        ev._stats.update(mae=ev._abs_error, rmse=ev._sq_error)
        return ev

    @classmethod
    def for_means(cls, window: int, names: tuple[str, ...], drift: Any = None) -> Evaluation:
        """Quality as running means of per-outcome scores (hit-rate@k, uplift)."""
        ev = cls(window, drift)
        for name in names:
            ev._stats[name] = _Avg(window)
        return ev

    # -- updates (called when an outcome is known) -------------------------------

    def order_outcomes(self, hold_ms: int) -> Evaluation:
        """Feed the drift monitor in prediction order (see the class); returns self."""
        self._hold_ms = int(hold_ms)
        self._held = []
        return self

    def binary(self, y_true: bool, p_true: float, ts: int, predicted_ts: int | None = None) -> None:
        """One binary outcome; ``p_true`` is clipped to [1e-15, 1 - 1e-15] (log loss stays finite),
        NaN counts as 0.5 (no information)."""
        p = min(max(p_true, _EPS), 1 - _EPS) if p_true == p_true else 0.5
        y = bool(y_true)
        loss = -math.log(p if y else 1 - p)
        self._auc.add(y, p)
        self._log_loss.add(loss)
        self._accuracy.add(1.0 if (p >= 0.5) is y else 0.0)
        self._predicted.add(p)
        self._observed.add(1.0 if y else 0.0)
        # The outcome too: a detector that supports it (cusum) watches the surprise of
        # each outcome given its probability, not the mean error (drowned by the common class).
        self._error(loss, ts, (y, p), predicted_ts)

    def multiclass(self, y_true: Any, proba: dict[Any, float], ts: int) -> None:
        """One outcome of a multiclass prediction: accuracy of the most probable class, and
        cross-entropy, where a class missing from ``proba`` costs -log(1e-15) (River's
        ``CrossEntropy`` counts it as no loss at all)."""
        y_pred = max(proba, key=proba.__getitem__) if proba else None
        correct = y_pred == y_true
        self._accuracy.add(1.0 if correct else 0.0)
        self._log_loss.add(-math.log(min(max(proba.get(y_true, 0.0), _EPS), 1 - _EPS)))
        self._error(0.0 if correct else 1.0, ts)

    def regression(self, y_true: float, y_pred: float, ts: int) -> None:
        error = y_true - y_pred
        absolute = abs(error)
        self._abs_error.add(absolute)
        self._sq_error.add(error * error)
        self._error(absolute, ts)

    def score(self, name: str, value: float) -> None:
        """Add one observation of a mean-type metric (not an error: no drift update)."""
        self._stats[name].add(value)  # type: ignore[attr-defined]

    def error(
        self, error: float, ts: int, outcome: tuple[bool, float] | None = None, predicted_ts: int | None = None
    ) -> None:
        """Report the error of one evaluated prediction (for mean-type evaluations,
        or a binary outcome not scored by the metrics: ``outcome`` = its true class
        and the probability predicted)."""
        self._error(error, ts, outcome, predicted_ts)

    def _error(
        self, error: float, ts: int, outcome: tuple[bool, float] | None = None, predicted_ts: int | None = None
    ) -> None:
        self.n_evaluated += 1
        held = self._held
        if held is not None and self.drift is not None:
            while held and held[0][0] <= ts:
                due, _, e, o = heapq.heappop(held)
                self._feed(e, due, o)
            if predicted_ts is not None and predicted_ts + self._hold_ms > ts:
                self._held_seq += 1
                heapq.heappush(held, (predicted_ts + self._hold_ms, self._held_seq, error, outcome))
                return
        self._feed(error, ts, outcome)

    def _feed(self, error: float, ts: int, outcome: tuple[bool, float] | None) -> None:
        if self.drift is not None:
            if outcome is None:
                self.drift.update(error, ts)
            else:
                self.drift.update(error, ts, outcome)

    # -- reading (scrape time) ---------------------------------------------------

    def get(self, name: str, window: str) -> float:
        """The metric's value, NaN while it is undefined (ROC AUC before both classes were seen).

        >>> ev = Evaluation.for_binary(window=10)
        >>> ev.binary(True, 0.9, ts=0)
        >>> ev.get("roc_auc", "cumulative"), ev.get("accuracy", "cumulative")
        (nan, 1.0)
        """
        return float(self._stats[name].get(window))

    def values(self) -> Iterator[tuple[str, str, float]]:
        """``(metric, window, value)`` for every metric, window in {cumulative, rolling};
        the value is NaN while undefined (exported as nothing, printed as n/a)."""
        for name, stat in self._stats.items():
            for window in ("cumulative", "rolling"):
                yield name, window, float(stat.get(window))

    # -- checkpoints from before the O(1) metrics ----------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_metrics" in state:  # pickled with River metric objects (see the class)
            state = _migrated(state)
        self.__dict__.update(state)


# -- the format before the O(1) metrics: kept so that its pickles load --------------------


class _Windowed:
    """Before: one River metric, cumulative and under ``utils.Rolling`` (only unpickled now)."""

    __slots__ = ("cumulative", "rolling")
    cumulative: Any
    rolling: Any


class _Mean:
    """Before: a ``RunningMean`` and a ``_RingMean`` (only unpickled now)."""

    __slots__ = ("cumulative", "rolling")
    cumulative: RunningMean
    rolling: _RingMean


class _RingMean:
    """Before: the rolling half of ``_Mean`` (only unpickled now)."""

    __slots__ = ("i", "n", "total", "values")
    i: int
    n: int
    total: float
    values: list[float]


def _migrated(old: dict[str, Any]) -> dict[str, Any]:
    """The state of an ``Evaluation`` pickled with River metric objects, in today's form."""
    metrics: dict[str, _Windowed] = old.pop("_metrics")
    means: dict[str, _Mean] = old.pop("_means")
    window = old["window"]
    if "roc_auc" in metrics:
        ev = Evaluation.for_binary(window)
    elif "mae" in metrics:
        ev = Evaluation.for_regression(window)
    elif metrics:
        ev = Evaluation.for_multiclass(window)
    else:
        ev = Evaluation.for_means(window, tuple(means))
    for name, stat in ev._stats.items():
        if name in means:
            _restore_mean(stat, means[name])  # type: ignore[arg-type]
        elif name == "roc_auc":
            _restore_auc(stat, metrics[name])  # type: ignore[arg-type]
        else:
            _restore_metric(stat, name, metrics[name])  # type: ignore[arg-type]
    new = ev.__dict__
    new.update(old)  # window, drift, n_evaluated, the held outcomes
    return new


def _restore_mean(stat: _Avg, old: _Mean) -> None:
    """From a ``RunningMean`` and a ``_RingMean``, or (older) River's ``stats.Mean`` under
    ``utils.Rolling``, which kept the arguments of the window's updates."""
    ring: Any = old.rolling
    if isinstance(ring, _RingMean):
        n = len(ring.values)
        recent = ring.values[: ring.i] if ring.n < n else ring.values[ring.i :] + ring.values[: ring.i]
        stat.restore(old.cumulative.n, old.cumulative.total, recent)
        return
    cumulative: Any = old.cumulative
    stat.restore(cumulative.n, cumulative.get() * cumulative.n, [float(a[0]) for a, _ in ring.window])


def _restore_metric(stat: _Avg, name: str, old: _Windowed) -> None:
    """MAE, RMSE, log loss (binary, multiclass) and accuracy: the cumulative mean and count,
    and the window's per-outcome values computed again from the arguments ``utils.Rolling`` kept."""
    cumulative = old.cumulative
    if name == "accuracy":
        n = cumulative.cm.total_weight
        total = cumulative.get() * n
    else:
        mean = cumulative._mean  # River's MeanMetric: a stats.Mean of the per-outcome values
        n = mean.n
        total = mean.get() * n
    args = [a for a, _ in old.rolling.window]
    if name == "accuracy":
        recent = [1.0 if y == p else 0.0 for y, p in args]
    elif name == "mae":
        recent = [abs(y - p) for y, p in args]
    elif name == "rmse":
        recent = [(y - p) ** 2 for y, p in args]
    else:  # log_loss: binary (y, p) or multiclass (y, {class: p})
        recent = [-math.log(min(max(_proba(y, p), _EPS), 1 - _EPS)) for y, p in args]
    stat.restore(n, total, recent)


def _proba(y: Any, p: Any) -> float:
    if isinstance(p, dict):
        return float(p.get(y, 0.0))
    return float(p) if y else 1.0 - float(p)


def _restore_auc(stat: _AUC, old: _Windowed) -> None:
    """River's ``ROCAUC`` counted, per threshold, the predictions above it: the counts between
    two thresholds go to the bucket of their midpoint (the same AUC as River's trapezoids)."""
    cumulative = old.cumulative
    thresholds, cms = cumulative.thresholds, cumulative.cms
    pos, neg = [0] * AUC_BUCKETS, [0] * AUC_BUCKETS
    for k in range(len(thresholds) - 1):
        b = bucket(min(max((thresholds[k] + thresholds[k + 1]) / 2, _EPS), 1 - _EPS))
        pos[b] += round(cms[k].true_positives(True) - cms[k + 1].true_positives(True))
        neg[b] += round(cms[k].false_positives(True) - cms[k + 1].false_positives(True))
    recent = []
    for (y, proba), _ in old.rolling.window:
        p = proba.get(True, 0.0) if isinstance(proba, dict) else proba
        recent.append((bool(y), min(max(float(p), _EPS), 1 - _EPS)))
    stat.restore(pos, neg, recent)
