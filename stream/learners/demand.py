"""Demand forecasts and stock-out warnings per item, learned online from the purchase stream.

The learner reads two streams:

* ``purchases``: units sold per item (``quantity``); they update the item's
  sales rates, its hourly sales history and its estimated stock; no output;
* ``prices``: the item's current price, competitor price, ``stock`` and
  category. Each price event is a forecasting moment for that item.

Forecasts are also made at every event-time bucket boundary (``bucket_s``,
an hour by default) for the items that sold in the bucket that just closed,
as of the boundary. An event that makes forecasts publishes them together
(``DemandForecasts``: one ``Forecast`` per item and horizon); every other
event publishes nothing.

For each of ``horizons_s`` (1 h and 24 h by default) one global River
regressor over all items (not one time-series model per item) corrects the
item's *rate forecast* (its in-stock sales rate at the middle half-life,
1 day, times the horizon): it learns ``log((1 + units) / (1 + rate
forecast))`` (``target = "log_ratio"``), so a model that has learned nothing
forecasts the rate. Its features: the other rates and the seasonal naive
forecast relative to the rate forecast, its level, the window's factor of the
shop's daily profile (horizons under a day; the rates are deseasonalised by
that profile, learned online from all sales), the price relative to the
item's reference price (time-weighted average) and to the competitor, a
promotion flag (price 5 % or more below the reference), the category and the
stock level. Each window is weighted by its expected volume so the fit weighs
items as WAPE does; ``target = "units"`` learns raw counts instead (for a
count loss such as Poisson). Per horizon, the forecast served is the one of
the lowest running absolute error of three: the model's, the rate forecast
(``source = "rate"``) and the seasonal naive one (``"baseline"``).

Labels come later, from the stream itself: when ``t + horizon`` has passed
(event time), the forecast is joined to the units actually sold in its window
(one queue per horizon; a window closing *is* the label) and it is scored; the
model learns it unless it overlaps the item's last learned window of that
horizon by more than 3/4 (hourly 24 h windows: the near-copies cost a learn
each and teach little). **Censored demand**: a window in which the item was out of
stock (its reported stock, or the stock estimated from the last report minus
the units sold since, at 0) is neither learned nor scored (``censored``), and
the sales rates decay only over in-stock time, so a stock-out is never read
as zero demand.

The baseline is the item's seasonal naive forecast: the units sold over the
same window one day earlier (from hourly buckets). Until ``min_outcomes``
windows of a horizon are learned, the forecast published is the baseline's
(``source = "baseline"``).

Intervals are conformal: the normalised residuals ``(y - mu) / sqrt(mu + 1)``
of the last ``calibration_window`` scored windows give the ``interval_level``
quantiles, so a 90 % interval covers about 90 % of outcomes (a horizon with
too few residuals yet borrows another's). The same scores give the stock-out
probability (demand over ``lead_time_s`` at least the stock, from the horizon
closest to the lead time, scaled), the reorder suggestion (units to order so
the ``service_level`` quantile of the demand over lead time plus horizon is
covered by stock) and the **stock-out risk**: the probability of selling out
before the item's next expected restock (its own restock cadence, seen as
stock reports above the estimated stock; else the shop's; else
``review_period_s``). A forecast with the item in stock and a risk of at least
``warn_probability`` is a ``warning``; ``quality()`` counts the items whose
last forecast (within a season) warned, ``items_at_risk``.

>>> from stream.events import Price, Purchase
>>> spec = DemandSpec(horizons_s=[3600.0], bucket_s=600.0, min_outcomes=0)
>>> learner = spec.build("demand", {"purchases": "purchases", "prices": "prices"})
>>> price = Price(event_id="p1", ts=0, item_id="i1", price=10.0, competitor_price=10.5, stock=40)
>>> out = learner.predict(price); learner.learn(price)
>>> [(f.item_id, f.horizon_s, f.stock) for f in out.forecasts]
[('i1', 3600.0, 40)]
>>> for k in range(6):
...     buy = Purchase(event_id=f"b{k}", ts=60_000 * k + 1, order_id=f"o{k}", user_id="u", item_id="i1",
...                    quantity=2, unit_price=10.0)
...     _ = learner.predict(buy); learner.learn(buy)
>>> learner.stock_of("i1")
28
>>> late = Price(event_id="p2", ts=4_000_000, item_id="i1", price=10.0)
>>> out = learner.predict(late); learner.learn(late)
>>> learner.label_stats()["expired"] >= 1, out.forecasts[-1].item_id
(True, 'i1')
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import msgspec
from river import base

from stream.bounded import BoundedDict
from stream.drift import AdaptiveModel, DriftSpec
from stream.evaluation import Evaluation
from stream.events import Price, Purchase
from stream.learners.base import Learner
from stream.learners.configured import accepts_sample_weight
from stream.models import build_model, with_seed

__all__ = ["DemandForecasts", "DemandLearner", "DemandSpec", "Forecast", "Interval"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Level = Annotated[float, msgspec.Meta(gt=0, lt=1)]


def _default_model() -> dict[str, Any]:
    return {
        "class": "linear_model.LinearRegression",
        "params": {"optimizer": {"class": "optim.AdaGrad", "params": {"lr": 0.05}}, "intercept_lr": 0.01},
    }


class Interval(msgspec.Struct, gc=False):
    low: float
    high: float
    level: float


class Forecast(msgspec.Struct, gc=False):
    """Units of one item expected to sell over the next ``horizon_s`` seconds (event time)."""

    item_id: str
    horizon_s: float
    #: Event time the forecast is made as of (its window starts here), epoch ms.
    ts: int
    expected_units: float
    interval: Interval
    #: Estimated units in stock (last report minus units sold since), or None if never reported.
    stock: int | None
    #: Hours the stock lasts at the forecast rate (None: stock unknown or no demand expected).
    hours_of_cover: float | None
    #: Probability of selling out within ``lead_time_s`` (None: stock unknown).
    stockout_probability: float | None
    #: Units to order now to cover lead time plus horizon at the service level (stock unknown: as if 0).
    reorder_suggestion: int
    #: ``model``; ``rate`` (the item's sales rate, served while it beats the model on the running
    #: error); ``baseline`` (the seasonal naive forecast: until ``min_outcomes``, or while it is best);
    #: ``combined`` (the three weighted by inverse squared running error, while none is clearly best).
    source: Literal["model", "rate", "baseline", "combined"]
    #: Probability of selling out before the item's next expected restock (None: stock unknown).
    stockout_risk: float | None = None
    #: ``stockout_risk >= warn_probability`` with the item in stock: order now.
    warning: bool = False


class DemandForecasts(msgspec.Struct, gc=False):
    """What one event publishes: the forecasts it made (a price event's item, and
    the items that sold in a bucket that just closed)."""

    forecasts: list[Forecast]


class DemandSpec(msgspec.Struct, tag="demand", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    output_topic: str = "demand-forecasts"
    #: River regressor of the units sold in a window: ``{class, params}`` or a pipeline list (one per horizon).
    model: dict[str, Any] | list[dict[str, Any]] = msgspec.field(default_factory=_default_model)
    seed: int = 42
    #: What the model learns: ``log_ratio`` (``log((1 + units) / (1 + rate forecast))``, squared loss:
    #: a multiplicative correction of the item's sales rate, which a model that learned nothing
    #: leaves as it is) or ``units`` (raw counts, for count losses such as Poisson).
    target: Literal["log_ratio", "units"] = "log_ratio"
    #: Forecast horizons (event time, seconds).
    horizons_s: list[PositiveFloat] = msgspec.field(default_factory=lambda: [3_600.0, 86_400.0])
    #: Bucket of the sales history and of the boundary forecasts.
    bucket_s: PositiveFloat = 3_600.0
    #: Replenishment lead time: the stock-out probability is over this much event time.
    lead_time_s: PositiveFloat = 86_400.0
    #: Time between replenishments assumed until restocks are seen (an item's own, or the shop's):
    #: the stock-out risk is over the time to the next expected restock.
    review_period_s: PositiveFloat = 7 * 86_400.0
    #: A forecast warns (``warning``) when the stock-out risk reaches this.
    warn_probability: Level = 0.4
    #: Coverage of the published interval, and service level of the reorder suggestion.
    interval_level: Level = 0.9
    service_level: Level = 0.95
    #: Half-lives of the item's sales rates (in-stock time), fast to slow; the middle one is the
    #: rate forecast the model corrects.
    rate_half_lives_s: list[PositiveFloat] = msgspec.field(default_factory=lambda: [3_600.0, 86_400.0, 7 * 86_400.0])
    #: Season of the naive baseline (same window this long ago).
    season_s: PositiveFloat = 86_400.0
    #: Half-life of the reference price (time-weighted average of the item's prices).
    reference_half_life_s: PositiveFloat = 7 * 86_400.0
    #: Windows learned per horizon before the model's forecast is published (until then: the baseline's).
    min_outcomes: NonNegativeInt = 500
    #: Scored windows kept per horizon for the conformal interval.
    calibration_window: PositiveInt = 2_000
    #: Per-item state: LRU capacity and TTL after the item's last event (None: until pushed out).
    max_items: PositiveInt = 100_000
    item_ttl_s: PositiveFloat | None = 14 * 86_400.0
    #: Forecasts waiting for their window to close, at most.
    max_pending: PositiveInt = 500_000
    #: At most this many items forecast at one bucket boundary (those that sold most first).
    max_boundary_items: PositiveInt = 10_000
    evaluation_window: PositiveInt = 5_000
    #: Concept drift on the forecast error of the longest horizon (normalised residuals).
    drift: DriftSpec = msgspec.field(default_factory=DriftSpec)

    def validate(self, name: str) -> None:
        if not self.horizons_s:
            raise ValueError("`horizons_s` needs at least one horizon")
        if len(set(self.horizons_s)) != len(self.horizons_s):
            raise ValueError("`horizons_s` has duplicates")
        if len(self.rate_half_lives_s) != 3:
            raise ValueError("`rate_half_lives_s` takes three half-lives (fast, medium, slow)")
        self.drift.validate()
        model = build_model(with_seed(self.model, self.seed), "model")
        if not isinstance(model, base.Regressor):
            raise ValueError(f"model: the demand model must be a River regressor, got {type(model).__name__}")

    def build(self, name: str, topics: Mapping[str, str]) -> DemandLearner:
        return DemandLearner(name, self, topics)


_DAY_MS = 86_400_000
_LOG_SCALE = 10.0
#: Scores a horizon needs before its own conformal quantiles are used.
_MIN_SCORES = 50
_RESORT_EVERY = 100
#: Outcomes the running errors that choose the served forecast average over (exponentially).
_CHOICE_SPAN = 1_000
#: Volume bins of the conformal residuals (``_volume_bin``).
_VOLUME_BINS = 5
_SOURCES: tuple[Literal["model", "rate", "baseline", "combined"], ...] = ("model", "rate", "baseline", "combined")
#: Running errors within this fraction of each other: the candidates are combined, not chosen.
_COMBINE_WITHIN = 0.03


class _Item:
    """What is known of an item: price, stock, restocks, sales rates and recent sales."""

    __slots__ = (
        "category",
        "competitor",
        "cum_units",
        "first_ts",
        "last_bucket",
        "learned",
        "out_ms",
        "out_since",
        "price",
        "price_ts",
        "rate_ts",
        "rates",
        "ref",
        "restock_gap",
        "restock_ts",
        "sold_since_report",
        "starts",
        "stock_reported",
    )

    def __init__(self, ts: int, n_buckets: int, n_horizons: int) -> None:
        self.price: float | None = None
        self.ref: float | None = None
        self.price_ts = ts
        self.competitor: float | None = None
        self.category: str | None = None
        self.stock_reported: int | None = None
        self.sold_since_report = 0
        self.out_since: int | None = None
        self.out_ms = 0
        self.first_ts = ts
        self.rates = [0.0, 0.0, 0.0]
        self.rate_ts = 0  # in-stock time (ms) of the last rate update
        self.cum_units = 0
        # Ring of the units sold before each bucket began, indexed by absolute bucket number
        # modulo its length: units over any span of the last ring's worth of buckets in O(1).
        self.starts = [0] * n_buckets
        self.last_bucket = -1
        #: Event time of the last restock seen, and the time between restocks (None: not seen).
        self.restock_ts: int | None = None
        self.restock_gap: float | None = None
        #: Per horizon, the start of the last window the model learned (see ``DemandLearner._closed``).
        self.learned = [-(2**62)] * n_horizons

    # -- stock and in-stock time --------------------------------------------------------

    @property
    def stock(self) -> int | None:
        if self.stock_reported is None:
            return None
        return max(self.stock_reported - self.sold_since_report, 0)

    def out_total(self, ts: int) -> int:
        """Out-of-stock ms from the first event up to ``ts``."""
        if self.out_since is not None and ts > self.out_since:
            return self.out_ms + ts - self.out_since
        return self.out_ms

    def in_stock_ms(self, ts: int) -> int:
        return max(ts - self.first_ts - self.out_total(ts), 0)

    def go_out(self, ts: int) -> None:
        if self.out_since is None:
            self.out_since = ts

    def come_back(self, ts: int) -> None:
        if self.out_since is not None:
            self.out_ms += max(ts - self.out_since, 0)
            self.out_since = None

    def units_before(self, t: int, bucket_ms: int) -> float | None:
        """Units sold before ``t`` (linear within its bucket; None: older than the ring)."""
        j = t // bucket_ms
        last = self.last_bucket
        if j > last:
            return float(self.cum_units)
        starts = self.starts
        n = len(starts)
        if j <= last - n:
            return None
        s0 = starts[j % n]
        s1 = self.cum_units if j == last else starts[(j + 1) % n]
        return s0 + (s1 - s0) * (t - j * bucket_ms) / bucket_ms


_HOUR_MS = 3_600_000


class _Season:
    """The shop's daily demand profile, learned online from the sales of all items: an
    hour-of-day factor (of mean 1) around a level.

    Items' rates are kept deseasonalised (each unit counts ``1 / factor`` of its hour), and a
    forecast multiplies them by the window's mean factor: one profile for the whole shop, learned
    from its total sales (thousands of units a day where an item sells a few), multiplicative
    like a shop's traffic. (A day-of-week factor learned the same way from one or two weeks of
    totals, which stock-outs and demand shifts move as much as the weekday does, made the 24 h
    forecasts worse: see docs/learners-demand.md.)

    >>> s = _Season()
    >>> for hour in range(24 * 14):  # two weeks: twice the units on the hours 18-23
    ...     s.advance(hour * _HOUR_MS); s.add(20 if hour % 24 >= 18 else 10)
    >>> round(s.hour[20] / s.hour[3], 1), round(s.window(18 * _HOUR_MS, 6 * _HOUR_MS), 1)
    (2.0, 1.6)
    """

    __slots__ = ("current", "hour", "hour_n", "level", "units", "windows")

    #: Smoothing of the hour-of-day factors (one update a day each) and of the level per hour
    #: (half-life ~1 day).
    HOUR_RATE = 0.2
    LEVEL_RATE = 1 - 2 ** (-1 / 24)

    def __init__(self) -> None:
        self.hour = [1.0] * 24
        self.level: float | None = None
        self.hour_n = -1  # absolute hour number of the hour being counted
        self.units = 0.0
        #: The factor of the current hour (what a unit sold now counts as, deseasonalised: 1/factor).
        self.current = 1.0
        self.windows: dict[tuple[int, int], float] = {}

    def add(self, units: float) -> None:
        self.units += units

    def advance(self, ts: int) -> None:
        """Close the hours before ``ts``'s."""
        n = ts // _HOUR_MS
        if n <= self.hour_n:
            return
        if self.hour_n >= 0:
            for k in range(self.hour_n, min(n, self.hour_n + 24)):
                self._close(k % 24)
                self.units = 0.0
        self.hour_n = n
        self.current = self.hour[n % 24]
        self.windows = {}

    def _close(self, h: int) -> None:
        units = self.units
        if self.level is None:
            self.level = units
            return
        if self.level > 0:
            self.hour[h] += self.HOUR_RATE * (units / self.level - self.hour[h])
        self.level += self.LEVEL_RATE * (units / self.hour[h] - self.level)
        if h == 23:
            _normalise(self.hour)

    def window(self, t0: int, length: int) -> float:
        """The mean factor over ``[t0, t0 + length)`` (hourly; 1 from a day on)."""
        if length >= _DAY_MS:
            return 1.0
        key = (t0 // _HOUR_MS, length)
        f = self.windows.get(key)
        if f is None:
            hours = max(round(length / _HOUR_MS), 1)
            hour = self.hour
            f = sum(hour[n % 24] for n in range(key[0], key[0] + hours)) / hours
            self.windows[key] = f
        return f


def _normalise(factors: list[float]) -> None:
    mean = sum(factors) / len(factors)
    if mean > 0:
        for i, f in enumerate(factors):
            factors[i] = f / mean


class _Scores:
    """Normalised residuals of the last ``size`` scored windows: conformal quantiles at
    ``levels`` (cached at each re-sort) and survival probabilities."""

    __slots__ = ("fallback", "i", "levels", "n_new", "q", "ring", "size", "sorted")

    def __init__(self, size: int, levels: tuple[float, ...]) -> None:
        self.size = size
        self.levels = levels
        self.fallback = [_normal_quantile(q) for q in levels]
        self.q = list(self.fallback)
        self.ring: list[float] = []
        self.i = 0
        self.n_new = 0
        self.sorted: list[float] = []

    @property
    def ready(self) -> bool:
        return len(self.sorted) >= _MIN_SCORES

    def add(self, score: float) -> None:
        ring = self.ring
        if len(ring) < self.size:
            ring.append(score)
        else:
            ring[self.i] = score
            self.i = (self.i + 1) % self.size
        self.n_new += 1
        if self.n_new >= _RESORT_EVERY or len(self.sorted) < _MIN_SCORES:
            self.sorted = s = sorted(ring)
            self.n_new = 0
            if len(s) >= _MIN_SCORES:
                self.q = [s[min(max(math.ceil(q * (len(s) + 1)) - 1, 0), len(s) - 1)] for q in self.levels]

    def survival(self, z: float) -> float:
        """Share of scores >= ``z``."""
        s = self.sorted
        if len(s) < _MIN_SCORES:
            return 0.5 * math.erfc(z / math.sqrt(2))
        return (len(s) - bisect.bisect_left(s, z)) / len(s)


def _normal_quantile(q: float) -> float:
    # Bisection on erfc: computed once per level, for the warm-up fallback.
    lo, hi = -8.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class _Pending:
    """A forecast waiting for its window to close: the forecast served and the candidates."""

    __slots__ = ("anchor", "baseline", "cum_units", "h", "high", "item_id", "low", "mu", "mu_model", "out_ms",
                 "source", "ts", "x")  # fmt: skip

    def __init__(
        self, item_id: str, h: int, ts: int, source: int, mu: float, mu_model: float, anchor: float,
        baseline: float, x: dict[str, float], cum_units: int,
    ) -> None:  # fmt: skip
        self.item_id = item_id
        self.source = source
        self.h = h
        self.ts = ts
        self.mu = mu
        self.mu_model = mu_model
        self.anchor = anchor
        self.baseline = baseline
        self.x = x
        self.cum_units = cum_units
        # Set once the interval and the stock are known (_forecast_item).
        self.low = self.high = 0.0
        self.out_ms = 0


class DemandLearner(Learner):
    kind = "demand"

    def __init__(self, name: str, spec: DemandSpec, topics: Mapping[str, str]) -> None:
        self.purchases_topic = topics.get("purchases", "purchases")
        self.prices_topic = topics.get("prices", "prices")
        super().__init__(name, spec.output_topic, frozenset({self.purchases_topic, self.prices_topic}))
        self.spec = spec
        self.horizons_ms = [int(h * 1000) for h in spec.horizons_s]
        self.labels = [_label(h) for h in spec.horizons_s]
        longest = max(range(len(self.horizons_ms)), key=self.horizons_ms.__getitem__)
        self._longest = longest
        self.models: list[Any] = []
        self.evaluations: dict[str, Evaluation] = {}
        for k, label in enumerate(self.labels):
            model = build_model(with_seed(spec.model, spec.seed))
            served, monitor = spec.drift.build(model, task="regression", name=f"{name}.{label}",
                                               on_switch=self._model_switched)  # fmt: skip
            self.models.append(served)
            names = ("abs_error", "baseline_abs_error", "units", "coverage", "censored")
            self.evaluations[label] = Evaluation.for_means(
                spec.evaluation_window, names, drift=monitor if k == longest else None
            )
        self._evaluations = list(self.evaluations.values())
        #: The longest horizon's evaluation: its drift monitor is the learner's.
        self.evaluation = self.evaluations[self.labels[longest]]
        lo_q = (1 - spec.interval_level) / 2
        levels = (lo_q, 1 - lo_q, spec.service_level)
        #: Per horizon and volume bin (``_volume_bin``): the normalised residuals. The spread of a
        #: residual grows faster than ``sqrt(mu)`` with the volume (the rate's own error), so one
        #: pool for all would cover small items too widely and large ones too narrowly.
        self.scores = [[_Scores(spec.calibration_window, levels) for _ in range(_VOLUME_BINS)]
                       for _ in self.horizons_ms]  # fmt: skip
        self._log_target = spec.target == "log_ratio"
        self._volume = [1.0] * len(self.horizons_ms)
        self._weighted = accepts_sample_weight(self.models[0])
        self.outcomes = [0] * len(self.horizons_ms)
        self.censored = [0] * len(self.horizons_ms)
        #: Per horizon, the running mean absolute error of each source (model, rate, baseline).
        self.errors = [[0.0, 0.0, 0.0] for _ in self.horizons_ms]
        self._learn_every = [h // 4 for h in self.horizons_ms]
        self.bucket_ms = int(spec.bucket_s * 1000)
        self.season_ms = int(spec.season_s * 1000)
        self._n_buckets = -(-(self.season_ms + max(self.horizons_ms)) // self.bucket_ms) + 2
        self._items: BoundedDict[str, _Item] = BoundedDict(
            spec.max_items, int(spec.item_ttl_s * 1000) if spec.item_ttl_s is not None else None
        )
        self._taus = [h * 1000 / math.log(2) for h in spec.rate_half_lives_s]
        self._ref_tau = spec.reference_half_life_s * 1000 / math.log(2)
        self.lead_ms = int(spec.lead_time_s * 1000)
        self.review_ms = int(spec.review_period_s * 1000)
        #: The shop's time between restocks (mean over the items' restocks seen; None: none yet).
        self.restock_gap: float | None = None
        # The horizon the lead-time figures are read from: the closest (in ratio) to the lead time.
        self._lead_h = min(
            range(len(self.horizons_ms)), key=lambda k: abs(math.log(self.horizons_ms[k] / self.lead_ms))
        )
        # The forecasts waiting for their window to close, one queue per horizon (windows of one
        # horizon close in the order they open). No label arrives by id, unlike the other learners'
        # (stream.labels.LabelJoin): a window closing *is* the label, the units sold in it.
        self.waiting: list[deque[_Pending]] = [deque() for _ in self.horizons_ms]
        self.closed = 0
        self.evicted = 0
        self._bucket = -1  # current bucket number (event time)
        self._sold_in_bucket: dict[str, int] = {}
        self._events = 0
        self._now = 0
        #: Items forecast, and those in stock whose last forecast warned, and when (the
        #: ``items_with_traffic`` and ``items_at_risk`` gauges: those of the last season).
        self.forecast_at: dict[str, int] = {}
        self.at_risk: dict[str, int] = {}
        #: Windows that closed with the item no longer in state (forgotten): not learned.
        self.forgotten = 0
        self._made: tuple[Any, list[_Pending]] | None = None
        # Time features of the last forecasting moment, per horizon (a boundary forecasts many items at once).
        self._time_ts = -1
        self._time_x: list[dict[str, float]] = []
        #: The shop's weekly profile: items' rates are deseasonalised by it.
        self.season = _Season()

    # -- the Learner interface ------------------------------------------------------------

    def predict(self, event: Any) -> DemandForecasts | None:
        pending: list[_Pending] = []
        out: list[Forecast] = []
        if event.ts // self.bucket_ms > self._bucket:
            self._boundary(event.ts, out, pending)
        if type(event) is Price:
            it = self._apply(event)
            self._forecast_item(event.item_id, it, event.ts, out, pending)
        self._made = (event, pending)
        return DemandForecasts(out) if out else None

    def learn(self, event: Any) -> None:
        made, self._made = self._made, None
        if made is None or made[0] is not event:
            # learn without predict: make (and wait for) the same forecasts.
            self.predict(event)
            made, self._made = self._made, None
        assert made is not None
        waiting = self.waiting
        for p in made[1]:
            waiting[p.h].append(p)
        ts = event.ts
        if ts > self._now:
            self._now = ts
            self.season.advance(ts)
        now = self._now
        for queue, h_ms in zip(waiting, self.horizons_ms, strict=True):
            if queue and queue[0].ts + h_ms < now:  # a window closed (else: one comparison per event)
                self._close(queue, h_ms)
        if type(event) is Purchase:
            self._sold(event)
        self._events += 1
        if self._events % 4096 == 0:
            self._expire(ts)

    def label_stats(self) -> Mapping[str, int]:
        """``expired``: forecast windows closed (each one learned, or censored);
        ``evicted``: pushed out by ``max_pending``. No label arrives by id."""
        return {"expired": self.closed, "evicted": self.evicted}

    def quality(self) -> Iterator[tuple[str, str, float]]:
        for label, ev in self.evaluations.items():
            for window in ("cumulative", "rolling"):
                units = ev.get("units", window)
                err = ev.get("abs_error", window)
                base_err = ev.get("baseline_abs_error", window)
                yield f"mae_{label}", window, err
                yield f"baseline_mae_{label}", window, base_err
                yield f"wape_{label}", window, err / units if units > 0 else 0.0
                yield f"baseline_wape_{label}", window, base_err / units if units > 0 else 0.0
                yield f"coverage_{label}", window, ev.get("coverage", window)
                yield f"censored_share_{label}", window, ev.get("censored", window)
        since = self._now - self.season_ms
        yield "items_at_risk", "rolling", float(_count_since(self.at_risk, since))
        yield "items_with_traffic", "rolling", float(_count_since(self.forecast_at, since))

    def replace_model(self, model: Any) -> None:
        k = self._longest
        if isinstance(self.models[k], AdaptiveModel):
            self.models[k].current = model
        else:
            self.models[k] = model
        self.model_version += 1

    @property
    def model(self) -> Any:
        """The longest horizon's model (what ``stream model`` exports and swaps)."""
        return self.models[self._longest]

    def stock_of(self, item_id: str) -> int | None:
        it = self._items.get(item_id)
        return None if it is None else it.stock

    # -- state ----------------------------------------------------------------------------

    def _item(self, item_id: str, ts: int) -> _Item:
        it = self._items.get(item_id, ts)
        if it is None:
            it = _Item(ts, self._n_buckets, len(self.horizons_ms))
        self._items.put(item_id, it, ts)
        return it

    def _expire(self, ts: int) -> None:
        if self._items.ttl_ms is not None:
            self._items.expire(ts)
        since = ts - self.season_ms
        for table in (self.at_risk, self.forecast_at):
            for i in [i for i, t in table.items() if t < since]:
                del table[i]

    def _apply(self, event: Price) -> _Item:
        it = self._item(event.item_id, event.ts)
        ts = event.ts
        if it.price is None or it.ref is None:
            it.ref = event.price
        elif ts > it.price_ts:
            w = math.exp(-(ts - it.price_ts) / self._ref_tau)
            it.ref = w * it.ref + (1 - w) * it.price
        it.price_ts = max(it.price_ts, ts)
        it.price = event.price
        if event.competitor_price is not None:
            it.competitor = event.competitor_price
        if event.category is not None:
            it.category = event.category
        if event.stock is not None:
            before = it.stock
            if before is not None and event.stock > before:
                self._restocked(it, ts)
            self._rates_to(it, ts)
            it.stock_reported = event.stock
            it.sold_since_report = 0
            if event.stock > 0:
                it.come_back(ts)
            else:
                it.go_out(ts)
        return it

    def _restocked(self, it: _Item, ts: int) -> None:
        """A stock report above the estimated stock: a replenishment; learn the cadence."""
        if it.restock_ts is not None and ts > it.restock_ts:
            gap = float(ts - it.restock_ts)
            it.restock_gap = gap if it.restock_gap is None else 0.5 * (it.restock_gap + gap)
            shop = self.restock_gap
            self.restock_gap = gap if shop is None else shop + (gap - shop) / 100.0
        it.restock_ts = ts

    def _rates_to(self, it: _Item, ts: int) -> None:
        """Decay the item's rates to ``ts`` (over in-stock time only)."""
        now = it.in_stock_ms(ts)
        dt = now - it.rate_ts
        if dt > 0:
            rates = it.rates
            for k, tau in enumerate(self._taus):
                rates[k] *= math.exp(-dt / tau)
            it.rate_ts = now

    def _sold(self, event: Purchase) -> None:
        ts = event.ts
        it = self._item(event.item_id, ts)
        if event.category is not None and it.category is None:
            it.category = event.category
        q = event.quantity
        self._rates_to(it, ts)
        season = self.season
        season.add(q)
        rates = it.rates
        u = q * 1000.0 / season.current  # deseasonalised units, per second
        for k, tau in enumerate(self._taus):
            rates[k] += u / tau  # exponentially weighted
        b = ts // self.bucket_ms
        if b > it.last_bucket:
            starts = it.starts
            n = len(starts)
            cum = it.cum_units
            for j in range(max(it.last_bucket + 1, b - n + 1), b + 1):
                starts[j % n] = cum
            it.last_bucket = b
        it.cum_units += q
        if it.stock_reported is not None:
            it.sold_since_report += q
            if it.stock == 0:
                it.go_out(ts)
        if b >= self._bucket:
            self._sold_in_bucket[event.item_id] = self._sold_in_bucket.get(event.item_id, 0) + q

    # -- forecasting ------------------------------------------------------------------------

    def _boundary(self, ts: int, out: list[Forecast], pending: list[_Pending]) -> None:
        b = ts // self.bucket_ms
        if b <= self._bucket:
            return
        if self._bucket >= 0 and self._sold_in_bucket:
            at = (self._bucket + 1) * self.bucket_ms
            sold = self._sold_in_bucket
            ids = sorted(sold, key=lambda i: (-sold[i], i))[: self.spec.max_boundary_items]
            for item_id in ids:
                it = self._items.get(item_id)
                if it is not None:
                    self._forecast_item(item_id, it, at, out, pending)
        self._bucket = b
        self._sold_in_bucket = {}

    def _rates(self, it: _Item, ts: int) -> list[float]:
        """The item's rates (units/ms) at ``ts``, bias-corrected for a short history."""
        now = it.in_stock_ms(ts)
        if now <= 0:
            return [0.0, 0.0, 0.0]
        dt = max(now - it.rate_ts, 0)
        exp = math.exp
        (r0, r1, r2), (t0, t1, t2) = it.rates, self._taus
        return [r0 * exp(-dt / t0) / (1000.0 - 1000.0 * exp(-now / t0)),
                r1 * exp(-dt / t1) / (1000.0 - 1000.0 * exp(-now / t1)),
                r2 * exp(-dt / t2) / (1000.0 - 1000.0 * exp(-now / t2))]  # fmt: skip

    def _baseline(self, it: _Item, ts: int, h_ms: int, slow_rate: float) -> float:
        """Seasonal naive: units sold in ``[ts - season, ts - season + h)``."""
        start = ts - self.season_ms
        if start >= it.first_ts:
            a = it.units_before(start, self.bucket_ms)
            if a is not None:
                b = it.units_before(start + h_ms, self.bucket_ms)
                return (b if b is not None else a) - a
        # Less than a season of history: the slow rate over the horizon.
        return slow_rate * h_ms

    def _time_features(self, ts: int) -> list[dict[str, float]]:
        """Per horizon under a day, the log of the window's mean factor of the shop's daily
        profile (the rate forecast is scaled by it; the model learns how far to trust it).
        Shared by a moment's items."""
        if ts != self._time_ts:
            window = self.season.window
            xs = [{"season": math.log(window(ts, h))} if h < _DAY_MS else {} for h in self.horizons_ms]
            self._time_ts, self._time_x = ts, xs
        return self._time_x

    def _item_features(self, it: _Item) -> dict[str, float]:
        x: dict[str, float] = {}
        if it.price is not None and it.ref is not None:
            rel = math.log(it.price / it.ref)
            x["price_vs_ref"] = _LOG_SCALE * rel
            x["promo"] = 1.0 if rel < -0.05 else 0.0
            if it.competitor is not None:
                x["price_vs_competitor"] = _LOG_SCALE * math.log(it.price / it.competitor)
        if it.category is not None:
            x["cat=" + it.category] = 1.0
        stock = it.stock
        if stock is not None:
            x["log_stock"] = math.log1p(stock) / 5.0
        return x

    def _forecast_item(self, item_id: str, it: _Item, ts: int, out: list[Forecast], pending: list[_Pending]) -> None:
        rates = self._rates(it, ts)
        r_fast, r_mid, r_slow = rates
        common = self._item_features(it)
        times = self._time_features(ts)
        window = self.season.window
        log, cum_units = math.log, it.cum_units
        warm = self.outcomes
        min_outcomes = self.spec.min_outcomes
        made: list[_Pending] = []
        for k, h_ms in enumerate(self.horizons_ms):
            baseline = self._baseline(it, ts, h_ms, r_slow)
            anchor = r_mid * h_ms * window(ts, h_ms)
            la = log(anchor + 1.0)
            x = {"naive": log(baseline + 1.0) - la, "rate_fast": log(r_fast * h_ms + 1.0) - la,
                 "rate_slow": log(r_slow * h_ms + 1.0) - la, "level": la / 5.0}  # fmt: skip
            x.update(times[k])
            x.update(common)
            f = self.models[k].predict_one(x)
            f = float(f) if f is not None and math.isfinite(f) else 0.0
            mu_model = (anchor + 1.0) * math.exp(min(f, 20.0)) - 1.0 if self._log_target else f
            mu_model = min(max(mu_model, 0.0), 1e9)
            if warm[k] < min_outcomes:
                source, mu = 2, baseline
            else:
                source, mu = _serve(self.errors[k], mu_model, anchor, baseline)
            made.append(_Pending(item_id, k, ts, source, mu, mu_model, anchor, baseline, x, cum_units))
        self._publish(item_id, it, ts, made, out)
        pending += made

    def _publish(self, item_id: str, it: _Item, ts: int, made: list[_Pending], out: list[Forecast]) -> None:
        """The stock figures (from the horizon closest to the lead time) and the published
        forecasts, with their intervals (kept on the pending forecasts for scoring)."""
        spec = self.spec
        kl = self._lead_h
        h_l = self.horizons_ms[kl]
        rate = made[kl].mu / h_l  # units per ms
        stock = it.stock
        scores, widen = self._calibration(kl, made[kl].mu)
        p_out: float | None = None
        risk: float | None = None
        warn = False
        if stock is not None and stock <= 0:
            p_out = risk = 1.0
        elif stock is not None:
            mu_l = rate * self.lead_ms
            p_out = scores.survival((stock - 0.5 - mu_l) / (widen * math.sqrt(mu_l + 1.0)))
            t = self._to_restock(it, ts)
            risk = scores.survival((stock - 0.5 - rate * t) / (widen * self._spread(rate, t, h_l)))
            warn = risk >= spec.warn_probability
        self.forecast_at[item_id] = ts
        if warn:
            self.at_risk[item_id] = ts
        elif item_id in self.at_risk:
            del self.at_risk[item_id]
        q_service = scores.q[2] * widen
        out_ms = it.out_total(ts)
        level = spec.interval_level
        have = stock or 0
        for p in made:
            k, mu = p.h, p.mu
            h_ms = self.horizons_ms[k]
            cal, wide = (scores, widen) if k == kl else self._calibration(k, mu)
            spread = wide * math.sqrt(mu + 1.0)
            q = cal.q
            low = max(mu + q[0] * spread, 0.0)
            high = max(mu + q[1] * spread, low)
            p.low, p.high, p.out_ms = low, high, out_ms
            mu_c = rate * (self.lead_ms + h_ms)
            reorder = max(math.ceil(mu_c + q_service * math.sqrt(mu_c + 1.0) - have), 0)
            cover = stock * h_ms / mu / 3_600_000 if stock is not None and mu > 0 else None
            out.append(Forecast(item_id, h_ms / 1000.0, ts, mu, Interval(low, high, level), stock, cover, p_out,
                                reorder, _SOURCES[p.source], risk, warn))  # fmt: skip

    def _calibration(self, k: int, mu: float) -> tuple[_Scores, float]:
        """The residuals for a forecast ``mu`` of horizon ``k`` and a factor to widen them by:
        its volume bin's; while those are too few (a longer horizon's first windows have not
        closed yet), the same bin of the horizon with the most, widened by the square root
        of the horizons' ratio when it is shorter (no residual of this horizon yet: wide
        rather than overconfident)."""
        b = _volume_bin(mu)
        scores = self.scores[k][b]
        if scores.ready:
            return scores, 1.0
        j = max(range(len(self.scores)), key=lambda i: len(self.scores[i][b].sorted))
        return self.scores[j][b], math.sqrt(max(self.horizons_ms[k] / self.horizons_ms[j], 1.0))

    def _to_restock(self, it: _Item, ts: int) -> float:
        """Event time (ms) until the item's next expected restock: its own cadence, else the
        shop's, else ``review_period_s``, after its last restock (none seen: the lead time)."""
        gap = it.restock_gap if it.restock_gap is not None else self.restock_gap
        if gap is None:
            gap = float(self.review_ms)
        if it.restock_ts is None:
            # No restock of the item seen: when the next comes is unknown, and the risk is the one
            # an order placed now could still cover (half a cycle to go, on average, warned
            # three times as many cycles that were restocked in time as ones that ran out).
            return float(self.lead_ms)
        left = it.restock_ts + gap - ts
        # Overdue: the cadence says nothing more; assume a lead time (ordering now).
        return left if left > 0 else float(self.lead_ms)

    @staticmethod
    def _spread(rate: float, t: float, h_ms: int) -> float:
        """Scale of the demand over ``t`` ms for the normalised residuals of an ``h_ms`` horizon:
        Poisson-like up to the horizon, then the rate's own error carried over the whole span."""
        if t <= h_ms:
            return math.sqrt(rate * t + 1.0)
        return math.sqrt(rate * h_ms + 1.0) * t / h_ms

    # -- windows closing (the labels) ---------------------------------------------------------

    def _close(self, queue: deque[_Pending], h_ms: int) -> None:
        """Close the windows of ``queue`` that ended before the watermark; drop the oldest
        beyond ``max_pending``."""
        now = self._now
        while queue and queue[0].ts + h_ms < now:
            p = queue.popleft()
            self.closed += 1
            self._closed(p, p.ts + h_ms)
        while len(queue) > self.spec.max_pending:
            queue.popleft()
            self.evicted += 1

    def _closed(self, p: _Pending, deadline: int) -> None:
        it = self._items.get(p.item_id)
        if it is None:
            self.forgotten += 1
            return
        k = p.h
        ev = self._evaluations[k]
        if it.out_total(deadline) > p.out_ms:
            # Out of stock during the window: the sales are censored, not the demand.
            self.censored[k] += 1
            ev.score("censored", 1.0)
            return
        ev.score("censored", 0.0)
        y = it.cum_units - p.cum_units
        # A window overlapping the item's last learned one by more than 3/4 (an hourly 24 h
        # forecast) adds little to learn from but costs a learn: it is scored, not learned.
        if p.ts >= it.learned[k] + self._learn_every[k]:
            it.learned[k] = p.ts
            self._learn(k, p, y)
        n = self.outcomes[k] = self.outcomes[k] + 1
        a = 1.0 / min(n, _CHOICE_SPAN)
        errors = self.errors[k]
        errors[0] += (abs(y - p.mu_model) - errors[0]) * a
        errors[1] += (abs(y - p.anchor) - errors[1]) * a
        errors[2] += (abs(y - p.baseline) - errors[2]) * a
        ev.score("abs_error", abs(y - p.mu))
        ev.score("baseline_abs_error", abs(y - p.baseline))
        ev.score("units", float(y))
        ev.score("coverage", 1.0 if p.low <= y <= p.high else 0.0)
        z = (y - p.mu) / math.sqrt(p.mu + 1.0)
        self.scores[k][_volume_bin(p.mu)].add(z)
        ev.error(abs(z), deadline)

    def _learn(self, k: int, p: _Pending, y: int) -> None:
        model = self.models[k]
        self.n_learned += 1
        if not self._log_target:
            model.learn_one(p.x, float(y))
            return
        # Weighted by the window's expected volume (relative to the mean), so the log-space
        # fit weighs items as WAPE does; otherwise the many small items shrink the large ones.
        v = p.baseline + p.anchor + 1.0
        vol = self._volume
        vol[k] += (v - vol[k]) / min(self.outcomes[k] + 1, 1000)
        target = math.log((y + 1.0) / (p.anchor + 1.0))
        if self._weighted:
            model.learn_one(p.x, target, w=min(v / vol[k], 5.0))
        else:
            model.learn_one(p.x, target)

    def _model_switched(self, switch: Any) -> None:
        self.model_version += 1


def _serve(errors: list[float], model: float, rate: float, baseline: float) -> tuple[int, float]:
    """The source and forecast served from the candidates' running errors: the best one when
    its error is clearly the lowest, else their combination weighted by inverse squared error
    (candidates within ``_COMBINE_WITHIN`` of each other are not told apart by a running mean
    over correlated windows, and switching between them chases noise; averaging does not).

    >>> _serve([1.0, 2.0, 3.0], 10.0, 20.0, 30.0)
    (0, 10.0)
    >>> source, mu = _serve([1.0, 1.01, 3.0], 10.0, 20.0, 30.0)
    >>> source, round(mu, 2)  # weights 1, 0.98, 0.11
    (3, 15.75)
    """
    e_model, e_rate, e_base = errors
    best, second = sorted(errors)[:2]
    if best <= 0.0 or second > best * (1.0 + _COMBINE_WITHIN):
        if e_model <= e_rate and e_model <= e_base:
            return 0, model
        return (1, rate) if e_rate <= e_base else (2, baseline)
    w_model, w_rate, w_base = 1.0 / (e_model * e_model), 1.0 / (e_rate * e_rate), 1.0 / (e_base * e_base)
    return 3, (w_model * model + w_rate * rate + w_base * baseline) / (w_model + w_rate + w_base)


def _volume_bin(mu: float) -> int:
    """``mu + 1`` in [1, 3), [3, 9), [9, 27), [27, 81), [81, ...)."""
    b = 0
    v = mu + 1.0
    while v >= 3.0 and b < _VOLUME_BINS - 1:
        v /= 3.0
        b += 1
    return b


def _count_since(table: dict[str, int], since: int) -> int:
    # A copy first: the metrics thread reads while the loop writes.
    return sum(1 for ts in list(table.values()) if ts >= since)


def _label(h_s: float) -> str:
    """``3600.0`` -> ``1h``, ``86400`` -> ``24h``, ``90`` -> ``90s``."""
    if h_s % 3600 == 0:
        return f"{int(h_s // 3600)}h"
    if h_s % 60 == 0:
        return f"{int(h_s // 60)}m"
    return f"{h_s:g}s"
