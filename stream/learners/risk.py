"""Fraud risk of each order line, learned online from late, partial labels.

The learner reads ``purchases`` and ``fraud-labels``. Each purchase is
published a ``RiskScore`` (topic ``risk-scores``): ``fraud_probability``, a
``decision`` (``block`` at ``block_threshold`` or above, ``review`` at
``review_threshold`` or above, else ``approve``) and the ``source`` of the
probability.

Features, all scaled to [0, 1] by fixed ranges: the purchase (amount, quantity, payment method, category, account
age, shipping country differing from the account's country) and the buyer's
bounded online state before it: purchases in the last hour and day, the
amount against the user's usual (log) amount, a device the user has not used
before, and whether this is the user's first purchase seen.

Labels are late and partial: chargebacks arrive days later, and only for
frauds. So each purchase waits under its ``order_id`` (``stream.labels``): a
fraud label within ``label_window_s`` of event time makes it a fraud, and
the window closing without one makes it legitimate. Either way the model
learns it then, and the prediction published at purchase time is evaluated
(``Evaluation.for_binary``, errors to the concept-drift monitor).

Class imbalance (~1 % fraud): a fraud outcome is learned with sample weight
``fraud_weight`` (River's ``learn_one(x, y, w=...)``; a model without sample
weights sees it that many times instead, i.e. oversampling), so the rare
class moves the weights as much as the common one. Weighting multiplies the
model's odds by ``fraud_weight``; the published probability divides them
back (``p = q / (q + w (1 - q))``), so it stays a calibrated probability and
the thresholds keep their meaning.

Cold start: until the model has learned ``min_labels`` outcomes of which
``min_fraud_labels`` frauds, the probability comes from a cold-start score
and ``source`` is ``anomaly``. By default (``anomaly = "profile"``) that is a
``FraudProfile``: how rare the order's (binned) feature values are among all
orders, turned, label by label, into how much likelier they are among the
labelled frauds (naive Bayes under a uniform prior). It needs no legitimate
labels, which arrive only when an order's window closes, hours later.
``anomaly = "half_space_trees"`` uses ``river.anomaly.HalfSpaceTrees`` (seeded,
on the features scaled to [0, 1]) instead. The score is turned into
its quantile ``u`` among the last ``anomaly_reference`` orders' scores, and
``fraud_probability = u ** (1 / expected_fraud_rate - 1)``: the mean
probability is then ``expected_fraud_rate`` and only the most anomalous
orders get high probabilities, so the same thresholds apply. After that the
source is ``model`` for good, and the detector stops learning.
Ground-truth ROC AUC on the quality bench: ``docs/learners-pricing-risk.md``.

>>> from stream.events import FraudLabel, Purchase
>>> learner = RiskSpec(min_labels=1, min_fraud_labels=1, label_window_s=60).build(
...     "risk", {"purchases": "purchases", "fraud_labels": "fraud-labels"})
>>> def order(i, user, amount, ts):
...     return Purchase(event_id=f"p{i}", ts=ts, order_id=f"o{i}", user_id=user, item_id="i1", quantity=1,
...                     unit_price=amount, payment_method="card", country="US", shipping_country="US",
...                     account_age_days=400.0, device_id=f"d-{user}")
>>> first = order(1, "u1", 25.0, ts=0)
>>> score = learner.predict(first); learner.learn(first)
>>> score.source, score.decision
('anomaly', 'approve')
>>> label = FraudLabel(event_id="l1", ts=30_000, order_id="o1", is_fraud=True)
>>> learner.predict(label) is None
True
>>> learner.learn(label)                   # joined: learned as a fraud
>>> learner.predict(order(2, "u2", 30.0, ts=40_000)).source
'model'
>>> learner.label_stats()["joined"], learner.n_learned
(1, 1)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from river import anomaly, base

from stream.bounded import BoundedDict, FeatureBound, model_feature_names, model_table_sizes
from stream.drift import AdaptiveModel, DriftSpec
from stream.evaluation import Evaluation
from stream.events import FraudLabel, Purchase
from stream.labels import LabelJoin
from stream.learners.base import Learner
from stream.learners.configured import accepts_sample_weight
from stream.models import build_model, with_seed
from stream.sync import HSTWindow, Params, assign_count_params, assign_hst_params, count_params, hst_params

__all__ = ["RiskLearner", "RiskScore", "RiskSpec"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Probability = Annotated[float, msgspec.Meta(gt=0, lt=1)]


def _default_model() -> dict[str, Any]:
    # The features are already scaled to [0, 1]: no StandardScaler (it would triple the learning cost).
    return {
        "class": "linear_model.LogisticRegression",
        "params": {"optimizer": {"class": "optim.SGD", "params": {"lr": 0.1}}, "intercept_lr": 0.01},
    }


class RiskScore(msgspec.Struct, gc=False):
    """The prediction published for a purchase."""

    order_id: str
    #: Probability that the order is fraudulent (calibrated for ``model``; see the module doc for ``anomaly``).
    fraud_probability: float
    decision: Literal["approve", "review", "block"]
    #: ``model``: the supervised model; ``anomaly``: too few labels yet, an anomaly detector.
    source: Literal["model", "anomaly"]


class RiskSpec(msgspec.Struct, tag="risk", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    output_topic: str = "risk-scores"
    #: River binary classifier: ``{class, params}`` or a pipeline list.
    model: dict[str, Any] | list[dict[str, Any]] = msgspec.field(default_factory=_default_model)
    #: Seeds the anomaly detector and every (nested) model that takes a ``seed`` and has none.
    seed: int = 42
    #: An order with no fraud label this long (event time) after it is learned as legitimate.
    label_window_s: PositiveFloat = 14_400.0
    #: Orders waiting for their label, at most (the oldest are dropped unlearned, counted ``evicted``).
    max_pending: PositiveInt = 200_000
    #: Sample weight of a fraud outcome (class imbalance); the output is corrected back.
    fraud_weight: Annotated[float, msgspec.Meta(ge=1)] = 20.0
    #: Decisions: ``review`` from this probability, ``block`` from that one.
    review_threshold: Probability = 0.1
    block_threshold: Probability = 0.5
    #: Outcomes learned (and frauds among them) before the model replaces the anomaly detector.
    min_labels: NonNegativeInt = 500
    min_fraud_labels: NonNegativeInt = 10
    #: The fraud rate the anomaly-based probability is scaled to (its mean).
    expected_fraud_rate: Probability = 0.01
    #: The cold-start score: ``profile`` (``FraudProfile``: rare feature values, then what
    #: the labelled frauds look like) or ``half_space_trees`` (river.anomaly.HalfSpaceTrees).
    anomaly: Literal["profile", "half_space_trees"] = "profile"
    #: HalfSpaceTrees: trees, height, window (orders) of its mass profiles ...
    anomaly_trees: PositiveInt = 10
    anomaly_height: Annotated[int, msgspec.Meta(ge=1, le=20)] = 8
    anomaly_window: PositiveInt = 250
    #: ... and the recent scores an order's score is ranked among.
    anomaly_reference: Annotated[int, msgspec.Meta(ge=10)] = 1_000
    #: Users whose purchase history is kept (least recently active forgotten first) ...
    max_users: PositiveInt = 200_000
    #: ... and for how long after their last purchase.
    user_ttl_s: PositiveFloat = 30 * 86_400.0
    #: Devices remembered per user (a device outside them is new).
    max_devices: PositiveInt = 8
    #: Purchase times kept per user (the hour and day counts saturate there).
    max_recent: PositiveInt = 64
    #: One-hot features (``cat=<category>``, ``pay=<payment method>``) the model keeps
    #: weights for, least recently learned forgotten first: their values come from the data.
    max_one_hot: PositiveInt = 10_000
    #: Rolling window (outcomes) of the rolling quality metrics.
    evaluation_window: PositiveInt = 10_000
    #: Concept drift on the outcomes' log loss: ``{ detector = "adwin", reaction = "report" | "switch" }``.
    drift: DriftSpec = msgspec.field(default_factory=DriftSpec)

    def validate(self, name: str) -> None:
        if self.review_threshold > self.block_threshold:
            raise ValueError("`review_threshold` must not exceed `block_threshold`")
        if self.min_fraud_labels > self.min_labels:
            raise ValueError("`min_fraud_labels` must not exceed `min_labels`")
        self.drift.validate()
        model = build_model(with_seed(self.model, self.seed), "model")
        if not isinstance(model, base.Classifier):
            raise ValueError(f"model: the fraud model must be a River classifier, got {type(model).__name__}")

    def build(self, name: str, topics: Mapping[str, str]) -> RiskLearner:
        return RiskLearner(name, self, topics)


# -- features ----------------------------------------------------------------------------

_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000

#: Numeric features, in the order of the tuple kept per waiting order.
NUMERIC = (
    "log_amount",
    "amount_vs_usual",
    "first_purchase",
    "purchases_1h",
    "purchases_1d",
    "new_device",
    "ships_abroad",
    "log_account_age",
    "new_account",
    "log_quantity",
    "payment_rarity",
)
#: Each numeric feature's range, mapped to [0, 1] (clipped outside) for both models.
_RANGES = (
    (0.0, 10.0),
    (-3.0, 3.0),
    (0.0, 1.0),
    (0.0, 3.0),
    (0.0, 4.0),
    (0.0, 1.0),
    (0.0, 1.0),
    (0.0, 8.0),
    (0.0, 1.0),
    (0.0, 3.0),
    (0.0, 1.0),
)

#: One numeric tuple (None: unknown) and the categorical fields of an order.
Features = tuple[tuple[float | None, ...], str | None, str | None]


def as_dict(f: Features) -> dict[str, float]:
    """The model's features: numbers scaled to [0, 1] by name (unknown left out), strings one-hot.

    >>> as_dict(((4.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, 0.0, 1.0, 0.0, 0.9), "card", None))["log_amount"]
    0.4
    """
    nums, payment, category = f
    x = {
        name: min(max((v - lo) / (hi - lo), 0.0), 1.0)
        for name, v, (lo, hi) in zip(NUMERIC, nums, _RANGES, strict=True)
        if v is not None
    }
    if payment is not None:
        x["pay=" + payment] = 1.0
    if category is not None:
        x["cat=" + category] = 1.0
    return x


def _unit(nums: tuple[float | None, ...]) -> tuple[float | None, ...]:
    """Every numeric feature in [0, 1] (None: unknown)."""
    return tuple(
        None if v is None else min(max((v - lo) / (hi - lo), 0.0), 1.0)
        for v, (lo, hi) in zip(nums, _RANGES, strict=True)
    )


def _profiled(f: Features) -> tuple[tuple[float | None, ...], tuple[str | None, ...]]:
    """An order as ``FraudProfile`` sees it: the numbers in [0, 1], payment method and category."""
    return _unit(f[0]), (f[1], f[2])


def _scaled(nums: tuple[float | None, ...]) -> dict[str, float]:
    """The anomaly detector's features: every numeric one, in [0, 1] (unknown: the middle)."""
    out = {}
    for name, v, (lo, hi) in zip(NUMERIC, nums, _RANGES, strict=True):
        out[name] = 0.5 if v is None else min(max((v - lo) / (hi - lo), 0.0), 1.0)
    return out


class FraudProfile:
    """How much more likely an order's features are among frauds than among all orders.

    A naive-Bayes log-likelihood ratio over binned features: each numeric feature
    (scaled to [0, 1]) falls in one of ``bins`` bins, each categorical one is its
    value. ``score = sum_f log P(bin_f | fraud) - log P(bin_f | any order)``.
    ``P(. | any order)`` is counted on every order (Laplace-smoothed);
    ``P(. | fraud)`` on the labelled frauds, under a Dirichlet prior of
    ``prior_frauds`` pseudo-frauds spread *uniformly* over the bins. With no fraud
    label yet the score is therefore ``-sum_f log P(bin_f)`` plus a constant: a
    histogram-based outlier score (rare values anywhere are suspicious), and each
    labelled fraud moves it towards what frauds actually look like. A few labels
    suffice (each feature's histogram is learned on its own), which is what a
    stream of ~1 % frauds with late labels offers early on.

    Counts halve once ``halving`` orders (and ``halving_frauds`` frauds) were
    added since the last halving, so both follow a changing world; a new fraud
    pattern is learned from its first labels.

    >>> p = FraudProfile(n_numeric=1, bins=4)
    >>> for v in [0.1] * 50 + [0.9] * 2:
    ...     p.add(((v,), ()))
    >>> p.score(((0.9,), ())) > p.score(((0.1,), ()))      # rare values first
    True
    >>> for _ in range(20):
    ...     p.add_fraud(((0.1,), ()))
    >>> p.score(((0.1,), ())) > p.score(((0.9,), ()))      # then what the labelled frauds look like
    True
    """

    def __init__(
        self,
        n_numeric: int,
        bins: int = 4,
        *,
        n_categorical: int = 0,
        prior_frauds: float = 4.0,
        halving: int = 20_000,
        halving_frauds: int = 200,
        max_values: int = 256,
    ) -> None:
        self.bins = bins
        self.prior = prior_frauds
        self.halving = halving
        self.halving_frauds = halving_frauds
        self.max_values = max_values
        self.all = np.zeros((n_numeric, bins))
        self.fraud = np.zeros((n_numeric, bins))
        self.n_all = np.zeros(n_numeric)
        self.n_fraud = np.zeros(n_numeric)
        self.cat_all: list[dict[str, float]] = [{} for _ in range(n_categorical)]
        self.cat_fraud: list[dict[str, float]] = [{} for _ in range(n_categorical)]
        self.cat_n_all = [0.0] * n_categorical
        self.cat_n_fraud = [0.0] * n_categorical
        self._added = 0
        self._added_frauds = 0

    def bin_of(self, scaled: tuple[float | None, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(feature rows, their bins) of the known numeric features."""
        rows = [i for i, v in enumerate(scaled) if v is not None]
        bins = [min(int(scaled[i] * self.bins), self.bins - 1) for i in rows]  # type: ignore[operator]
        return np.array(rows, dtype=np.intp), np.array(bins, dtype=np.intp)

    def score(self, x: tuple[tuple[float | None, ...], tuple[str | None, ...]]) -> float:
        rows, bins = self.bin_of(x[0])
        b = self.bins
        p_all = (self.all[rows, bins] + 1.0) / (self.n_all[rows] + b)
        p_fraud = (self.fraud[rows, bins] + self.prior / b) / (self.n_fraud[rows] + self.prior)
        s = float(np.log(p_fraud / p_all).sum())
        for k, value in enumerate(x[1]):
            if value is None:
                continue
            seen = self.cat_all[k]
            n_values = len(seen) + 1  # the values seen and "a new one"
            p_a = (seen.get(value, 0.0) + 1.0) / (self.cat_n_all[k] + n_values)
            p_f = (self.cat_fraud[k].get(value, 0.0) + self.prior / n_values) / (self.cat_n_fraud[k] + self.prior)
            s += math.log(p_f / p_a)
        return s

    def add(self, x: tuple[tuple[float | None, ...], tuple[str | None, ...]]) -> None:
        """Count an order (every order, fraud or not: the reference distribution)."""
        self._added = self._tally(x, self.all, self.n_all, self.cat_all, self.cat_n_all, self._added, self.halving)

    def add_fraud(self, x: tuple[tuple[float | None, ...], tuple[str | None, ...]]) -> None:
        self._added_frauds = self._tally(
            x, self.fraud, self.n_fraud, self.cat_fraud, self.cat_n_fraud, self._added_frauds, self.halving_frauds
        )

    def _tally(
        self,
        x: tuple[tuple[float | None, ...], tuple[str | None, ...]],
        table: np.ndarray,
        totals: np.ndarray,
        cat: list[dict[str, float]],
        cat_totals: list[float],
        added: int,
        halving: int,
    ) -> int:
        """Count ``x`` into one side's tables (in place), halving them every ``halving`` counts;
        returns the side's count since its last halving."""
        rows, bins = self.bin_of(x[0])
        table[rows, bins] += 1.0
        totals[rows] += 1.0
        _count(cat, cat_totals, x[1], self.max_values)
        added += 1
        if added < halving:
            return added
        table *= 0.5
        totals *= 0.5
        _halve(cat, cat_totals)
        return 0


def _count(tables: list[dict[str, float]], totals: list[float], values: tuple[str | None, ...], cap: int) -> None:
    for k, (table, value) in enumerate(zip(tables, values, strict=True)):
        if value is None:
            continue
        if value not in table and len(table) >= cap:
            # Bounded vocabulary: the rarest value makes room (it scores as unseen then).
            rarest = min(table, key=table.__getitem__)
            totals[k] -= table.pop(rarest)
        table[value] = table.get(value, 0.0) + 1.0
        totals[k] += 1.0


def _halve(tables: list[dict[str, float]], totals: list[float]) -> None:
    for k, table in enumerate(tables):
        for key in table:
            table[key] *= 0.5
        totals[k] *= 0.5


class _User:
    """A buyer's recent history: order times, devices, usual (log) amount, and the
    history features of the current order (every line of an order gets the same)."""

    __slots__ = ("devices", "last_order", "mean_log_amount", "n", "order_history", "times")

    def __init__(self, max_recent: int) -> None:
        self.times: deque[int] = deque(maxlen=max_recent)
        self.devices: list[str] = []
        self.n = 0
        self.mean_log_amount = 0.0
        self.last_order = ""
        #: (first purchase, orders in the last hour, in the last day, new device, usual log
        #: amount or None) as seen by the first line of ``last_order``.
        self.order_history: tuple[float, float, float, float, float | None] | None = None


class _Order:
    """An order line waiting for its label."""

    __slots__ = ("features", "p", "ts")

    def __init__(self, features: Features, p: float, ts: int | None = None) -> None:
        self.features = features
        self.p = p
        self.ts = ts


_EPS = 1e-15
_MAX_PAYMENT_METHODS = 64
_PAYMENT_HALVING = 20_000.0


class RiskLearner(Learner):
    kind = "risk"

    def __init__(self, name: str, spec: RiskSpec, topics: Mapping[str, str]) -> None:
        self.purchases_topic = topics.get("purchases", "purchases")
        self.labels_topic = topics.get("fraud_labels", "fraud-labels")
        super().__init__(name, spec.output_topic, frozenset({self.purchases_topic, self.labels_topic}))
        self.spec = spec
        model = build_model(with_seed(spec.model, spec.seed))
        self.model, monitor = spec.drift.build(
            model, task="binary", name=name, error=self._model_error, on_switch=self._model_switched
        )
        self._weighted = accepts_sample_weight(model)
        hold_ms = int(spec.label_window_s * 1000)
        self.evaluation = Evaluation.for_binary(spec.evaluation_window, drift=monitor).order_outcomes(hold_ms)
        self.detector: Any = (
            anomaly.HalfSpaceTrees(
                n_trees=spec.anomaly_trees, height=spec.anomaly_height, window_size=spec.anomaly_window, seed=spec.seed
            )
            if spec.anomaly == "half_space_trees"
            else None
        )
        self.profile = FraudProfile(len(NUMERIC), n_categorical=2)
        self._reference = np.zeros(spec.anomaly_reference)
        self._n_reference = 0
        self._exponent = 1.0 / spec.expected_fraud_rate - 1.0
        #: Outcomes learned, and frauds among them (the switch from anomaly to model).
        self.n_labels = 0
        self.n_frauds = 0
        self.source: Literal["model", "anomaly"] = "anomaly"
        self._users: BoundedDict[str, _User] = BoundedDict(spec.max_users, int(spec.user_ttl_s * 1000))
        #: Purchases by payment method (a bounded vocabulary), for how rare a method is.
        self._payments: BoundedDict[str, list[float]] = BoundedDict(_MAX_PAYMENT_METHODS)
        self._n_payments = 0.0
        self.joins: LabelJoin[str, _Order] = LabelJoin(
            int(spec.label_window_s * 1000), spec.max_pending, on_label=self._labelled, on_expire=self._legitimate
        )
        self._scored: tuple[Purchase, Features, float] | None = None
        self._swept = 0
        #: The one-hot features with weights in the model, bounded (``max_one_hot``).
        self._one_hot = FeatureBound(spec.max_one_hot, self._serving)

    # -- the Learner interface ------------------------------------------------------------

    def predict(self, event: Any) -> RiskScore | None:
        if type(event) is not Purchase:
            return None
        f = self._features(event)
        p = self._score(f)
        self._scored = (event, f, p)
        spec = self.spec
        if p >= spec.block_threshold:
            decision: Literal["approve", "review", "block"] = "block"
        elif p >= spec.review_threshold:
            decision = "review"
        else:
            decision = "approve"
        return RiskScore(event.order_id, p, decision, self.source)

    def learn(self, event: Any) -> None:
        cls = type(event)
        if cls is FraudLabel:
            self.joins.label(event.order_id, event.is_fraud, event.ts)
            return
        if cls is not Purchase:
            return
        scored, self._scored = self._scored, None
        if scored is not None and scored[0] is event:
            f, p = scored[1], scored[2]
        else:
            f = self._features(event)
            p = self._score(f)
        if self.source == "anomaly" and self.detector is not None:
            self.detector.learn_one(_scaled(f[0]))
        self.profile.add(_profiled(f))
        self._remember(event)
        self.joins.add(event.order_id, _Order(f, p, event.ts), event.ts)
        self._swept += 1
        if self._swept >= 4096:
            # The TTL of users who never buy again would otherwise apply only when they are pushed out.
            self._swept = 0
            self._users.expire(event.ts)

    def label_stats(self) -> Mapping[str, int]:
        return self.joins.stats()

    def replace_model(self, model: Any) -> None:
        if isinstance(self.model, AdaptiveModel):
            self.model.current = model
        else:
            self.model = model
        self._weighted = accepts_sample_weight(model)
        self.model_version += 1

    # -- scoring --------------------------------------------------------------------------

    def _score(self, f: Features) -> float:
        if self.source == "model":
            x = as_dict(f)
            # Counted when predicted too: a scaler in the model keeps statistics of what it transforms.
            self._touch_one_hot(f)
            return self._calibrated(self.model, x)
        return self._anomaly_probability(f)

    def _calibrated(self, model: Any, x: dict[str, float]) -> float:
        """The model's probability with the fraud weight's odds taken back out."""
        proba = model.predict_proba_one(x)
        q = float(proba.get(True, 0.0)) if proba else 0.0
        w = self.spec.fraud_weight
        denominator = q + w * (1.0 - q)
        return q / denominator if denominator > 0 else 0.0

    def _anomaly_probability(self, f: Features) -> float:
        if self.spec.anomaly == "profile":
            score = self.profile.score(_profiled(f))
        else:
            score = self.detector.score_one(_scaled(f[0]))
        ref = self._reference
        n = min(self._n_reference, len(ref))
        u = 0.5
        if n:
            recent = ref[:n]
            u = float(np.count_nonzero(recent < score) + 0.5 * np.count_nonzero(recent == score)) / n
        ref[self._n_reference % len(ref)] = score
        self._n_reference += 1
        return float(u**self._exponent)

    def _features(self, event: Purchase) -> Features:
        ts = event.ts
        amount = event.quantity * event.unit_price
        log_amount = math.log(amount)
        user = self._users.get(event.user_id, ts)
        history = self._history(user, event) if user is not None else None
        if history is None:
            first, n_1h, n_1d, new_device, vs_usual = 1.0, 0.0, 0.0, 0.0, 0.0
        else:
            first, n_1h, n_1d, new_device, usual = history
            vs_usual = 0.0 if usual is None else min(max(log_amount - usual, -5.0), 5.0)
        country, shipping = event.country, event.shipping_country
        abroad = None if country is None or shipping is None else float(country != shipping)
        age = event.account_age_days
        log_age = None if age is None else math.log1p(age)
        young = None if age is None else float(age < 7.0)
        payment = event.payment_method
        rarity = None
        if payment is not None and self._n_payments > 0:
            seen = self._payments.get(payment)
            rarity = 1.0 - (seen[0] / self._n_payments if seen is not None else 0.0)
        nums = (
            log_amount, vs_usual, first, n_1h, n_1d, new_device, abroad, log_age, young,
            math.log(event.quantity), rarity,
        )  # fmt: skip
        return nums, payment, event.category

    def _history(self, user: _User, event: Purchase) -> tuple[float, float, float, float, float | None] | None:
        """The user's history features before this order (None: no purchase seen)."""
        if event.order_id == user.last_order:
            return user.order_history
        if user.n == 0:
            return None
        ts = event.ts
        n_1h = n_1d = 0
        hour, day = ts - _HOUR_MS, ts - _DAY_MS
        for t in reversed(user.times):
            if t < day:
                break
            n_1d += 1
            if t >= hour:
                n_1h += 1
        device = event.device_id
        new_device = 1.0 if device is not None and device not in user.devices else 0.0
        return 0.0, math.log1p(n_1h), math.log1p(n_1d), new_device, user.mean_log_amount

    # -- state and labels -----------------------------------------------------------------

    def _remember(self, event: Purchase) -> None:
        """The buyer's history and the payment mix, after scoring the purchase."""
        ts = event.ts
        user = self._users.get(event.user_id, ts)
        if user is None:
            user = _User(self.spec.max_recent)
        if event.order_id != user.last_order:
            # Velocity counts orders, and every line of an order sees the history before it.
            user.order_history = self._history(user, event)
            user.times.append(ts)
            user.last_order = event.order_id
        user.n += 1
        log_amount = math.log(event.quantity * event.unit_price)
        # A plain mean over the first purchases, then an exponential one (habits change).
        user.mean_log_amount += (log_amount - user.mean_log_amount) / min(user.n, 20)
        device = event.device_id
        if device is not None:
            devices = user.devices
            if device in devices:
                devices.remove(device)
            devices.append(device)
            if len(devices) > self.spec.max_devices:
                del devices[0]
        self._users.put(event.user_id, user, ts)
        payment = event.payment_method
        if payment is not None:
            counts = self._payments
            seen = counts.get(payment)
            if seen is None:
                seen = [0.0]
            seen[0] += 1.0
            counts.put(payment, seen, ts)
            self._n_payments += 1.0
            if self._n_payments >= _PAYMENT_HALVING:
                # Halving now and then keeps the mix recent (and the counts bounded).
                self._n_payments = 0.0
                for _, c in counts.items():
                    c[0] *= 0.5
                    self._n_payments += c[0]

    def _touch_one_hot(self, f: Features) -> None:
        _, payment, category = f
        if payment is not None:
            self._one_hot.touch("pay=" + payment)
        if category is not None:
            self._one_hot.touch("cat=" + category)

    def _labelled(self, order: _Order, is_fraud: Any, ts: int) -> None:
        self._outcome(order, bool(is_fraud), ts)

    def _legitimate(self, order: _Order, deadline: int) -> None:
        self._outcome(order, False, deadline)

    def _outcome(self, order: _Order, fraud: bool, ts: int) -> None:
        self.evaluation.binary(fraud, order.p, ts, getattr(order, "ts", None))
        x = as_dict(order.features)
        self._touch_one_hot(order.features)
        model = self.model
        if fraud:
            w = self.spec.fraud_weight
            if self._weighted:
                model.learn_one(x, True, w=w)
            else:
                for _ in range(max(1, round(w))):
                    model.learn_one(x, True)
            self.n_frauds += 1
            self.profile.add_fraud(_profiled(order.features))
        else:
            model.learn_one(x, False)
        self.n_labels += 1
        self.n_learned += 1
        spec = self.spec
        if self.source == "anomaly" and self.n_labels >= spec.min_labels and self.n_frauds >= spec.min_fraud_labels:
            self.source = "model"
            # No longer scored nor learned: its memory goes.
            self.detector = None
            self._reference = np.zeros(0)

    def _model_error(self, model: Any, x: Any, y: Any) -> float:
        """The error a drift-switch candidate is scored with, on the calibrated probability
        like the serving model's errors from ``Evaluation``."""
        p = min(max(self._calibrated(model, x), _EPS), 1 - _EPS)
        return -math.log(p if y else 1 - p)

    def _model_switched(self, switch: Any) -> None:
        self.model_version += 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "profile" not in state:
            # A checkpoint from before the fraud profile: it starts empty (it learns from every order),
            # and a learner still scoring with its HalfSpaceTrees goes on with them.
            self.profile = FraudProfile(len(NUMERIC), n_categorical=2)
            if self.detector is not None:
                self.spec = msgspec.structs.replace(self.spec, anomaly="half_space_trees")
        if "_one_hot" not in state:
            # A checkpoint from before the bound: its model's data-named features are adopted.
            self._one_hot = FeatureBound(self.spec.max_one_hot, self._serving)
            self._one_hot.adopt(
                name
                for name in model_feature_names(self.model)
                if isinstance(name, str) and name.startswith(("cat=", "pay="))
            )

    def _serving(self) -> Any:
        """The model (an ``AdaptiveModel`` holds its candidate and fallback too)."""
        return self.model

    # -- introspection (tests, the flood bench; not for the hot path) -------------------------

    def state_sizes(self) -> dict[str, int]:
        """Entries held by every per-key structure, and the model's largest table."""
        return {
            "users": len(self._users),
            "pending": len(self.joins),
            "payments": len(self._payments),
            "one_hot": len(self._one_hot),
            "profile_values": max((len(t) for t in self.profile.cat_all), default=0),
            "model_table": max(model_table_sizes(self.model).values(), default=0),
        }

    # -- model sync (stream.sync): what every task's copy should know ---------------------------

    def global_params(self) -> Params:
        """The linear model's weights, the outcome counters (they decide the switch from the anomaly
        detector to the model, which one task alone would reach P times later) and, until then, the
        detector's masses (one task's window would take P times longer to fill)."""
        params = super().global_params()
        params.update(count_params({"labels": self.n_labels, "frauds": self.n_frauds}))
        if self.detector is not None:
            params.update(hst_params(self.detector, getattr(self, "_hst_window", None)))
        return params

    def set_global_params(self, params: Params) -> None:
        super().set_global_params(params)
        if self.detector is not None:
            window: HSTWindow | None = getattr(self, "_hst_window", None)
            self._hst_window = assign_hst_params(self.detector, params, window)
        counts = assign_count_params(params, ("labels", "frauds"))
        self.n_labels = round(counts.get("labels", self.n_labels))
        self.n_frauds = round(counts.get("frauds", self.n_frauds))
        spec = self.spec
        if self.source == "anomaly" and self.n_labels >= spec.min_labels and self.n_frauds >= spec.min_fraud_labels:
            self.source = "model"
            self.detector = None
            self._reference = np.zeros(0)
            self._hst_window = None
