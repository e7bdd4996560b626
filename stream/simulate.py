"""A deterministic e-commerce event simulator with known ground truth.

It writes the four input streams in the event contracts of ``stream.events``
(clicks, purchases, prices, fraud labels), in event-time order, from a world
whose hidden parameters are known, so learners and drift detectors can be
scored against the truth rather than against noisy labels:

* a catalog of items in categories, with Zipf popularity, list prices and costs;
* users with latent category tastes (Dirichlet), countries, devices, accounts;
* sessions of clicks that sometimes convert into purchases, with a constant
  price elasticity per category (``P(buy) ~ (price / list_price) ** elasticity``);
* prices that change over time: scheduled tests across a price grid and
  random moves, each emitted as a ``Price`` event;
* fraud (about 1 % of orders) with recognisable patterns (young account, new
  device, shipping abroad, bursts, high amounts), whose labels arrive late in
  event time, and only for most frauds (chargebacks);
* scheduled drifts at known points: a taste shift between categories, a change
  of price elasticity, a new fraud pattern.

Everything is drawn from seeded numpy generators in vectorised blocks of
``SimConfig.block_s`` seconds of event time, so the same ``SimConfig`` gives the same
bytes on every machine and generation runs well over 50k events/s.

>>> sim = Simulation(SimConfig(seed=1, events=2000, n_users=200, n_items=100))
>>> events = list(sim)
>>> len(events), events[0][0]
(2000, 'prices')
>>> stream, key, value, ts = events[500]
>>> all(a[3] <= b[3] for a, b in zip(events, events[1:]))  # event-time order
True
>>> [d.kind for d in sim.truth.drifts]
['taste_shift', 'elasticity_change', 'fraud_pattern']
>>> list(simulate(SimConfig(seed=1, events=2000, n_users=200, n_items=100))) == events
True
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from stream.events import Click, FraudLabel, Price, Purchase

__all__ = [
    "STREAMS",
    "DetectionScore",
    "DriftPoint",
    "GroundTruth",
    "SimConfig",
    "SimEvent",
    "Simulation",
    "produce_to_kafka",
    "simulate",
    "write_recording",
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

_DAY_MS = 86_400_000
_NEVER = np.iinfo(np.int64).max


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
        return dataclasses.asdict(self)

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


# --------------------------------------------------------------------------- ground truth


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
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        self._user_index = {user: i for i, user in enumerate(self.user_ids)}
        self._cat_index = {c: i for i, c in enumerate(self.categories)}

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
        """Drifts meant for the learner kind ``learner`` (``recommendation``,
        ``pricing``, ``risk``) if given and known, else drifts that change any
        of ``streams``, else all."""
        if learner is not None and any(learner in d.learners for d in self.drifts):
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
            end = min(d.ts + tolerance_ms, drifts[n + 1].ts if n + 1 < len(drifts) else _NEVER)
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
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        """Read a ``truth.json`` written by :meth:`save`."""
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "stream-simulation-truth":
            raise ValueError(f"{path}: not a simulation ground-truth file")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()}
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


# --------------------------------------------------------------------------- the simulation


class Simulation:
    """One run of the simulator: iterate it once for the events; ``truth``
    is complete when the iteration ends.

    Iterating yields ``(stream, key, value, ts)`` tuples (``SimEvent``) in
    event-time order (ties in generation order). ``headers(index)`` gives the
    headers a writer should attach to the event at that index (only the
    deliberately invalid records carry one, naming the corruption).
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        c = config
        # Independent generators per subsystem: the world stays the same when,
        # say, only the fraud settings change.
        seeds = np.random.SeedSequence(c.seed).spawn(6)
        self._rng_world, self._rng_sessions, self._rng_prices, self._rng_fraud, self._rng_bad, self._rng_labels = (
            np.random.default_rng(s) for s in seeds
        )
        self._build_world()
        self._bad_headers: dict[int, list[tuple[str, bytes | None]]] = {}
        #: Generation sequence number of each fraudulent purchase -> its order id.
        self._fraud_seq: dict[int, str] = {}
        self._consumed = False

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
        countries = rng.choice(len(COUNTRIES), n_users, p=_norm(COUNTRY_WEIGHTS))
        # Account age at the start: most accounts are old, a few are days old.
        self.user_created = c.start_ts - (rng.exponential(500.0, n_users) * _DAY_MS).astype(np.int64) - _DAY_MS
        self.user_devices = rng.integers(1, 3, n_users)
        self.user_payment = rng.choice(len(PAYMENT_METHODS), n_users, p=_norm(PAYMENT_WEIGHTS))

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

    # -- iteration ---------------------------------------------------------------

    def __iter__(self) -> Iterator[SimEvent]:
        if self._consumed:
            raise RuntimeError("a Simulation can be iterated once; make a new one")
        self._consumed = True
        return self._run()

    def headers(self, index: int) -> list[tuple[str, bytes | None]] | None:
        """Headers for the event emitted at ``index`` (None for all but the invalid records)."""
        return self._bad_headers.get(index)

    def _run(self) -> Iterator[SimEvent]:
        c = self.config
        truth = self.truth
        # The events are built as the contract Structs themselves, so what we write always decodes.
        enc = msgspec.json.Encoder().encode
        fraud_seq = self._fraud_seq
        window_ms = int(c.block_s * 1000)
        end_ts = c.start_ts + int(c.duration_s * 1000) if c.duration_s is not None else _NEVER
        limit = c.events if c.events is not None else _NEVER

        state = _State(self)
        drift_plan = self._drift_plan()
        bad_plan = self._bad_plan()
        pending: list[tuple[int, int, str, bytes | None, bytes]] = []  # heap of future events
        emitted = 0
        pending_drifts: list[DriftPoint] = []  # applied, waiting for their first event's index

        # The initial price snapshot: every item's price, at the start.
        batch = state.snapshot(c.start_ts, enc)
        t0 = c.start_ts
        while True:
            t1 = t0 + window_ms
            # Drifts take effect at the first window start past their point.
            for kind, at in list(drift_plan):
                # Every event before t0 is out by now, so ``emitted`` is exact here.
                due = emitted >= at * limit if c.events is not None else t0 >= c.start_ts + at * (end_ts - c.start_ts)
                if due:
                    drift_plan.remove((kind, at))
                    point = self._apply_drift(kind, t0, state)
                    truth.drifts.append(point)
                    pending_drifts.append(point)
            batch += state.window(t0, t1, enc)
            state.advance()
            batch.sort(key=_by_ts_seq)
            # Everything before t1 is final: later windows only add events at or after t1.
            for ev in heapq.merge(_drain(pending, t1), batch, key=_by_ts_seq) if pending else batch:
                ts = ev[0]
                if ts >= t1:
                    heapq.heappush(pending, ev)
                    continue
                if ts >= end_ts or emitted >= limit:
                    return self._finish(emitted)
                while bad_plan and (bad_plan[-1][0] <= emitted if c.events is not None else bad_plan[-1][0] <= ts):
                    _, kind = bad_plan.pop()
                    stream, key, value = self._bad_record(kind, ts)
                    truth.bad_records.append({"index": emitted, "stream": stream, "kind": kind})
                    self._bad_headers[emitted] = [("stream.sim.corrupt", kind.encode())]
                    truth.counts[stream] += 1
                    truth.end_ts = ts
                    emitted += 1
                    yield stream, key, value, ts
                    if emitted >= limit:
                        return self._finish(emitted)
                if pending_drifts:
                    for point in pending_drifts:
                        if ts >= point.ts:
                            point.index = emitted
                    pending_drifts = [p for p in pending_drifts if p.index is None]
                stream = ev[2]
                truth.counts[stream] += 1
                if stream == "fraud_labels":
                    record = truth.frauds.get(ev[3].decode())  # type: ignore[union-attr]
                    if record is not None:
                        record["labeled"] = True
                elif stream == "purchases" and ev[1] in fraud_seq:
                    truth.frauds[fraud_seq.pop(ev[1])]["emitted"] = True
                truth.end_ts = ts
                emitted += 1
                yield stream, ev[3], ev[4], ts
            batch = []
            t0 = t1
            if t0 >= end_ts:
                return self._finish(emitted)

    def _finish(self, emitted: int) -> None:
        truth = self.truth
        truth.events = emitted
        truth.orders = self._orders_emitted
        # Frauds generated but cut off by the end of the stream were never seen.
        truth.frauds = {o: f for o, f in truth.frauds.items() if f.pop("emitted", False)}
        if self.config.duration_s is not None:
            self.truth.end_ts = self.config.start_ts + int(self.config.duration_s * 1000)

    @property
    def _orders_emitted(self) -> int:
        return self.truth.counts["purchases"] - sum(1 for b in self.truth.bad_records if b["stream"] == "purchases")

    # -- drifts ------------------------------------------------------------------

    def _drift_plan(self) -> list[tuple[str, float]]:
        c = self.config
        if not c.drifts:
            return []
        return [
            ("taste_shift", c.taste_shift_at),
            ("elasticity_change", c.elasticity_change_at),
            ("fraud_pattern", c.fraud_pattern_at),
        ]

    def _apply_drift(self, kind: str, ts: int, state: _State) -> DriftPoint:
        c, rng, cats = self.config, self._rng_world, self.cat_names
        n_cat = len(cats)
        if kind == "taste_shift":
            # A derangement of categories: an affected user's taste for category k
            # becomes their old taste for perm[k] (e.g. garden lovers now want toys).
            perm = rng.permutation(n_cat)
            while np.any(perm == np.arange(n_cat)):
                perm = rng.permutation(n_cat)
            users = np.flatnonzero(rng.random(c.n_users) < c.taste_shift_share)
            self.tastes[users] = self.tastes[users][:, perm]
            self.taste_cdf[users] = np.cumsum(self.tastes[users], axis=1)
            self.taste_cdf[users, -1] = 1.0
            point = DriftPoint(
                kind,
                ts,
                None,
                ["clicks", "purchases"],
                f"{len(users)} users ({c.taste_shift_share:.0%}) shift their tastes between categories",
                {
                    "users": [self.user_ids[u] for u in users],
                    "new_taste_from": [cats[int(k)] for k in perm],
                    "_perm": perm,
                    "_users": {int(u) for u in users},
                },
                ["recommendation"],
            )
            return point
        if kind == "elasticity_change":
            affected = np.sort(rng.choice(n_cat, max(1, n_cat // 2), replace=False))
            self.elasticity[affected] *= c.elasticity_factor
            return DriftPoint(
                kind,
                ts,
                None,
                ["clicks", "purchases"],
                f"price elasticity x{c.elasticity_factor} in {len(affected)} categories (optimal prices drop)",
                {
                    "categories": [cats[int(k)] for k in affected],
                    "elasticity": {cats[k]: float(self.elasticity[k]) for k in range(n_cat)},
                    "_elasticity": self.elasticity.copy(),
                },
                ["pricing"],
            )
        if kind == "fraud_pattern":
            state.fraud_pattern_b = True
            return DriftPoint(
                kind,
                ts,
                None,
                ["purchases", "fraud_labels"],
                "new fraud pattern: account takeover with gift cards, bulk quantities, domestic shipping",
                {"pattern": "B", "share_of_frauds": 0.7, "category": cats[state.fraud_b_category]},
                ["risk"],
            )
        raise ValueError(kind)

    # -- invalid records ---------------------------------------------------------

    def _bad_plan(self) -> list[tuple[int, str]]:
        """``(position, kind)`` popped from the end, soonest last: positions are
        event indexes (``events`` mode) or event times (``duration`` mode)."""
        c, rng = self.config, self._rng_bad
        k = c.bad_records
        if k <= 0:
            return []
        if c.events is not None:
            lo, hi = int(c.events * 0.05), max(int(c.events * 0.95), int(c.events * 0.05) + k)
            positions = np.sort(rng.choice(np.arange(lo, hi), min(k, hi - lo), replace=False))
        else:
            span = int(c.duration_s * 1000)  # type: ignore[operator]
            positions = np.sort(c.start_ts + rng.integers(span // 20, span * 19 // 20, k))
        plan = [(int(p), BAD_KINDS[n % len(BAD_KINDS)]) for n, p in enumerate(positions)]
        return plan[::-1]

    def _bad_record(self, kind: str, ts: int) -> tuple[str, bytes, bytes]:
        n = len(self.truth.bad_records)
        user = self.user_ids[int(self._rng_bad.integers(self.config.n_users))]
        item = self.item_ids[int(self._rng_bad.integers(self.config.n_items))]
        if kind == "invalid_json":
            value = f'{{"event_id": "bad-{n}", "ts": {ts}, "user_id": "{user}", "item_id": "{item}"'.encode()
            return "clicks", user.encode(), value
        if kind == "non_utf8":
            value = (
                f'{{"event_id": "bad-{n}", "ts": {ts}, "user_id": "{user}", "item_id": "'.encode()
                + b"caf\xe9 \xff\xfe"
                + b'"}'
            )
            return "clicks", user.encode(), value
        if kind == "missing_field":
            value = (
                f'{{"event_id": "bad-{n}", "ts": {ts}, "order_id": "bad-o{n}", "user_id": "{user}", '
                f'"item_id": "{item}", "quantity": 1}}'
            ).encode()
            return "purchases", user.encode(), value
        value = f'{{"event_id": "bad-{n}", "ts": {ts}, "item_id": "{item}", "price": -4.99}}'.encode()
        return "prices", item.encode(), value


def _norm(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def _by_ts_seq(ev: tuple[int, int, str, bytes | None, bytes]) -> tuple[int, int]:
    return ev[0], ev[1]


def _drain(heap: list[Any], before: int) -> list[Any]:
    out = []
    while heap and heap[0][0] < before:
        out.append(heapq.heappop(heap))
    return out


def _sample_rows(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per-row categorical draws: ``cdf`` is (n, k) cumulative, ``u`` (n,) uniforms."""
    return np.minimum((cdf < u[:, None]).sum(axis=1), cdf.shape[1] - 1)


class _State:
    """The evolving parts of the world: prices, counters, fraud mode."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        c = sim.config
        n = c.n_items
        self.cur_price = sim.list_price.copy()
        # Price level of the random walk, and the grid multiplier of items under test.
        self.base_mult = np.ones(n)
        self.test_mult = np.full(n, np.nan)
        self.in_test = np.zeros(n, dtype=bool)
        self.next_test_ts = c.start_ts + int(c.price_test_every_s * 1000)
        # Sessions (and fraud bursts) started in a window run on into the next
        # ones, so price changes are drawn that many windows ahead:
        # ``ahead[k]`` = (change time, new price) per item of window w + k.
        self.window_ms = int(c.block_s * 1000)
        self.max_session_ms = int(c.max_session_s * 1000)
        lookahead = -(-self.max_session_ms // self.window_ms)  # ceil
        self.horizon_ms = (lookahead + 1) * self.window_ms
        self.latest_price = self.cur_price.copy()
        self.ahead: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self.ahead.append((np.full(n, _NEVER, dtype=np.int64), self.cur_price.copy()))  # the first window: none
        self._next_draw = c.start_ts + self.window_ms
        for _ in range(lookahead):
            self._draw_window()
        self.seq = 0
        self.n_click = self.n_purchase = self.n_price = self.n_label = 0
        self.n_session = self.n_order = self.n_new_user = self.n_new_device = 0
        self.fraud_pattern_b = False
        self.fraud_b_category = int(np.argmax(np.array([sim.list_price[ix].mean() for ix in sim.cat_items])))

    def next_seq(self, n: int) -> range:
        r = range(self.seq, self.seq + n)
        self.seq += n
        return r

    # -- prices ------------------------------------------------------------------

    def _price_events(self, enc: Any, ts: np.ndarray, items: np.ndarray, prices: np.ndarray) -> list[Any]:
        sim = self.sim
        rng = sim._rng_prices
        n = len(items)
        comp = np.round(sim.list_price[items] * sim.competitor_factor[items] * rng.uniform(0.97, 1.03, n), 2)
        stock = rng.integers(0, 500, n)
        out = []
        cost, cat, ids, names, keys = sim.cost_l, sim.item_cat_l, sim.item_ids, sim.cat_names, sim.item_id_b
        for t, i, p, cp, st, sq in zip(
            ts.tolist(), items.tolist(), prices.tolist(), comp.tolist(), stock.tolist(), self.next_seq(n), strict=True
        ):
            self.n_price += 1
            value = enc(Price(f"pr{self.n_price}", t, ids[i], p, cost[i], cp, st, names[cat[i]]))
            out.append((t, sq, "prices", keys[i], value))
        return out

    def snapshot(self, ts: int, enc: Any) -> list[Any]:
        n = self.sim.config.n_items
        return self._price_events(enc, np.full(n, ts, dtype=np.int64), np.arange(n), self.cur_price)

    def advance(self) -> None:
        """The current window is done: its price changes become the current
        prices, and one more window is drawn ahead."""
        ts, price = self.ahead.popleft()
        changed = ts != _NEVER
        self.cur_price[changed] = price[changed]
        self._draw_window()

    def _draw_window(self) -> None:
        """Draw the price changes of the next window not drawn yet."""
        sim, c, rng = self.sim, self.sim.config, self.sim._rng_prices
        n = c.n_items
        t_next = self._next_draw
        self._next_draw += self.window_ms
        ch_ts = np.full(n, _NEVER, dtype=np.int64)
        mult = np.where(self.in_test, self.test_mult, self.base_mult)
        new_mult = mult.copy()
        if t_next >= self.next_test_ts:
            # A scheduled price test: the last cohort goes back to its normal
            # price, a new cohort moves to random points of the grid.
            self.next_test_ts += int(c.price_test_every_s * 1000)
            ending = self.in_test.copy()
            self.in_test[:] = False
            cohort = rng.random(n) < c.price_test_share
            self.in_test[cohort] = True
            self.test_mult[cohort] = np.asarray(PRICE_GRID)[rng.integers(0, len(PRICE_GRID), n)][cohort]
            new_mult = np.where(self.in_test, self.test_mult, self.base_mult)
            moved = (ending | cohort) & (new_mult != mult)
            ch_ts[moved] = t_next
        # Random moves (competitor reactions, promotions) at random times in the
        # window, scaled so the rate per hour does not depend on the window size.
        share = c.random_move_share * c.block_s / 600.0
        movers = (rng.random(n) < share) & ~self.in_test & (ch_ts == _NEVER)
        steps = np.exp(rng.normal(0.0, 0.08, n))
        self.base_mult = np.where(movers, np.clip(self.base_mult * steps, 0.7, 1.3), self.base_mult)
        new_mult = np.where(movers, self.base_mult, new_mult)
        ch_ts[movers] = t_next + rng.integers(0, self.window_ms, n)[movers]
        items = np.flatnonzero(ch_ts != _NEVER)
        prev_price = self.latest_price
        new_price = np.maximum(np.round(sim.list_price * new_mult, 2), 0.01)
        items = items[new_price[items] != prev_price[items]]
        ts = np.full(n, _NEVER, dtype=np.int64)
        ts[items] = ch_ts[items]
        price = prev_price.copy()
        price[items] = new_price[items]
        self.latest_price = price
        self.ahead.append((ts, price))

    def price_at(self, items: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Each item's price at each time (within the windows drawn ahead)."""
        price = self.cur_price[items]
        for change_ts, change_price in self.ahead:
            price = np.where(ts >= change_ts[items], change_price[items], price)
        return price

    # -- one window of sessions ---------------------------------------------------

    def window(self, t0: int, t1: int, enc: Any) -> list[Any]:
        sim, c = self.sim, self.sim.config
        rng = sim._rng_sessions
        out: list[Any] = []
        # Price events of this window (drawn ahead last window).
        change_ts, change_price = self.ahead[0]
        items = np.flatnonzero(change_ts != _NEVER)
        if len(items):
            order = np.lexsort((items, change_ts[items]))
            items = items[order]
            out += self._price_events(enc, change_ts[items], items, change_price[items])

        window_ms = t1 - t0
        n_sess = int(rng.poisson(c.sessions_per_s * window_ms / 1000))
        if n_sess:
            out += self._sessions(t0, t1, n_sess, enc)
        return out

    def _sessions(self, t0: int, t1: int, n_sess: int, enc: Any) -> list[Any]:
        sim, c = self.sim, self.sim.config
        rng = sim._rng_sessions
        window_ms = t1 - t0
        start = np.sort(t0 + rng.integers(0, window_ms, n_sess))
        users = np.minimum(np.searchsorted(sim.activity_cdf, rng.random(n_sess)), c.n_users - 1)
        n_clicks = np.minimum(rng.geometric(1.0 / c.mean_clicks, n_sess), 30)
        sess_ids = np.arange(self.n_session, self.n_session + n_sess)
        self.n_session += n_sess
        # Flatten to clicks.
        s_of = np.repeat(np.arange(n_sess), n_clicks)
        gaps = rng.exponential(30_000.0, len(s_of)).astype(np.int64) + 1000
        first = np.concatenate([[0], np.cumsum(n_clicks)[:-1]])
        csum = np.cumsum(gaps)
        offset = csum - np.repeat(csum[first] - gaps[first], n_clicks)  # time since session start
        ts = start[s_of] + offset - gaps[first][s_of]  # first click at session start
        keep = ts < start[s_of] + self.max_session_ms
        s_of, ts = s_of[keep], ts[keep]
        u = users[s_of]
        n = len(s_of)
        # Category: the user's tastes, sometimes global popularity (exploration).
        r = rng.random(n)
        explore = rng.random(n) < c.explore
        cat = np.where(
            explore,
            np.minimum(np.searchsorted(sim.global_cat_cdf, r), c.n_categories - 1),
            _sample_rows(sim.taste_cdf[u], r),
        )
        item = np.empty(n, dtype=np.int64)
        r2 = rng.random(n)
        for k in np.unique(cat):
            m = cat == k
            ix = sim.cat_items[k]
            item[m] = ix[np.minimum(np.searchsorted(sim.cat_item_cdf[k], r2[m]), len(ix) - 1)]
        price = self.price_at(item, ts)
        source = rng.integers(0, len(CLICK_SOURCES), n)
        # Conversion: constant elasticity around the list price, boosted by taste.
        rel = price / sim.list_price[item]
        boost = np.minimum(0.5 + sim.tastes[u, cat] * c.n_categories * 0.5, 4.0)
        p_buy = np.minimum(c.base_conversion * boost * rel ** sim.elasticity[cat] * sim.competitor_factor[item], 0.5)
        buy = rng.random(n) < p_buy
        out: list[Any] = []
        seqs = self.next_seq(n)
        ids, names, keys, cats = sim.item_ids, sim.user_ids, sim.user_id_b, sim.cat_names
        n_click = self.n_click
        for t, uu, it, ca, pr, so, ss, sq in zip(
            ts.tolist(), u.tolist(), item.tolist(), cat.tolist(), price.tolist(),
            source.tolist(), sess_ids[s_of].tolist(), seqs, strict=True,
        ):  # fmt: skip
            n_click += 1
            click = Click(f"c{n_click}", t, names[uu], ids[it], f"s{ss}", cats[ca], pr, CLICK_SOURCES[so])
            out.append((t, sq, "clicks", keys[uu], enc(click)))
        self.n_click = n_click
        if buy.any():
            out += self._purchases(ts[buy], u[buy], item[buy], price[buy], enc)
        n_legit = int(buy.sum())
        out += self._frauds(t0, t1, n_legit, enc)
        return out

    def _purchases(
        self, click_ts: np.ndarray, u: np.ndarray, item: np.ndarray, price: np.ndarray, enc: Any
    ) -> list[Any]:
        sim, c = self.sim, self.sim.config
        rng = sim._rng_sessions
        n = len(u)
        ts = click_ts + rng.integers(5_000, 120_000, n)
        qty = np.minimum(rng.geometric(0.75, n), 5)
        other_pay = rng.choice(len(PAYMENT_METHODS), n, p=_norm(PAYMENT_WEIGHTS))
        pay = np.where(rng.random(n) < 0.8, sim.user_payment[u], other_pay)
        home = sim.user_country[u]
        abroad = rng.random(n) < 0.02
        ship = np.where(abroad, (home + rng.integers(1, len(COUNTRIES), n)) % len(COUNTRIES), home)
        new_device = rng.random(n) < 0.04
        dev = rng.integers(0, 2, n) % sim.user_devices[u]
        age = (ts - sim.user_created[u]) / _DAY_MS
        if c.legit_label_rate > 0:
            labeled = rng.random(n) < c.legit_label_rate
            # Confirmations of good orders come later than chargebacks.
            delay = self._label_delays(n) * 2
        else:
            labeled = np.zeros(n, dtype=bool)
            delay = np.zeros(n, dtype=np.int64)
        out = []
        for t, uu, it, pr, q, pm, sh, nd, dv, ag, lb, dl, sq in zip(
            ts.tolist(), u.tolist(), item.tolist(), price.tolist(), qty.tolist(), pay.tolist(), ship.tolist(),
            new_device.tolist(), dev.tolist(), age.tolist(), labeled.tolist(), delay.tolist(), self.next_seq(n),
            strict=True,
        ):  # fmt: skip
            user = sim.user_ids[uu]
            if nd:
                self.n_new_device += 1
                device = f"d{uu}n{self.n_new_device}"
            else:
                device = f"d{uu}x{dv}"
            home, dest, pm_name = COUNTRIES[sim.user_country[uu]], COUNTRIES[sh], PAYMENT_METHODS[pm]
            out.append(self._purchase(enc, t, sq, user, it, q, pr, pm_name, home, dest, round(ag, 2), device))
            if lb:
                out.append(self._label(enc, t + dl, f"o{self.n_order}", False))
        return out

    def _purchase(
        self, enc: Any, t: int, sq: int, user: str, it: int, q: int, pr: float, pay: str, country: str, ship: str,
        age: float, device: str,
    ) -> Any:  # fmt: skip
        sim = self.sim
        self.n_purchase += 1
        self.n_order += 1
        value = enc(
            Purchase(
                event_id=f"p{self.n_purchase}",
                ts=t,
                order_id=f"o{self.n_order}",
                user_id=user,
                item_id=sim.item_ids[it],
                quantity=q,
                unit_price=pr,
                category=sim.cat_names[sim.item_cat[it]],
                payment_method=pay,
                country=country,
                shipping_country=ship,
                account_age_days=age,
                device_id=device,
            )
        )
        return (t, sq, "purchases", user.encode(), value)

    def _label(self, enc: Any, ts: int, order_id: str, is_fraud: bool) -> Any:
        self.n_label += 1
        value = enc(FraudLabel(event_id=f"l{self.n_label}", ts=ts, order_id=order_id, is_fraud=is_fraud))
        return (ts, self.next_seq(1)[0], "fraud_labels", order_id.encode(), value)

    def _label_delays(self, n: int) -> np.ndarray:
        c = self.sim.config
        return (np.exp(self.sim._rng_labels.normal(0.0, 0.7, n)) * c.label_delay_median_s * 1000).astype(np.int64)

    # -- fraud -------------------------------------------------------------------

    def _frauds(self, t0: int, t1: int, n_legit: int, enc: Any) -> list[Any]:
        """Fraudulent orders, about ``fraud_rate`` of all orders, in bursts."""
        sim, c = self.sim, self.sim.config
        rng = sim._rng_fraud
        rate = c.fraud_rate
        n_fraud = int(rng.poisson(n_legit * rate / (1 - rate))) if rate > 0 else 0
        out: list[Any] = []
        window_ms = t1 - t0
        while n_fraud > 0:
            pattern = "B" if self.fraud_pattern_b and rng.random() < 0.7 else "A"
            burst = min(n_fraud, int(rng.integers(1, 5) if pattern == "A" else rng.integers(2, 6)))
            n_fraud -= burst
            t = int(t0 + rng.integers(0, window_ms))
            # Price lookups know the windows drawn ahead; bursts stay within them.
            t_max = t0 + self.horizon_ms - 1
            if pattern == "A":
                # Stolen card on a fresh account: days old, new device, ships abroad, expensive items.
                self.n_new_user += 1
                uu = c.n_users + self.n_new_user
                user = f"u{uu}"
                country = int(rng.choice(len(COUNTRIES), p=_norm(COUNTRY_WEIGHTS)))
                age0 = float(rng.uniform(0.0, 3.0))
                abroad = rng.random() < 0.8
                ship = (country + int(rng.integers(1, len(COUNTRIES)))) % len(COUNTRIES) if abroad else country
                device = f"d{uu}n0" if rng.random() < 0.9 else f"d{uu}x0"
                pay = "card" if rng.random() < 0.9 else "paypal"
            else:
                # Account takeover: an old account, domestic shipping, gift cards, bulk quantities.
                uu = int(rng.integers(c.n_users))
                user = sim.user_ids[uu]
                country = int(sim.user_country[uu])
                age0 = (t - int(sim.user_created[uu])) / _DAY_MS
                ship = country
                self.n_new_device += 1
                device = f"d{uu}n{self.n_new_device}" if rng.random() < 0.5 else f"d{uu}x0"
                pay = "gift_card" if rng.random() < 0.85 else "card"
            for _ in range(burst):
                if pattern == "A":
                    it = int(sim.expensive_items[rng.integers(len(sim.expensive_items))])
                    q = int(rng.integers(1, 4))
                else:
                    ix = sim.cat_items[self.fraud_b_category]
                    it = int(ix[rng.integers(len(ix))])
                    q = int(rng.integers(3, 9))
                price = float(self.price_at(np.array([it]), np.array([t]))[0])
                # The fraudster views the item just before buying it.
                self.n_click += 1
                # Never before the window start: earlier events are already out.
                click_ts = max(t - int(rng.integers(10_000, 60_000)), t0)
                click = Click(f"c{self.n_click}", click_ts, user, sim.item_ids[it],
                              f"s{self.n_session}", sim.cat_names[sim.item_cat[it]], price, "search")  # fmt: skip
                self.n_session += 1
                out.append((click.ts, self.next_seq(1)[0], "clicks", user.encode(), enc(click)))
                age = age0 + (t - t0) / _DAY_MS if pattern == "A" else (t - int(sim.user_created[uu])) / _DAY_MS
                seq = self.next_seq(1)[0]
                home, dest = COUNTRIES[country], COUNTRIES[ship]
                out.append(self._purchase(enc, t, seq, user, it, q, price, pay, home, dest, round(age, 2), device))
                order_id = f"o{self.n_order}"
                self.sim._fraud_seq[out[-1][1]] = order_id
                label_ts = None
                if rng.random() < c.fraud_label_rate:
                    label_ts = t + int(self._label_delays(1)[0])
                    out.append(self._label(enc, label_ts, order_id, True))
                sim.truth.frauds[order_id] = {"ts": t, "pattern": pattern, "label_ts": label_ts, "labeled": False}
                # Bursts: the next order of the same attack a minute or two later.
                t = min(t + int(rng.integers(30_000, 120_000)), t_max)
        return out


def simulate(config: SimConfig) -> Iterator[SimEvent]:
    """The events of ``Simulation(config)``, when the ground truth is not needed."""
    return iter(Simulation(config))


# --------------------------------------------------------------------------- writers


def _partition_of(key: bytes | None, partitions: int) -> int:
    """A stable key -> partition mapping for simulated multi-partition recordings."""
    import zlib

    return zlib.crc32(key or b"") % partitions if partitions > 1 else 0


def write_recording(
    sim: Simulation,
    out_dir: str | Path,
    topics: Mapping[str, str],
    *,
    partitions: int = 1,
    progress: bool = True,
) -> Any:
    """Write the simulation as a recording (``stream.replay`` format) with its
    ``truth.json``; ``topics`` maps stream names to topic names. Returns the manifest."""
    from stream.progress import Progress
    from stream.replay import TIMESTAMP_CREATE_TIME, RecordingWriter

    out = Path(out_dir)
    # numpy's version: the random streams (so the bytes) are the same for the same seed and numpy.
    source = {"kind": "simulator", "seed": sim.config.seed, "numpy": np.__version__, "config": sim.config.to_dict()}
    writer = RecordingWriter(out, source=source, streams=dict(topics), truth="truth.json")
    offsets: dict[tuple[str, int], int] = {}
    bar = Progress(sim.config.events, desc="simulate", enabled=progress)
    with writer:
        for topic in topics.values():
            for partition in range(partitions):
                writer.declare(topic, partition)
        for n, (stream, key, value, ts) in enumerate(sim):
            tp = (topics[stream], _partition_of(key, partitions))
            offset = offsets.get(tp, 0)
            offsets[tp] = offset + 1
            writer.add(tp[0], tp[1], offset, (TIMESTAMP_CREATE_TIME, ts), key, value, sim.headers(n))
            bar.update()
    bar.close()
    sim.truth.save(out / "truth.json")
    return writer.manifest


def produce_to_kafka(
    sim: Simulation,
    config: Any,
    *,
    create_topics: bool = False,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Produce the simulation to the configured input topics (key, event time
    as the record timestamp), every delivery checked. Returns records produced."""
    from stream.progress import Progress
    from stream.replay import KafkaWriter, ensure_topics

    topics = config.input_topics()
    ensure_topics(config, dict.fromkeys(topics.values(), config.topics.partitions), create=create_topics)
    writer = KafkaWriter(config)
    bar = Progress(sim.config.events, desc="simulate -> kafka", enabled=progress)
    for n, (stream, key, value, ts) in enumerate(sim):
        if stop is not None and n % 1000 == 0 and stop():
            break
        writer.produce(topics[stream], key, value, timestamp=ts, headers=sim.headers(n))
        bar.update()
    writer.flush()
    bar.close()
    return writer.produced


def simulate_command(args: Any, config: Any) -> int:
    """``stream simulate``: see ``stream simulate --help``."""
    import sys

    from stream.replay import RecordingError, parse_duration, stop_on_signals

    try:
        duration = parse_duration(args.duration) if args.duration else None
        sim_config = SimConfig(
            seed=args.seed,
            events=None if duration is not None else args.events,
            duration_s=duration,
            n_users=args.users,
            n_items=args.items,
            n_categories=args.categories,
            fraud_rate=args.fraud_rate,
            bad_records=args.bad_records,
            drifts=args.drifts,
        )
        sim = Simulation(sim_config)
        if args.out:
            manifest = write_recording(
                sim, args.out, config.input_topics(), partitions=args.partitions, progress=args.progress
            )
            truth_path = Path(args.out) / "truth.json"
            where = f"recording {args.out} ({manifest.records:,} records)"
        else:
            with stop_on_signals() as stop:
                n = produce_to_kafka(sim, config, create_topics=args.create_topics, progress=args.progress, stop=stop)
            truth_path = Path(args.truth)
            sim.truth.save(truth_path)
            where = f"{config.kafka.bootstrap_servers} ({n:,} records, all delivered)"
    except (RecordingError, ValueError) as exc:
        print(f"stream: {exc}", file=sys.stderr)
        return 1
    t = sim.truth
    counts = ", ".join(f"{s} {n:,}" for s, n in t.counts.items())
    print(f"simulated {t.events:,} events (seed {args.seed}) to {where}: {counts}")
    print(f"  frauds {len(t.frauds):,} of {t.orders:,} orders; invalid records {len(t.bad_records)}")
    for d in t.drifts:
        print(f"  drift {d.kind} at event {d.index if d.index is not None else '-'}: {d.description}")
    print(f"  ground truth: {truth_path}")
    return 0
