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

import heapq
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from stream.events import AdCandidate, Click, FraudLabel, Price, Purchase, Search
from stream.kafka import KafkaWriter, ensure_topics
from stream.progress import Progress
from stream.recording import TIMESTAMP_CREATE_TIME, RecordingWriter
from stream.simulate_demand import Demand
from stream.world import (
    BAD_KINDS,
    CLICK_SOURCES,
    COUNTRIES,
    COUNTRY_WEIGHTS,
    DAY_MS,
    GENERIC_QUERIES,
    NEVER,
    PAYMENT_METHODS,
    PAYMENT_WEIGHTS,
    PRICE_GRID,
    QUERY_MODIFIERS,
    STREAMS,
    DetectionScore,
    DriftPoint,
    GroundTruth,
    SimConfig,
    SimEvent,
    World,
    normalized,
)

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


# --------------------------------------------------------------------------- the simulation


class Simulation(World):
    """One run of the simulator: iterate it once for the events; ``truth``
    is complete when the iteration ends.

    Iterating yields ``(stream, key, value, ts)`` tuples (``SimEvent``) in
    event-time order (ties in generation order). ``headers(index)`` gives the
    headers a writer should attach to the event at that index (only the
    deliberately invalid records carry one, naming the corruption).
    """

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self._bad_headers: dict[int, list[tuple[str, bytes | None]]] = {}
        #: Generation sequence number of each fraudulent purchase -> its order id.
        self._fraud_seq: dict[int, str] = {}
        self._consumed = False

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
        end_ts = c.start_ts + int(c.duration_s * 1000) if c.duration_s is not None else NEVER
        limit = c.events if c.events is not None else NEVER

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
        plan = [
            ("taste_shift", c.taste_shift_at),
            ("elasticity_change", c.elasticity_change_at),
            ("fraud_pattern", c.fraud_pattern_at),
        ]
        if c.demand is not None:
            plan.append(("demand_shift", c.demand.shift_at))
        return plan

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
        if kind == "demand_shift" and state.demand is not None:
            return state.demand.shift(ts)
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
        self.ahead.append((np.full(n, NEVER, dtype=np.int64), self.cur_price.copy()))  # the first window: none
        self._next_draw = c.start_ts + self.window_ms
        for _ in range(lookahead):
            self._draw_window()
        self.seq = 0
        self.n_click = self.n_purchase = self.n_price = self.n_label = 0
        self.n_session = self.n_order = self.n_new_user = self.n_new_device = 0
        self.n_search = 0
        self.fraud_pattern_b = False
        self.fraud_b_category = int(np.argmax(np.array([sim.list_price[ix].mean() for ix in sim.cat_items])))
        self.demand = Demand(sim) if c.demand is not None else None

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
        stock: list[Any] = rng.integers(0, 500, n).tolist()
        if self.demand is not None:
            # Stock is reported by the inventory's own events (snapshot, sell-out, restock).
            stock = self.demand.reported_stock(items)
        out = []
        cost, cat, ids, names, keys = sim.cost_l, sim.item_cat_l, sim.item_ids, sim.cat_names, sim.item_id_b
        for t, i, p, cp, st, sq in zip(
            ts.tolist(), items.tolist(), prices.tolist(), comp.tolist(), stock, self.next_seq(n), strict=True
        ):
            self.n_price += 1
            value = enc(Price(f"pr{self.n_price}", t, ids[i], p, cost[i], cp, st, names[cat[i]]))  # type: ignore[arg-type]
            out.append((t, sq, "prices", keys[i], value))
        return out

    def snapshot(self, ts: int, enc: Any) -> list[Any]:
        n = self.sim.config.n_items
        return self._price_events(enc, np.full(n, ts, dtype=np.int64), np.arange(n), self.cur_price)

    def advance(self) -> None:
        """The current window is done: its price changes become the current
        prices, and one more window is drawn ahead."""
        ts, price = self.ahead.popleft()
        changed = ts != NEVER
        self.cur_price[changed] = price[changed]
        self._draw_window()

    def _draw_window(self) -> None:
        """Draw the price changes of the next window not drawn yet."""
        sim, c, rng = self.sim, self.sim.config, self.sim._rng_prices
        n = c.n_items
        t_next = self._next_draw
        self._next_draw += self.window_ms
        ch_ts = np.full(n, NEVER, dtype=np.int64)
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
        movers = (rng.random(n) < share) & ~self.in_test & (ch_ts == NEVER)
        steps = np.exp(rng.normal(0.0, 0.08, n))
        self.base_mult = np.where(movers, np.clip(self.base_mult * steps, 0.7, 1.3), self.base_mult)
        new_mult = np.where(movers, self.base_mult, new_mult)
        ch_ts[movers] = t_next + rng.integers(0, self.window_ms, n)[movers]
        items = np.flatnonzero(ch_ts != NEVER)
        prev_price = self.latest_price
        new_price = np.maximum(np.round(sim.list_price * new_mult, 2), 0.01)
        items = items[new_price[items] != prev_price[items]]
        ts = np.full(n, NEVER, dtype=np.int64)
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
        items = np.flatnonzero(change_ts != NEVER)
        if len(items):
            order = np.lexsort((items, change_ts[items]))
            items = items[order]
            out += self._price_events(enc, change_ts[items], items, change_price[items])

        window_ms = t1 - t0
        if self.demand is not None:
            out += self.demand.restocks(self, t0, t1, enc)
            n_sess = int(rng.poisson(c.sessions_per_s * window_ms / 1000 * self.demand.season(t0, t1)))
        else:
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
        if self.demand is not None:
            p_buy = np.minimum(p_buy * self.demand.uplift(rel, cat), 0.5)
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
        if c.searches_per_session > 0:
            out += self._searches(start, users, sess_ids, enc)
        return out

    # -- search and ads requests (their own generator: nothing above changes) -------------

    def _searches(self, start: np.ndarray, users: np.ndarray, sess_ids: np.ndarray, enc: Any) -> list[Any]:
        """Requests of the sessions starting in this window: a query from the user's tastes,
        the engine's candidates in its (noisy) order, or ads with bids in a uniformly random
        order (the logging policy of the replay method); each position examined with
        probability ``(1 + k) ** -position_bias``, an examined item clicked with its true
        attractiveness (``GroundTruth.relevance``), some clicks followed by a purchase."""
        sim, c = self.sim, self.sim.config
        rng = sim._rng_search
        truth = sim.truth
        search = truth.search
        assert search is not None
        n_req = rng.poisson(c.searches_per_session, len(users))
        out: list[Any] = []
        cats = sim.cat_names
        span = max(self.max_session_ms // 2 - 180_000, 1_000)
        for s_ix in np.flatnonzero(n_req).tolist():
            uu = int(users[s_ix])
            user = sim.user_ids[uu]
            times = np.sort(int(start[s_ix]) + rng.integers(0, span, int(n_req[s_ix])))
            for t in times.tolist():
                self.n_search += 1
                rid = f"q{self.n_search}"
                ads = rng.random() < c.ads_share
                if rng.random() < 0.15:
                    qcat = -1
                    query = GENERIC_QUERIES[int(rng.integers(len(GENERIC_QUERIES)))]
                else:
                    qcat = int(_sample_rows(sim.taste_cdf[[uu]], rng.random(1))[0])
                    mod = QUERY_MODIFIERS[int(rng.integers(len(QUERY_MODIFIERS)))]
                    query = f"{mod} {cats[qcat]}".strip()
                n_cand = min(c.ad_candidates if ads else c.search_candidates, c.n_items)
                items = self._engine_candidates(rng, qcat, n_cand)
                if ads:
                    order = rng.permutation(len(items))
                else:
                    score = np.log(sim.popularity[items] * c.n_items) * 0.5 + rng.normal(
                        0.0, c.engine_noise, len(items)
                    )
                    if qcat >= 0:
                        score += 2.0 * (sim.item_cat[items] == qcat)
                    order = np.argsort(-score, kind="stable")
                items = items[order]
                ids = [sim.item_ids[i] for i in items.tolist()]
                category = cats[qcat] if qcat >= 0 and rng.random() < 0.5 else None
                candidates: list[Any]
                if ads:
                    bids = np.round(np.exp(rng.normal(-0.5, 0.6, len(items))), 2) + 0.01
                    candidates = [AdCandidate(i, b) for i, b in zip(ids, bids.tolist(), strict=True)]
                else:
                    candidates = ids
                req = Search(f"sr{self.n_search}", t, user, rid, "ads" if ads else "search", candidates, query,
                             f"s{int(sess_ids[s_ix])}", category)  # fmt: skip
                out.append((t, self.next_seq(1)[0], "searches", sim.user_id_b[uu], enc(req)))
                out += self._request_clicks(rng, t, uu, user, rid, query, items, ids, ads, s_ix, sess_ids, enc)
        return out

    def _engine_candidates(self, rng: Any, qcat: int, n: int) -> np.ndarray:
        """``n`` distinct items: most from the query's category (by popularity), the rest popular anywhere."""
        sim = self.sim
        picked: list[int] = []
        if qcat >= 0:
            ix = sim.cat_items[qcat]
            k = min(len(ix), int(n * 0.6))
            p = sim.popularity[ix] / sim.popularity[ix].sum()
            picked = rng.choice(ix, k, replace=False, p=p).tolist()
        rest = n - len(picked)
        if rest > 0:
            pool = rng.choice(len(sim.popularity), min(4 * n, len(sim.popularity)), replace=False, p=sim.popularity)
            have = set(picked)
            for i in pool.tolist():
                if i not in have:
                    picked.append(i)
                    have.add(i)
                    if len(picked) == n:
                        break
        return np.array(picked, dtype=np.intp)

    def _request_clicks(
        self, rng: Any, t: int, uu: int, user: str, rid: str, query: str, items: np.ndarray, ids: list[str],
        ads: bool, s_ix: int, sess_ids: np.ndarray, enc: Any,
    ) -> list[Any]:  # fmt: skip
        sim, c = self.sim, self.sim.config
        search = sim.truth.search
        assert search is not None
        n = len(ids)
        alpha = sim.truth.relevance(user, query, ids, t)
        exam = search.examination(n, ads)
        clicked = np.flatnonzero((rng.random(n) < exam) & (rng.random(n) < alpha))
        if not len(clicked):
            return []
        out: list[Any] = []
        click_ts = t + np.cumsum(rng.integers(2_000, 20_000, len(clicked)))
        attributed = rng.random(len(clicked)) < c.click_attribution
        price = self.price_at(items[clicked], click_ts)
        buy = rng.random(len(clicked)) < c.base_conversion * 3
        source = "ads" if ads else "search"
        for k, ct, pr, at, b in zip(clicked.tolist(), click_ts.tolist(), price.tolist(), attributed.tolist(),
                                    buy.tolist(), strict=True):  # fmt: skip
            it = int(items[k])
            self.n_click += 1
            click = Click(f"c{self.n_click}", ct, user, ids[k], f"s{int(sess_ids[s_ix])}",
                          sim.cat_names[int(sim.item_cat[it])], pr, source,
                          rid if at else None, k if at else None)  # fmt: skip
            out.append((ct, self.next_seq(1)[0], "clicks", sim.user_id_b[uu], enc(click)))
            if b:
                pt = ct + int(rng.integers(5_000, 60_000))
                home = COUNTRIES[int(sim.user_country[uu])]
                age = round((pt - int(sim.user_created[uu])) / DAY_MS, 2)
                pay = PAYMENT_METHODS[int(sim.user_payment[uu])]
                out.append(self._purchase(enc, pt, self.next_seq(1)[0], user, it, 1, pr, pay, home, home, age,
                                          f"d{uu}x0"))  # fmt: skip
        return out

    def _purchases(
        self, click_ts: np.ndarray, u: np.ndarray, item: np.ndarray, price: np.ndarray, enc: Any
    ) -> list[Any]:
        sim, c = self.sim, self.sim.config
        rng = sim._rng_sessions
        n = len(u)
        ts = click_ts + rng.integers(5_000, 120_000, n)
        qty = np.minimum(rng.geometric(0.75, n), 5)
        other_pay = rng.choice(len(PAYMENT_METHODS), n, p=normalized(PAYMENT_WEIGHTS))
        pay = np.where(rng.random(n) < 0.8, sim.user_payment[u], other_pay)
        home = sim.user_country[u]
        abroad = rng.random(n) < 0.02
        ship = np.where(abroad, (home + rng.integers(1, len(COUNTRIES), n)) % len(COUNTRIES), home)
        new_device = rng.random(n) < 0.04
        dev = rng.integers(0, 2, n) % sim.user_devices[u]
        age = (ts - sim.user_created[u]) / DAY_MS
        if c.legit_label_rate > 0:
            labeled = rng.random(n) < c.legit_label_rate
            # Confirmations of good orders come later than chargebacks.
            delay = self._label_delays(n) * 2
        else:
            labeled = np.zeros(n, dtype=bool)
            delay = np.zeros(n, dtype=np.int64)
        if self.demand is not None:
            # Stock is drawn down in event-time order.
            order = np.argsort(ts, kind="stable")
            ts, u, item, price, qty, pay, ship, new_device, dev, age, labeled, delay = (  # type: ignore[assignment]
                a[order] for a in (ts, u, item, price, qty, pay, ship, new_device, dev, age, labeled, delay)
            )
        out: list[Any] = []
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
            if self.demand is not None:
                q = self.demand.sell(self, enc, out, t, it, q)
                if q == 0:
                    continue  # out of stock: the demand is lost (censored), no order
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
                country = int(rng.choice(len(COUNTRIES), p=normalized(COUNTRY_WEIGHTS)))
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
                age0 = (t - int(sim.user_created[uu])) / DAY_MS
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
                age = age0 + (t - t0) / DAY_MS if pattern == "A" else (t - int(sim.user_created[uu])) / DAY_MS
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
    """Write the simulation as a recording (``stream.recording`` format) with its
    ``truth.json``; ``topics`` maps stream names to topic names. Returns the manifest."""
    out = Path(out_dir)
    if not sim.config.searches_per_session:
        topics = {s: t for s, t in topics.items() if s in STREAMS}  # no search stream in this recording
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
