"""Prequential evaluation: how good were the predictions that were actually made.

Each learner owns one ``Evaluation``. When the outcome of a prediction is
known (at once, or when a delayed label arrives), the learner reports the
prediction and the outcome; the evaluation keeps every quality metric both
cumulative and over a rolling window of the last ``window`` outcomes, and
feeds the per-prediction error to a concept-drift detector (``stream.drift``).

Quality is read at scrape time through ``values()``, never on the hot path.

>>> ev = Evaluation.for_binary(window=100)
>>> for p, y in [(0.9, True), (0.2, False), (0.7, False), (0.6, True)]:
...     ev.binary(y, p, ts=0)
>>> round(ev.get("accuracy", "cumulative"), 2), round(ev.get("roc_auc", "rolling"), 2)
(0.75, 0.75)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any

from river import metrics, utils

__all__ = ["Evaluation", "RunningMean"]

_EPS = 1e-15


class _Windowed:
    """One metric, cumulative and rolling."""

    __slots__ = ("cumulative", "rolling")

    def __init__(self, metric: type[metrics.base.Metric], window: int) -> None:
        self.cumulative: Any = metric()
        self.rolling: Any = utils.Rolling(metric, window_size=window)

    def update(self, y_true: Any, y_pred: Any) -> None:
        self.cumulative.update(y_true, y_pred)
        self.rolling.update(y_true, y_pred)


class _Mean:
    """A running mean, cumulative and over the last ``window`` values (for ratios
    such as hit-rate). A ring buffer with a running sum: O(1) per value, where
    ``utils.Rolling(stats.Mean)`` reverts a River statistic through a deque.

    >>> m = _Mean(window=2)
    >>> for v in (1.0, 0.0, 0.0):
    ...     m.update(v)
    >>> round(m.cumulative.get(), 3), m.rolling.get()
    (0.333, 0.0)
    """

    __slots__ = ("cumulative", "rolling")

    def __init__(self, window: int) -> None:
        self.cumulative = RunningMean()
        self.rolling = _RingMean(window)

    def update(self, value: float) -> None:
        self.cumulative.update(value)
        self.rolling.update(value)


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


class _RingMean:
    __slots__ = ("i", "n", "total", "values")

    def __init__(self, window: int) -> None:
        self.values = [0.0] * window
        self.i = 0
        self.n = 0
        self.total = 0.0

    def update(self, value: float) -> None:
        values, i = self.values, self.i
        self.total += value - values[i]
        values[i] = value
        i += 1
        if i == len(values):
            i = 0
            self.total = math.fsum(values)  # once per window: no rounding drift from the running sum
        self.i = i
        if self.n < len(values):
            self.n += 1

    def get(self) -> float:
        return self.total / self.n if self.n else 0.0


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
    """

    _hold_ms = 0
    _held: list[tuple[int, int, float, Any]] | None = None
    _held_seq = 0

    def __init__(self, window: int, drift: Any = None) -> None:
        self.window = window
        self.drift = drift
        self.n_evaluated = 0
        self._metrics: dict[str, _Windowed] = {}
        self._means: dict[str, _Mean] = {}

    # -- construction ------------------------------------------------------------

    @classmethod
    def for_binary(cls, window: int, drift: Any = None) -> Evaluation:
        ev = cls(window, drift)
        for name, m in (("roc_auc", metrics.ROCAUC), ("log_loss", metrics.LogLoss), ("accuracy", metrics.Accuracy)):
            ev._metrics[name] = _Windowed(m, window)
        ev._means["predicted_rate"] = _Mean(window)
        ev._means["observed_rate"] = _Mean(window)
        return ev

    @classmethod
    def for_multiclass(cls, window: int, drift: Any = None) -> Evaluation:
        ev = cls(window, drift)
        ev._metrics["accuracy"] = _Windowed(metrics.Accuracy, window)
        ev._metrics["log_loss"] = _Windowed(metrics.CrossEntropy, window)
        return ev

    @classmethod
    def for_regression(cls, window: int, drift: Any = None) -> Evaluation:
        ev = cls(window, drift)
        ev._metrics["mae"] = _Windowed(metrics.MAE, window)
        ev._metrics["rmse"] = _Windowed(metrics.RMSE, window)
        return ev

    @classmethod
    def for_means(cls, window: int, names: tuple[str, ...], drift: Any = None) -> Evaluation:
        """Quality as running means of per-outcome scores (hit-rate@k, uplift)."""
        ev = cls(window, drift)
        for name in names:
            ev._means[name] = _Mean(window)
        return ev

    # -- updates (called when an outcome is known) -------------------------------

    def order_outcomes(self, hold_ms: int) -> Evaluation:
        """Feed the drift monitor in prediction order (see the class); returns self."""
        self._hold_ms = int(hold_ms)
        self._held = []
        return self

    def binary(self, y_true: bool, p_true: float, ts: int, predicted_ts: int | None = None) -> None:
        p = min(max(p_true, _EPS), 1 - _EPS)
        proba = {True: p, False: 1 - p}
        m = self._metrics
        m["roc_auc"].update(y_true, proba)
        m["log_loss"].update(y_true, p)
        m["accuracy"].update(y_true, p >= 0.5)
        self._means["predicted_rate"].update(p)
        self._means["observed_rate"].update(float(y_true))
        # The outcome too: a detector that supports it (cusum) watches the surprise of
        # each outcome given its probability, not the mean error (drowned by the common class).
        self._error(-math.log(p if y_true else 1 - p), ts, (bool(y_true), p), predicted_ts)

    def multiclass(self, y_true: Any, proba: dict[Any, float], ts: int) -> None:
        y_pred = max(proba, key=proba.__getitem__) if proba else None
        self._metrics["accuracy"].update(y_true, y_pred)
        self._metrics["log_loss"].update(y_true, proba)
        self._error(0.0 if y_pred == y_true else 1.0, ts)

    def regression(self, y_true: float, y_pred: float, ts: int) -> None:
        self._metrics["mae"].update(y_true, y_pred)
        self._metrics["rmse"].update(y_true, y_pred)
        self._error(abs(y_true - y_pred), ts)

    def score(self, name: str, value: float) -> None:
        """Add one observation of a mean-type metric (not an error: no drift update)."""
        self._means[name].update(value)

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
        if name == "roc_auc" and name in self._metrics:
            seen = self._means["observed_rate"]
            rate = (seen.cumulative if window == "cumulative" else seen.rolling).get()
            if not 0.0 < rate < 1.0:
                return math.nan
        m = self._metrics.get(name)
        if m is not None:
            return float((m.cumulative if window == "cumulative" else m.rolling).get())
        mean = self._means[name]
        return float((mean.cumulative if window == "cumulative" else mean.rolling).get())

    def values(self) -> Iterator[tuple[str, str, float]]:
        """``(metric, window, value)`` for every metric, window in {cumulative, rolling};
        the value is NaN while undefined (exported as nothing, printed as n/a)."""
        for name in (*self._metrics, *self._means):
            for window in ("cumulative", "rolling"):
                yield name, window, self.get(name, window)
