"""Top-k item recommendations from clicks and purchases, learned online.

On every click the learner publishes the k items it ranks best for that user
(never the item just clicked); purchases publish nothing. Both are learned
from as implicit feedback: a click is a positive, a purchase a stronger one
(``purchase_weight``), and since implicit data has no negatives, ``negatives``
items per positive are drawn from the recent positives, i.e. from the
popularity distribution. The model is a River ``reco`` ranker (``reco.FunkMF``
by default, ``reco.BiasedMF``, ``reco.Baseline``) or a ``facto.FMClassifier`` /
``FMRegressor`` over a ``{user, item}`` one-hot, given as a model spec: swapping
it is a config change.

The catalog is never scored as a whole. Each click ranks a bounded candidate
set: the globally popular items, the items co-clicked with the clicked item
and with the user's recent items, and the popular items of the user's recent
categories. The item weights of the River model are mirrored row by row in
one matrix, so ranking is one matrix-vector product: the user's vector (plus
what they are looking at now, while they are new) against the items' vectors,
plus a log-popularity prior. A user the model does not know yet gets the
popularity list (cold start); a new item becomes a candidate as soon as it
gets traffic. Popularity decays on event time (half-life
``popularity_half_life_s``), so it follows trends.

Quality is measured as users see it: on each click, was the clicked item in
the list last served to that user (at most ``hit_window_s`` earlier)? That is
``hit_rate`` (hit-rate@k of what was served) next to ``baseline_hit_rate``
(the popularity list computed at the same moment, whether served or not), and
``1 - hit`` feeds a concept-drift detector.

Every per-user and per-item structure is bounded (``max_users`` and
``user_ttl_s``, ``max_items`` and ``item_ttl_s``, ``max_categories``,
``max_neighbors``, ``recent_items``), and a forgotten user or item is dropped
from the model too, so memory stays flat however many distinct users pass.
Measured quality and cost: ``docs/learners-recommendation.md``.

>>> from stream.events import Click
>>> learner = RecommendationSpec(k=2).build("reco", {"clicks": "clicks", "purchases": "purchases"})
>>> clicks = [("ann", "a"), ("bob", "a"), ("bob", "b"), ("cat", "a"), ("cat", "c"), ("ann", "b")]
>>> for i, (user, item) in enumerate(clicks):
...     click = Click(event_id=f"e{i}", ts=1_000 * i, user_id=user, item_id=item)
...     _ = learner.predict(click)
...     learner.learn(click)
>>> click = Click(event_id="e6", ts=6_000, user_id="dan", item_id="c")
>>> out = learner.predict(click)
>>> out.source, [r.item_id for r in out.items]
('popularity', ['a', 'b'])
>>> learner.learn(click)
>>> out = learner.predict(Click(event_id="e7", ts=7_000, user_id="dan", item_id="a"))
>>> out.source, len(out.items), "a" in [r.item_id for r in out.items]
('model', 2, False)
"""

from __future__ import annotations

import collections
import copy
import math
import random
from collections.abc import Mapping
from operator import itemgetter
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from river import facto, optim, reco

from stream.bounded import BoundedDict
from stream.drift import ConceptDrift, Detector
from stream.evaluation import Evaluation
from stream.events import Click, Purchase
from stream.learners.base import Learner
from stream.models import build_model, with_seed
from stream.sync import Params, Table

__all__ = ["RecommendationLearner", "RecommendationSpec", "Recommendations", "ScoredItem"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


def _default_model() -> dict[str, Any]:
    return {
        "class": "reco.FunkMF",
        "params": {
            "n_factors": 16,
            "l2": 0.001,
            "optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}},
            # Small initial vectors: a new user's vector is mostly its initial noise.
            "initializer": {"class": "optim.initializers.Normal", "params": {"sigma": 0.03}},
        },
    }


class ScoredItem(msgspec.Struct, frozen=True, gc=False):
    item_id: str
    #: The model's score (``source = "model"``), or the item's decayed count of
    #: clicks and weighted purchases at the click's time (``"popularity"``).
    score: float


class Recommendations(msgspec.Struct, gc=False):
    """The prediction published for a click: best first, never the clicked item."""

    items: list[ScoredItem]
    #: ``model``: ranked by the model; ``popularity``: a user the model does not know yet.
    source: Literal["model", "popularity"]


class RecommendationSpec(
    msgspec.Struct, tag="recommendation", tag_field="kind", forbid_unknown_fields=True, kw_only=True
):
    output_topic: str = "recommendations"
    #: Items per published list.
    k: PositiveInt = 10
    #: A purchase counts as this many clicks (popularity, co-clicks, and the
    #: model: sample weight, or repeated ``learn_one`` for models without one).
    purchase_weight: PositiveFloat = 3.0
    #: Negatives per positive, drawn from the recent positives (popularity).
    negatives: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    #: Recent positives the negatives are drawn from.
    negative_pool: PositiveInt = 10_000
    #: Seeds negative sampling, and every (nested) model spec taking a ``seed`` that has none.
    seed: int = 42
    #: River model, ``{class, params}``: a ``reco`` ranker or ``facto.FMClassifier``/``FMRegressor``.
    model: dict[str, Any] = msgspec.field(default_factory=_default_model)
    #: ``batch``: a positive and its negatives make one vectorised SGD step (the
    #: summed gradient; ``reco.FunkMF``/``BiasedMF`` with ``optim.SGD`` only, other
    #: models learn sequentially). ``sequential``: River's ``learn_one`` per sample.
    update: Literal["batch", "sequential"] = "batch"
    #: Users remembered (least recently active forgotten first) ...
    max_users: PositiveInt = 200_000
    #: ... and for how long after their last event (event time).
    user_ttl_s: PositiveFloat = 86_400.0
    #: Items remembered (least recently interacted with forgotten first), optionally for a limited time.
    max_items: PositiveInt = 100_000
    item_ttl_s: PositiveFloat | None = None
    #: Categories whose most popular items are tracked, and how many items each.
    max_categories: PositiveInt = 10_000
    category_items: PositiveInt = 20
    #: Items remembered per user: each new one counts as co-clicked with them, and
    #: their co-clicked items are candidates.
    recent_items: PositiveInt = 3
    #: Categories remembered per user, whose popular items are candidates.
    recent_categories: PositiveInt = 2
    #: Co-clicked items counted per item (the most co-clicked, approximately).
    max_neighbors: PositiveInt = 20
    #: Candidates ranked per click, at most ...
    candidates: PositiveInt = 100
    #: ... of which the most popular items (also where the popularity list comes from).
    popular_candidates: PositiveInt = 20
    #: Popularity counts halve over this much event time.
    popularity_half_life_s: PositiveFloat = 3_600.0
    #: Events learned from a user before the model ranks for them (popularity before).
    min_user_events: PositiveInt = 1
    #: Ranking query: the user's vector plus this times the mean vector of the item
    #: just clicked and the user's recent items (what the user is looking at now) ...
    context_weight: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    #: ... while the user has fewer events than this; then their own vector is trained.
    context_events: PositiveInt = 20
    #: Added to the model's score: this times the log of the item's decayed count. The
    #: negatives are drawn by popularity, so the model learns affinity beyond it.
    popularity_prior: Annotated[float, msgspec.Meta(ge=0)] = 0.03
    #: A click is a hit or a miss of the last list served to its user if that list
    #: is at most this old (event time); clicks without one are not evaluated.
    hit_window_s: PositiveFloat = 1_800.0
    #: Evaluated clicks in the rolling window of the hit-rates.
    evaluation_window: PositiveInt = 10_000
    #: Concept-drift detector fed ``1 - hit`` (``adwin``, ``page_hinkley``, ``kswin``), and its parameters.
    drift_detector: Detector = "adwin"
    drift_params: dict[str, float | int | str] = {}

    def validate(self, name: str) -> None:
        if self.popular_candidates <= self.k:
            raise ValueError("`popular_candidates` must exceed `k` (the popularity list skips the clicked item)")
        if self.candidates < self.popular_candidates:
            raise ValueError("`candidates` must be at least `popular_candidates`")
        try:
            self.drift()
        except TypeError as exc:
            raise ValueError(f"drift_params: {exc}") from None
        _weights_for(build_model(with_seed(self.model, self.seed), "model"), 1, self.update)

    def build(self, name: str, topics: Mapping[str, str]) -> RecommendationLearner:
        return RecommendationLearner(name, self, topics)

    def drift(self) -> ConceptDrift:
        params: dict[str, Any] = dict(self.drift_params)
        return ConceptDrift(self.drift_detector, **params)


# -- the model and the item matrix ----------------------------------------------------


def _drop_key(obj: Any, key: Any, prefix: str) -> None:
    """Drop ``key`` from the per-key weights of ``obj`` (its dict attributes named
    ``prefix*``) and from the per-key state of its ``prefix*`` optimizers (moments)."""
    for name, value in list(vars(obj).items()):
        if not name.startswith(prefix):
            continue
        if isinstance(value, dict):
            value.pop(key, None)
        elif isinstance(value, optim.base.Optimizer):
            for state in vars(value).values():
                if isinstance(state, dict):
                    state.pop(key, None)


class _Weights:
    """The River model, and its item weights mirrored row by row (one row per
    remembered item) in ``table = [vectors | offset]``, where ``offset`` is the
    item's bias plus the learner's popularity prior: a candidate set is scored
    by one gather and one product with ``[user vector, 1]``.

    Subclasses say how the model is keyed; ``learn`` goes sample by sample
    through River's ``learn_one`` and copies the items' weights afterwards."""

    def __init__(self, model: Any, n_rows: int, n_factors: int, has_biases: bool) -> None:
        self.model = model
        self.n_factors = n_factors
        self.has_biases = has_biases
        self.table = np.zeros((n_rows, n_factors + 1))
        self.vectors = self.table[:, :n_factors]
        self.biases = np.zeros(n_rows)
        self.priors = np.zeros(n_rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["vectors"]  # a view of ``table``: pickle would copy it
        # The arrays are sized for ``max_items``; rows past the last non-zero one
        # are zeros: a checkpoint stores the used rows and the full size.
        used = np.flatnonzero(self.table.any(axis=1) | (self.biases != 0) | (self.priors != 0))
        n = int(used[-1]) + 1 if len(used) else 0
        state["n_rows"] = len(self.table)
        for name in ("table", "biases", "priors"):
            state[name] = state[name][:n].copy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        n_rows = state.pop("n_rows")
        for name in ("table", "biases", "priors"):
            state[name] = _padded(state[name], n_rows)
        self.__dict__.update(state)
        self.vectors = self.table[:, : self.n_factors]

    # Keyed access to the model, per kind of model.
    def _learn_one(self, user: str, item: str, weight: float, positive: bool) -> None:
        raise NotImplementedError

    def _item_weights(self, item: str) -> tuple[np.ndarray | None, float]:
        raise NotImplementedError

    def user(self, user: str) -> np.ndarray | None:
        """The user's latent vector, None if the model does not know the user."""
        raise NotImplementedError

    def forget_user(self, user: str) -> None:
        raise NotImplementedError

    def _forget_item(self, item: str) -> None:
        raise NotImplementedError

    # Rows.
    def add_item(self, item: str, row: int) -> None:
        """A newly remembered item took ``row``; its weights are copied once learned."""

    def remove_item(self, item: str, row: int) -> None:
        self._forget_item(item)
        self.table[row] = 0.0
        self.biases[row] = 0.0
        self.priors[row] = 0.0

    def relink(self, rows: Mapping[str, int]) -> None:
        """Called after unpickling, with the rows of the remembered items."""

    def set_prior(self, row: int, prior: float) -> None:
        self.priors[row] = prior
        self.table[row, self.n_factors] = prior + self.biases.item(row) if self.has_biases else prior

    def shift_priors(self, delta: float, rows: np.ndarray) -> None:
        self.priors[rows] += delta
        self.table[rows, self.n_factors] += delta

    def learn(self, user: str, items: list[str], rows: list[int], weight: float) -> None:
        """Learn the positive ``items[0]`` and the negatives ``items[1:]``."""
        table, f = self.table, self.n_factors
        for j, (item, row) in enumerate(zip(items, rows, strict=True)):
            self._learn_one(user, item, weight, j == 0)
            vec, bias = self._item_weights(item)
            if vec is not None:
                table[row, :f] = vec
            self.biases[row] = bias
            table[row, f] = bias + self.priors[row]

    def scores(self, query: np.ndarray, candidates: list[int]) -> np.ndarray:
        """``query`` is ``[user vector, 1]``: latent affinity + bias + prior per candidate."""
        return self.table.take(candidates, axis=0) @ query


class _RankerWeights(_Weights):
    """A ``reco`` ranker: ``u_latents``/``i_latents`` and/or ``u_biases``/``i_biases``
    keyed by user and item ids. Positives have target 1, negatives 0."""

    def __init__(self, model: Any, n_rows: int) -> None:
        n_factors = int(model.n_factors) if hasattr(model, "i_latents") else 0
        super().__init__(model, n_rows, n_factors, hasattr(model, "i_biases"))

    def _learn_one(self, user: str, item: str, weight: float, positive: bool) -> None:
        # Rankers take no sample weight: a purchase is learned as that many clicks.
        for _ in range(max(1, round(weight)) if positive else 1):
            self.model.learn_one(user, item, 1.0 if positive else 0.0)

    def _item_weights(self, item: str) -> tuple[np.ndarray | None, float]:
        m = self.model
        vec = m.i_latents.get(item) if self.n_factors else None
        return vec, float(m.i_biases.get(item, 0.0)) if self.has_biases else 0.0

    def user(self, user: str) -> np.ndarray | None:
        if self.n_factors:
            return self.model.u_latents.get(user)
        return _NO_FACTORS if user in self.model.u_biases else None

    def forget_user(self, user: str) -> None:
        _drop_key(self.model, user, "u_")

    def _forget_item(self, item: str) -> None:
        _drop_key(self.model, item, "i_")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self.n_factors:
            # One matrix per latent table instead of one pickled array per user and
            # item: ~200k small pickles were most of a large checkpoint's time.
            model = copy.copy(self.model)  # shallow: only the two attributes are swapped
            state["model"] = model
            for name in ("u_latents", "i_latents"):
                latents = getattr(self.model, name)
                keys = list(latents)
                matrix = np.stack(list(latents.values())) if keys else np.zeros((0, self.n_factors))
                state[name] = (latents.default_factory, keys, matrix)
                setattr(model, name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        packed = [(name, state.pop(name)) for name in ("u_latents", "i_latents") if name in state]
        super().__setstate__(state)
        for name, (factory, keys, matrix) in packed:
            # Rows of one block (kept alive while any is used); i_latents are relinked to ``vectors``.
            setattr(self.model, name, collections.defaultdict(factory, zip(keys, matrix, strict=True)))


class _BatchMFWeights(_RankerWeights):
    """``reco.FunkMF``/``BiasedMF`` trained by ``optim.SGD``, one step per event.

    The item vectors in the model's ``i_latents`` are views of rows of
    ``vectors``: an update writes both at once, and ranking reads them without
    copies. A positive and its negatives share a user, so they make one step of
    the summed gradient (River's loss, learning rates, L2 and gradient clipping;
    the positive's gradient times the event's weight; the optimizers count one
    iteration per sample), in ~15 array operations instead of ~15 per sample:
    the difference from sequential steps is second order in the learning rate."""

    def __init__(self, model: Any, n_rows: int) -> None:
        super().__init__(model, n_rows)
        self._biased = isinstance(model, reco.BiasedMF)
        m = model
        self._l2 = m.l2_latent if self._biased else m.l2
        self._u_opt = m.u_latent_optimizer if self._biased else m.u_optimizer
        self._i_opt = m.i_latent_optimizer if self._biased else m.i_optimizer
        self._squared = type(m.loss) is optim.losses.Squared and m.clip_gradient >= _NO_CLIP
        #: Targets of a positive and its negatives, by batch size.
        self._targets = [np.array([1.0] + [0.0] * (b - 1)) for b in range(_MAX_BATCH + 1)]

    def add_item(self, item: str, row: int) -> None:
        # The model's own initializer draws the vector (seeded, in event order).
        m = self.model
        self.vectors[row] = m.i_latents[item]
        m.i_latents[item] = self.vectors[row]
        if self._biased:
            self.biases[row] = bias = m.i_biases[item]
            self.table[row, self.n_factors] = bias + self.priors[row]

    def relink(self, rows: Mapping[str, int]) -> None:
        latents, vectors = self.model.i_latents, self.vectors
        for item, row in rows.items():
            if item in latents:
                vectors[row] = latents[item]
                latents[item] = vectors[row]

    def learn(self, user: str, items: list[str], rows: list[int], weight: float) -> None:
        m = self.model
        b = len(rows)
        pu = m.u_latents[user]
        # From the contiguous table: ``take`` on the strided ``vectors`` copies it whole first.
        v = self.table.take(rows, axis=0)[:, : self.n_factors]
        pred = v @ pu
        if self._biased:
            m.global_mean.update(1.0, weight)
            for _ in range(b - 1):
                m.global_mean.update(0.0)
            bu = m.u_biases[user]
            bi = self.biases.take(rows)
            pred += bi
            pred += m.global_mean.get() + bu
        loss, clip = m.loss, m.clip_gradient
        uo, io = self._u_opt, self._i_opt
        lr_u, lr_i = uo.lr.get(uo.n_iterations), io.lr.get(io.n_iterations)
        uo.n_iterations += b
        io.n_iterations += b
        if self._squared:
            # River's Squared gradient is 2 (y_pred - y), it clips nothing: g holds
            # y_pred - y, the 2 goes into the steps below.
            g = pred - self._targets[b]
            scale = 2.0
        else:
            p = pred.tolist()
            g_list = [max(min(loss.gradient(1.0, p[0]), clip), -clip)]
            g_list.extend(max(min(loss.gradient(0.0, x), clip), -clip) for x in p[1:])
            g = np.array(g_list)
            scale = 1.0
        if weight != 1.0:
            g[0] *= weight
        l2 = self._l2
        # Both gradients from the weights before the step (g_j = scale * g[j]):
        #   pu <- pu - lr_u (sum_j g_j v_j + b l2 pu),  v_j <- v_j - lr_i (g_j pu + l2 v_j)
        step_u = g @ v
        new_v = np.multiply.outer(g * (-scale * lr_i), pu)
        if l2:
            new_v += v * (1.0 - lr_i * l2)
            pu *= 1.0 - lr_u * b * l2
        else:
            new_v += v
        self.vectors[rows] = new_v
        step_u *= scale * lr_u
        pu -= step_u
        if self._biased:
            ubo, ibo = m.u_bias_optimizer, m.i_bias_optimizer
            m.u_biases[user] = bu - ubo.lr.get(ubo.n_iterations) * (scale * float(g.sum()) + b * m.l2_bias * bu)
            ubo.n_iterations += b
            bi -= ibo.lr.get(ibo.n_iterations) * (scale * g + m.l2_bias * bi)
            ibo.n_iterations += b
            self.biases[rows] = bi
            self.table[rows, self.n_factors] = bi + self.priors.take(rows)
            i_biases = m.i_biases
            for item, value in zip(items, bi.tolist(), strict=True):
                i_biases[item] = value


class _FMWeights(_Weights):
    """A factorization machine over ``{"user": id, "item": id}``, one-hot encoded by
    River as ``user_<id>`` and ``item_<id>``: score = w_item + <v_user, v_item> +
    terms equal for every candidate. Positives are True (1), negatives False (0),
    the event's weight is the sample weight."""

    def __init__(self, model: Any, n_rows: int) -> None:
        super().__init__(model, n_rows, int(model.n_factors), True)
        self.classifier = isinstance(model, facto.FMClassifier)

    def _learn_one(self, user: str, item: str, weight: float, positive: bool) -> None:
        x = {"user": user, "item": item}
        y = positive if self.classifier else float(positive)
        self.model.learn_one(x, y, w=weight if positive else 1.0)

    def _item_weights(self, item: str) -> tuple[np.ndarray | None, float]:
        key = "item_" + item
        return self.model.latents.get(key), float(self.model.weights.get(key, 0.0))

    def user(self, user: str) -> np.ndarray | None:
        return self.model.latents.get("user_" + user)

    def _forget(self, key: str) -> None:
        m = self.model
        m.latents.pop(key, None)
        m.weights.pop(key, None)
        for opt in (m.weight_optimizer, m.latent_optimizer):
            for state in vars(opt).values():
                if isinstance(state, dict):
                    state.pop(key, None)

    def forget_user(self, user: str) -> None:
        self._forget("user_" + user)

    def _forget_item(self, item: str) -> None:
        self._forget("item_" + item)


_NO_FACTORS = np.zeros(0)
#: River's default ``clip_gradient``, large enough to never clip a squared loss here.
_NO_CLIP = 1e12
#: A positive and at most this many negatives per batch step.
_MAX_BATCH = 1 + 64


def _weights_for(model: Any, n_rows: int, update: str) -> _Weights:
    if isinstance(model, reco.base.Ranker) and (hasattr(model, "i_latents") or hasattr(model, "i_biases")):
        if update == "batch" and _sgd_mf(model):
            return _BatchMFWeights(model, n_rows)
        return _RankerWeights(model, n_rows)
    if isinstance(model, (facto.FMClassifier, facto.FMRegressor)):
        return _FMWeights(model, n_rows)
    raise ValueError(
        f"model: {type(model).__name__} is not supported; use a River reco ranker with latent factors or "
        "biases (reco.FunkMF, reco.BiasedMF, reco.Baseline) or facto.FMClassifier / facto.FMRegressor"
    )


def _sgd_mf(model: Any) -> bool:
    optimizers: tuple[Any, ...]
    if type(model) is reco.FunkMF:
        optimizers = (model.u_optimizer, model.i_optimizer)
    elif type(model) is reco.BiasedMF:
        optimizers = (
            model.u_bias_optimizer,
            model.i_bias_optimizer,
            model.u_latent_optimizer,
            model.i_latent_optimizer,
        )
    else:
        return False
    return all(type(o) is optim.SGD for o in optimizers)


# -- bounded state --------------------------------------------------------------------


class _Top:
    """The ``capacity`` rows with the highest scores, best first. Exact as long as a
    row's score changes only through ``update``: forward-decayed counts only grow,
    so an item can only enter the top when it is itself counted."""

    __slots__ = ("capacity", "keys", "scores", "version")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[int] = []
        self.scores: list[float] = []
        #: Bumped when membership changes (not order), so derived arrays are rebuilt only then.
        self.version = 0

    def update(self, key: int, score: float) -> None:
        keys, scores = self.keys, self.scores
        if key in keys:
            i = keys.index(key)
            scores[i] = score
        else:
            if len(keys) < self.capacity:
                keys.append(key)
                scores.append(score)
            elif score > scores[-1]:
                keys[-1] = key
                scores[-1] = score
            else:
                return
            self.version += 1
            i = len(keys) - 1
        while i > 0 and scores[i - 1] < score:
            keys[i], keys[i - 1] = keys[i - 1], keys[i]
            scores[i], scores[i - 1] = scores[i - 1], scores[i]
            i -= 1
        # Downwards too: a recycled row restarts from a lower count.
        n = len(keys) - 1
        while i < n and scores[i + 1] > score:
            keys[i], keys[i + 1] = keys[i + 1], keys[i]
            scores[i], scores[i + 1] = scores[i + 1], scores[i]
            i += 1

    def remove(self, key: int) -> bool:
        if key not in self.keys:
            return False
        i = self.keys.index(key)
        del self.keys[i], self.scores[i]
        self.version += 1
        return True

    def rescale(self, factor: float) -> None:
        self.scores = [s * factor for s in self.scores]


class _User:
    __slots__ = ("baseline", "categories", "events", "recent", "served", "served_ts")

    def __init__(self) -> None:
        #: Item ids, not rows (a row is recycled when its item is forgotten); most recent last.
        self.recent: list[str] = []
        self.categories: list[str] = []
        #: The list served on the last click and the popularity list of that moment.
        self.served: tuple[str, ...] = ()
        self.baseline: tuple[str, ...] = ()
        self.served_ts: int | None = None
        self.events = 0

    # A tuple, not the default slots dict: there are up to ``max_users`` of these in a checkpoint.
    def __getstate__(self) -> tuple[Any, ...]:
        return self.recent, self.categories, self.served, self.baseline, self.served_ts, self.events

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.recent, self.categories, self.served, self.baseline, self.served_ts, self.events = state


class _Item:
    __slots__ = ("category", "neighbors", "row")

    def __init__(self) -> None:
        self.row = -1
        self.category: str | None = None
        #: Row of a co-clicked item -> weighted co-click count (the largest, see ``_bump``).
        self.neighbors: dict[int, float] = {}

    def __getstate__(self) -> tuple[Any, ...]:
        return self.row, self.category, self.neighbors

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.row, self.category, self.neighbors = state


#: Forward-decayed counts are rescaled once their exponent passes this (e^30 ~ 1e13).
_MAX_EXPONENT = 30.0
#: Learned events between sweeps of TTL-expired users and items.
_SWEEP_EVERY = 4096


class RecommendationLearner(Learner):
    kind = "recommendation"

    def __init__(self, name: str, spec: RecommendationSpec, topics: Mapping[str, str]) -> None:
        self.clicks_topic = topics.get("clicks", "clicks")
        self.purchases_topic = topics.get("purchases", "purchases")
        super().__init__(name, spec.output_topic, frozenset({self.clicks_topic, self.purchases_topic}))
        self.spec = spec
        self.k = spec.k
        n = spec.max_items
        self.weights = _weights_for(build_model(with_seed(spec.model, spec.seed)), n, spec.update)
        self.evaluation = Evaluation.for_means(
            spec.evaluation_window,
            ("hit_rate", "baseline_hit_rate"),
            drift=spec.drift(),
        )
        self._rng = random.Random(spec.seed)
        self._users: BoundedDict[str, _User] = BoundedDict(
            spec.max_users, int(spec.user_ttl_s * 1000), on_evict=self._user_evicted
        )
        # Items: the BoundedDict decides what is forgotten (LRU, TTL); their rows
        # index the arrays ranking reads (weights, popularity).
        self._items: BoundedDict[str, _Item] = BoundedDict(
            n, int(spec.item_ttl_s * 1000) if spec.item_ttl_s is not None else None, on_evict=self._item_evicted
        )
        self._item_ttl = spec.item_ttl_s is not None
        self._row_of: dict[str, int] = {}
        self._item_at: list[str | None] = [None] * n
        self._item_state: list[_Item | None] = [None] * n
        self._free_rows: list[int] = []
        self._next_row = 0
        # Forward-decayed popularity, weight * exp((ts - t0) / tau): comparable across
        # items at any time without touching them; rescaled when the exponent grows.
        self._popularity = np.zeros(n)
        self._tau_ms = spec.popularity_half_life_s * 1000 / math.log(2)
        self._t0: int | None = None
        self._popular = _Top(spec.popular_candidates)
        self._popular_stale = False
        self._categories: BoundedDict[str, _Top] = BoundedDict(spec.max_categories, on_evict=self._category_evicted)
        self._category_top: dict[str, _Top] = {}
        self._negatives: list[str] = []
        self._negatives_next = 0
        self._hit_window_ms = int(spec.hit_window_s * 1000)
        #: Ranking query, ``[user vector (+ context), 1]``, and its head.
        self._query = np.ones(self.weights.n_factors + 1)
        self._query_head = self._query[: self.weights.n_factors]
        #: ``context_weight / n`` n times, by number n of context items.
        self._context_weights = [np.full(n, spec.context_weight / max(n, 1)) for n in range(spec.recent_items + 2)]
        #: The click ``predict`` just served and its user's state, for ``learn``.
        self._pending: tuple[Any, _User] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_query_head"]  # a view of ``_query``: pickle would copy it
        # Row-indexed structures are sized for ``max_items``; rows from ``_next_row`` on were never used.
        n = self._next_row
        state["_popularity"] = self._popularity[:n].copy()
        state["_item_at"] = self._item_at[:n]
        state["_item_state"] = self._item_state[:n]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        n_rows = state["spec"].max_items
        state["_popularity"] = _padded(state["_popularity"], n_rows)
        for name in ("_item_at", "_item_state"):
            state[name] = state[name] + [None] * (n_rows - len(state[name]))
        self.__dict__.update(state)
        self._query_head = self._query[: self.weights.n_factors]
        self.weights.relink(self._row_of)

    @property
    def model(self) -> Any:
        """The River model (its item weights are also mirrored for ranking)."""
        return self.weights.model

    def replace_model(self, model: Any) -> None:
        """Serve ``model`` (warm start, rollback): the ranking rows of the remembered
        items are mirrored from it (drawn by its initializer for items it does not
        know); popularity priors stay."""
        old = self.weights
        weights = _weights_for(model, len(old.table), self.spec.update)
        weights.priors[:] = old.priors
        f = weights.n_factors
        for item, row in self._row_of.items():
            vec, bias = weights._item_weights(item)
            if vec is None and f:
                weights.add_item(item, row)
                vec, bias = weights._item_weights(item)
            if vec is not None:
                weights.vectors[row] = vec
            weights.biases[row] = bias
            weights.set_prior(row, old.priors.item(row))
        weights.relink(self._row_of)
        self.weights = weights
        self._query = np.ones(f + 1)
        self._query_head = self._query[:f]
        self.model_version += 1

    # -- the Learner interface ------------------------------------------------------------

    def predict(self, event: Any) -> Recommendations | None:
        if type(event) is not Click:
            return None
        ts = event.ts
        item = event.item_id
        state = self._users.get(event.user_id, ts)
        if state is None:
            state = _User()
        elif state.served_ts is not None and ts - state.served_ts <= self._hit_window_ms:
            hit = item in state.served
            ev = self.evaluation
            ev.score("hit_rate", 1.0 if hit else 0.0)
            ev.score("baseline_hit_rate", 1.0 if item in state.baseline else 0.0)
            ev.error(0.0 if hit else 1.0, ts)
        baseline = self._popular_ids(item)
        user_vector = self.weights.user(event.user_id) if state.events >= self.spec.min_user_events else None
        if user_vector is None:
            ids, scores = baseline, self._popularity_scores(baseline, ts)
            source = "popularity"
        else:
            ids, scores = self._rank(user_vector, state, item, event.category, ts)
            source = "model"
        state.served = tuple(ids)
        state.baseline = tuple(baseline)
        state.served_ts = ts
        self._pending = (event, state)
        return Recommendations([ScoredItem(i, s) for i, s in zip(ids, scores, strict=True)], source)  # type: ignore[arg-type]

    def learn(self, event: Any) -> None:
        if type(event) is Click:
            weight = 1.0
        elif type(event) is Purchase:
            weight = self.spec.purchase_weight
        else:
            return
        ts = event.ts
        user, item = event.user_id, event.item_id
        pending, self._pending = self._pending, None
        state = pending[1] if pending is not None and pending[0] is event else self._users.get(user, ts)
        if state is None:
            state = _User()
        it = self._touch_item(item, ts)
        score = self._count(it.row, weight, ts)
        self._popular.update(it.row, score)
        category = event.category
        if category:
            self._count_category(it, category, score, ts)
        recent = state.recent
        self._co_click(it, recent, weight)
        self._learn_model(user, item, it.row, weight, recent)
        if item in recent:
            recent.remove(item)
        recent.append(item)
        if len(recent) > self.spec.recent_items:
            del recent[0]
        if category:
            categories = state.categories
            if category in categories:
                categories.remove(category)
            categories.append(category)
            if len(categories) > self.spec.recent_categories:
                del categories[0]
        state.events += 1
        self._users.put(user, state, ts)
        self.n_learned += 1
        if self.n_learned % _SWEEP_EVERY == 0:
            self._users.expire(ts)
            self._items.expire(ts)

    # -- learning ---------------------------------------------------------------------------

    def _learn_model(self, user: str, item: str, row: int, weight: float, recent: list[str]) -> None:
        """The positive and its negatives: recent positives (so drawn by popularity)
        other than the item and the user's recent items, each at most once."""
        items, rows = [item], [row]
        pool = self._negatives
        n = len(pool)
        if n:
            rng, row_of = self._rng, self._row_of
            for _ in range(self.spec.negatives):
                neg = pool[int(rng.random() * n)]
                neg_row = row_of.get(neg)
                if neg_row is None or neg_row in rows or neg in recent:
                    continue
                items.append(neg)
                rows.append(neg_row)
        self.weights.learn(user, items, rows, weight)
        if n < self.spec.negative_pool:
            pool.append(item)
        else:
            pool[self._negatives_next] = item
            self._negatives_next = (self._negatives_next + 1) % n

    def _touch_item(self, item: str, ts: int) -> _Item:
        row = self._row_of.get(item)
        if row is not None:
            # With a TTL, None if it ran out: the item is forgotten and starts afresh.
            it = self._items.get(item, ts) if self._item_ttl else self._item_state[row]
            if it is not None:
                self._items.put(item, it, ts)
                return it
        it = _Item()
        # Put first: at capacity this forgets the least recent item, freeing its row.
        self._items.put(item, it, ts)
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            row = self._next_row
            self._next_row += 1
        it.row = row
        self._row_of[item] = row
        self._item_at[row] = item
        self._item_state[row] = it
        self.weights.add_item(item, row)
        return it

    def _count(self, row: int, weight: float, ts: int) -> float:
        """Add ``weight`` to the item's decayed count; returns its forward-decayed score."""
        if self._t0 is None:
            self._t0 = ts
        exponent = (ts - self._t0) / self._tau_ms
        if exponent > _MAX_EXPONENT:
            self._rescale(ts)
            exponent = 0.0
        elif exponent < -_MAX_EXPONENT:
            exponent = -_MAX_EXPONENT  # far out of order: next to nothing, but a positive count
        pop = self._popularity
        score = pop.item(row) + weight * math.exp(exponent)
        pop[row] = score
        prior = self.spec.popularity_prior
        if prior:
            self.weights.set_prior(row, prior * math.log(score))
        return score

    def _rescale(self, ts: int) -> None:
        assert self._t0 is not None
        factor = math.exp(-(ts - self._t0) / self._tau_ms)
        self._t0 = ts
        self._popularity *= factor
        if self.spec.popularity_prior:
            live = np.flatnonzero(self._popularity > 0)
            self.weights.shift_priors(self.spec.popularity_prior * math.log(factor), live)
        self._popular.rescale(factor)
        for top in self._category_top.values():
            top.rescale(factor)

    def _count_category(self, it: _Item, category: str, score: float, ts: int) -> None:
        if it.category != category:
            if it.category is not None:
                old = self._category_top.get(it.category)
                if old is not None:
                    old.remove(it.row)
            it.category = category
        top = self._category_top.get(category)
        if top is None:
            top = self._category_top[category] = _Top(self.spec.category_items)
        self._categories.put(category, top, ts)
        top.update(it.row, score)

    def _co_click(self, it: _Item, recent: list[str], weight: float) -> None:
        row_of, item_state = self._row_of, self._item_state
        cap = self.spec.max_neighbors
        row = it.row
        mine = it.neighbors
        for other in recent:
            other_row = row_of.get(other)
            if other_row is None or other_row == row:
                continue
            theirs = item_state[other_row].neighbors  # type: ignore[union-attr]
            # Mostly pairs already counted: bump in place, _bump only for newcomers.
            count = mine.get(other_row)
            if count is None:
                _bump(mine, other_row, weight, cap)
            else:
                mine[other_row] = count + weight
            count = theirs.get(row)
            if count is None:
                _bump(theirs, row, weight, cap)
            else:
                theirs[row] = count + weight

    def _user_evicted(self, user: str, state: _User, reason: str) -> None:
        self.weights.forget_user(user)

    def _category_evicted(self, category: str, top: _Top, reason: str) -> None:
        self._category_top.pop(category, None)

    def _item_evicted(self, item: str, it: _Item, reason: str) -> None:
        row = it.row
        if self._row_of.get(item) == row:
            del self._row_of[item]
        if row < 0:
            return
        self.weights.remove_item(item, row)
        # The row will be recycled: drop the references to it that can be found (co-clicks
        # are mostly symmetric); ranking skips free rows, and the rest fade out.
        item_state = self._item_state
        for other_row in it.neighbors:
            other = item_state[other_row]
            if other is not None:
                other.neighbors.pop(row, None)
        if it.category is not None:
            top = self._category_top.get(it.category)
            if top is not None:
                top.remove(row)
        if self._popular.remove(row):
            # The next most popular item is not tracked: recount when next needed.
            self._popular_stale = True
        self._item_at[row] = None
        self._item_state[row] = None
        self._popularity[row] = 0.0
        self._free_rows.append(row)

    # -- ranking ----------------------------------------------------------------------------

    def _popular_ids(self, exclude: str) -> list[str]:
        """The popularity list: the k most popular items but ``exclude``."""
        if self._popular_stale:
            self._refresh_popular()
        item_at = self._item_at
        ids: list[str] = [item_at[r] for r in self._popular.keys[: self.k + 1]]  # type: ignore[misc]
        if exclude in ids:
            ids.remove(exclude)
        else:
            del ids[self.k :]
        return ids

    def _popularity_scores(self, ids: list[str], ts: int) -> list[float]:
        if self._t0 is None:
            return []
        decay = math.exp(-(ts - self._t0) / self._tau_ms)
        pop, row_of = self._popularity, self._row_of
        return [float(pop[row_of[i]]) * decay for i in ids]

    def _refresh_popular(self) -> None:
        pop = self._popularity
        top = self._popular
        live = np.flatnonzero(pop > 0)
        if len(live) > top.capacity:
            live = live[np.argpartition(-pop[live], top.capacity - 1)[: top.capacity]]
        live = live[np.argsort(-pop[live], kind="stable")]
        top.keys = live.tolist()
        top.scores = pop[live].tolist()
        top.version += 1
        self._popular_stale = False

    def _rank(
        self, user_vector: np.ndarray, state: _User, item: str, category: str | None, ts: int
    ) -> tuple[list[str], list[float]]:
        """Score the candidate set with the model; the top k, best first."""
        row_of, item_state = self._row_of, self._item_state
        # Most specific first, as the budget may cut the tail: co-clicked with the
        # item just clicked, then with the user's recent items, then the categories' hits.
        rows: list[int] = []
        context: list[int] = []
        clicked = row_of.get(item, -1)
        if clicked >= 0:
            rows.extend(item_state[clicked].neighbors)  # type: ignore[union-attr]
            context.append(clicked)
        for other in reversed(state.recent):
            other_row = row_of.get(other, -1)
            if other_row >= 0 and other_row != clicked:
                rows.extend(item_state[other_row].neighbors)  # type: ignore[union-attr]
                context.append(other_row)
        budget = self.spec.candidates - len(self._popular.keys)
        if len(rows) < budget:
            categories = state.categories
            if category and category not in categories:
                categories = [*categories, category]
            for c in reversed(categories):
                top = self._category_top.get(c)
                if top is not None:
                    rows.extend(top.keys)
        if len(rows) > budget:
            del rows[budget:]
        rows.extend(self._popular.keys)
        weights = self.weights
        query, head = self._query, self._query_head
        if context and state.events < self.spec.context_events and self.spec.context_weight and weights.n_factors:
            # A new user's vector says little yet; what they are looking at now does.
            mean = self._context_weights[len(context)] @ weights.table.take(context, axis=0)
            np.add(mean[: weights.n_factors], user_vector, out=head)
        else:
            head[:] = user_vector
        scores = weights.scores(query, rows)
        prior = self.spec.popularity_prior
        order = np.argsort(scores).tolist()
        ranked = scores.tolist()
        ids: list[str] = []
        best: list[float] = []
        seen = {clicked}
        item_at = self._item_at
        k = self.k
        # The prior's forward-decay offset is the same for all: published scores are
        # the model's plus prior * log(decayed count at ts), comparable over time.
        shift = prior * (ts - self._t0) / self._tau_ms if prior and self._t0 is not None else 0.0
        # Best first, skipping repeats, the clicked item and rows freed since noted.
        for i in reversed(order):
            r = rows[i]
            if r in seen:
                continue
            seen.add(r)
            other = item_at[r]
            if other is not None:
                ids.append(other)
                best.append(ranked[i] - shift)
                if len(ids) == k:
                    break
        return ids, best

    # -- introspection (tests, debugging; not for the hot path) ------------------------------

    def state_sizes(self) -> dict[str, int]:
        """Entries held by every per-user and per-item structure."""
        model = self.model
        if isinstance(self.weights, _FMWeights):
            model_users = sum(1 for k in model.latents if k.startswith("user_"))
            model_items = sum(1 for k in model.latents if k.startswith("item_"))
        else:
            model_users = len(getattr(model, "u_latents", getattr(model, "u_biases", {})))
            model_items = len(getattr(model, "i_latents", getattr(model, "i_biases", {})))
        return {
            "users": len(self._users),
            "items": len(self._items),
            "item_rows": len(self._row_of),
            "categories": len(self._categories),
            "category_tops": len(self._category_top),
            "model_users": model_users,
            "model_items": model_items,
            "negative_pool": len(self._negatives),
            "max_neighbors": max((len(it.neighbors) for _, it in self._items.items()), default=0),
        }


    # -- model sync (stream.sync): what every task's copy should know ---------------------------

    def global_params(self) -> Params:
        """Per remembered item: its latent vector (``weights``: the tasks' updates add up, as one model's
        SGD steps would; an item new to several tasks at once adds their random starts, a small
        noise) and its forward-decayed popularity (``decayed``, at this copy's ``t0``). Users' vectors
        stay with their task. Co-click counts are not synced: measured, they changed the hit-rate by
        under 0.5 % at three times the merge cost (bench/README.md, scale)."""
        out = Params(ref_ms=float(self._t0 or 0), tau_ms=self._tau_ms)
        items = list(self._row_of)
        rows = [self._row_of[i] for i in items]
        if isinstance(self.weights, _RankerWeights) and self.weights.n_factors > 0 and items:
            out.weights["i"] = Table(items, self.weights.vectors[rows])  # fancy indexing: a copy
        pop = self._popularity.take(rows).tolist()
        out.decayed = {item: p for item, p in zip(items, pop, strict=True) if p > 0}
        return out

    def set_global_params(self, params: Params) -> None:
        """The merged values of the items this copy remembers (others stay unknown to it until they
        get traffic in its task; their updates keep counting in the merge)."""
        weights, row_of, item_state = self.weights, self._row_of, self._item_state
        table = params.weights.get("i")
        if isinstance(weights, _RankerWeights) and weights.n_factors and isinstance(table, Table):
            known = [(row, r) for r, item in enumerate(table.ids) if (row := row_of.get(item)) is not None]
            if known:
                rows, at = (list(x) for x in zip(*known, strict=True))
                weights.vectors[rows] = table.matrix[at]
                if not isinstance(weights, _BatchMFWeights):  # there, the model's vectors are views of these rows
                    latents = weights.model.i_latents
                    for row in rows:
                        item = self._item_at[row]
                        if item in latents:
                            latents[item][:] = weights.vectors[row]
        if params.decayed and self._t0 is not None:
            factor = math.exp((params.ref_ms - self._t0) / self._tau_ms)
            known_pop = [(row, value * factor) for item, value in params.decayed.items()
                         if value > 0 and (row := row_of.get(item)) is not None]  # fmt: skip
            if known_pop:
                rows_p, scores = (list(x) for x in zip(*known_pop, strict=True))
                self._popularity[rows_p] = scores
                prior = self.spec.popularity_prior
                if prior:
                    priors = prior * np.log(np.array(scores))
                    weights.priors[rows_p] = priors
                    offset = priors + weights.biases[rows_p] if weights.has_biases else priors
                    weights.table[rows_p, weights.n_factors] = offset
                for row, score in known_pop:
                    it = item_state[row]
                    top = self._category_top.get(it.category) if it is not None and it.category else None
                    if top is not None:
                        top.update(row, score)
            self._popular_stale = True  # recounted from the array when next needed


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``n`` rows."""
    full = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
    full[: len(a)] = a
    return full


def _bump(neighbors: dict[int, float], key: int, weight: float, cap: int) -> None:
    """Count a co-click. A full table keeps its ``cap // 2`` largest counts: one sort
    per ``cap // 2`` newcomers instead of a scan for the smallest on each."""
    count = neighbors.get(key)
    if count is not None:
        neighbors[key] = count + weight
        return
    if len(neighbors) >= cap:
        kept = sorted(neighbors.items(), key=itemgetter(1), reverse=True)[: max(1, cap // 2)]
        neighbors.clear()
        neighbors.update(kept)
    neighbors[key] = weight
