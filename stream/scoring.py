"""Scoring against the simulator's ground truth.

``TruthScorer`` scores every published prediction against what the
simulator knows (the user's true tastes, the optimal price, whether an order
was a fraud); ``score_against_truth`` adds each drift monitor's delays and
false alarms against the true drift points. The backtest and the demo both
use them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec

from stream.config import Config
from stream.evaluation import RunningMean
from stream.pipeline import BaseObserver
from stream.world import GroundTruth

__all__ = ["TruthScorer", "score_against_truth"]


def _get(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, Mapping) else getattr(event, name, None)


class TruthScorer(BaseObserver):
    """Scores each published prediction against the simulator's ground truth.

    Attach it with ``wrap_sink`` (sees the output value) and as a pipeline
    observer (``published`` sees the event it belongs to): the pipeline calls
    the two back to back for every prediction.
    """

    def __init__(self, truth: GroundTruth, *, trace: bool = False) -> None:
        self.truth = truth
        #: With ``trace``: every score with its event time, ``(learner, what) -> [(ts, value, baseline)]``
        #: for ``hit`` (taste hit-rate, popularity's), ``regret`` (recommended price, current price)
        #: and ``fraud`` (probability, 1.0 if a fraud): quality over time, for the quality bench.
        self.trace: dict[tuple[str, str], list[tuple[int, float, float]]] | None = {} if trace else None
        self._decode = msgspec.json.Decoder().decode
        self._last: bytes | None = None
        self.hits: dict[str, RunningMean] = {}
        self.hit_baseline: dict[str, RunningMean] = {}
        self.hits_after_shift: dict[str, RunningMean] = {}
        self.regret: dict[str, RunningMean] = {}
        self.regret_baseline: dict[str, RunningMean] = {}
        self.regret_after_change: dict[str, RunningMean] = {}
        self.fraud_scores: dict[str, dict[str, float]] = {}
        self.blocked: dict[str, list[int]] = {}  # learner -> [true pos, flagged, frauds scored]
        #: Rankings: NDCG@10 of ours and of the engine's order on true relevance; ads: expected
        #: revenue of ours and of ranking by bid alone; and the replay estimates (``_Replay``).
        self.ndcg: dict[str, RunningMean] = {}
        self.ndcg_original: dict[str, RunningMean] = {}
        self.ads_revenue: dict[str, RunningMean] = {}
        self.ads_revenue_by_bid: dict[str, RunningMean] = {}
        self.replay: dict[str, _Replay] = {}

    def _since(self, kind: str, ts: int) -> bool:
        """Whether the drift ``kind`` has happened by ``ts`` (drifts are appended
        while the simulation runs, so this looks each time: at most three)."""
        return any(d.kind == kind and ts >= d.ts for d in self.truth.drifts)

    # -- wiring ------------------------------------------------------------------

    def wrap_sink(self, sink: Any) -> Any:
        scorer = self

        class _Sink:
            def produce(self, topic: str, key: Any, value: Any, headers: Any = None) -> None:
                scorer._last = value
                sink.produce(topic, key, value, headers)

        return _Sink()

    def processed(self, topic: str, record: Any, event: Any) -> None:
        if self.replay and type(event).__name__ == "Click":
            for replay in self.replay.values():
                replay.click(event)

    def published(self, learner: Any, event: Any, record: Any) -> None:
        value, self._last = self._last, None
        if value is None:
            return
        try:
            prediction = self._decode(value).get("prediction")
        except msgspec.DecodeError:
            return
        if isinstance(prediction, dict):
            self.score(learner.name, event, prediction)

    # -- scoring -----------------------------------------------------------------

    def score(self, name: str, event: Any, prediction: Mapping[str, Any]) -> None:
        truth = self.truth
        ts = _get(event, "ts")
        if ts is None:
            return
        items = prediction.get("items")
        if "request_id" in prediction and isinstance(items, list):
            if items and truth.search is not None:
                self._score_ranking(name, event, [i["item_id"] for i in items])
            return
        if isinstance(items, list) and items:
            user = _get(event, "user_id")
            ids = [i.get("item_id") if isinstance(i, Mapping) else i for i in items]
            hit = truth.taste_hit_rate(user, [i for i in ids if isinstance(i, str)], ts) if user else None
            if hit is not None:
                self.hits.setdefault(name, RunningMean()).update(hit)
                # What recommending by global popularity would score: the chance a
                # popular item falls in the user's top categories.
                tops = truth.top_categories(user, ts)
                base = sum(float(truth.category_weights[truth.categories.index(c)]) for c in tops)
                base /= float(truth.category_weights.sum())
                self.hit_baseline.setdefault(name, RunningMean()).update(base)
                if self.trace is not None:
                    self.trace.setdefault((name, "hit"), []).append((ts, hit, base))
                if self._since("taste_shift", ts):
                    self.hits_after_shift.setdefault(name, RunningMean()).update(hit)
        price = prediction.get("recommended_price")
        item = _get(event, "item_id")
        if isinstance(price, (int, float)) and price > 0 and isinstance(item, str) and truth.category_of(item):
            mine = truth.pricing_regret(item, float(price), ts)
            self.regret.setdefault(name, RunningMean()).update(mine)
            current = _get(event, "unit_price") or _get(event, "price")
            if isinstance(current, (int, float)) and current > 0:
                regret = truth.pricing_regret(item, float(current), ts)
                self.regret_baseline.setdefault(name, RunningMean()).update(regret)
                if self.trace is not None:
                    self.trace.setdefault((name, "regret"), []).append((ts, mine, regret))
            if self._since("elasticity_change", ts):
                regret = truth.pricing_regret(item, float(price), ts)
                self.regret_after_change.setdefault(name, RunningMean()).update(regret)
        p = prediction.get("fraud_probability")
        order = _get(event, "order_id")
        if isinstance(p, (int, float)) and isinstance(order, str):
            self.fraud_scores.setdefault(name, {})[order] = float(p)
            decision = prediction.get("decision")
            counts = self.blocked.setdefault(name, [0, 0, 0])
            fraud = truth.is_fraud(order)
            if self.trace is not None:
                self.trace.setdefault((name, "fraud"), []).append((ts, float(p), float(fraud)))
            if decision in ("block", "review"):
                counts[1] += 1
                counts[0] += fraud
            counts[2] += fraud

    def _score_ranking(self, name: str, event: Any, ours: list[str]) -> None:
        truth, user, query, ts = self.truth, event.user_id, event.query, event.ts
        if event.kind == "search":
            original = list(dict.fromkeys(event.candidates))
            self.ndcg.setdefault(name, RunningMean()).update(truth.ranking_ndcg(user, query, ours, ts))
            self.ndcg_original.setdefault(name, RunningMean()).update(truth.ranking_ndcg(user, query, original, ts))
            return
        bid = {c.item_id: c.bid for c in reversed(event.candidates)}
        by_bid = sorted(bid, key=lambda i: -bid[i])
        value = truth.ads_value(user, query, ours, [bid[i] for i in ours], ts)
        self.ads_revenue.setdefault(name, RunningMean()).update(value)
        base = truth.ads_value(user, query, by_bid, [bid[i] for i in by_bid], ts)
        self.ads_revenue_by_bid.setdefault(name, RunningMean()).update(base)
        self.replay.setdefault(name, _Replay()).request(event, ours[0], by_bid[0])

    def results(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}

        def put(name: str, key: str, value: Any) -> None:
            if value is not None:
                out.setdefault(name, {})[key] = value

        for name, m in self.hits.items():
            put(name, "taste_hit_rate", m.mean)
            put(name, "taste_hit_rate_popularity_baseline", self.hit_baseline[name].mean)
            if name in self.hits_after_shift:
                put(name, "taste_hit_rate_after_shift", self.hits_after_shift[name].mean)
            put(name, "recommendations_scored", m.n)
        for name, m in self.regret.items():
            put(name, "pricing_regret", m.mean)
            if name in self.regret_baseline:
                put(name, "pricing_regret_of_current_price", self.regret_baseline[name].mean)
            if name in self.regret_after_change:
                put(name, "pricing_regret_after_change", self.regret_after_change[name].mean)
            put(name, "prices_scored", m.n)
        for name, scores in self.fraud_scores.items():
            put(name, "fraud_auc", self.truth.fraud_auc(scores))
            tp, flagged, frauds = self.blocked[name]
            put(name, "flagged_precision", tp / flagged if flagged else None)
            put(name, "flagged_recall", tp / frauds if frauds else None)
            put(name, "orders_scored", len(scores))
        for name, m in self.ndcg.items():
            put(name, "ndcg_at_10_truth", m.mean)
            put(name, "ndcg_at_10_truth_original_order", self.ndcg_original[name].mean)
            put(name, "searches_scored", m.n)
        for name, m in self.ads_revenue.items():
            put(name, "ads_expected_revenue_per_request", m.mean)
            put(name, "ads_expected_revenue_per_request_by_bid", self.ads_revenue_by_bid[name].mean)
            put(name, "ads_scored", m.n)
        for name, replay in self.replay.items():
            for key, value in replay.results().items():
                put(name, key, value)
        return out


class _Replay:
    """The replay method (Li et al., 2011) for the top ad slot on a recorded stream whose
    logged top ad was drawn uniformly at random (the simulator's ads): a policy's revenue
    per request is estimated on the requests where the logged top ad is the one the policy
    puts first, from the clicks on it (carrying the request's id at position 0, or by the
    same user on that item within ``window_ms`` when they carry none). Estimated for our
    order, for ranking by bid alone, and for the logging policy itself (every request)."""

    def __init__(self, window_ms: int = 1_800_000, capacity: int = 100_000) -> None:
        self.window_ms = window_ms
        self.capacity = capacity
        # request id -> [user, ts, logged top ad, its bid, ours matches, by-bid matches, clicked]
        self._open: OrderedDict[str, list[Any]] = OrderedDict()
        self._by_user: dict[str, str] = {}
        self.n = {"ours": 0, "bid": 0, "logged": 0}
        self.revenue = {"ours": 0.0, "bid": 0.0, "logged": 0.0}

    def request(self, event: Any, ours_top: str, bid_top: str) -> None:
        if not event.candidates:
            return
        logged = event.candidates[0]
        entry = [event.user_id, event.ts, logged.item_id, logged.bid, logged.item_id == ours_top,
                 logged.item_id == bid_top, False]  # fmt: skip
        self.n["logged"] += 1
        self.n["ours"] += entry[4]
        self.n["bid"] += entry[5]
        self._open[event.request_id] = entry
        self._by_user[event.user_id] = event.request_id
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)

    def click(self, click: Any) -> None:
        rid = click.request_id
        if rid is not None:
            entry = self._open.get(rid)
            if entry is None or click.position not in (None, 0):
                return
        else:
            rid = self._by_user.get(click.user_id)
            entry = self._open.get(rid) if rid is not None else None
            if entry is None or click.ts - entry[1] > self.window_ms:
                return
        if entry[6] or click.item_id != entry[2]:
            return
        entry[6] = True
        self.revenue["logged"] += entry[3]
        if entry[4]:
            self.revenue["ours"] += entry[3]
        if entry[5]:
            self.revenue["bid"] += entry[3]

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for policy in ("ours", "bid", "logged"):
            n = self.n[policy]
            out[f"replay_top_ad_revenue_{policy}"] = self.revenue[policy] / n if n else None
            out[f"replay_top_ad_requests_{policy}"] = n
        return out


def score_against_truth(truth: GroundTruth, run: Any, config: Config, scorer: TruthScorer | None) -> dict[str, Any]:
    """The ``truth`` section of a report: per-learner scores and each drift
    monitor's delays and false alarms against the drifts of the streams its
    learner reads."""
    by_topic = {t: s for s, t in config.input_topics().items()}
    drift: dict[str, Any] = {}
    for learner, name, _ in run.monitors:
        streams = sorted({by_topic[t] for t in learner.reads if t in by_topic})
        kind = getattr(learner, "kind", None)
        dets = run.detections[name]
        score = truth.score_detections([(d["ts"], d["index"]) for d in dets], streams, learner=kind)
        entry = {"streams": streams, "drifts": score.drifts, "false_alarms": score.false_alarms,
                 "detections": score.detections}  # fmt: skip
        if any(d.get("direction") for d in dets):
            worse = [(d["ts"], d["index"]) for d in dets if d.get("direction") == "worse"]
            w = truth.score_detections(worse, streams, learner=kind)
            entry["worse_only"] = {"drifts": w.drifts, "false_alarms": w.false_alarms, "detections": w.detections}
        drift[name] = entry
    return {
        "learners": scorer.results() if scorer is not None else {},
        "drift": drift,
        "drift_points": [
            {"kind": d.kind, "ts": d.ts, "index": d.index, "streams": d.streams, "description": d.description}
            for d in truth.drifts
        ],
        "frauds": len(truth.frauds),
        "orders": truth.orders,
    }
