"""Price recommendations from the conversion of views, learned online.

The learner reads three streams:

* ``prices``: an item's current price, cost, competitor price, stock and
  category. Each price event is published a quote (``PriceQuote``, topic
  ``price-quotes``): the predicted conversion of a view at the current price
  and the price that maximises the expected margin per view,
  ``(price - cost) * p(price)`` (the revenue ``price * p(price)`` when the cost
  is unknown), within guardrails;
* ``clicks``: a view of the item at its current price (the click's ``price``,
  else the item's latest); no output;
* ``purchases``: a conversion of the views of that item by that user; no output.

The model (any River binary classifier, ``linear_model.LogisticRegression`` by
default) learns p(conversion | view) from the price *relative to the item's
reference price* (an exponentially time-weighted average of its past prices,
half-life ``reference_half_life_s``), the competitor gap, the stock, the time
of day and the category (with a per-category price slope, since elasticity
differs by category). A view's label is known only later (``stream.labels``):
positive when a purchase of the item by the same user follows within
``label_window_s`` of event time, negative when that window closes. Only
``negative_sampling`` of the negatives are learned, weighted up to stay
unbiased: most views do not convert, and learning is most of a view's cost.

The recommendation scores a grid of ``grid_points`` candidate prices between
the guardrails, vectorised: with a logistic model (alone or after a
``StandardScaler``) every price feature is affine in log(price), so
``logit p(c) = logit p(current) + slope * log(c / current)`` where the slope
is read from the model's weights; any other model is scored per grid point
with ``predict_proba_one``. The guardrails, each named in ``bound_by`` when it
stopped the recommendation from going further (None: an interior optimum):

* ``max_change``: at most ``max_change`` (a fraction) away from the current price;
* ``min_margin``: ``(price - cost) / price >= min_margin`` (when the cost is known);
* ``floor`` / ``ceiling``: within ``[floor_ratio, ceiling_ratio] x`` the reference price;
* ``warm_up``: fewer than ``min_outcomes`` view outcomes are known yet: the
  current price is recommended.

When the guardrails conflict, the step limit wins (prices never jump) and the
recommendation moves as far as it allows towards the others; a ceiling
below the minimum margin yields to the margin.

``quote(item_id, ts)`` gives the same quote on demand (an API asking for a
price), from the item's latest state, without changing anything.

Quality: ``Evaluation.for_binary`` on the views' outcomes (the probability
predicted at view time), its errors fed to the concept-drift monitor, and
``margin_uplift``, the mean over quotes of the model's expected margin per
view at the recommended price minus at the current price.

>>> from stream.events import Click, Price, Purchase
>>> spec = PricingSpec(min_outcomes=0, label_window_s=60, negative_sampling=1.0)
>>> learner = spec.build("pricing", {"clicks": "clicks", "purchases": "purchases", "prices": "prices"})
>>> price = Price(event_id="p1", ts=0, item_id="i1", price=10.0, cost=6.0, competitor_price=10.5, stock=40)
>>> quote = learner.predict(price); learner.learn(price)
>>> quote.price, quote.recommended_price, quote.bound_by   # an untrained model: margin grows with price
(10.0, 11.0, 'max_change')
>>> for i, (user, bought) in enumerate([("u1", True), ("u2", False), ("u3", True)]):
...     click = Click(event_id=f"c{i}", ts=1_000 * i, user_id=user, item_id="i1")
...     _ = learner.predict(click); learner.learn(click)
...     if bought:
...         buy = Purchase(event_id=f"b{i}", ts=1_000 * i + 500, order_id=f"o{i}", user_id=user,
...                        item_id="i1", quantity=1, unit_price=10.0)
...         _ = learner.predict(buy); learner.learn(buy)
>>> learner.joins.advance(100_000)          # u2's window closes: a negative
>>> learner.label_stats()["joined"], learner.label_stats()["expired"], learner.n_learned
(2, 1, 3)
>>> 0 < learner.quote("i1", ts=100_000).conversion_probability < 1
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from river import base, compose, linear_model, preprocessing

from stream.bounded import BoundedDict, FeatureBound, model_feature_names, model_table_sizes
from stream.drift import AdaptiveModel, DriftSpec
from stream.evaluation import Evaluation
from stream.events import Click, Price, Purchase
from stream.labels import LabelJoin
from stream.learners.base import Learner
from stream.learners.configured import accepts_sample_weight
from stream.models import build_model, with_seed
from stream.sync import Params, assign_count_params, count_params

__all__ = ["PriceQuote", "PricingLearner", "PricingSpec"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0, lt=1)]
Guardrail = Literal["max_change", "min_margin", "floor", "ceiling", "warm_up"]


def _default_model() -> dict[str, Any]:
    return {
        "class": "linear_model.LogisticRegression",
        "params": {"optimizer": {"class": "optim.AdaGrad", "params": {"lr": 0.02}}, "intercept_lr": 0.01},
    }


class PriceQuote(msgspec.Struct, gc=False):
    """The prediction published for a price event (and returned by ``quote``)."""

    item_id: str
    #: The current price, and the predicted probability that a view at it converts.
    price: float
    conversion_probability: float
    #: The price maximising the expected margin (or revenue) per view within the guardrails.
    recommended_price: float
    recommended_conversion_probability: float
    #: Expected margin per view, ``(price - cost) * p``, or revenue ``price * p`` when the cost is unknown.
    expected_margin: float
    recommended_expected_margin: float
    objective: Literal["margin", "revenue"]
    #: The item's reference price (time-weighted average of its past prices).
    reference_price: float
    #: The guardrail that stopped the recommendation, or None (an unconstrained optimum).
    bound_by: Guardrail | None


class PricingSpec(msgspec.Struct, tag="pricing", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    output_topic: str = "price-quotes"
    #: River binary classifier of a view's conversion: ``{class, params}`` or a pipeline list.
    model: dict[str, Any] | list[dict[str, Any]] = msgspec.field(default_factory=_default_model)
    #: Given to every (nested) model that takes a ``seed`` and has none.
    seed: int = 42
    #: A view is positive if the same user buys the item within this much event time.
    label_window_s: PositiveFloat = 600.0
    #: Views waiting for their outcome, at most (the oldest are dropped, counted ``evicted``).
    max_pending: PositiveInt = 200_000
    #: Items whose price state is kept (least recently priced forgotten first) ...
    max_items: PositiveInt = 100_000
    #: ... and for how long after their last price event (None: until pushed out).
    item_ttl_s: PositiveFloat | None = None
    #: Categories the model keeps weights for (its ``cat=<c>`` one-hot and ``price_vs_ref:<c>``
    #: slope; least recently learned forgotten first): the model grows by two weights, and their
    #: optimizer and scaler state, per distinct category, and categories come from the data.
    max_categories: PositiveInt = 10_000
    #: Half-life of the time-weighted average of an item's prices (its reference price).
    reference_half_life_s: PositiveFloat = 7 * 86_400.0
    #: Candidate prices scored per quote, evenly spaced between the guardrails.
    grid_points: Annotated[int, msgspec.Meta(ge=3, le=1001)] = 21
    #: Largest change of the recommended price from the current one, as a fraction.
    max_change: Fraction = 0.10
    #: Smallest margin ``(price - cost) / price`` recommended (cost known); 0 allows selling at cost.
    min_margin: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.05
    #: Recommended prices stay within these multiples of the reference price.
    floor_ratio: PositiveFloat = 0.5
    ceiling_ratio: PositiveFloat = 2.0
    #: Recommended prices are rounded to this step (currency units; 0: not rounded).
    price_step: Annotated[float, msgspec.Meta(ge=0)] = 0.01
    #: Share of non-converting views learned from, each with weight ``1 / negative_sampling``
    #: (unbiased; most views do not convert, and learning is most of a view's cost).
    #: 1: every view. Needs a model whose ``learn_one`` takes a sample weight ``w``.
    negative_sampling: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25
    #: View outcomes known before the model's recommendations are published (until then: the current price).
    min_outcomes: NonNegativeInt = 2_000
    #: Rolling window (outcomes) of the rolling quality metrics.
    evaluation_window: PositiveInt = 10_000
    #: The quality metrics are updated on one view outcome in this many (every outcome's
    #: log loss still feeds the drift detector): a binary evaluation costs ~20 us, more
    #: than the rest of a view's work, and there is an outcome per click.
    evaluate_every: PositiveInt = 8
    #: Concept drift on the view outcomes' log loss: ``{ detector = "adwin", params = {...} }``.
    drift: DriftSpec = msgspec.field(default_factory=DriftSpec)

    def validate(self, name: str) -> None:
        if self.floor_ratio >= self.ceiling_ratio:
            raise ValueError("`floor_ratio` must be below `ceiling_ratio`")
        if self.floor_ratio > 1 or self.ceiling_ratio < 1:
            raise ValueError("`floor_ratio` must be <= 1 <= `ceiling_ratio` (the reference price must be allowed)")
        self.drift.validate()
        model = build_model(with_seed(self.model, self.seed), "model")
        if not isinstance(model, base.Classifier):
            raise ValueError(f"model: the conversion model must be a River classifier, got {type(model).__name__}")

    def build(self, name: str, topics: Mapping[str, str]) -> PricingLearner:
        return PricingLearner(name, self, topics)


# -- features ---------------------------------------------------------------------------

#: Price features are log ratios times this, so a 10 % move is ~1 unit, like the other features.
_LOG_SCALE = 10.0
_REL = "price_vs_ref"
_GAP = "price_vs_competitor"
_DAY_MS = 86_400_000
_TWO_PI = 2 * math.pi


class _Item:
    """What is known of an item's price (from its price events)."""

    __slots__ = ("category", "competitor", "cost", "price", "ref", "stock", "ts")

    def __init__(self, event: Price) -> None:
        self.price = event.price
        self.ref = event.price
        self.ts = event.ts
        self.cost = event.cost
        self.competitor = event.competitor_price
        self.stock = event.stock
        self.category = event.category

    def reference(self, ts: int, tau_ms: float) -> float:
        """The reference price at ``ts``: the past prices' average, weighted by how
        long each held, exponentially forgetting (the current one has held since ``self.ts``)."""
        dt = ts - self.ts
        if dt <= 0:
            return self.ref
        return self.ref + (1.0 - math.exp(-dt / tau_ms)) * (self.price - self.ref)


class _View:
    """A view waiting for its outcome: what its features are rebuilt from, and its prediction."""

    __slots__ = ("category", "competitor", "p", "price", "ref", "stock", "ts")

    def __init__(
        self, price: float, ref: float, competitor: float | None, stock: int | None, category: str | None,
        ts: int, p: float,
    ) -> None:  # fmt: skip
        self.price = price
        self.ref = ref
        self.competitor = competitor
        self.stock = stock
        self.category = category
        self.ts = ts
        self.p = p


def features(
    price: float, ref: float, competitor: float | None, stock: int | None, category: str | None, ts: int
) -> dict[str, float]:
    """The conversion model's features of a view at ``price``.

    >>> x = features(11.0, 10.0, 10.0, 0, "books", ts=6 * 3_600_000)
    >>> round(x["price_vs_ref"], 3), x["price_vs_ref:books"] == x["price_vs_ref"], x["out_of_stock"]
    (0.953, True, 1.0)
    >>> round(x["time_sin"], 3), round(x["time_cos"], 3), x["cat=books"]
    (1.0, 0.0, 1.0)
    """
    rel = _LOG_SCALE * math.log(price / ref)
    angle = _TWO_PI * (ts % _DAY_MS) / _DAY_MS
    x = {_REL: rel, "time_sin": math.sin(angle), "time_cos": math.cos(angle)}
    if competitor is not None:
        x[_GAP] = _LOG_SCALE * math.log(price / competitor)
    if stock is not None:
        x["stock"] = math.log1p(stock) / 5.0
        x["out_of_stock"] = 1.0 if stock == 0 else 0.0
    if category is not None:
        x["cat=" + category] = 1.0
        x[_REL + ":" + category] = rel
    return x


def _price_slope(model: Any, category: str | None, competitor: bool) -> float | None:
    """d logit p / d log(price) of a logistic model (alone or after StandardScalers), read
    from its weights; None for any other model (scored point by point instead)."""
    if isinstance(model, AdaptiveModel):
        model = model.current
    scalers: list[Any] = []
    if isinstance(model, compose.Pipeline):
        steps = list(model.steps.values())
        model = steps[-1]
        for step in steps[:-1]:
            if not isinstance(step, preprocessing.StandardScaler):
                return None
            scalers.append(step)
    if type(model) is not linear_model.LogisticRegression:
        return None
    names = [_REL]
    if category is not None:
        names.append(_REL + ":" + category)
    if competitor:
        names.append(_GAP)
    weights = model._weights
    slope = 0.0
    for name in names:
        w = weights.get(name, 0.0)
        for scaler in scalers:
            if not scaler.with_std:
                continue
            var = scaler.vars.get(name)
            if var is None:
                w = 0.0
                break
            v = var.get() if scaler.window_size is not None else var
            w = w / v**0.5 if v else 0.0
        slope += w
    return slope * _LOG_SCALE


def _category_features(category: str) -> tuple[str, str]:
    """The model's features named after a category (see ``features``)."""
    return "cat=" + category, _REL + ":" + category


#: Price events between sweeps of items past their TTL.
_SWEEP_EVERY = 4096
#: Probabilities are clipped like stream.evaluation does, so the errors compare.
_EPS = 1e-15


class PricingLearner(Learner):
    kind = "pricing"

    def __init__(self, name: str, spec: PricingSpec, topics: Mapping[str, str]) -> None:
        self.clicks_topic = topics.get("clicks", "clicks")
        self.purchases_topic = topics.get("purchases", "purchases")
        self.prices_topic = topics.get("prices", "prices")
        reads = frozenset({self.clicks_topic, self.purchases_topic, self.prices_topic})
        super().__init__(name, spec.output_topic, reads)
        self.spec = spec
        model = build_model(with_seed(spec.model, spec.seed))
        self.model, monitor = spec.drift.build(model, task="binary", name=name, on_switch=self._model_switched)
        hold_ms = int(spec.label_window_s * 1000)
        self.evaluation = Evaluation.for_binary(spec.evaluation_window, drift=monitor).order_outcomes(hold_ms)
        #: Model-estimated gain of the recommendations (a mean, not an error: no drift).
        self.uplift = Evaluation.for_means(spec.evaluation_window, ("margin_uplift",))
        self._items: BoundedDict[str, _Item] = BoundedDict(
            spec.max_items, int(spec.item_ttl_s * 1000) if spec.item_ttl_s is not None else None
        )
        self._tau_ms = spec.reference_half_life_s * 1000 / math.log(2)
        self.joins: LabelJoin[tuple[str, str], _View] = LabelJoin(
            int(spec.label_window_s * 1000),
            spec.max_pending,
            on_label=self._converted,
            on_expire=self._not_converted,
            # Nearly every view expires: remembering them all to tell a late purchase from an
            # unrelated one would cost more memory than the views waiting (and never more
            # closed ids than views waiting).
            remember=min(10_000, spec.max_pending),
        )
        #: Categories with weights in the model, bounded (``max_categories``).
        self._categories = FeatureBound(spec.max_categories, self._serving, expand=_category_features)
        #: View outcomes known (learned or sampled out).
        self._outcomes = 0
        self._prices_seen = 0
        # Negatives are sampled (and weighted up) only if the model takes sample weights.
        self._negative_rate = spec.negative_sampling if accepts_sample_weight(model) else 1.0
        self._rng = random.Random(spec.seed)
        #: Views without any known price (neither the click's nor a price event's): not learned.
        self.unpriced_views = 0
        # predict -> learn hand-over of the same event (the view's prediction, the price applied).
        self._scored: tuple[Any, _View | None] | None = None
        self._applied: Price | None = None

    # -- the Learner interface ------------------------------------------------------------

    def predict(self, event: Any) -> PriceQuote | None:
        cls = type(event)
        if cls is Click:
            self._scored = (event, self._view(event))
            return None
        if cls is Price:
            self._apply(event)
            quote = self.quote(event.item_id, event.ts)
            if quote is not None and quote.bound_by != "warm_up":
                self.uplift.score("margin_uplift", quote.recommended_expected_margin - quote.expected_margin)
            return quote
        return None

    def learn(self, event: Any) -> None:
        cls = type(event)
        if cls is Click:
            scored, self._scored = self._scored, None
            view = scored[1] if scored is not None and scored[0] is event else self._view(event)
            if view is not None:
                self.joins.add((event.user_id, event.item_id), view, event.ts)
            else:
                self.joins.advance(event.ts)
        elif cls is Purchase:
            self.joins.label((event.user_id, event.item_id), True, event.ts)
        elif cls is Price:
            if self._applied is not event:
                self._apply(event)
            self._applied = None
            self.joins.advance(event.ts)
            self._prices_seen += 1
            if self._prices_seen % _SWEEP_EVERY == 0 and self._items.ttl_ms is not None:
                # The TTL otherwise applies only to items priced again.
                self._items.expire(event.ts)

    def label_stats(self) -> Mapping[str, int]:
        return self.joins.stats()

    def quality(self) -> Iterator[tuple[str, str, float]]:
        yield from self.evaluation.values()
        yield from self.uplift.values()

    def replace_model(self, model: Any) -> None:
        if isinstance(self.model, AdaptiveModel):
            self.model.current = model
        else:
            self.model = model
        self._negative_rate = self.spec.negative_sampling if accepts_sample_weight(model) else 1.0
        self.model_version += 1

    # -- quotes ---------------------------------------------------------------------------

    def quote(self, item_id: str, ts: int) -> PriceQuote | None:
        """The quote for ``item_id`` at event time ``ts``, on demand: the predicted
        conversion at its current price and the recommended price, from its
        latest price event and the current model. None for an item with no
        price state (never priced, or forgotten). Changes nothing (not counted
        in ``margin_uplift``), except that a category the model does not know is
        counted against ``max_categories`` (a scaler in the model would keep
        statistics of it)."""
        it = self._items.get(item_id)
        if it is None:
            return None
        spec = self.spec
        price = it.price
        ref = it.reference(ts, self._tau_ms)
        cost = it.cost
        x = features(price, ref, it.competitor, it.stock, it.category, ts)
        if it.category is not None and it.category not in self._categories:
            self._categories.touch(it.category, ts)
        p_now = self._p(x)
        unit_cost = cost if cost is not None else 0.0
        margin_now = (price - unit_cost) * p_now
        objective: Literal["margin", "revenue"] = "margin" if cost is not None else "revenue"
        if self._outcomes < spec.min_outcomes:
            return PriceQuote(item_id, price, p_now, price, p_now, margin_now, margin_now, objective, ref, "warm_up")
        rec, p_rec, bound_by = self._recommend(it, price, ref, unit_cost, cost is not None, x, p_now, ts)
        return PriceQuote(
            item_id, price, p_now, rec, p_rec, margin_now, (rec - unit_cost) * p_rec, objective, ref, bound_by
        )

    def _recommend(
        self, it: _Item, price: float, ref: float, cost: float, has_cost: bool, x: dict[str, float],
        p_now: float, ts: int,
    ) -> tuple[float, float, Guardrail | None]:  # fmt: skip
        spec = self.spec
        step_lo, step_hi = price * (1 - spec.max_change), price * (1 + spec.max_change)
        lo, lo_by = step_lo, "max_change"
        floor = spec.floor_ratio * ref
        if floor > lo:
            lo, lo_by = floor, "floor"
        if has_cost:
            margin_floor = cost / (1 - spec.min_margin)
            if margin_floor > lo:
                lo, lo_by = margin_floor, "min_margin"
        hi, hi_by = step_hi, "max_change"
        ceiling = spec.ceiling_ratio * ref
        if ceiling < hi:
            hi, hi_by = ceiling, "ceiling"
        if lo > hi:
            # Conflicting guardrails: never jump more than a step, and never below the margin.
            if lo > step_hi:
                target, by = self._round(step_hi, up=False), "max_change"
            elif hi < step_lo:
                target, by = self._round(step_lo, up=True), "max_change"
            else:
                target, by = self._round(lo, up=True), lo_by
            p_target = float(self._p_grid(np.array([target]), it, price, ref, x, p_now, ts)[0])
            return target, p_target, by  # type: ignore[return-value]
        n = spec.grid_points
        grid = np.empty(n + 3)
        grid[:n] = np.linspace(lo, hi, n)
        step = spec.price_step
        if step > 0:
            lo_r, hi_r = self._round(lo, up=True), self._round(hi, up=False)
            if lo_r <= hi_r:
                np.clip(np.round(np.round(grid[:n] / step) * step, 10), lo_r, hi_r, out=grid[:n])
        # The current price (the uplift is then never negative), and a probe just
        # outside each end: better there means that end's guardrail binds.
        grid[n] = min(max(price, grid[0]), grid[n - 1])
        grid[n + 1] = lo * (1 - 1e-3)
        grid[n + 2] = hi * (1 + 1e-3)
        p = self._p_grid(grid, it, price, ref, x, p_now, ts)
        value = (grid - cost) * p
        best = int(np.argmax(value[: n + 1]))
        rec = float(grid[best])
        bound_by: Guardrail | None = None
        if rec <= grid[0] and value[n + 1] > value[best]:
            bound_by = lo_by  # type: ignore[assignment]
        elif rec >= grid[n - 1] and value[n + 2] > value[best]:
            bound_by = hi_by  # type: ignore[assignment]
        return rec, float(p[best]), bound_by

    def _round(self, value: float, up: bool) -> float:
        """``value`` on the price step, rounded towards the inside of its guardrail."""
        step = self.spec.price_step
        if step <= 0:
            return value
        n = math.ceil(value / step - 1e-9) if up else math.floor(value / step + 1e-9)
        return round(n * step, 10)  # 10.99, not 10.990000000000002

    def _p_grid(
        self, grid: np.ndarray, it: _Item, price: float, ref: float, x: dict[str, float], p_now: float, ts: int
    ) -> np.ndarray:
        slope = _price_slope(self.model, it.category, it.competitor is not None)
        if slope is not None:
            p = min(max(p_now, _EPS), 1 - _EPS)
            logit = math.log(p / (1 - p)) + slope * np.log(grid / price)
            return 1.0 / (1.0 + np.exp(-logit))
        return np.array([self._p(features(float(c), ref, it.competitor, it.stock, it.category, ts)) for c in grid])

    def _p(self, x: dict[str, float]) -> float:
        proba = self.model.predict_proba_one(x)
        return float(proba.get(True, 0.0)) if proba else 0.0

    # -- state and labels -----------------------------------------------------------------

    def _apply(self, event: Price) -> None:
        """A price event is a fact about the item, recorded before quoting it."""
        items = self._items
        it = items.get(event.item_id, event.ts)
        if it is None:
            it = _Item(event)
        else:
            if event.ts >= it.ts:
                it.ref = it.reference(event.ts, self._tau_ms)
                it.ts = event.ts
            it.price = event.price
            if event.cost is not None:
                it.cost = event.cost
            if event.competitor_price is not None:
                it.competitor = event.competitor_price
            if event.stock is not None:
                it.stock = event.stock
            if event.category is not None:
                it.category = event.category
        items.put(event.item_id, it, event.ts)
        self._applied = event

    def _view(self, click: Click) -> _View | None:
        ts = click.ts
        it = self._items.get(click.item_id)
        if it is not None:
            price = click.price if click.price is not None else it.price
            ref = it.reference(ts, self._tau_ms)
            competitor, stock = it.competitor, it.stock
            category = it.category if it.category is not None else click.category
        elif click.price is not None:
            # Never priced: its reference is the price it is seen at.
            price = ref = click.price
            competitor = stock = None
            category = click.category
        else:
            self.unpriced_views += 1
            return None
        if category is not None:
            # Counted when predicted too: a scaler in the model keeps statistics of what it transforms.
            self._categories.touch(category, ts)
        p = self._p(features(price, ref, competitor, stock, category, ts))
        return _View(price, ref, competitor, stock, category, ts, p)

    def _learn_view(self, view: _View, converted: bool, ts: int) -> None:
        self._outcomes += 1
        if self._outcomes % self.spec.evaluate_every == 0:
            self.evaluation.binary(converted, view.p, ts, view.ts)
        else:
            p = min(max(view.p, _EPS), 1 - _EPS)
            self.evaluation.error(-math.log(p if converted else 1 - p), ts, (converted, p), view.ts)
        if converted:
            w = 1.0
        elif self._negative_rate < 1.0:
            if self._rng.random() >= self._negative_rate:
                return
            w = 1.0 / self._negative_rate
        else:
            w = 1.0
        x = features(view.price, view.ref, view.competitor, view.stock, view.category, view.ts)
        if view.category is not None:
            self._categories.touch(view.category, ts)
        if w == 1.0:
            self.model.learn_one(x, converted)
        else:
            self.model.learn_one(x, converted, w=w)
        self.n_learned += 1

    def _converted(self, view: _View, label: Any, ts: int) -> None:
        self._learn_view(view, True, ts)

    def _not_converted(self, view: _View, deadline: int) -> None:
        self._learn_view(view, False, deadline)

    def _model_switched(self, switch: Any) -> None:
        self.model_version += 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_categories" not in state:
            # A checkpoint from before the bound: its model's data-named features are adopted.
            self._categories = FeatureBound(self.spec.max_categories, self._serving, expand=_category_features)
            self._categories.adopt(
                name[4:]
                for name in model_feature_names(self.model)
                if isinstance(name, str) and name.startswith("cat=")
            )

    def _serving(self) -> Any:
        """The model (an ``AdaptiveModel`` holds its candidate and fallback too)."""
        return self.model

    # -- introspection (tests, the flood bench; not for the hot path) -------------------------

    def state_sizes(self) -> dict[str, int]:
        """Entries held by every per-key structure, and the model's largest table."""
        return {
            "items": len(self._items),
            "pending": len(self.joins),
            "categories": len(self._categories),
            "model_table": max(model_table_sizes(self.model).values(), default=0),
        }

    # -- model sync (stream.sync): what every task's copy should know ---------------------------

    def global_params(self) -> Params:
        """The model's weights and scaler moments, and the outcome count (it ends the warm-up,
        which one task alone would reach P times later)."""
        params = super().global_params()
        params.update(count_params({"outcomes": self._outcomes}))
        return params

    def set_global_params(self, params: Params) -> None:
        super().set_global_params(params)
        self._outcomes = round(assign_count_params(params, ("outcomes",)).get("outcomes", self._outcomes))
