"""Drift: concept drift on a learner's error stream, data drift on its inputs,
and the reaction to a confirmed concept drift.

Three pieces, each cheap on the hot path:

* ``ConceptDrift`` watches the per-prediction error a learner's ``Evaluation``
  feeds it, counts detections and says whether the error went up (``worse``:
  the concept changed under the model) or down (``better``: usually the model
  still learning).
* ``AdaptiveModel`` wraps a River model behind the same ``learn_one`` /
  ``predict_one`` / ``predict_proba_one`` interface *and* the ``ConceptDrift``
  interface. With ``reaction = "switch"`` a confirmed (``worse``) drift starts a
  candidate: a fresh ``clone()`` of the model trained on the recent stream; the
  candidate replaces the serving model once its rolling error beats it, and
  the replaced model is kept as ``fallback``.
* ``psi`` / ``ks`` score data drift between a reference window and the recent
  window of sampled feature values (computed at scrape time by
  ``stream.metrics``, never per event).

Configuration, per learner (``[learners.NAME.drift]``, see ``DriftSpec``)::

    drift = { detector = "adwin", reaction = "switch" }

>>> monitor = ConceptDrift("adwin")
>>> for i in range(3000):
...     _ = monitor.update(0.1 if i < 1500 else 0.9, ts=i)
>>> monitor.detections >= 1 and 1500 <= monitor.last_detection_ts < 1700
True
>>> monitor.last_direction, monitor.worse >= 1
('worse', True)
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

import msgspec
import numpy as np
from river import drift

__all__ = [
    "AdaptiveModel",
    "ConceptDrift",
    "DriftMonitor",
    "DriftSpec",
    "Switch",
    "ks",
    "psi",
]

log = logging.getLogger(__name__)

Detector = Literal["block_cusum", "cusum", "adwin", "page_hinkley", "kswin"]
Reaction = Literal["report", "switch"]
Task = Literal["binary", "multiclass", "regression"]
Direction = Literal["worse", "better"]

#: Probabilities are clipped like ``stream.evaluation`` does, so errors compare.
_EPS = 1e-15


class Cusum:
    """CUSUM charts with a false-alarm rate set by their threshold ``h``.

    Which chart depends on what it is fed:

    * ``update_binary(y, p)``, a binary prediction ``p`` and its outcome ``y``:
      the risk-adjusted Bernoulli CUSUM (Steiner et al., 2000), two-sided. Each
      outcome adds the log-likelihood ratio of "the odds of ``y`` are ``theta``
      times what the model said" against "as the model said", ``S = max(0, S + W)``;
      the upper chart catches positives the model no longer expects (a new fraud
      pattern), the lower one (``1 / theta``) positives it expects that no longer
      come. The model's probabilities are first recalibrated to its own recent
      level (observed over predicted rate over ~``memory`` outcomes), so a model
      that is steadily miscalibrated, or slowly learning, is not a drift: only a
      change faster than ``memory`` is. Every outcome counts with its surprise,
      so a rare class is not drowned by the common one (a plain error mean is).
    * ``update(x)`` with ``x`` in {0, 1} (an error indicator: a missed
      recommendation): the Bernoulli CUSUM of the error rate against its recent
      level (``memory``), upper side only (errors more frequent).
    * ``update(x)``, any other error (an absolute error): a CUSUM of the error
      standardized against its recent mean and deviation, clipped to
      ``[-clip, clip]``, with ``S = max(0, S + z - k)``, upper side only.

    Expected false alarms: the in-control run length grows about exponentially
    with ``h``. Measured on independent outcomes with the reference estimated
    as above (``theta = 2``): at ``h = 10``, at most 1 alarm in 400,000
    outcomes at error rates of 2 % and 30 % and on calibrated binary outcomes
    with p in 1-21 % (``h = 8``: 1-7 alarms, ``h = 12``: none). For the
    standardized chart (``k = 0.5``, ``gaussian_h = 12``) Siegmund's
    approximation gives ~10^6 outcomes. Outcomes that are not independent
    (clustered, or in an order that depends on the outcome) alarm more: see
    ``Evaluation.order_outcomes``. Measured on the simulator: ``bench/quality.py``. After an alarm the statistics and
    the reference start afresh, and ``min_samples`` outcomes are needed
    before the chart tests again.

    >>> c = Cusum()
    >>> alarms = []
    >>> for i in range(8000):
    ...     miss = ((i * 7919) % 100) < (20 if i < 4000 else 40)   # error rate 0.2 -> 0.4
    ...     c.update(float(miss))
    ...     if c.drift_detected:
    ...         alarms.append(i)
    >>> len(alarms) >= 1, 4000 <= alarms[0] < 4300
    (True, True)
    """

    def __init__(
        self,
        theta: float = 2.0,
        h: float = 10.0,
        k: float = 0.5,
        gaussian_h: float = 12.0,
        clip: float = 3.0,
        memory: int = 5000,
        min_samples: int = 500,
    ) -> None:
        if theta <= 1 or h <= 0 or k < 0 or gaussian_h <= 0 or clip <= 0 or memory < 2 or min_samples < 2:
            raise ValueError("cusum: need theta > 1, h, gaussian_h, clip > 0, k >= 0, memory and min_samples >= 2")
        self.theta, self.h, self.k = float(theta), float(h), float(k)
        self.gaussian_h, self.clip = float(gaussian_h), float(clip)
        self.memory, self.min_samples = memory, min_samples
        self._log_up, self._log_down = math.log(theta), -math.log(theta)
        self.drift_detected = False
        self.n_detections = 0
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self._mean = 0.0  # reference: the error's (or the outcome's) recent mean ...
        self._var = 0.0  # ... and variance (standardized chart)
        self._pmean = 0.0  # the predictions' recent mean (binary chart)
        self.upper = 0.0
        self.lower = 0.0

    def _reference(self, x: float, p: float = 0.0) -> None:
        self.n += 1
        a = 1.0 / self.n if self.n <= self.min_samples else 1.0 / self.memory
        d = x - self._mean
        self._mean += a * d
        self._var = (1 - a) * (self._var + a * d * d)
        self._pmean += a * (p - self._pmean)

    def _alarm(self) -> None:
        self.drift_detected = True
        self.n_detections += 1
        self._reset()

    def update(self, x: float, group: Any = None) -> None:
        """One error (River's detector interface)."""
        self.drift_detected = False
        if self.n >= self.min_samples:
            if x == 0.0 or x == 1.0:
                p = min(max(self._mean, 1e-6), 1 - 1e-6)
                w = (self._log_up if x else 0.0) - math.log(1.0 - p + self.theta * p)
                self.upper = max(0.0, self.upper + w)
                if self.upper > self.h:
                    self._alarm()
                    return
            elif self._var > 0:
                z = (x - self._mean) / math.sqrt(self._var)
                z = self.clip if z > self.clip else (-self.clip if z < -self.clip else z)
                self.upper = max(0.0, self.upper + z - self.k)
                if self.upper > self.gaussian_h:
                    self._alarm()
                    return
        self._reference(x)

    def update_binary(self, y: bool, p: float) -> None:
        """One binary outcome ``y`` and the probability ``p`` the model gave it."""
        self.drift_detected = False
        p = min(max(p, 1e-6), 1 - 1e-6)
        if self.n >= self.min_samples and self._pmean > 0:
            # recalibrated to the model's recent level, in odds
            ratio = (self._mean / (1 - self._mean)) / (self._pmean / (1 - self._pmean)) if self._mean < 1 else 1.0
            odds = p / (1 - p) * max(ratio, 1e-6)
            q = odds / (1 + odds)
            theta = self.theta
            up = (self._log_up if y else 0.0) - math.log(1.0 - q + theta * q)
            down = (self._log_down if y else 0.0) - math.log(1.0 - q + q / theta)
            self.upper = max(0.0, self.upper + up)
            self.lower = max(0.0, self.lower + down)
            if self.upper > self.h or self.lower > self.h:
                self._alarm()
                return
        self._reference(1.0 if y else 0.0, p)

    @property
    def width(self) -> int | None:
        return None


#: Siegmund's correction of a CUSUM threshold for the overshoot of a normal chart.
_OVERSHOOT = 1.166


def cusum_arl(h: float, k: float, shift: float = 0.0) -> float:
    """Average run length, in values, of a one-sided CUSUM ``S = max(0, S + z - k)``
    with threshold ``h`` on values ``z ~ N(shift, 1)`` (Siegmund's approximation).

    The exact values (Markov chain) for ``h = 4, k = 0.5`` are 336 and 8.38:

    >>> round(cusum_arl(4.0, 0.5)), round(cusum_arl(4.0, 0.5, shift=1.0), 1)
    (338, 8.3)
    """
    d, b = shift - k, h + _OVERSHOOT
    if abs(d) < 1e-9:
        return b * b
    return (math.exp(-2 * d * b) + 2 * d * b - 1) / (2 * d * d)


def cusum_threshold(arl: float, k: float) -> float:
    """The threshold ``h`` whose in-control average run length (``cusum_arl`` at
    shift 0) is ``arl`` values: the false-alarm rate is set, not tuned.

    >>> h = cusum_threshold(10_000, 0.5)
    >>> round(h, 2), round(cusum_arl(h, 0.5))
    (7.35, 10000)
    """
    if arl <= 1 or k <= 0:
        raise ValueError("cusum_threshold: need arl > 1 and k > 0")
    lo, hi = 0.0, 1.0
    while cusum_arl(hi, k) < arl:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cusum_arl(mid, k) < arl else (lo, mid)
    return hi


class BlockCusum:
    """A one-sided CUSUM on block means of an error, with a false-alarm rate set
    by its in-control average run length ``arl`` (in outcomes).

    Why blocks: the per-outcome errors of a learner are anything but normal
    (0/1 misses, rare costly positives, sessions of correlated outcomes).
    The mean of ``block`` outcomes is near-normal, and its spread measured on
    the stream itself includes the correlation inside a block, so the chart's
    theory (``cusum_threshold``, Siegmund) holds on the signal it watches:
    ``h`` is computed from ``arl / block`` blocks, never tuned to the data.

    The reference (mean, variance, lag-1 autocorrelation of the block means)
    is an exponential average over ~``memory`` blocks, fed ``lag`` blocks
    late, so a change does not leak into its own reference before the chart
    sees it; a slowly learning model (a falling error) is followed. The
    variance is inflated by ``(1 + rho) / (1 - rho)`` for the correlation
    left between blocks (the variance of a sum of AR(1) values). Each block
    mean is standardised, ``z = (b - mean) / sd`` (clipped to ``clip``),
    and ``S = max(0, S + z - k)`` alarms above ``h``: ``k = 0.5`` is the
    optimal reference for a rise of one standard deviation of a block mean.
    The chart tests once ``warmup`` blocks are in the reference; after an
    alarm it starts afresh. Binary outcomes (``update_binary``) are scored
    by their squared error ``(y - p)^2``: bounded, unlike the log loss.

    Detection delay after a rise of ``d`` block standard deviations: about
    ``(h + 1.166) / (d - k)`` blocks (``cusum_arl`` with ``shift=d``).

    >>> import random
    >>> rng, c, alarms = random.Random(0), BlockCusum(block=50, arl=1_000_000), []
    >>> for i in range(20_000):
    ...     c.update(float(rng.random() < (0.2 if i < 10_000 else 0.3)))   # miss rate 0.2 -> 0.3
    ...     if c.drift_detected:
    ...         alarms.append(i)
    >>> len(alarms), 10_000 <= alarms[0] < 11_500
    (1, True)
    """

    def __init__(
        self,
        block: int = 100,
        arl: float = 1_000_000.0,
        k: float = 0.5,
        warmup: int = 20,
        memory: int = 100,
        lag: int = 10,
        clip: float = 4.0,
    ) -> None:
        if block < 1 or warmup < 2 or memory < 2 or lag < 0 or k <= 0 or clip <= k:
            raise ValueError("block_cusum: need block >= 1, warmup and memory >= 2, lag >= 0, 0 < k < clip")
        if arl <= 2 * block:
            raise ValueError(f"block_cusum: arl ({arl}) must exceed two blocks ({2 * block} outcomes)")
        self.block, self.arl, self.k, self.clip = int(block), float(arl), float(k), float(clip)
        self.warmup, self.memory, self.lag = int(warmup), int(memory), int(lag)
        self.h = cusum_threshold(self.arl / self.block, self.k)
        self.drift_detected = False
        self.n_detections = 0
        self._reset()

    def _reset(self) -> None:
        self._sum = 0.0
        self._n = 0
        self._pending: deque[float] = deque()
        self.n_reference = 0
        self.mean = 0.0
        self.var = 0.0
        self._cov = 0.0
        self._dev = 0.0
        self.upper = 0.0
        #: Blocks since the chart last left zero: the estimated start of a change.
        self._run = 0

    def update(self, x: float, group: Any = None) -> None:
        """One outcome's error (River's detector interface)."""
        self.drift_detected = False
        self._sum += x
        self._n += 1
        if self._n == self.block:
            mean, self._sum, self._n = self._sum / self.block, 0.0, 0
            self._add_block(mean)

    def update_binary(self, y: bool, p: float) -> None:
        """One binary outcome ``y`` and the probability ``p`` the model gave it."""
        d = (1.0 if y else 0.0) - p
        self.update(d * d)

    @property
    def sd(self) -> float:
        """The standard deviation a block mean is standardised with."""
        rho = self._cov / self.var if self.var > 0 else 0.0
        rho = min(max(rho, 0.0), 0.9)
        return max(math.sqrt(self.var * (1 + rho) / (1 - rho)), 1e-12)

    def _add_block(self, b: float) -> None:
        if self.n_reference >= self.warmup:
            z = (b - self.mean) / self.sd
            self.upper = max(0.0, self.upper + min(z, self.clip) - self.k)
            self._run = self._run + 1 if self.upper > 0 else 0
            if self.upper > self.h:
                self.drift_detected = True
                self.n_detections += 1
                self._last_width = self._run * self.block
                self._reset()
                return
        pending = self._pending
        pending.append(b)
        if len(pending) > self.lag:
            self._reference(pending.popleft())

    def _reference(self, b: float) -> None:
        n = self.n_reference = self.n_reference + 1
        if n == 1:
            self.mean = b
            return
        a = 1.0 / n if n <= self.memory else 1.0 / self.memory
        # Predictive deviations (from the mean before this block): the noise of
        # the reference itself counts in the spread the chart standardises with.
        d = b - self.mean
        if n == 2:
            self.var = d * d
        else:
            self.var = (1 - a) * self.var + a * d * d
            self._cov = (1 - a) * self._cov + a * d * self._dev
        self._dev = d
        self.mean += a * d

    _last_width: int | None = None

    @property
    def width(self) -> int | None:
        """Outcomes since the chart left zero before its last alarm (where the change began)."""
        return self._last_width


def _detector(kind: Detector, params: dict[str, Any]) -> Any:
    if kind == "block_cusum":
        return BlockCusum(**params)
    if kind == "cusum":
        return Cusum(**params)
    if kind == "adwin":
        return drift.ADWIN(**params)
    if kind == "page_hinkley":
        return drift.PageHinkley(**params)
    if kind == "kswin":
        return drift.KSWIN(**params)
    raise ValueError(f"unknown drift detector `{kind}` (block_cusum, cusum, adwin, page_hinkley, kswin)")


class DriftMonitor(Protocol):
    """What ``Evaluation`` feeds and ``stream.metrics`` reads: a ``ConceptDrift``
    or an ``AdaptiveModel``."""

    @property
    def detections(self) -> int: ...
    @property
    def last_detection_ts(self) -> int | None: ...
    def update(self, error: float, ts: int, outcome: tuple[bool, float] | None = None) -> bool: ...


class ConceptDrift:
    """Counts concept drifts detected on an error stream, with the event time of the last.

    Every detection is classified by the direction of the error: ``worse``
    when the recent error (an exponential average over ~``recent_span``
    outcomes) is above the mean error since the previous detection, else
    ``better``. Only ``worse`` is a concept drift worth reacting to: a model
    that is still learning makes its error drop, which detectors also flag.

    >>> m = ConceptDrift("adwin")
    >>> for i in range(2000):
    ...     _ = m.update(0.8 if i < 1000 else 0.1, ts=i)
    >>> m.better >= 1, m.worse, m.last_direction
    (True, 0, 'better')
    """

    def __init__(self, kind: Detector = "adwin", *, recent_span: int = 30, **params: Any) -> None:
        self.kind = kind
        self.params = params
        self.detector = _detector(kind, params)
        self._grouped = kind in ("cusum", "block_cusum")
        self.detections = 0
        self.worse = 0
        self.better = 0
        self.last_detection_ts: int | None = None
        self.last_direction: Direction | None = None
        self.n_seen = 0
        # Direction bookkeeping: three float operations per update.
        self._alpha = 2.0 / (recent_span + 1)
        self._recent = 0.0
        self._regime_sum = 0.0
        self._regime_n = 0

    def update(self, error: float, ts: int, outcome: tuple[bool, float] | None = None) -> bool:
        """One outcome's error; for a binary prediction also ``outcome``, the
        true class and the probability predicted, which ``cusum`` watches
        instead of the error (the other detectors watch the error)."""
        self.n_seen += 1
        if self.n_seen == 1:
            self._recent = error
        else:
            self._recent += self._alpha * (error - self._recent)
        self._regime_sum += error
        self._regime_n += 1
        if outcome is not None and self._grouped:
            self.detector.update_binary(*outcome)
        else:
            self.detector.update(error)
        if not self.detector.drift_detected:
            return False
        self.detections += 1
        self.last_detection_ts = ts
        # cusum alarms only on a rise of the error (of one group: maybe not of the mean).
        if self._grouped or self._recent > self._regime_sum / self._regime_n:
            self.worse += 1
            self.last_direction = "worse"
        else:
            self.better += 1
            self.last_direction = "better"
        self._regime_sum = 0.0
        self._regime_n = 0
        return True

    @property
    def recent_width(self) -> int | None:
        """How many of the latest outcomes the detector attributes to the current
        concept (ADWIN's window after a cut), or None if it cannot tell."""
        width = getattr(self.detector, "width", None)
        return int(width) if width is not None else None

    def reset_detector(self) -> None:
        """Start the detector afresh (after a model switch the old errors say
        nothing about the new model); counts and history are kept."""
        self.detector = _detector(self.kind, self.params)
        self._regime_sum = 0.0
        self._regime_n = 0


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class DriftSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How a learner watches and reacts to concept drift (``[learners.NAME.drift]``).

    >>> spec = msgspec.convert({"detector": "adwin", "reaction": "switch"}, DriftSpec)
    >>> spec.validate()
    >>> model, monitor = spec.build(_Const(0.0), task="regression", name="demo")
    >>> model is monitor, type(model).__name__
    (True, 'AdaptiveModel')
    >>> model, monitor = DriftSpec().build(_Const(0.0), task="regression")
    >>> type(model).__name__, type(monitor).__name__
    ('_Const', 'ConceptDrift')
    """

    #: River detector fed the per-prediction error: ``adwin``, ``page_hinkley`` or ``kswin``.
    detector: Detector = "adwin"
    #: Detector parameters (``{ delta = 0.002 }`` for ADWIN).
    params: dict[str, float | int | str] = {}
    #: ``report``: count and expose detections only. ``switch``: also train a
    #: candidate after a confirmed drift and serve it once it is better.
    reaction: Reaction = "report"
    #: Rolling window (outcomes) over which candidate and serving model are compared.
    window: PositiveInt = 1000
    #: Outcomes a candidate must be scored on before it may replace the serving model.
    min_samples: PositiveInt = 200
    #: A candidate that has not won after this many outcomes is dropped.
    max_trial: PositiveInt = 5000
    #: Recent ``(x, y)`` kept to pre-train a candidate on the post-drift data
    #: the detector needed to confirm the drift (0: start untrained).
    warm_start: NonNegativeInt = 500
    #: Relative improvement of the rolling error required to switch (0.05 = 5 % lower).
    margin: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.05

    def validate(self) -> None:
        """Raise ValueError on an unusable spec (unknown detector parameter ...)."""
        try:
            _detector(self.detector, dict(self.params))
        except TypeError as exc:
            raise ValueError(f"drift.params: {exc}") from None
        if self.min_samples > self.max_trial:
            raise ValueError("drift.min_samples must not exceed drift.max_trial")

    def monitor(self) -> ConceptDrift:
        params: dict[str, Any] = dict(self.params)
        return ConceptDrift(self.detector, **params)

    def build(
        self,
        model: Any,
        *,
        task: Task = "binary",
        name: str = "",
        error: Callable[[Any, Any, Any], float] | None = None,
        on_switch: Callable[[Switch], None] | None = None,
    ) -> tuple[Any, DriftMonitor]:
        """``(model to serve, monitor to give the Evaluation)``.

        ``report`` leaves the model untouched (no wrapper on the hot path);
        ``switch`` wraps it in an ``AdaptiveModel``, which is then both."""
        if self.reaction == "report":
            return model, self.monitor()
        adaptive = AdaptiveModel(model, self, task=task, name=name, error=error, on_switch=on_switch)
        return adaptive, adaptive


class Switch(msgspec.Struct, frozen=True):
    """One replacement of the serving model, kept in ``AdaptiveModel.history``."""

    reason: Literal["drift", "rollback"]
    #: Event time (epoch ms) of the drift that started the trial, if any.
    drift_ts: int | None
    #: Rolling mean error over the trial of the model replaced, and of its replacement.
    before: float
    after: float
    #: Outcomes the candidate was scored on before it won.
    trial_outcomes: int


class _RollingMean:
    """Mean of the last ``size`` values: O(1) per value, bounded memory."""

    __slots__ = ("_sum", "_values", "n")

    def __init__(self, size: int) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self.n = 0

    def add(self, value: float) -> None:
        values = self._values
        if len(values) == values.maxlen:
            self._sum -= values[0]
        values.append(value)
        self._sum += value
        self.n += 1

    @property
    def mean(self) -> float:
        return self._sum / len(self._values) if self._values else math.nan


def _binary_error(model: Any, x: Any, y: Any) -> float:
    proba = model.predict_proba_one(x)
    p = proba.get(True, 0.0) if proba else 0.5
    p = min(max(p, _EPS), 1 - _EPS)
    return -math.log(p if y else 1 - p)


def _multiclass_error(model: Any, x: Any, y: Any) -> float:
    proba = model.predict_proba_one(x)
    y_pred = max(proba, key=proba.__getitem__) if proba else None
    return 0.0 if y_pred == y else 1.0


def _regression_error(model: Any, x: Any, y: Any) -> float:
    return abs(float(y) - float(model.predict_one(x)))


#: The same per-outcome errors ``stream.evaluation`` feeds the monitor, so the
#: candidate's errors and the serving model's are comparable.
_ERRORS: dict[str, Callable[[Any, Any, Any], float]] = {
    "binary": _binary_error,
    "multiclass": _multiclass_error,
    "regression": _regression_error,
}


class AdaptiveModel:
    """A River model that replaces itself after a confirmed concept drift.

    Learners hold it instead of the raw model, and hand it to their
    ``Evaluation`` as the drift monitor, which feeds it the serving model's
    per-prediction error through ``update(error, ts)``:

    * a ``worse`` detection starts a *candidate*, ``model.clone()``, pre-trained
      on the last samples the detector attributes to the new concept (at most
      ``warm_start``), then trained on every sample the serving model learns;
    * the candidate is scored test-then-train on each of those samples with
      the learner's error; once both rolling errors have ``min_samples`` outcomes
      and the candidate's is ``margin`` lower, it becomes the serving model and
      the old one is kept as ``fallback`` (``rollback()`` restores it);
    * a candidate that has not won after ``max_trial`` outcomes is dropped.

    Every switch bumps ``switches``, is appended to ``history``, logged with the
    errors before and after, and passed to ``on_switch`` (learners bump their
    ``model_version`` there). Costs nothing extra outside a trial except a
    deque append for the warm-start buffer; during a trial, one more
    prediction and one more ``learn_one`` per sample.

    >>> from river import linear_model
    >>> spec = DriftSpec(reaction="switch", min_samples=50, warm_start=100)
    >>> model = AdaptiveModel(linear_model.LinearRegression(), spec, task="regression", name="demo")
    >>> for i in range(4000):
    ...     x = {"x": (i % 10) / 10}
    ...     y = 2 * x["x"] if i < 2000 else -3 * x["x"] + 5   # abrupt change at 2000
    ...     _ = model.update(abs(y - model.predict_one(x)), ts=i)
    ...     model.learn_one(x, y)
    >>> model.switches >= 1, model.fallback is not None, model.history[0].after < model.history[0].before
    (True, True, True)
    """

    def __init__(
        self,
        model: Any,
        spec: DriftSpec | None = None,
        *,
        task: Task = "binary",
        name: str = "",
        error: Callable[[Any, Any, Any], float] | None = None,
        on_switch: Callable[[Switch], None] | None = None,
    ) -> None:
        self.spec = spec if spec is not None else DriftSpec(reaction="switch")
        self.name = name
        self.task = task
        self.current = model
        self.candidate: Any = None
        self.fallback: Any = None
        self.monitor = self.spec.monitor()
        self.on_switch = on_switch
        self.switches = 0
        self.rollbacks = 0
        self.trials = 0
        self.abandoned = 0
        self.history: deque[Switch] = deque(maxlen=32)
        self._error = error if error is not None else _ERRORS[task]
        reacting = self.spec.reaction == "switch"
        self._recent: deque[tuple[Any, Any]] | None = (
            deque(maxlen=self.spec.warm_start) if reacting and self.spec.warm_start else None
        )
        self._current_errors = _RollingMean(self.spec.window)
        self._candidate_errors = _RollingMean(self.spec.window)
        self._trial_drift_ts: int | None = None

    # -- the ConceptDrift interface (fed by Evaluation) -------------------------

    @property
    def detections(self) -> int:
        return self.monitor.detections

    @property
    def last_detection_ts(self) -> int | None:
        return self.monitor.last_detection_ts

    @property
    def worse(self) -> int:
        return self.monitor.worse

    @property
    def better(self) -> int:
        return self.monitor.better

    @property
    def in_trial(self) -> bool:
        return self.candidate is not None

    def update(self, error: float, ts: int, outcome: tuple[bool, float] | None = None) -> bool:
        """The serving model's error on one outcome; returns whether a drift was detected."""
        detected = self.monitor.update(error, ts, outcome)
        if self.candidate is not None:
            self._current_errors.add(error)
        elif detected and self.monitor.last_direction == "worse" and self.spec.reaction == "switch":
            self._start_trial(ts)
        return detected

    # -- the River interface ------------------------------------------------------

    def predict_one(self, x: Any, **kwargs: Any) -> Any:
        return self.current.predict_one(x, **kwargs)

    def predict_proba_one(self, x: Any, **kwargs: Any) -> Any:
        return self.current.predict_proba_one(x, **kwargs)

    def learn_one(self, x: Any, y: Any, **kwargs: Any) -> None:
        self.current.learn_one(x, y, **kwargs)
        if self._recent is not None:
            self._recent.append((x, y))
        candidate = self.candidate
        if candidate is not None:
            # Test-then-train, like the serving model was: score before learning.
            self._candidate_errors.add(self._error(candidate, x, y))
            candidate.learn_one(x, y, **kwargs)
            self._decide()

    def clone(self) -> AdaptiveModel:
        return AdaptiveModel(
            self.current.clone(), self.spec, task=self.task, name=self.name, error=self._error, on_switch=self.on_switch
        )

    def __getattr__(self, name: str) -> Any:
        # Anything else (debug_one, model-specific attributes) is the serving
        # model's. Dunders and a half-built instance (unpickling) must not recurse.
        if name.startswith("__") or "current" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["current"], name)

    # -- trials and switches ------------------------------------------------------

    def _start_trial(self, ts: int) -> None:
        candidate = self.current.clone()
        if self._recent:
            # Pre-train on what the detector attributes to the new concept: the
            # samples it needed to see before it could confirm the drift.
            width = self.monitor.recent_width
            n = len(self._recent) if width is None else min(width, len(self._recent))
            for x, y in list(self._recent)[len(self._recent) - n :]:
                candidate.learn_one(x, y)
        self.candidate = candidate
        self.trials += 1
        self._trial_drift_ts = ts
        self._current_errors = _RollingMean(self.spec.window)
        self._candidate_errors = _RollingMean(self.spec.window)
        log.info("drift confirmed, training a candidate model", extra={"learner": self.name, "drift_ts": ts})

    def _decide(self) -> None:
        spec = self.spec
        mine, theirs = self._current_errors, self._candidate_errors
        if theirs.n < spec.min_samples or mine.n < spec.min_samples:
            return
        if theirs.mean < mine.mean * (1.0 - spec.margin):
            self._switch("drift", before=mine.mean, after=theirs.mean, trial=theirs.n)
        elif theirs.n >= spec.max_trial:
            log.info(
                "candidate model dropped: not better than the serving model",
                extra={"learner": self.name, "serving_error": mine.mean, "candidate_error": theirs.mean},
            )
            self.abandoned += 1
            self.candidate = None

    def _switch(self, reason: Literal["drift", "rollback"], *, before: float, after: float, trial: int) -> None:
        new = self.candidate if reason == "drift" else self.fallback
        self.fallback, self.current, self.candidate = self.current, new, None
        self.switches += 1
        event = Switch(reason, self._trial_drift_ts if reason == "drift" else None, before, after, trial)
        self.history.append(event)
        # The detector's window holds the old model's errors: start it afresh.
        self.monitor.reset_detector()
        log.info(
            "model switched",
            extra={
                "learner": self.name,
                "reason": reason,
                "metric": "rolling mean error",
                "before": round(before, 6),
                "after": round(after, 6),
                "trial_outcomes": trial,
                "switches": self.switches,
            },
        )
        if self.on_switch is not None:
            self.on_switch(event)

    def rollback(self) -> bool:
        """Serve the fallback again (an operator's or a learner's decision).
        Returns False when there is no fallback."""
        if self.fallback is None:
            return False
        self.candidate = None
        self.rollbacks += 1
        self._switch("rollback", before=math.nan, after=math.nan, trial=0)
        return True


# -- data drift -------------------------------------------------------------------


def psi(reference: Sequence[float] | np.ndarray, recent: Sequence[float] | np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``recent`` against ``reference``.

    Bins are the reference's quantiles (ties merged, so discrete features
    work); each proportion gets half a count of additive smoothing so an
    empty bin gives a large finite score, not infinity. Usual reading: < 0.1
    stable, 0.1-0.25 moderate shift, > 0.25 significant shift.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    >>> psi(a, b) < 0.05, psi(a, b + 1.0) > 0.25
    (True, True)
    """
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(recent, dtype=float)
    if ref.size == 0 or cur.size == 0:
        return math.nan
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    k = edges.size + 1
    p = (np.bincount(np.searchsorted(edges, ref, side="right"), minlength=k) + 0.5) / (ref.size + 0.5 * k)
    q = (np.bincount(np.searchsorted(edges, cur, side="right"), minlength=k) + 0.5) / (cur.size + 0.5 * k)
    return float(np.sum((q - p) * np.log(q / p)))


def ks(reference: Sequence[float] | np.ndarray, recent: Sequence[float] | np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the
    two empirical distribution functions, in [0, 1].

    >>> ks([1, 2, 3], [1, 2, 3]), ks([1, 2, 3], [4, 5, 6])
    (0.0, 1.0)
    """
    ref = np.sort(np.asarray(reference, dtype=float))
    cur = np.sort(np.asarray(recent, dtype=float))
    if ref.size == 0 or cur.size == 0:
        return math.nan
    points = np.concatenate([ref, cur])
    gap = np.searchsorted(ref, points, side="right") / ref.size - np.searchsorted(cur, points, side="right") / cur.size
    return float(np.max(np.abs(gap)))


class _Const:
    """A stand-in model for doctests."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict_one(self, x: Any) -> float:
        return self.value

    def learn_one(self, x: Any, y: Any) -> None:
        pass

    def clone(self) -> _Const:
        return _Const(self.value)
