"""The simulator's world: its configuration, catalog, users and tastes, and the ground truth.

``SimConfig`` says what to simulate; ``World`` draws what the shop is made of
(items in categories with Zipf popularity, list prices and costs; users with
latent category tastes, countries, devices and accounts) from seeded
generators; ``GroundTruth`` keeps the hidden parameters, the drifts applied
(``DriftPoint``) and the frauds, and scores predictions and drift detections
against them. ``stream.simulate`` runs the world forward into events.

>>> w = World(SimConfig(seed=1, events=2000, n_users=200, n_items=100))
>>> len(w.item_ids), len(w.user_ids), round(float(w.tastes.sum(axis=1).mean()), 6)
(100, 200, 1.0)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SEARCH_SETTINGS",
    "STREAMS",
    "DemandSim",
    "DetectionScore",
    "DriftPoint",
    "GroundTruth",
    "SearchTruth",
    "SimConfig",
    "SimEvent",
    "World",
]

#: The logical stream names the simulator writes (the ``[topics]`` keys in config).
STREAMS = ("clicks", "purchases", "prices", "fraud_labels")

#: ``(stream, key, value, ts)``: stream name, record key, JSON value, event time (epoch ms).
SimEvent = tuple[str, bytes | None, bytes, int]

CATEGORY_NAMES = (
    "electronics", "books", "fashion", "home", "garden", "toys", "sports", "beauty", "grocery", "automotive",
    "music", "movies", "games", "health", "pets", "office", "baby", "jewelry", "tools", "outdoors",
)  # fmt: skip
COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "PL", "SE", "CA")
COUNTRY_WEIGHTS = (0.30, 0.14, 0.14, 0.10, 0.07, 0.07, 0.06, 0.05, 0.04, 0.03)
PAYMENT_METHODS = ("card", "paypal", "apple_pay", "gift_card")
PAYMENT_WEIGHTS = (0.68, 0.22, 0.08, 0.02)
CLICK_SOURCES = ("search", "home", "category", "recommendation", "email")
#: Price multipliers (of the list price) visited by the scheduled price tests.
PRICE_GRID = (0.8, 0.9, 1.0, 1.1, 1.2)
BAD_KINDS = ("invalid_json", "non_utf8", "missing_field", "negative_price")

#: The search generator's spawn key (its own stream, whatever other subsystems spawn).
SEARCH_SPAWN_KEY = 0x5EA2C4
DAY_MS = 86_400_000
#: Learner kinds whose drifts the simulator schedules by name (``DriftPoint.learners``).
BUILTIN_KINDS = frozenset({"recommendation", "pricing", "risk", "demand", "ranking"})
NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True, kw_only=True)
class DemandSim:
    """The demand and inventory a planner recognises (``SimConfig.demand``; off by default).

    Sessions follow a daily and weekly cycle, a price well below list (a
    promotion) sells more than the elasticity alone says, every item has a
    stock that sales draw down and a periodic restock (order-up-to a level of
    ``cover_days_range`` days of its expected demand, every ``restock_every_s``),
    an item out of stock sells nothing (its demand is lost: censored), and at
    ``shift_at`` the demand of some categories shifts by ``shift_factor``.
    Drawn from a generator of its own, so the other streams' draws do not move.
    """

    #: Session rate x (1 + a cos(2 pi (hour - peak_hour) / 24)).
    daily_amplitude: float = 0.6
    peak_hour: float = 20.0
    #: Saturday and Sunday sessions x (1 + weekend_uplift).
    weekend_uplift: float = 0.3
    #: Conversion x this while an item's price is at most ``promo_below`` x its list price.
    promo_uplift: float = 1.5
    promo_below: float = 0.9
    restock_every_s: float = 4 * 86_400.0
    cover_days_range: tuple[float, float] = (1.5, 6.0)
    shift_at: float = 0.5
    shift_share: float = 0.5
    shift_factor: float = 1.8


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """What to simulate. Two configs that compare equal give identical streams."""

    seed: int = 0
    #: Stop after exactly this many events (when ``duration_s`` is None).
    events: int | None = 100_000
    #: Or stop at this much event time after ``start_ts``.
    duration_s: float | None = None
    #: Event time of the first event (epoch ms; default 2023-11-14T22:13:20Z).
    start_ts: int = 1_700_000_000_000
    n_users: int = 5_000
    n_items: int = 1_000
    n_categories: int = 12
    #: Zipf exponent of item popularity.
    zipf_s: float = 1.1
    #: Dirichlet concentration of user tastes: small = users like few categories.
    taste_alpha: float = 0.3
    #: Share of clicks drawn from global popularity instead of the user's tastes.
    explore: float = 0.15
    #: Session arrival rate (event time); each session has ~4 clicks.
    sessions_per_s: float = 0.5
    mean_clicks: float = 4.0
    #: Base purchase probability of a click at list price (before taste and price effects).
    base_conversion: float = 0.03
    #: Elasticities per category are drawn uniformly from this range (all < -1).
    elasticity_range: tuple[float, float] = (-3.5, -2.0)
    #: Cost as a share of the list price, drawn per item.
    cost_ratio_range: tuple[float, float] = (0.5, 0.7)
    #: Every this many seconds a new cohort of items is put on a grid price.
    price_test_every_s: float = 7200.0
    price_test_share: float = 0.10
    #: Share of items whose price makes a random move in each window.
    random_move_share: float = 0.01
    fraud_rate: float = 0.01
    #: Share of frauds whose label ever arrives.
    fraud_label_rate: float = 0.85
    #: Median label delay (event time, lognormal).
    label_delay_median_s: float = 1800.0
    #: Share of legitimate orders that also get a (late) ``is_fraud: false`` label.
    legit_label_rate: float = 0.0
    #: Deliberately invalid records mixed in (invalid JSON, non-UTF-8, missing field, negative price).
    bad_records: int = 0
    drifts: bool = True
    #: Where the drifts happen, as a share of the stream (events, or duration).
    taste_shift_at: float = 0.4
    elasticity_change_at: float = 0.6
    fraud_pattern_at: float = 0.75
    #: Share of users whose tastes shift, and the elasticity factor of the affected categories.
    taste_shift_share: float = 0.5
    elasticity_factor: float = 1.6
    #: Generation block (event time); drifts and price tests take effect at block starts.
    #: None: about 1 % of the stream (within 10-600 s), so drift points land where asked.
    window_s: float | None = None
    #: Sessions end after this long (event time) at the latest.
    max_session_s: float = 1200.0
    #: Demand seasonality, promotions, stock-outs and restocks (None: off, the streams as before).
    demand: DemandSim | None = None
    # -- search and ads requests (stream ``searches``), from their own generator; off by default,
    # so the four other streams are the same bytes with or without these fields.
    #: Search or ads requests per session (Poisson mean); 0: none.
    searches_per_session: float = 0.0
    #: Share of the requests that are ads requests.
    ads_share: float = 0.3
    #: Candidates of a search request, and of an ads request; ad slots shown.
    search_candidates: int = 50
    ad_candidates: int = 20
    ad_slots: int = 3
    #: Noise (standard deviation, in logits) of the engine's ranking score.
    engine_noise: float = 1.0
    #: Examination of position k (0-based): ``(1 + k) ** -position_bias``.
    position_bias: float = 1.0
    #: Share of the clicks on a request's candidates that carry its ``request_id`` and ``position``.
    click_attribution: float = 0.8

    def __post_init__(self) -> None:
        if (self.events is None) == (self.duration_s is None):
            raise ValueError("give exactly one of `events` and `duration_s`")
        if self.events is not None and self.events < 1:
            raise ValueError("`events` must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("`duration_s` must be > 0")
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError("`window_s` must be > 0")
        if self.n_users < 1 or self.n_items < 2 or not 2 <= self.n_categories <= self.n_items:
            raise ValueError("need n_users >= 1 and 2 <= n_categories <= n_items")
        if not 0 <= self.fraud_rate < 0.5:
            raise ValueError("`fraud_rate` must be in [0, 0.5)")
        if self.elasticity_range[1] >= -1:
            raise ValueError("elasticities must be < -1 (an optimal price exists only then)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["demand"] is None:
            del out["demand"]  # off: the documents stay byte-identical to those before it existed
        if not self.searches_per_session:
            # Without searches their settings change nothing: left out, so manifests and
            # truth files stay byte-identical to those written before the search stream existed.
            for name in SEARCH_SETTINGS:
                if out[name] == _SEARCH_DEFAULTS[name]:
                    del out[name]
        return out

    @property
    def block_s(self) -> float:
        """The generation block actually used (``window_s``, or derived from the stream's size).

        >>> SimConfig(events=100_000).block_s, SimConfig(events=2_000).block_s, SimConfig(window_s=60).block_s
        (454.5, 10.0, 60.0)
        """
        if self.window_s is not None:
            return float(self.window_s)
        if self.duration_s is not None:
            span = self.duration_s
        else:
            # ~1.1 events per click (purchases, prices, labels on top).
            span = (self.events or 0) / (self.sessions_per_s * self.mean_clicks * 1.1)
        return float(min(max(round(span / 100, 1), 10.0), 600.0))


#: SimConfig fields of the search and ads simulation.
SEARCH_SETTINGS = ("searches_per_session", "ads_share", "search_candidates", "ad_candidates", "ad_slots",
                   "engine_noise", "position_bias", "click_attribution")  # fmt: skip
_SEARCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SimConfig) if f.name in SEARCH_SETTINGS}
#: Generic queries (no category in them): relevance is the user's taste and the item's quality.
GENERIC_QUERIES = ("gift ideas", "deals", "new arrivals", "best sellers")
QUERY_MODIFIERS = ("", "cheap", "best", "new", "sale", "top")
#: True attractiveness of an item for a query (see ``SearchTruth``): logit coefficients.
REL_BASE, REL_QUERY, REL_TASTE, REL_QUALITY = -2.0, 2.0, 0.6, 1.0


# --------------------------------------------------------------------------- ground truth


@dataclass
class SearchTruth:
    """The hidden parameters of search relevance: the probability that a user who
    examines an item clicks it (its attractiveness) is
    ``sigmoid(REL_BASE + REL_QUERY [item in the query's category] + REL_TASTE log(n_cat taste) + REL_QUALITY q)``
    with ``taste`` the user's true share of the item's category (clipped to [-3, 2] after the log)
    and ``q`` the item's hidden quality (standard normal)."""

    quality: np.ndarray
    position_bias: float
    ad_slots: int

    def examination(self, n: int, ads: bool = False) -> np.ndarray:
        """Probability that position k (0-based) is examined; ads beyond the slots are not shown."""
        e = (1.0 + np.arange(n)) ** -self.position_bias
        if ads:
            e[self.ad_slots :] = 0.0
        return e


@dataclass
class DriftPoint:
    """A scheduled change of the world, from event time ``ts`` (and event ``index`` of the stream)."""

    kind: str
    ts: int
    #: Index (0-based) of the first emitted event at or after ``ts``; None if the stream ended first.
    index: int | None
    #: The input streams whose distribution changes.
    streams: list[str]
    description: str
    details: dict[str, Any] = field(default_factory=dict)
    #: The learner kinds this drift is meant to challenge (recommendation, pricing, risk).
    learners: list[str] = field(default_factory=list)


@dataclass
class DetectionScore:
    """How one detector did against the scheduled drifts."""

    #: Per relevant drift: ``{"kind", "ts", "delay_ms", "delay_events"}`` (delays None when missed).
    drifts: list[dict[str, Any]]
    #: Detections that follow no relevant drift within the tolerance.
    false_alarms: int
    detections: int


class GroundTruth:
    """The hidden parameters of a simulation, and scorers against them.

    Saved as JSON next to the recording (``truth.json``), loadable with
    :meth:`load`. The static world is known at construction; drift points,
    fraud truth and counts fill in while the simulation runs.
    """

    def __init__(self, config: SimConfig, world: dict[str, Any]) -> None:
        self.config = config
        self.categories: list[str] = world["categories"]
        self.item_ids: list[str] = world["item_ids"]
        self.item_category: np.ndarray = world["item_category"]
        self.list_price: np.ndarray = world["list_price"]
        self.cost: np.ndarray = world["cost"]
        self.popularity: np.ndarray = world["popularity"]
        self.user_ids: list[str] = world["user_ids"]
        self.user_country: list[str] = world["user_country"]
        self.tastes: np.ndarray = world["tastes"]
        self.category_weights: np.ndarray = world["category_weights"]
        self.elasticity: np.ndarray = world["elasticity"]
        self.drifts: list[DriftPoint] = []
        #: order_id -> {"ts", "pattern", "label_ts", "labeled"} for every fraudulent order.
        self.frauds: dict[str, dict[str, Any]] = {}
        self.orders = 0
        self.counts: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self.events = 0
        self.start_ts = config.start_ts
        self.end_ts = config.start_ts
        #: ``{"index", "stream", "kind"}`` of every deliberately invalid record.
        self.bad_records: list[dict[str, Any]] = []
        #: Search relevance (None when the simulation has no search stream).
        self.search: SearchTruth | None = None
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        self._user_index = {user: i for i, user in enumerate(self.user_ids)}
        self._cat_index = {c: i for i, c in enumerate(self.categories)}
        #: With ``SimConfig.demand``: ``{"stockouts": [{"item_id", "start", "end"}], "restocks",
        #: "lost_units", "sold_units"}`` (``end`` None while still out at the end).
        self.demand: dict[str, Any] | None = None

    # -- the world at a point in event time --------------------------------------

    def _drift(self, kind: str, ts: int) -> DriftPoint | None:
        for d in self.drifts:
            if d.kind == kind and ts >= d.ts:
                return d
        return None

    def taste(self, user_id: str, ts: int) -> np.ndarray | None:
        """The user's true category distribution at ``ts`` (None for accounts made by fraudsters)."""
        u = self._user_index.get(user_id)
        if u is None:
            return None
        taste = self.tastes[u]
        shift = self._drift("taste_shift", ts)
        if shift is not None and u in shift.details["_users"]:
            taste = taste[shift.details["_perm"]]
        return taste

    def top_categories(self, user_id: str, ts: int, k: int = 2) -> list[str]:
        """The ``k`` categories the user likes most at ``ts``."""
        taste = self.taste(user_id, ts)
        if taste is None:
            return []
        return [self.categories[int(c)] for c in np.argsort(-taste, kind="stable")[:k]]

    def category_of(self, item_id: str) -> str | None:
        i = self._item_index.get(item_id)
        return None if i is None else self.categories[int(self.item_category[i])]

    def taste_hit_rate(self, user_id: str, item_ids: Sequence[str], ts: int, top: int = 2) -> float | None:
        """Share of ``item_ids`` in the user's ``top`` true categories at ``ts``
        (None when the user or the list is unknown or empty)."""
        tops = set(self.top_categories(user_id, ts, top))
        if not tops or not item_ids:
            return None
        return sum(self.category_of(i) in tops for i in item_ids) / len(item_ids)

    def elasticity_at(self, category: str, ts: int) -> float:
        c = self._cat_index[category]
        change = self._drift("elasticity_change", ts)
        if change is not None:
            return float(change.details["_elasticity"][c])
        return float(self.elasticity[c])

    def optimal_price(self, item_id: str, ts: int) -> float:
        """The profit-maximising price of the item at ``ts``: for constant
        elasticity ``e`` the Lerner rule ``cost * e / (1 + e)``, kept within
        [0.5, 2] x list price (the conversion cap is ignored)."""
        i = self._item_index[item_id]
        e = self.elasticity_at(self.categories[int(self.item_category[i])], ts)
        price = float(self.cost[i]) * e / (1 + e)
        return min(max(price, 0.5 * float(self.list_price[i])), 2.0 * float(self.list_price[i]))

    def expected_profit(self, item_id: str, price: float, ts: int) -> float:
        """Expected profit per view of the item at ``price`` (up to a per-item constant)."""
        i = self._item_index[item_id]
        e = self.elasticity_at(self.categories[int(self.item_category[i])], ts)
        return (price - float(self.cost[i])) * (price / float(self.list_price[i])) ** e

    def pricing_regret(self, item_id: str, price: float, ts: int) -> float:
        """Relative profit lost by charging ``price`` instead of the optimal price (0 = optimal)."""
        best = self.expected_profit(item_id, self.optimal_price(item_id, ts), ts)
        return (best - self.expected_profit(item_id, price, ts)) / best if best > 0 else 0.0

    def query_category(self, query: str | None) -> str | None:
        """The category a simulated query is about (its first category term), if any."""
        if not query:
            return None
        for term in query.split():
            if term in self._cat_index:
                return term
        return None

    def relevance(self, user_id: str, query: str | None, item_ids: Sequence[str], ts: int) -> np.ndarray:
        """True attractiveness (click probability when examined) of each item for the
        user and query at ``ts``; unknown items get the base rate."""
        search = self.search
        if search is None:
            raise ValueError("this simulation has no search stream")
        idx = np.fromiter((self._item_index.get(i, -1) for i in item_ids), np.intp, len(item_ids))
        known = idx >= 0
        ix = np.where(known, idx, 0)
        cats = self.item_category[ix]
        z = np.full(len(ix), REL_BASE)
        q = self.query_category(query)
        if q is not None:
            z += REL_QUERY * (cats == self._cat_index[q])
        taste = self.taste(user_id, ts)
        if taste is not None:
            z += REL_TASTE * np.clip(np.log(len(self.categories) * np.maximum(taste[cats], 1e-9)), -3.0, 2.0)
        z += REL_QUALITY * search.quality[ix]
        return np.where(known, 1.0 / (1.0 + np.exp(-z)), 1.0 / (1.0 + math.exp(-REL_BASE)))

    def ranking_ndcg(self, user_id: str, query: str | None, ordered: Sequence[str], ts: int, k: int = 10) -> float:
        """NDCG@k of ``ordered`` item ids, the gains their true attractiveness for the user and query."""
        rel = self.relevance(user_id, query, ordered, ts)
        discount = 1.0 / np.log2(np.arange(len(rel)) + 2.0)
        dcg = float((rel[:k] * discount[:k]).sum())
        ideal = float((np.sort(rel)[::-1][:k] * discount[:k]).sum())
        return dcg / ideal if ideal > 0 else 0.0

    def ads_value(
        self, user_id: str, query: str | None, ordered: Sequence[str], bids: Sequence[float], ts: int
    ) -> float:
        """Expected revenue of the ads ``ordered`` (their ``bids``) in the slots: examination x attractiveness x bid."""
        search = self.search
        if search is None:
            raise ValueError("this simulation has no search stream")
        rel = self.relevance(user_id, query, ordered, ts)
        exam = search.examination(len(rel), ads=True)
        return float((exam * rel * np.asarray(bids, dtype=float)).sum())

    def is_fraud(self, order_id: str) -> bool:
        return order_id in self.frauds

    def fraud_auc(self, scores: dict[str, float]) -> float | None:
        """ROC AUC of fraud ``scores`` by order id against the true fraud flags
        (None unless both classes are present).

        >>> t = GroundTruth.__new__(GroundTruth); t.frauds = {"o2": {}}
        >>> t.fraud_auc({"o1": 0.1, "o2": 0.9, "o3": 0.2})
        1.0
        """
        if not scores:
            return None
        y = np.fromiter((o in self.frauds for o in scores), dtype=bool, count=len(scores))
        s = np.fromiter(scores.values(), dtype=float, count=len(scores))
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            return None
        # Mann-Whitney U with average ranks for ties.
        order = np.argsort(s, kind="stable")
        ranks = np.empty(len(s))
        sorted_s = s[order]
        _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
        avg = first + (counts - 1) / 2.0 + 1
        ranks[order] = np.repeat(avg, counts)
        return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

    def drift_points(self, streams: Sequence[str] | None = None, learner: str | None = None) -> list[DriftPoint]:
        """Drifts meant for the learner kind ``learner`` if it is a built-in kind (``recommendation``,
        ``pricing``, ``risk``, ``demand``, ``ranking``: none when no drift is meant for it, e.g. the
        demand world is off), else drifts that change any of ``streams`` (a config-defined learner
        reading them), else all."""
        if learner is not None and (learner in BUILTIN_KINDS or any(learner in d.learners for d in self.drifts)):
            return [d for d in self.drifts if learner in d.learners]
        if streams is None:
            return list(self.drifts)
        wanted = set(streams)
        return [d for d in self.drifts if wanted & set(d.streams)]

    def score_detections(
        self,
        detections: Sequence[tuple[int, int | None]],
        streams: Sequence[str] | None = None,
        tolerance_ms: int | None = None,
        learner: str | None = None,
    ) -> DetectionScore:
        """Score a detector's ``(ts, event_index)`` detections against the
        relevant drifts (``drift_points(streams, learner)``): the first
        detection within ``tolerance_ms`` after a drift (and before the next
        relevant one) gives its delay; every other detection is a false alarm.
        The tolerance defaults to a fifth of the stream."""
        drifts = sorted(self.drift_points(streams, learner), key=lambda d: d.ts)
        if tolerance_ms is None:
            tolerance_ms = max((self.end_ts - self.start_ts) // 5, 1)
        used: set[int] = set()
        scored = []
        for n, d in enumerate(drifts):
            end = min(d.ts + tolerance_ms, drifts[n + 1].ts if n + 1 < len(drifts) else NEVER)
            hit = next((k for k, (ts, _) in enumerate(detections) if d.ts <= ts < end and k not in used), None)
            row: dict[str, Any] = {"kind": d.kind, "ts": d.ts, "delay_ms": None, "delay_events": None}
            if hit is not None:
                used.add(hit)
                ts, index = detections[hit]
                row["delay_ms"] = ts - d.ts
                if index is not None and d.index is not None:
                    row["delay_events"] = index - d.index
            scored.append(row)
        return DetectionScore(drifts=scored, false_alarms=len(detections) - len(used), detections=len(detections))

    def score_stockout_warnings(self, warnings: Sequence[tuple[str, int]], lead_ms: int) -> dict[str, Any] | None:
        """Score stock-out warnings ``(item_id, ts)`` against the simulated stock-outs
        (None without ``SimConfig.demand``). Per item, a stock cycle runs from one
        restock to the next; a stock-out is **warned** if a warning came in its
        cycle at least ``lead_ms`` before it ran out (``lead_ms_median``: from the
        cycle's first warning); a cycle with warnings (made while in stock) is a
        **true** warning if it ran out, a false one if it was restocked first.
        Cycles whose first warning came less than ``lead_ms`` before the end of
        the stream are left out (their outcome is unknown).

        >>> t = GroundTruth.__new__(GroundTruth); t.start_ts, t.end_ts = 0, 100
        >>> t.demand = {"stockouts": [{"item_id": "a", "start": 50, "end": 60}],
        ...             "restocks": [{"item_id": "a", "ts": 60}, {"item_id": "b", "ts": 40}]}
        >>> s = t.score_stockout_warnings([("a", 30), ("a", 45), ("b", 20), ("b", 95)], lead_ms=10)
        >>> s["recall"], s["precision"], s["lead_ms_median"]
        (1.0, 0.5, 20.0)
        """
        if self.demand is None:
            return None
        restocks: dict[str, list[int]] = {}
        for r in self.demand["restocks"]:
            restocks.setdefault(r["item_id"], []).append(r["ts"])
        outs: dict[str, list[int]] = {}
        for o in self.demand["stockouts"]:
            outs.setdefault(o["item_id"], []).append(o["start"])
        warned_at: dict[str, list[int]] = {}
        for item, ts in warnings:
            warned_at.setdefault(item, []).append(ts)
        n_outs = warned = true = false = 0
        leads: list[int] = []
        for item in set(outs) | set(warned_at):
            bounds = [self.start_ts, *sorted(restocks.get(item, [])), NEVER]
            starts = sorted(outs.get(item, []))
            ws = sorted(warned_at.get(item, []))
            for c0, c1 in itertools.pairwise(bounds):
                out = next((s for s in starts if c0 <= s < c1), None)
                cut = out if out is not None else c1
                mine = [w for w in ws if c0 <= w < cut]
                if out is not None:
                    n_outs += 1
                    if mine and mine[0] <= out - lead_ms:
                        warned += 1
                    if mine:
                        leads.append(out - mine[0])
                if mine and (out is not None or mine[0] <= self.end_ts - lead_ms):
                    if out is not None:
                        true += 1
                    else:
                        false += 1
        return {
            "stockouts": n_outs,
            "warned_ahead": warned,
            "recall": warned / n_outs if n_outs else None,
            "warned_cycles": true + false,
            "precision": true / (true + false) if true + false else None,
            "lead_ms_median": float(np.median(leads)) if leads else None,
            "lead_ms": lead_ms,
        }

    # -- persistence -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see docs/replay-and-simulate.md, "Ground truth")."""
        cats = self.categories
        return {
            "format": "stream-simulation-truth",
            "version": 1,
            "config": self.config.to_dict(),
            "start_ts": self.start_ts,
            "end_ts": self.end_ts,
            "events": self.events,
            "counts": self.counts,
            "categories": cats,
            "category_weights": self.category_weights.tolist(),
            "elasticity": {c: float(e) for c, e in zip(cats, self.elasticity, strict=True)},
            "items": {
                "item_id": self.item_ids,
                "category": [cats[int(c)] for c in self.item_category],
                "list_price": _round(self.list_price, 2),
                "cost": _round(self.cost, 2),
                "popularity": self.popularity.tolist(),
                "optimal_price": [round(self.optimal_price(i, self.start_ts), 4) for i in self.item_ids],
            },
            "users": {
                "user_id": self.user_ids,
                "country": self.user_country,
                "tastes": [_round(row, 5) for row in self.tastes],
            },
            "drifts": [
                {
                    "kind": d.kind,
                    "ts": d.ts,
                    "index": d.index,
                    "streams": d.streams,
                    "description": d.description,
                    "learners": d.learners,
                    "details": {k: v for k, v in d.details.items() if not k.startswith("_")},
                }
                for d in self.drifts
            ],
            "fraud": {"orders": self.orders, "frauds": self.frauds},
            "bad_records": self.bad_records,
            **({"demand": self.demand} if self.demand is not None else {}),
        } | self._search_dict()

    def _search_dict(self) -> dict[str, Any]:
        if self.search is None:
            return {}
        s = self.search
        return {"search": {"quality": _round(s.quality, 5), "position_bias": s.position_bias, "ad_slots": s.ad_slots}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        """Read a ``truth.json`` written by :meth:`save`."""
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "stream-simulation-truth":
            raise ValueError(f"{path}: not a simulation ground-truth file")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()}
        if isinstance(fields.get("demand"), dict):
            demand = {k: tuple(v) if isinstance(v, list) else v for k, v in fields["demand"].items()}
            fields["demand"] = DemandSim(**demand)  # type: ignore[arg-type]
        config = SimConfig(**fields)
        cats = doc["categories"]
        cat_index = {c: i for i, c in enumerate(cats)}
        items = doc["items"]
        world = {
            "categories": cats,
            "item_ids": items["item_id"],
            "item_category": np.array([cat_index[c] for c in items["category"]]),
            "list_price": np.array(items["list_price"], dtype=float),
            "cost": np.array(items["cost"], dtype=float),
            "popularity": np.array(items["popularity"], dtype=float),
            "user_ids": doc["users"]["user_id"],
            "user_country": doc["users"]["country"],
            "tastes": np.array(doc["users"]["tastes"], dtype=float),
            "category_weights": np.array(doc["category_weights"], dtype=float),
            "elasticity": np.array([doc["elasticity"][c] for c in cats], dtype=float),
        }
        truth = cls(config, world)
        truth.start_ts, truth.end_ts, truth.events = doc["start_ts"], doc["end_ts"], doc["events"]
        truth.counts = doc["counts"]
        truth.orders = doc["fraud"]["orders"]
        truth.frauds = doc["fraud"]["frauds"]
        truth.bad_records = doc["bad_records"]
        if "demand" in doc:
            truth.demand = doc["demand"]
        if "search" in doc:
            sd = doc["search"]
            truth.search = SearchTruth(np.array(sd["quality"], dtype=float), sd["position_bias"], sd["ad_slots"])
        for d in doc["drifts"]:
            point = DriftPoint(
                d["kind"], d["ts"], d["index"], d["streams"], d["description"], d["details"], d.get("learners", [])
            )
            _attach_private(point, truth)
            truth.drifts.append(point)
        return truth


def _round(values: np.ndarray, digits: int) -> list[float]:
    return [round(float(v), digits) for v in values]


def _attach_private(point: DriftPoint, truth: GroundTruth) -> None:
    """Rebuild the array forms of a drift's details that the scorers use."""
    cat_index = {c: i for i, c in enumerate(truth.categories)}
    if point.kind == "taste_shift":
        point.details["_perm"] = np.array([cat_index[c] for c in point.details["new_taste_from"]])
        point.details["_users"] = {truth._user_index[u] for u in point.details["users"]}
    elif point.kind == "elasticity_change":
        point.details["_elasticity"] = np.array([point.details["elasticity"][c] for c in truth.categories])


# --------------------------------------------------------------------------- the world


class World:
    """What the shop is made of, drawn from ``config``'s seed: the catalog, the
    users and their tastes (``tastes`` and ``elasticity`` change when drifts apply).
    ``truth`` starts as the world's hidden parameters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        c = config
        # Independent generators per subsystem: the world stays the same when,
        # say, only the fraud settings change.
        seeds = np.random.SeedSequence(c.seed).spawn(6)
        self._rng_world, self._rng_sessions, self._rng_prices, self._rng_fraud, self._rng_bad, self._rng_labels = (
            np.random.default_rng(s) for s in seeds
        )
        # The demand world's own generator (the seventh child: the six above are unchanged).
        self._rng_demand = np.random.default_rng(np.random.SeedSequence(c.seed).spawn(7)[6])
        self._build_world()
        self._build_search()

    def _build_search(self) -> None:
        """The search world, from its own generator (spawn key "search"): drawn only when
        searches are simulated, so nothing else changes."""
        c = self.config
        self._rng_search = np.random.default_rng(np.random.SeedSequence(c.seed, spawn_key=(SEARCH_SPAWN_KEY,)))
        if not c.searches_per_session:
            return
        quality = self._rng_search.normal(0.0, 1.0, c.n_items)
        self.truth.search = SearchTruth(quality, c.position_bias, c.ad_slots)
        self.truth.counts["searches"] = 0

    # -- the world ---------------------------------------------------------------

    def _build_world(self) -> None:
        c, rng = self.config, self._rng_world
        n_cat, n_items, n_users = c.n_categories, c.n_items, c.n_users
        cats = list(CATEGORY_NAMES[:n_cat]) if n_cat <= len(CATEGORY_NAMES) else [f"cat{k:03d}" for k in range(n_cat)]
        # Categories differ in size; every category has at least one item.
        share = 1.0 / np.arange(1, n_cat + 1) ** 0.6
        item_cat = np.concatenate([np.arange(n_cat), rng.choice(n_cat, n_items - n_cat, p=share / share.sum())])
        rng.shuffle(item_cat)
        rank = rng.permutation(n_items) + 1
        popularity = 1.0 / rank**c.zipf_s
        popularity /= popularity.sum()
        cat_base = np.exp(rng.normal(math.log(30.0), 0.8, n_cat))
        list_price = np.maximum(np.round(cat_base[item_cat] * np.exp(rng.normal(0.0, 0.5, n_items))) - 0.01, 1.99)
        cost = np.round(list_price * rng.uniform(*c.cost_ratio_range, n_items), 2)
        self.competitor_factor = rng.uniform(0.9, 1.1, n_items)
        elasticity = rng.uniform(*c.elasticity_range, n_cat)

        tastes = rng.dirichlet(np.full(n_cat, c.taste_alpha), n_users)
        tastes = np.maximum(tastes, 1e-9)
        tastes /= tastes.sum(axis=1, keepdims=True)
        activity = np.exp(rng.normal(0.0, 1.0, n_users))
        countries = rng.choice(len(COUNTRIES), n_users, p=normalized(COUNTRY_WEIGHTS))
        # Account age at the start: most accounts are old, a few are days old.
        self.user_created = c.start_ts - (rng.exponential(500.0, n_users) * DAY_MS).astype(np.int64) - DAY_MS
        self.user_devices = rng.integers(1, 3, n_users)
        self.user_payment = rng.choice(len(PAYMENT_METHODS), n_users, p=normalized(PAYMENT_WEIGHTS))

        self.item_cat = item_cat
        self.list_price = list_price
        self.cost = cost
        self.popularity = popularity
        self.tastes = tastes
        self.elasticity = elasticity.copy()
        self.user_country = countries
        self.activity_cdf = np.cumsum(activity / activity.sum())
        self.category_weights = np.bincount(item_cat, weights=popularity, minlength=n_cat)
        self.item_ids = [f"i{k}" for k in range(n_items)]
        self.user_ids = [f"u{k}" for k in range(n_users)]
        self.cat_names = cats
        self.item_id_b = [s.encode() for s in self.item_ids]
        self.user_id_b = [s.encode() for s in self.user_ids]
        # Python lists for the per-event loops (numpy scalar indexing is slow there).
        self.cost_l = cost.tolist()
        self.item_cat_l = item_cat.tolist()
        # Items of each category and the CDF of their popularity within it.
        self.cat_items = [np.flatnonzero(item_cat == k) for k in range(n_cat)]
        self.cat_item_cdf = [np.cumsum(popularity[ix]) / popularity[ix].sum() for ix in self.cat_items]
        self.taste_cdf = np.cumsum(tastes, axis=1)
        self.taste_cdf[:, -1] = 1.0
        self.global_cat_cdf = np.cumsum(self.category_weights / self.category_weights.sum())
        self.global_cat_cdf[-1] = 1.0
        # Expensive items (top 20 % by price) are what card fraudsters buy.
        self.expensive_items = np.flatnonzero(list_price >= np.quantile(list_price, 0.8))

        self.truth = GroundTruth(
            self.config,
            {
                "categories": cats,
                "item_ids": self.item_ids,
                "item_category": item_cat,
                "list_price": list_price,
                "cost": cost,
                "popularity": popularity,
                "user_ids": self.user_ids,
                "user_country": [COUNTRIES[k] for k in countries],
                "tastes": tastes.copy(),
                "category_weights": self.category_weights,
                "elasticity": elasticity.copy(),
            },
        )


def normalized(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()
