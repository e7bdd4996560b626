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
regressor over all items (not one time-series model per item) predicts the
units sold in ``[t, t + horizon)``. Its features: the item's sales rates at
three decays (log of the expected units over the horizon at each), time of
day and of week of the window, the price relative to the item's reference
price (time-weighted average) and to the competitor, a promotion flag
(price 5 % or more below the reference), the category and the stock level.
The default model is a ``LinearRegression`` (AdaGrad) of ``log(1 + units)``
(``target = "log1p"``; the rates' logs then act multiplicatively), each window
weighted by its expected volume so the fit weighs items as WAPE does;
``target = "units"`` learns raw counts (for a count loss such as Poisson).

Labels come later, from the stream itself: when ``t + horizon`` has passed
(event time), the forecast is joined to the units actually sold in its window
(``stream.labels.LabelJoin``, which expires the window) and the model learns
it and is scored. **Censored demand**: a window in which the item was out of
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
quantiles, so a 90 % interval covers about 90 % of outcomes. The same scores
give the stock-out probability (demand over ``lead_time_s`` at least the
stock, from the horizon closest to the lead time, scaled) and the reorder
suggestion (units to order so the ``service_level`` quantile of the demand
over lead time plus horizon is covered by stock).

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
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import msgspec
from river import base

from stream.bounded import BoundedDict
from stream.drift import AdaptiveModel, DriftSpec
from stream.evaluation import Evaluation
from stream.events import Price, Purchase
from stream.labels import LabelJoin
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
    source: Literal["model", "baseline"]


class DemandForecasts(msgspec.Struct, gc=False):
    """What one event publishes: the forecasts it made (a price event's item, and
    the items that sold in a bucket that just closed)."""

    forecasts: list[Forecast]


class DemandSpec(msgspec.Struct, tag="demand", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    output_topic: str = "demand-forecasts"
    #: River regressor of the units sold in a window: ``{class, params}`` or a pipeline list (one per horizon).
    model: dict[str, Any] | list[dict[str, Any]] = msgspec.field(default_factory=_default_model)
    seed: int = 42
    #: What the model learns: ``log1p`` (``log(1 + units)``, squared loss: a median-like forecast,
    #: well conditioned for SGD whatever the item's volume) or ``units`` (for count losses, e.g. Poisson).
    target: Literal["log1p", "units"] = "log1p"
    #: Forecast horizons (event time, seconds).
    horizons_s: list[PositiveFloat] = msgspec.field(default_factory=lambda: [3_600.0, 86_400.0])
    #: Bucket of the sales history and of the boundary forecasts.
    bucket_s: PositiveFloat = 3_600.0
    #: Replenishment lead time: the stock-out probability is over this much event time.
    lead_time_s: PositiveFloat = 86_400.0
    #: Coverage of the published interval, and service level of the reorder suggestion.
    interval_level: Level = 0.9
    service_level: Level = 0.95
    #: Half-lives of the item's sales rates (in-stock time), fast to slow.
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
_WEEK_MS = 7 * _DAY_MS
_TWO_PI = 2 * math.pi
_LOG_SCALE = 10.0
#: Hourly buckets of history kept per item: the season plus the longest horizon.
_MIN_SCORES = 50
_RESORT_EVERY = 100


class _Item:
    """What is known of an item: price, stock, sales rates and recent sales."""

    __slots__ = (
        "buckets",
        "category",
        "competitor",
        "cum_units",
        "first_ts",
        "last_bucket",
        "out_ms",
        "out_since",
        "price",
        "price_ts",
        "rate_ts",
        "rates",
        "ref",
        "sold_since_report",
        "stock_reported",
    )

    def __init__(self, ts: int, n_buckets: int) -> None:
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
        # Ring of units per bucket, indexed by absolute bucket number modulo its length.
        self.buckets = [0] * n_buckets
        self.last_bucket = -1

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


class _Scores:
    """Normalised residuals of the last ``size`` scored windows, for conformal quantiles."""

    __slots__ = ("i", "n_new", "ring", "size", "sorted")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring: list[float] = []
        self.i = 0
        self.n_new = 0
        self.sorted: list[float] = []

    def add(self, score: float) -> None:
        ring = self.ring
        if len(ring) < self.size:
            ring.append(score)
        else:
            ring[self.i] = score
            self.i = (self.i + 1) % self.size
        self.n_new += 1
        if self.n_new >= _RESORT_EVERY or len(self.sorted) < _MIN_SCORES:
            self.sorted = sorted(ring)
            self.n_new = 0

    def quantile(self, q: float) -> float:
        s = self.sorted
        if len(s) < _MIN_SCORES:
            return _normal_quantile(q)
        k = min(max(math.ceil(q * (len(s) + 1)) - 1, 0), len(s) - 1)
        return s[k]

    def survival(self, z: float) -> float:
        """Share of scores >= ``z``."""
        s = self.sorted
        if len(s) < _MIN_SCORES:
            return 0.5 * math.erfc(z / math.sqrt(2))
        return (len(s) - bisect.bisect_left(s, z)) / len(s)


def _normal_quantile(q: float) -> float:
    # Acklam-free: bisection on erfc is plenty for a warm-up fallback.
    lo, hi = -8.0, 8.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class _Pending:
    """A forecast waiting for its window to close."""

    __slots__ = ("baseline", "cum_units", "h", "high", "item_id", "low", "mu", "out_ms", "ts", "x")

    def __init__(
        self, item_id: str, h: int, ts: int, mu: float, baseline: float, low: float, high: float,
        x: dict[str, float], cum_units: int, out_ms: int,
    ) -> None:  # fmt: skip
        self.item_id = item_id
        self.h = h
        self.ts = ts
        self.mu = mu
        self.baseline = baseline
        self.low = low
        self.high = high
        self.x = x
        self.cum_units = cum_units
        self.out_ms = out_ms


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
        #: The longest horizon's evaluation: its drift monitor is the learner's.
        self.evaluation = self.evaluations[self.labels[longest]]
        self.scores = [_Scores(spec.calibration_window) for _ in self.horizons_ms]
        self._log_target = spec.target == "log1p"
        self._volume = [1.0] * len(self.horizons_ms)
        self._weighted = accepts_sample_weight(self.models[0])
        self.outcomes = [0] * len(self.horizons_ms)
        self.censored = [0] * len(self.horizons_ms)
        self.bucket_ms = int(spec.bucket_s * 1000)
        self.season_ms = int(spec.season_s * 1000)
        self._n_buckets = -(-(self.season_ms + max(self.horizons_ms)) // self.bucket_ms) + 2
        self._items: BoundedDict[str, _Item] = BoundedDict(
            spec.max_items, int(spec.item_ttl_s * 1000) if spec.item_ttl_s is not None else None
        )
        self._taus = [h * 1000 / math.log(2) for h in spec.rate_half_lives_s]
        self._ref_tau = spec.reference_half_life_s * 1000 / math.log(2)
        self.lead_ms = int(spec.lead_time_s * 1000)
        # The horizon the lead-time figures are read from: the closest (in ratio) to the lead time.
        self._lead_h = min(
            range(len(self.horizons_ms)), key=lambda k: abs(math.log(self.horizons_ms[k] / self.lead_ms))
        )
        self._lo_q = (1 - spec.interval_level) / 2
        self._hi_q = 1 - self._lo_q
        # One join per horizon (windows close in the order added, so one length per join).
        # No label arrives by id: a window closing *is* the label (the units sold in it).
        self.joins: list[LabelJoin[str, _Pending]] = [
            LabelJoin(h_ms, spec.max_pending, on_label=self._ignore, on_expire=self._closed, remember=0)
            for h_ms in self.horizons_ms
        ]
        self._bucket = -1  # current bucket number (event time)
        self._sold_in_bucket: dict[str, int] = {}
        self._events = 0
        #: Windows that closed with the item no longer in state (forgotten): not learned.
        self.forgotten = 0
        self._made: tuple[Any, list[_Pending]] | None = None

    # -- the Learner interface ------------------------------------------------------------

    def predict(self, event: Any) -> DemandForecasts | None:
        pending: list[_Pending] = []
        out: list[Forecast] = []
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
        joins = self.joins
        for p in made[1]:
            joins[p.h].add(p.item_id, p, p.ts)
        ts = event.ts
        for join in joins:
            join.advance(ts)
        if type(event) is Purchase:
            self._sold(event)
        self._events += 1
        if self._events % 4096 == 0 and self._items.ttl_ms is not None:
            self._items.expire(ts)

    def label_stats(self) -> Mapping[str, int]:
        """``expired``: forecast windows closed (each one learned, or censored);
        ``evicted``: pushed out by ``max_pending``. No label arrives by id."""
        total: dict[str, int] = {}
        for join in self.joins:
            for key, n in join.stats().items():
                total[key] = total.get(key, 0) + n
        return total

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
            it = _Item(ts, self._n_buckets)
        self._items.put(item_id, it, ts)
        return it

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
            self._rates_to(it, ts)
            it.stock_reported = event.stock
            it.sold_since_report = 0
            if event.stock > 0:
                it.come_back(ts)
            else:
                it.go_out(ts)
        return it

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
        rates = it.rates
        for k, tau in enumerate(self._taus):
            rates[k] += q * 1000.0 / tau  # units per second, exponentially weighted
        it.cum_units += q
        b = ts // self.bucket_ms
        n = len(it.buckets)
        if b > it.last_bucket:
            for j in range(max(it.last_bucket + 1, b - n + 1), b + 1):
                it.buckets[j % n] = 0
            it.last_bucket = b
        if b > it.last_bucket - n:
            it.buckets[b % n] += q
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

    def _rate(self, it: _Item, k: int, ts: int) -> float:
        """Rate ``k`` (units/s) at ``ts``, bias-corrected for a short history."""
        now = it.in_stock_ms(ts)
        tau = self._taus[k]
        r = it.rates[k] * math.exp(-max(now - it.rate_ts, 0) / tau)
        age = now
        if age <= 0:
            return 0.0
        return r / (1.0 - math.exp(-age / tau))

    def _baseline(self, it: _Item, ts: int, h_ms: int) -> float:
        """Seasonal naive: units sold in ``[ts - season, ts - season + h)`` (hourly buckets)."""
        bms = self.bucket_ms
        start = ts - self.season_ms
        if start < it.first_ts:
            # Less than a season of history: the slow rate over the horizon.
            return self._rate(it, 2, ts) * h_ms / 1000.0
        n = len(it.buckets)
        b0 = start // bms
        frac = (start - b0 * bms) / bms
        nb = h_ms / bms
        total = 0.0
        j = b0
        left = nb
        weight = 1.0 - frac
        while left > 1e-9:
            w = min(weight, left)
            if it.last_bucket - n < j <= it.last_bucket:
                total += w * it.buckets[j % n]
            left -= w
            j += 1
            weight = 1.0
        return total

    def _features(self, it: _Item, ts: int, h_ms: int, baseline: float) -> dict[str, float]:
        h_s = h_ms / 1000.0
        x: dict[str, float] = {
            "naive": math.log(baseline + 0.1),
            "rate_fast": math.log(self._rate(it, 0, ts) * h_s + 0.1),
            "rate_mid": math.log(self._rate(it, 1, ts) * h_s + 0.1),
            "rate_slow": math.log(self._rate(it, 2, ts) * h_s + 0.1),
        }
        mid = ts + h_ms // 2
        day = _TWO_PI * (mid % _DAY_MS) / _DAY_MS
        week = _TWO_PI * (mid % _WEEK_MS) / _WEEK_MS
        if h_ms < _DAY_MS:
            x["day_sin"], x["day_cos"] = math.sin(day), math.cos(day)
            x["day2_sin"], x["day2_cos"] = math.sin(2 * day), math.cos(2 * day)
        if h_ms < _WEEK_MS:
            x["week_sin"], x["week_cos"] = math.sin(week), math.cos(week)
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
        spec = self.spec
        mus: list[float] = []
        made: list[tuple[int, float, float, float, float, dict[str, float], bool]] = []
        for k, h_ms in enumerate(self.horizons_ms):
            baseline = self._baseline(it, ts, h_ms)
            x = self._features(it, ts, h_ms, baseline)
            served = self.outcomes[k] >= spec.min_outcomes
            if served:
                mu = self.models[k].predict_one(x)
                mu = float(mu) if mu is not None and math.isfinite(mu) else baseline
                if self._log_target:
                    mu = math.expm1(min(mu, 20.0))
                mu = min(max(mu, 0.0), 1e9)
            else:
                mu = baseline
            scores = self.scores[k]
            spread = math.sqrt(mu + 1.0)
            low = max(mu + scores.quantile(self._lo_q) * spread, 0.0)
            high = max(mu + scores.quantile(self._hi_q) * spread, low)
            mus.append(mu)
            made.append((k, mu, baseline, low, high, x, served))
        # Lead-time figures, from the horizon closest to the lead time.
        kl = self._lead_h
        rate = mus[kl] / self.horizons_ms[kl]  # units per ms
        stock = it.stock
        scores = self.scores[kl]
        if stock is None:
            p_out: float | None = None
        elif stock <= 0:
            p_out = 1.0
        else:
            mu_l = rate * self.lead_ms
            p_out = scores.survival((stock - 0.5 - mu_l) / math.sqrt(mu_l + 1.0))
        out_ms = it.out_total(ts)
        for k, mu, baseline, low, high, x, served in made:
            h_ms = self.horizons_ms[k]
            mu_c = rate * (self.lead_ms + h_ms)
            need = mu_c + scores.quantile(spec.service_level) * math.sqrt(mu_c + 1.0)
            reorder = max(math.ceil(need - (stock or 0)), 0)
            cover = stock / (mu / h_ms) / 3_600_000 if stock is not None and mu > 0 else None
            out.append(
                Forecast(
                    item_id, h_ms / 1000.0, ts, round(mu, 4), Interval(round(low, 4), round(high, 4),
                    spec.interval_level), stock, None if cover is None else round(cover, 3),
                    None if p_out is None else round(p_out, 4), reorder, "model" if served else "baseline",
                )
            )  # fmt: skip
            pending.append(_Pending(item_id, k, ts, mu, baseline, low, high, x, it.cum_units, out_ms))

    # -- windows closing (the labels) ---------------------------------------------------------

    def _ignore(self, payload: _Pending, label: Any, ts: int) -> None:  # pragma: no cover - no labels by id
        pass

    def _closed(self, p: _Pending, deadline: int) -> None:
        it = self._items.get(p.item_id)
        if it is None:
            self.forgotten += 1
            return
        k = p.h
        label = self.labels[k]
        ev = self.evaluations[label]
        if it.out_total(deadline) > p.out_ms:
            # Out of stock during the window: the sales are censored, not the demand.
            self.censored[k] += 1
            ev.score("censored", 1.0)
            return
        ev.score("censored", 0.0)
        y = it.cum_units - p.cum_units
        if self._log_target:
            # Weighted by the window's expected volume (relative to the mean), so the log-space
            # fit weighs items as WAPE does; otherwise the many small items shrink the large ones.
            v = p.baseline + p.mu + 1.0
            self._volume[k] += (v - self._volume[k]) / min(self.outcomes[k] + 1, 1000)
            w = min(v / self._volume[k], 5.0)
            self.models[k].learn_one(p.x, math.log1p(y), w=w) if self._weighted else self.models[k].learn_one(
                p.x, math.log1p(y)
            )
        else:
            self.models[k].learn_one(p.x, float(y))
        self.n_learned += 1
        self.outcomes[k] += 1
        ev.score("abs_error", abs(y - p.mu))
        ev.score("baseline_abs_error", abs(y - p.baseline))
        ev.score("units", float(y))
        ev.score("coverage", 1.0 if p.low <= y <= p.high else 0.0)
        z = (y - p.mu) / math.sqrt(p.mu + 1.0)
        self.scores[k].add(z)
        ev.error(abs(z), deadline)

    def _model_switched(self, switch: Any) -> None:
        self.model_version += 1


def _label(h_s: float) -> str:
    """``3600.0`` -> ``1h``, ``86400`` -> ``24h``, ``90`` -> ``90s``."""
    if h_s % 3600 == 0:
        return f"{int(h_s // 3600)}h"
    if h_s % 60 == 0:
        return f"{int(h_s // 60)}m"
    return f"{h_s:g}s"
