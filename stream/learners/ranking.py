"""Search ranking and ad serving, learned online from what users click.

A request (``Search``, topic ``searches``) arrives with the candidates the
shop's engine returned, in its order: item ids for ``kind = "search"``,
``{item_id, bid}`` for ``kind = "ads"``. The learner scores every candidate
with an online click model (any River binary classifier; a
``linear_model.LogisticRegression`` is scored for the whole list at once from
its weights) and publishes one ``Ranking`` per request: the candidates in our
order, each with ``score`` (the model's probability that the item is clicked
when examined: its attractiveness) and ``p_click`` (that, times the estimated
examination of the position it gets); for ads also the ``bid``, the
``expected_value`` (``p_click * bid``) and whether the slot was an
``explored`` one.

Features of a candidate: the query (its terms in the item's category name),
the request's category, the item (category, price, decayed popularity, its
learned click rate: clicks over expected examinations), the user (share of
their recent clicks in the item's category, whether they clicked the item
recently) and the engine's own position (how much to trust its order is
learned, not assumed).

Labels are the clicks and purchases that follow, within ``label_window_s`` of
event time: a click or purchase carrying ``request_id`` answers that request;
one without it answers the user's latest open request whose candidates hold
the item. When a request's window closes it is learned from (cascade
assumption): clicked items are positives, weighted by the inverse of the
examination probability of the position they were shown at (clipped at
``min_propensity``), and unclicked items shown above the last click are
negatives (a bare ``LogisticRegression`` with plain SGD learns them in one
step: ``_sgd_step``); a request without a click teaches the model nothing, but
still counts for the position and item statistics. Examination by position is
estimated online as the ratio of clicks to the model's predicted
attractiveness at each position (regression-EM style), relative to the top
position, smoothed towards ``1 / (1 + position)`` and kept non-increasing.

``shown_order`` says which order the users saw: ``ours`` (the shop shows our
ranking: production) or ``original`` (the shop shows its engine's order and we
run in shadow: the simulator, logged data). Positions for the cascade and the
propensities are taken in that order (a click's own ``position`` wins).

Ads: candidates are ordered by expected value per examination (score x bid);
each of the first ``ad_slots`` slots is, with probability ``exploration``,
given to a uniformly drawn remaining candidate instead (epsilon-greedy), so new
ads get shown and learned. ``exploration_rate`` reports the share of slots
explored.

Quality (``quality()``): the click model's binary metrics on the learned
examples (their squared error feeds the concept-drift monitor, one mean per
learned request); on requests with a
click, ``ndcg_at_10`` and ``mrr`` of our order against the clicked (gain 1) and
bought (gain 2) items, next to ``ndcg_at_10_original`` / ``mrr_original`` of
the engine's order; ``ctr`` (requests with a click); ``revenue_per_request``
(ads: bids of the clicked ads in the slots shown); ``exploration_rate``.
Against the simulator's ground truth: ``stream.scoring`` and ``bench/run.py``
(docs/learners-ranking.md).

>>> from stream.events import Click, Search
>>> learner = RankingSpec(label_window_s=60, min_requests=0).build("ranking", {})
>>> s = Search(event_id="e1", ts=0, user_id="u1", request_id="r1", kind="search",
...            query="garden hose", candidates=["i1", "i2", "i3"])
>>> out = learner.predict(s); learner.learn(s)
>>> [r.item_id for r in out.items], out.source
(['i1', 'i2', 'i3'], 'model')
>>> click = Click(event_id="c1", ts=5_000, user_id="u1", item_id="i3", category="garden")
>>> _ = learner.predict(click); learner.learn(click)
>>> learner.advance(100_000)          # the window closes: i3 positive, i1 and i2 negatives
>>> learner.n_learned, learner.label_stats()["joined"]
(3, 1)
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from river import base, linear_model, optim

from stream.bounded import BoundedDict
from stream.drift import AdaptiveModel, ConceptDrift, DriftSpec
from stream.evaluation import Evaluation
from stream.events import Click, Purchase, Search
from stream.learners.base import Learner
from stream.learners.configured import accepts_sample_weight
from stream.models import build_model, with_seed

__all__ = ["FEATURES", "RankedItem", "Ranking", "RankingLearner", "RankingSpec", "ndcg", "query_terms"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


def _default_model() -> dict[str, Any]:
    return {
        "class": "linear_model.LogisticRegression",
        "params": {"optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}}, "intercept_lr": 0.01},
    }


class RankedItem(msgspec.Struct, gc=False, omit_defaults=True):
    """One candidate in our order."""

    item_id: str
    #: The click model's probability that the item is clicked when examined (attractiveness).
    score: float
    #: ``score`` x the estimated examination of the position it gets.
    p_click: float
    #: Ads only: the bid, ``p_click * bid``, and whether the slot was given by exploration.
    bid: float | None = None
    expected_value: float | None = None
    explored: bool | None = None


class Ranking(msgspec.Struct, gc=False):
    """The prediction published for a request (topic ``rankings``)."""

    request_id: str
    kind: Literal["search", "ads"]
    #: Every (distinct) candidate, in our order.
    items: list[RankedItem]
    #: ``model``, or ``original`` (the engine's order, while fewer than ``min_requests`` are learned).
    source: Literal["model", "original"]
    #: Ads: slots given by exploration (0 for searches).
    explored: int


class RankingSpec(msgspec.Struct, tag="ranking", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    output_topic: str = "rankings"
    #: River binary classifier of a click given examination: ``{class, params}`` or a pipeline list.
    model: dict[str, Any] | list[dict[str, Any]] = msgspec.field(default_factory=_default_model)
    #: Exploration and model initialisation.
    seed: int = 42
    #: Clicks and purchases answer a request within this much event time after it.
    label_window_s: PositiveFloat = 1800.0
    #: Which order users saw: ``ours`` (the shop shows our ranking) or ``original`` (shadow mode).
    shown_order: Literal["ours", "original"] = "ours"
    #: A purchase of a candidate counts as this many clicks.
    purchase_weight: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    #: Positions whose examination is estimated and learned from (deeper clicks are ignored).
    max_positions: Annotated[int, msgspec.Meta(ge=1, le=200)] = 20
    #: Share of the unclicked (negative) examples learned, each weighted ``1 / negative_sampling``
    #: (unbiased; learning is most of a request's cost). 1: all of them.
    negative_sampling: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    #: Inverse-propensity weights are at most ``1 / min_propensity``.
    min_propensity: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1
    #: Pseudo-requests pulling the examination estimate towards ``1 / (1 + position)``.
    propensity_prior: Annotated[float, msgspec.Meta(ge=0)] = 50.0
    #: Ads: slots shown, and the probability that a slot is given to a random candidate.
    ad_slots: PositiveInt = 3
    exploration: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    #: Requests learned before our order is published (until then: the engine's order).
    min_requests: NonNegativeInt = 200
    #: Requests waiting for their clicks, at most (the oldest are closed early, counted ``evicted``).
    max_pending: PositiveInt = 50_000
    #: Per-user state (recent categories and items): LRU capacity and TTL.
    max_users: PositiveInt = 200_000
    user_ttl_s: PositiveFloat | None = 86_400.0
    #: A user's category interest halves over this much event time.
    user_half_life_s: PositiveFloat = 3_600.0
    recent_items: PositiveInt = 20
    #: Items with statistics, at most (the least recently seen 10 % are forgotten when full).
    max_items: Annotated[int, msgspec.Meta(ge=16)] = 100_000
    max_categories: PositiveInt = 10_000
    popularity_half_life_s: PositiveFloat = 3_600.0
    #: Rolling window of the quality metrics; the click model's metrics on 1 example in N (each
    #: costs ~25 us: River's ROC AUC, cumulative and rolling; a request has 5-6 examples).
    evaluation_window: PositiveInt = 10_000
    evaluate_every: PositiveInt = 64
    #: Concept drift on the click model's squared error (one value per learned request: ``_BrierFeed``).
    drift: DriftSpec = msgspec.field(default_factory=DriftSpec)

    def validate(self, name: str) -> None:
        self.drift.validate()
        model = build_model(with_seed(self.model, self.seed), "model")
        if not isinstance(model, base.Classifier):
            raise ValueError(f"model: the click model must be a River classifier, got {type(model).__name__}")

    def build(self, name: str, topics: Mapping[str, str]) -> RankingLearner:
        return RankingLearner(name, self, topics)


# -- features -----------------------------------------------------------------------------

#: The click model's features, in the order of the scoring matrix's columns.
FEATURES = ("ctr", "popularity", "log_price", "user_category", "recent_item", "query_match", "category_match",
            "engine_rank", "new_item")  # fmt: skip
_F = len(FEATURES)
_TOKEN = re.compile(r"[a-z0-9]+")
#: Smoothing of an item's click rate: this many expected examinations at the global rate.
_CTR_PRIOR = 5.0
_EPS = 1e-15
_LN2 = math.log(2)
#: Columns of the item table.
_CLK, _EXM, _POP, _PRICE, _SEEN = range(5)
#: Candidates of a request at most (the contract's bound): the length of the per-position tables.
_MAX_CANDIDATES = 200


def _zeros(n: int) -> Iterator[int]:
    return itertools.repeat(0, n)


def query_terms(text: str | None) -> frozenset[str]:
    """Lower-case alphanumeric terms.

    >>> sorted(query_terms("Garden-Hose 20m"))
    ['20m', 'garden', 'hose']
    """
    return frozenset(_TOKEN.findall(text.lower())) if text else frozenset()


def ndcg(ranks: Mapping[int, float], k: int = 10) -> float:
    """NDCG@k of a list in which the items at 0-based ``ranks`` have the given gains.

    >>> ndcg({0: 1.0}), round(ndcg({1: 1.0}), 4), ndcg({12: 1.0})
    (1.0, 0.6309, 0.0)
    """
    if len(ranks) == 1:  # the common case (one click): no sorting
        ((r, g),) = ranks.items()
        return 1.0 / math.log2(r + 2) if r < k and g > 0 else 0.0
    dcg = sum(g / math.log2(r + 2) for r, g in ranks.items() if r < k)
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(ranks.values(), reverse=True)[:k]))
    return dcg / ideal if ideal > 0 else 0.0


def _brier_error(model: Any, x: Any, y: Any) -> float:
    """A click model's squared error on one example (what the drift monitor watches)."""
    proba = model.predict_proba_one(x)
    p = proba.get(True, 0.0) if proba else 0.5
    return (float(y) - p) ** 2


class _BrierFeed:
    """Feeds the drift monitor the squared error ``(y - p)^2`` of the click model, where
    ``Evaluation`` passes its log loss ``-log p_y`` (so ``(1 - exp(-loss))^2``): bounded,
    less heavy-tailed, so fewer false alarms (on the simulator, 34 detections instead of 86
    over 63k examples). Everything else is the monitor's (read by the metrics).

    A plain detector of errors gets one value per learned request (``flush``): the mean
    over its examples. They share a user, a query and a moment, so they are not independent
    draws, the requests are closer to it; and it is one detector update a request instead of
    several. A detector of binary outcomes (cusum), or a model that switches on drift
    (comparing the error of each example with a candidate's), gets every example as it comes.

    >>> from stream.drift import ConceptDrift
    >>> feed = _BrierFeed(ConceptDrift("adwin"))
    >>> _ = feed.update(-math.log(0.5), ts=1); _ = feed.update(-math.log(0.9), ts=1)
    >>> feed.n_seen, feed.flush(ts=1), feed.n_seen
    (0, None, 1)
    >>> round(feed.monitor._recent, 3)      # ((1 - 0.5)^2 + (1 - 0.9)^2) / 2
    0.13
    """

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.per_request = isinstance(monitor, ConceptDrift) and monitor.kind != "cusum"
        self._sum = 0.0
        self._n = 0

    def update(self, error: float, ts: int, outcome: tuple[bool, float] | None = None) -> bool:
        squared = (1.0 - math.exp(-error)) ** 2
        if self.per_request:
            self._sum += squared
            self._n += 1
            return False
        # A detector of binary outcomes (cusum) reads ``outcome``; the others the squared error.
        return bool(self.monitor.update(squared, ts, outcome))

    def flush(self, ts: int) -> None:
        """The request's examples are all in: their mean to the detector."""
        if self._n:
            mean = self._sum / self._n
            self._sum, self._n = 0.0, 0
            self.monitor.update(mean, ts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "monitor" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.monitor, name)


class _User:
    __slots__ = ("cats", "recent", "total", "ts")

    def __init__(self, ts: int) -> None:
        self.cats: dict[int, float] = {}
        self.total = 0.0
        self.ts = ts
        #: The items clicked last, oldest first (a dict: an ordered set with O(1) lookups).
        self.recent: dict[str, None] = {}


class _Request:
    """A scored request waiting for its clicks: what it is learned and evaluated from.

    Only the first positions in the order users saw are learned from (``max_positions``,
    or the ad slots), so only their feature rows, attractiveness and item slots are kept."""

    __slots__ = ("attr", "bids", "clicks", "deadline", "generation", "id_set", "ids", "kind", "order", "request_id",
                 "shown", "slots", "ts", "user", "x")  # fmt: skip

    def __init__(
        self, event: Search, deadline: int, ids: list[str], id_set: set[str], bids: np.ndarray | None,
        order: np.ndarray, shown: np.ndarray, x: np.ndarray, attr: np.ndarray, slots: np.ndarray, generation: int,
    ) -> None:  # fmt: skip
        self.request_id = event.request_id
        self.user = event.user_id
        self.ts = event.ts
        self.kind = event.kind
        self.deadline = deadline
        #: Candidate ids (and ads' bids) in the engine's order (and as a set: clicks are joined
        #: by item); ``order``: our order (indexes into ids).
        self.ids = ids
        self.id_set = id_set
        self.bids = bids
        self.order = order
        #: The first positions users saw (engine indexes), and per position: feature row,
        #: attractiveness, item slot (0: unknown when scored; valid while ``generation`` holds).
        self.shown = shown
        self.x = x
        self.attr = attr
        self.slots = slots
        self.generation = generation
        #: engine index -> label weight (1 a click, ``purchase_weight`` more for a purchase).
        self.clicks: dict[int, float] = {}


def _plain_logistic(model: Any) -> linear_model.LogisticRegression | None:
    """``model`` if it is a bare ``LogisticRegression`` with the log loss: its
    probability is ``sigmoid(w . x + b)``, so a whole candidate list is scored with one
    matrix-vector product from its weights."""
    if type(model) is linear_model.LogisticRegression and type(model.loss) is optim.losses.Log:
        return model
    return None


def _coefficients(weights: Any) -> list[float]:
    """A linear model's weights of ``FEATURES`` (0 for one it has not learned yet)."""
    try:
        return [weights[f] for f in FEATURES]  # a River VectorDict: indexing is its fast read
    except KeyError:
        return [weights.get(f, 0.0) for f in FEATURES]


def _steppable(model: Any) -> bool:
    """Whether a request's examples can be learned by ``_sgd_step`` instead of one
    ``learn_one`` each: plain SGD, no L1 (its cumulative penalty is per example), and
    every feature's weight already there (the first ``learn_one`` creates them with the
    model's initializer)."""
    lr = _plain_logistic(model)
    return lr is not None and type(lr.optimizer) is optim.SGD and lr.l1 == 0 and len(lr._weights) == _F


def _sgd_step(model: linear_model.LogisticRegression, x: np.ndarray, y: list[bool], w: list[float]) -> None:
    """One SGD step over a request's examples (rows of ``x``, labels ``y``, sample weights
    ``w``): the sum of their gradients at the current weights, with River's own loss
    weights, gradient clipping, L2, learning rates and iteration count, written back into
    the model's weights. River's ``learn_one`` takes the same gradients one example at a
    time (each at the weights the previous one left); for the few examples of one request
    (at most ``max_positions``) the difference is second order in the learning rate, and
    the cost is a handful of vector operations instead of a dict per example.

    One example: exactly River's step; two: the same up to the second order.

    >>> from river import linear_model, optim
    >>> a, b = (linear_model.LogisticRegression(optim.SGD(0.1)) for _ in range(2))
    >>> x = dict(zip(FEATURES, [0.5] * len(FEATURES)))
    >>> a.learn_one(x, True, w=2.0); b.learn_one(x, True, w=2.0)
    >>> _sgd_step(a, np.full((1, len(FEATURES)), 0.5), [False], [3.0]); b.learn_one(x, False, w=3.0)
    >>> max(abs(a.weights[f] - b.weights[f]) for f in FEATURES) < 1e-12, abs(a.intercept - b.intercept) < 1e-12
    (True, True)
    >>> _sgd_step(a, np.full((2, len(FEATURES)), 0.5), [True, False], [1.0, 2.0])
    >>> b.learn_one(x, True); b.learn_one(x, False, w=2.0)
    >>> round(a.weights["ctr"], 4), round(b.weights["ctr"], 4), a.optimizer.n_iterations
    (-0.0528, -0.056, 4)
    """
    weights = model._weights
    coef = _coefficients(weights)
    b = model.intercept
    loss = model.loss
    pos, neg, limit = loss.weight_pos, loss.weight_neg, model.clip_gradient
    g: list[float] = []
    for zk, yk, wk in zip((x @ np.array(coef)).tolist(), y, w, strict=True):
        # The log loss's gradient in the logit: sigmoid(z) - y (as tanh: no overflow).
        p = 0.5 + 0.5 * math.tanh(0.5 * (zk + b))
        gk = (p - 1.0) * wk * pos if yk else p * wk * neg
        g.append(min(max(gk, -limit), limit))
    opt = model.optimizer
    lr = opt.learning_rate
    model.intercept = b - model.intercept_lr.get(opt.n_iterations) * sum(g)
    l2 = model.l2 * len(g)
    for f, c, gf in zip(FEATURES, coef, (np.array(g) @ x).tolist(), strict=True):
        weights[f] = c - lr * (gf + l2 * c)
    opt.n_iterations += len(g)


class RankingLearner(Learner):
    kind = "ranking"

    def __init__(self, name: str, spec: RankingSpec, topics: Mapping[str, str]) -> None:
        self.searches_topic = topics.get("searches", "searches")
        self.clicks_topic = topics.get("clicks", "clicks")
        self.purchases_topic = topics.get("purchases", "purchases")
        super().__init__(name, spec.output_topic, frozenset({self.searches_topic, self.clicks_topic,
                                                               self.purchases_topic}))  # fmt: skip
        self.spec = spec
        model = build_model(with_seed(spec.model, spec.seed))
        self.model, monitor = spec.drift.build(
            model, task="binary", name=name, error=_brier_error, on_switch=self._model_switched
        )
        self._weighted = accepts_sample_weight(model)
        self.evaluation = Evaluation.for_binary(spec.evaluation_window, drift=_BrierFeed(monitor))
        self.ranking = Evaluation.for_means(
            spec.evaluation_window,
            ("ndcg_at_10", "ndcg_at_10_original", "mrr", "mrr_original", "ctr", "revenue_per_request",
             "exploration_rate"),
        )  # fmt: skip
        self._rng = random.Random(spec.seed)
        self._window_ms = int(spec.label_window_s * 1000)
        # Items: a slot each in flat arrays (slot 0: any unknown item).
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        size = 1024
        #: One row per column, one column per item slot: clicks, expected examinations,
        #: popularity (``log(p) + t / tau``: a popularity ``p`` at event time ``t`` decayed with
        #: time constant ``tau``, so that at any time ``ts`` it is ``exp(value - ts / tau)``;
        #: -inf: none), log price / 5 (0 unknown), last event time touched (eviction order).
        #: And each slot's category index (-1 unknown).
        self._tab = np.zeros((5, size))
        self._tab[_POP] = -np.inf
        self._cat = np.full(size, -1, dtype=np.intp)
        #: Counts the times item slots were forgotten (a request's slots hold while it is unchanged).
        self._generation = 0
        #: Query terms -> match of each category (cleared when categories are added, or when full).
        self._match_cache: dict[frozenset[str], np.ndarray] = {}
        self._n_slots = 1
        self._tot_clicks = 1.0
        self._tot_exams = 10.0
        self._pop_tau_ms = spec.popularity_half_life_s * 1000 / _LN2
        self._user_tau_ms = spec.user_half_life_s * 1000 / _LN2
        self._user_decay_ms = self._user_tau_ms * 0.05
        # Categories: index by name, and the terms of each name.
        self._cats: dict[str, int] = {}
        self._cat_terms: list[frozenset[str]] = []
        self._users: BoundedDict[str, _User] = BoundedDict(
            spec.max_users, int(spec.user_ttl_s * 1000) if spec.user_ttl_s is not None else None
        )
        # Examination by position: clicks and predicted attractiveness summed per shown position.
        # Per kind: ads slots are not organic results.
        d = spec.max_positions
        prior = 1.0 / (1.0 + np.arange(d))
        self._pos_clicks = {k: prior * spec.propensity_prior for k in ("search", "ads")}
        self._pos_attr = {k: np.full(d, spec.propensity_prior) for k in ("search", "ads")}
        self.examination = {k: prior.copy() for k in ("search", "ads")}
        #: The examination by position, padded with its last value to any list's length.
        self._exam_row = {k: np.full(_MAX_CANDIDATES, prior[-1]) for k in ("search", "ads")}
        for k in self._exam_row:
            self._exam_row[k][:d] = prior
        # In shadow mode the engine's position is the shown position: as a feature it would
        # soak up the position bias the propensities are there to remove.
        self._engine_feature = spec.shown_order == "ours"
        # Requests waiting for clicks, in deadline order; the user's open ones, newest last.
        self._pending: OrderedDict[str, _Request] = OrderedDict()
        self._by_user: dict[str, list[str]] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        #: The first pending request's deadline (nothing to close before it).
        self._due: float = math.inf
        self.now = -(2**62)
        self.n_requests = 0
        self._learned_requests = 0
        self._stats = {"received": 0, "joined": 0, "unmatched": 0, "late": 0, "expired": 0, "evicted": 0}
        self.purchases_joined = 0
        self._n_examples = 0
        self._scored: tuple[Search, _Request, np.ndarray, int] | None = None
        self._engine = 1.0 / np.log2(2.0 + np.arange(_MAX_CANDIDATES))
        self._identity = np.arange(_MAX_CANDIDATES)
        #: Positions kept per request (learned from; for ads also the slots whose revenue counts).
        self._keep = {"search": spec.max_positions, "ads": spec.ad_slots}
        self._fast_learn: bool | None = None

    # -- the Learner interface ------------------------------------------------------------

    def predict(self, event: Any) -> Ranking | None:
        if type(event) is not Search:
            return None
        req, attr, explored = self._score(event)
        self._scored = (event, req, attr, explored)
        return self._ranking(req, attr, explored)

    def learn(self, event: Any) -> None:
        cls = type(event)
        if cls is Search:
            scored, self._scored = self._scored, None
            req = scored[1] if scored is not None and scored[0] is event else self._score(event)[0]
            self.advance(event.ts)
            self._open(req)
        elif cls is Click:
            self.advance(event.ts)
            self._stats["received"] += 1
            self._observe(event.user_id, event.item_id, event.category, event.price, event.ts)
            self._label(event, 1.0)
        elif cls is Purchase:
            self.advance(event.ts)
            self._observe(event.user_id, event.item_id, event.category, event.unit_price, event.ts)
            if self._label(event, self.spec.purchase_weight, purchase=True):
                self.purchases_joined += 1

    def label_stats(self) -> Mapping[str, int]:
        """Clicks are the label records: ``received`` every click, ``joined`` those that
        answered an open request, ``expired`` requests closed without a click."""
        return dict(self._stats)

    def quality(self) -> Iterator[tuple[str, str, float]]:
        yield from self.evaluation.values()
        yield from self.ranking.values()

    def replace_model(self, model: Any) -> None:
        if isinstance(self.model, AdaptiveModel):
            self.model.current = model
        else:
            self.model = model
        self._weighted = accepts_sample_weight(model)
        self._fast_learn = None
        self.model_version += 1

    def _model_switched(self, switch: Any) -> None:
        self.model_version += 1

    # -- scoring --------------------------------------------------------------------------

    def _candidates(self, event: Search) -> tuple[list[str], set[str], np.ndarray | None]:
        cands = event.candidates
        if event.kind == "ads":
            ids = [c.item_id for c in cands]  # type: ignore[union-attr]
            bids: list[float] | None = [c.bid for c in cands]  # type: ignore[union-attr]
        else:
            ids = cands  # type: ignore[assignment]  # read only: the event's own list
            bids = None
        distinct = set(ids)
        if len(distinct) != len(ids):  # duplicates: the first occurrence counts
            seen: set[str] = set()
            keep = [i for i, x in enumerate(ids) if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]
            ids = [ids[i] for i in keep]
            if bids is not None:
                bids = [bids[i] for i in keep]
        return ids, distinct, (np.array(bids) if bids is not None else None)

    def features(self, event: Search, ids: list[str], slots: np.ndarray) -> np.ndarray:
        """The feature matrix of the candidates ``ids`` of ``event`` (rows in the engine's
        order), from their item ``slots``. Built feature by feature (a few vector operations
        each, in float64 throughout: a ufunc writing into another dtype takes numpy's slow,
        buffered path), no per-candidate object: a ``(len(ids), len(FEATURES))`` view."""
        n = len(ids)
        x = np.empty((_F, n))
        tab = self._tab.take(slots, axis=1)
        exams = tab[_EXM]
        rate = self._tot_clicks / self._tot_exams
        # The learned click rate: clicks over expected examinations, smoothed towards the global rate.
        den = exams + _CTR_PRIOR
        den *= rate
        np.divide(tab[_CLK] + _CTR_PRIOR * rate, den, out=x[0])
        np.log(x[0], out=x[0])
        # log(1 + popularity at the request's time) / 3 (np.logaddexp is scalar code: 20x slower).
        pop = tab[_POP]
        pop -= event.ts / self._pop_tau_ms
        np.exp(pop, out=pop)
        np.log1p(pop, out=x[1])
        x[1] *= 1.0 / 3.0
        x[2] = tab[_PRICE]
        cats = self._cat.take(slots)
        user = self._users.get(event.user_id, event.ts)
        n_cat = len(self._cat_terms)
        if user is not None and user.total > 0:
            share = np.zeros(n_cat + 1)  # the last: unknown category
            inv = 1.0 / user.total
            for k, w in user.cats.items():
                share[k] = w * inv
            share.take(cats, out=x[3])
            x[4] = np.fromiter(map(user.recent.__contains__, ids), float, n)
        else:
            x[3:5] = 0.0
        terms = query_terms(event.query)
        if terms and n_cat:
            self._query_match(terms, n_cat).take(cats, out=x[5])
        else:
            x[5] = 0.0
        req_cat = self._cats.get(event.category) if event.category is not None else None
        if req_cat is not None:
            x[6] = cats == req_cat
        else:
            x[6] = 0.0
        if self._engine_feature:
            x[7] = self._engine[:n] if n <= len(self._engine) else 1.0 / np.log2(2.0 + np.arange(n))
        else:
            x[7] = 0.0
        x[8] = exams == 0.0
        return x.T

    def _query_match(self, terms: frozenset[str], n_cat: int) -> np.ndarray:
        """Per category (and a last entry: unknown), whether a query term is in its name."""
        match = self._match_cache.get(terms)
        if match is None:
            if len(self._match_cache) >= 4096:
                self._match_cache.clear()
            match = np.zeros(n_cat + 1)
            for k, names in enumerate(self._cat_terms):
                if terms & names:
                    match[k] = 1.0
            self._match_cache[terms] = match
        return match

    def _attractiveness(self, x: np.ndarray) -> np.ndarray:
        model = self.model
        if isinstance(model, AdaptiveModel):
            model = model.current
        lr = _plain_logistic(model)
        if lr is not None:
            weights = lr._weights
            # sigmoid(w . x + b) = 0.5 + 0.5 tanh((w . x + b) / 2): no overflow, no clipping.
            half = np.array([0.5 * c for c in _coefficients(weights)])
            z = x @ half
            z += 0.5 * lr.intercept
            np.tanh(z, out=z)
            z *= 0.5
            z += 0.5
            return z
        out = np.empty(len(x))
        for r, row in enumerate(x.tolist()):
            proba = self.model.predict_proba_one(dict(zip(FEATURES, row, strict=True)))
            out[r] = proba.get(True, 0.0) if proba else 0.0
        return out

    def _score(self, event: Search) -> tuple[_Request, np.ndarray, int]:
        """The request scored and ordered: the pending request it becomes, every candidate's
        attractiveness (engine order) and the explored ad slots (a bit each)."""
        ids, distinct, bids = self._candidates(event)
        n = len(ids)
        slots = np.fromiter(map(self._slot.get, ids, _zeros(n)), np.intp, n)
        x = self.features(event, ids, slots)
        attr = self._attractiveness(x) if n else np.zeros(0)
        explored = 0
        if self._learned_requests < self.spec.min_requests:
            order = self._identity[:n] if n <= _MAX_CANDIDATES else np.arange(n)
        elif bids is not None:
            order = np.argsort(-(attr * bids), kind="stable")
        else:
            order = np.argsort(-attr, kind="stable")
        if bids is not None and self.spec.exploration > 0 and n > 1:
            order, explored = self._explore(order)
        keep = self._keep[event.kind]
        if self.spec.shown_order == "ours":
            top = order[:keep]
            x, top_attr, slots = x.take(top, axis=0).astype(np.float32), attr.take(top), slots.take(top)
        else:  # shown in the engine's order: the first rows as they are
            top = self._identity[: min(n, keep)]
            x, top_attr, slots = x[:keep].astype(np.float32), attr[:keep], slots[:keep]
        req = _Request(event, event.ts + self._window_ms, ids, distinct, bids, order, top, x, top_attr, slots,
                       self._generation)  # fmt: skip
        return req, attr, explored

    def _explore(self, order: np.ndarray) -> tuple[np.ndarray, int]:
        """Epsilon-greedy over the ad slots: each slot, with probability ``exploration``,
        goes to a candidate drawn uniformly from those not placed yet."""
        rng, eps = self._rng, self.spec.exploration
        slots = min(self.spec.ad_slots, len(order))
        out = order.tolist()
        explored = 0
        for k in range(slots):
            if rng.random() < eps:
                j = k + int(rng.random() * (len(out) - k))
                out.insert(k, out.pop(j))
                explored |= 1 << k
        return np.array(out, dtype=np.intp), explored

    def _ranking(self, req: _Request, attr: np.ndarray, explored: int) -> Ranking:
        order = req.order
        n = len(order)
        ids = req.ids
        ranked = [ids[i] for i in order.tolist()]
        score = attr.take(order)
        p_click = score * (self._exam_row[req.kind][:n] if n <= _MAX_CANDIDATES else self._examination_row(req.kind, n))
        n_explored = explored.bit_count()
        if req.bids is None:
            items = list(map(RankedItem, ranked, score.tolist(), p_click.tolist()))
        else:
            bids = req.bids.take(order)
            flags = [bool(explored >> k & 1) for k in range(n)]
            items = list(map(RankedItem, ranked, score.tolist(), p_click.tolist(), bids.tolist(),
                             (p_click * bids).tolist(), flags))  # fmt: skip
            slots = min(self.spec.ad_slots, n)
            if slots:
                self.ranking.score("exploration_rate", n_explored / slots)
        source: Literal["model", "original"] = "model"
        if self._learned_requests < self.spec.min_requests:
            source = "original"
        return Ranking(req.request_id, req.kind, items, source, n_explored)

    def _examination_row(self, kind: str, n: int) -> np.ndarray:
        exam = self.examination[kind]
        row = np.full(n, exam[-1])
        row[: min(n, len(exam))] = exam[:n]
        return row

    # -- state ----------------------------------------------------------------------------

    def _category(self, name: str | None) -> int:
        if name is None:
            return -1
        k = self._cats.get(name)
        if k is None:
            if len(self._cat_terms) >= self.spec.max_categories:
                return -1
            k = self._cats[name] = len(self._cat_terms)
            self._cat_terms.append(query_terms(name))
            self._match_cache.clear()
        return k

    def _item(self, item_id: str, ts: int) -> int:
        s = self._slot.get(item_id)
        if s is None:
            if self._free:
                s = self._free.pop()
            else:
                if self._n_slots == self._tab.shape[1]:
                    if self._n_slots - 1 >= self.spec.max_items:
                        self._forget_items()
                        s = self._free.pop()
                    else:
                        self._grow()
                if s is None:
                    s = self._n_slots
                    self._n_slots += 1
            self._slot[item_id] = s
            tab = self._tab
            tab[:, s] = 0.0
            tab[_POP, s] = -math.inf
            self._cat[s] = -1
        self._tab[_SEEN, s] = self.now if self.now > ts else ts
        return s

    def _grow(self) -> None:
        old = self._tab.shape[1]
        new = min(2 * old, self.spec.max_items + 1)
        tab = np.zeros((self._tab.shape[0], new))
        tab[_POP] = -math.inf
        tab[:, :old] = self._tab
        cat = np.full(new, -1, dtype=np.intp)
        cat[: len(self._cat)] = self._cat
        self._tab, self._cat = tab, cat

    def _forget_items(self) -> None:
        """The catalog bound is reached: forget the least recently seen tenth."""
        n = self._n_slots
        k = max(1, (n - 1) // 10)
        oldest = 1 + np.argsort(self._tab[_SEEN, 1:n], kind="stable")[:k]
        drop = set(oldest.tolist())
        for item, s in list(self._slot.items()):
            if s in drop:
                del self._slot[item]
        self._free.extend(sorted(drop, reverse=True))
        self._generation += 1

    def _observe(self, user_id: str, item_id: str, category: str | None, price: float | None, ts: int) -> None:
        """A click or purchase: the item's popularity and attributes, the user's interests."""
        s = self._slot.get(item_id)
        tab = self._tab
        if s is None:
            s = self._item(item_id, ts)
        else:
            tab[_SEEN, s] = self.now if self.now > ts else ts
        # One more unit of popularity at ts: log(exp(value) + exp(ts / tau)), stably.
        pop, now = float(tab[_POP, s]), ts / self._pop_tau_ms
        tab[_POP, s] = pop + math.log1p(math.exp(now - pop)) if pop > now else now + math.log1p(math.exp(pop - now))
        if price is not None:
            tab[_PRICE, s] = math.log(price) / 5.0
        k = self._category(category)
        if k >= 0:
            self._cat[s] = k
        else:
            k = int(self._cat[s])
        users = self._users
        user = users.get(user_id, ts)
        if user is None:
            user = _User(ts)
        elif ts - user.ts > self._user_decay_ms:
            # Decayed in steps (each exact: the whole time since the last step).
            f = math.exp((user.ts - ts) / self._user_tau_ms)
            user.cats = {c: w * f for c, w in user.cats.items() if w * f > 0.01}
            user.total = sum(user.cats.values())
            user.ts = ts
        if k >= 0:
            user.cats[k] = user.cats.get(k, 0.0) + 1.0
            user.total += 1.0
        recent = user.recent
        if recent.pop(item_id, 0) is not None and len(recent) >= self.spec.recent_items:
            del recent[next(iter(recent))]
        recent[item_id] = None
        users.put(user_id, user, ts)

    # -- requests and their labels --------------------------------------------------------

    def _open(self, req: _Request) -> None:
        self.n_requests += 1
        rid = req.request_id
        if rid in self._pending or rid in self._closed:
            return  # a replayed request: answered once
        pending = self._pending
        if not pending:
            self._due = req.deadline
        pending[rid] = req
        self._by_user.setdefault(req.user, []).append(rid)
        if len(pending) > self.spec.max_pending:
            _, old = pending.popitem(last=False)
            self._due = next(iter(pending.values())).deadline
            self._stats["evicted"] += 1
            self._close(old)

    def _label(self, event: Click | Purchase, weight: float, purchase: bool = False) -> bool:
        item = event.item_id
        req: _Request | None = None
        rid = event.request_id
        stats = self._stats
        if rid is not None:
            req = self._pending.get(rid)
            if req is None:
                if not purchase:
                    stats["unmatched"] += 1
                    if rid in self._closed:
                        stats["late"] += 1
                return False
            if item not in req.id_set or req.ts > event.ts:
                req = None
        else:
            for r in reversed(self._by_user.get(event.user_id, ())):
                cand = self._pending[r]
                if cand.ts <= event.ts and item in cand.id_set:
                    req = cand
                    break
        if req is None:
            if not purchase:
                stats["unmatched"] += 1
            return False
        i = req.ids.index(item)
        if purchase and i not in req.clicks:
            return False  # a purchase answers a request through a click on it
        req.clicks[i] = req.clicks.get(i, 0.0) + weight
        if not purchase:
            stats["joined"] += 1
        return True

    def advance(self, ts: int) -> None:
        """Event time moves to ``ts``: requests whose window closed are learned from."""
        if ts <= self.now:
            return
        self.now = ts
        if ts <= self._due:
            return
        pending = self._pending
        while pending:
            req = next(iter(pending.values()))
            if req.deadline >= ts:
                self._due = req.deadline
                return
            del pending[req.request_id]
            self._close(req)
        self._due = math.inf

    def _close(self, req: _Request) -> None:
        """The request's window closed: its statistics, its evaluation, and what it teaches."""
        rids = self._by_user.get(req.user)
        if rids is not None:
            rids.remove(req.request_id)
            if not rids:
                del self._by_user[req.user]
        closed = self._closed
        closed[req.request_id] = None
        if len(closed) > 10_000:
            closed.popitem(last=False)
        shown = req.shown.tolist()
        d = min(len(shown), self.spec.max_positions)
        clicks = req.clicks
        clicked = [k for k in range(d) if shown[k] in clicks] if clicks else []
        exam = self.examination[req.kind][:d]  # before this request updates it
        ex = exam.tolist()
        self._count_items(req, shown, d, clicked, exam, ex)
        self._count_positions(req, d, clicked)
        self._evaluate(req, shown, clicked)
        if not clicked:
            self._stats["expired"] += 1
            if req.bids is None:
                return
        self._learn(req, shown, d, clicked, ex)
        self._learned_requests += 1

    def _count_items(
        self, req: _Request, shown: list[int], d: int, clicked: list[int], exam: np.ndarray, ex: list[float]
    ) -> None:
        """Expected examinations of every shown item, clicks of the clicked."""
        slots = req.slots[:d]
        if req.generation != self._generation or not slots.all():
            # Items unknown when the request was scored, or slots forgotten since.
            slot_of, ids = self._slot.get, req.ids
            slots = np.array([slot_of(ids[i]) or self._item(ids[i], req.ts) for i in shown[:d]], np.intp)
        tab = self._tab
        tab[_SEEN].put(slots, self.now)
        exams = tab[_EXM]
        exams.put(slots, exams.take(slots) + exam)
        self._tot_exams += sum(ex)
        if clicked:
            clk = tab[_CLK]
            for k in clicked:
                clk[slots[k]] += 1.0
            self._tot_clicks += len(clicked)

    def _count_positions(self, req: _Request, d: int, clicked: list[int]) -> None:
        """Clicks and predicted attractiveness by position: the examination estimate."""
        kind = req.kind
        self._pos_attr[kind][:d] += req.attr[:d]
        pos_clicks = self._pos_clicks[kind]
        for k in clicked:
            pos_clicks[k] += 1.0
        self._update_examination(kind)

    def _learn(self, req: _Request, shown: list[int], d: int, clicked: list[int], ex: list[float]) -> None:
        """Cascade: positives at the clicks (weighted by the inverse examination of their
        position), negatives above the last click. Ads: every slot (a few), an unclicked one
        below the last click weighted by the probability that it was examined."""
        spec = self.spec
        ads = req.bids is not None
        last = clicked[-1] if clicked else -1
        depth = d if ads else last + 1
        clicks, floor = req.clicks, spec.min_propensity
        y: list[bool] = []
        w: list[float] = []
        for k in range(depth):
            c = clicks.get(shown[k])
            y.append(c is not None)
            if c is not None:
                w.append(c / max(ex[k], floor))
            else:
                w.append(ex[k] if ads and k > last else 1.0)
        self._evaluate_examples(y, req.attr[:depth].tolist(), req.deadline)
        rows = req.x[:depth]
        rate = spec.negative_sampling if self._weighted else 1.0
        if rate < 1.0:
            rng = self._rng
            keep = [k for k in range(depth) if y[k] or rng.random() < rate]
            y = [y[k] for k in keep]
            w = [w[k] if y[j] else w[k] / rate for j, k in enumerate(keep)]
            rows = rows[keep]
        if not y:
            return
        fast = self._fast_learn
        if not fast:
            fast = self._fast_learn = _steppable(self.model)
        if fast:
            _sgd_step(self.model, rows, y, w)  # type: ignore[arg-type]
        else:
            model, weighted = self.model, self._weighted
            for row, yk, wk in zip(rows.tolist(), y, w, strict=True):
                xk = dict(zip(FEATURES, row, strict=True))
                if weighted and wk != 1.0:
                    model.learn_one(xk, yk, w=wk)
                else:
                    model.learn_one(xk, yk)
        self.n_learned += len(y)

    def _evaluate_examples(self, y: list[bool], attr: list[float], ts: int) -> None:
        """The click model's metrics on one example in ``evaluate_every``; every example's
        error to the drift monitor."""
        ev, every, n = self.evaluation, self.spec.evaluate_every, self._n_examples
        drift = ev.drift
        for yk, a in zip(y, attr, strict=True):
            p = min(max(a, _EPS), 1 - _EPS)
            n += 1
            if n % every == 0:
                ev.binary(yk, p, ts)
            elif drift is not None:
                # What ``ev.error`` passes on (its other bookkeeping is for outcomes held back
                # to prediction order, which this learner does not ask for): a request's
                # examples are several, and the layers were most of their evaluation's cost.
                drift.update(-math.log(p if yk else 1 - p), ts)
        self._n_examples = n
        if type(drift) is _BrierFeed:  # (validation swaps in an accumulator of its own)
            drift.flush(ts)

    def _update_examination(self, kind: str) -> None:
        ratio = self._pos_clicks[kind] / self._pos_attr[kind]
        ratio /= ratio[0]
        # Non-increasing, at most 1 (the top position), at least min_propensity.
        exam = np.maximum(np.minimum.accumulate(ratio), self.spec.min_propensity)
        self.examination[kind] = exam
        row = self._exam_row[kind]
        row[: len(exam)] = exam
        row[len(exam) :] = exam[-1]

    def _evaluate(self, req: _Request, shown: list[int], clicked: list[int]) -> None:
        ev = self.ranking
        ev.score("ctr", 1.0 if clicked else 0.0)
        clicks = req.clicks
        if req.bids is not None:
            bids = req.bids
            ev.score("revenue_per_request", sum(float(bids[i]) for i in shown[: self.spec.ad_slots] if i in clicks))
        if not clicked:
            return
        # Gains: 1 a click, 2 a click and a purchase; ranks in our order and in the engine's.
        gains = {i: (2.0 if w > 1.0 else 1.0) for i, w in clicks.items()}
        order = req.order.tolist()
        ours = {order.index(i): g for i, g in gains.items()}
        ev.score("ndcg_at_10", ndcg(ours))
        ev.score("ndcg_at_10_original", ndcg(gains))
        ev.score("mrr", 1.0 / (1 + min(ours)))
        ev.score("mrr_original", 1.0 / (1 + min(gains)))
