"""An identity flood (every user, item, order, device and category new) leaves every
per-key structure within its bound: the learners' bounded maps and label joins,
and the River models' tables keyed by user, item or data-named feature. Counts,
not RSS (the RSS timeline is bench/run.py's ``flood`` section)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from river import linear_model, optim, preprocessing

from stream.bounded import FeatureBound, forget_feature, model_table_sizes
from stream.config import parse_config
from stream.drift import AdaptiveModel, DriftSpec
from stream.learners import build_learner
from stream.learners.configured import ConfiguredLearner
from stream.learners.pricing import PricingLearner
from stream.learners.recommendation import RecommendationLearner
from stream.learners.risk import RiskLearner
from stream.pipeline import Pipeline
from stream.recording import RecordedMessage

TOPICS = {"clicks": "clicks", "purchases": "purchases", "prices": "prices", "fraud_labels": "fraud-labels"}
T0 = 1_700_000_000_000

#: Small bounds, so a few thousand events pass each of them many times.
BOUNDS: dict[str, dict[str, Any]] = {
    "recommendation": {"max_users": 50, "max_items": 30, "max_categories": 10, "negative_pool": 100},
    "pricing": {"max_items": 20, "max_pending": 40, "max_categories": 10, "min_outcomes": 0},
    "risk": {"max_users": 50, "max_pending": 40, "max_one_hot": 10, "min_labels": 5, "min_fraud_labels": 1},
    "basket_size": {"max_one_hot": 10},
}


def config(**overrides: dict[str, Any]) -> Any:
    learners: dict[str, dict[str, Any]] = {
        "recommendation": {"kind": "recommendation", "k": 3, "popular_candidates": 5, "candidates": 20},
        "pricing": {"kind": "pricing", "label_window_s": 60, "negative_sampling": 1.0},
        "risk": {"kind": "risk", "label_window_s": 120},
        "basket_size": {
            "kind": "custom",
            "input": "purchases",
            "output_topic": "basket-size",
            "label": "quantity",
            "task": "regression",
            "features": ["unit_price", "category", "payment_method", "device_id", "account_age_days"],
            "model": [
                {"class": "preprocessing.StandardScaler"},
                {"class": "linear_model.LinearRegression", "params": {"optimizer": {"class": "optim.AdaGrad"}}},
            ],
        },
    }
    for name, spec in learners.items():
        spec.update(BOUNDS[name])
        spec.update(overrides.get(name, {}))
    return parse_config({"learners": learners})


def flood(n: int, start: int = 0) -> Iterator[RecordedMessage]:
    """Every user (two events each), item, order, device and category new; a price every
    10 events, a purchase every 5 (bought just after its click), a fraud label every 50."""
    orders: list[str] = []
    for i in range(start, start + n):
        ts = T0 + i * 1_000
        user, item, cat = f"u{i // 2}", f"i{i}", f"c{i // 3}"
        if i % 10 == 0:
            topic = "prices"
            doc: dict[str, Any] = {"event_id": f"r{i}", "ts": ts, "item_id": item, "price": 10.0 + i % 7,
                                   "cost": 6.0, "stock": i % 4, "category": cat}  # fmt: skip
        elif i % 10 == 5:
            topic = "purchases"
            orders.append(f"o{i}")
            doc = {"event_id": f"p{i}", "ts": ts, "order_id": f"o{i}", "user_id": f"u{(i - 1) // 2}",
                   "item_id": f"i{i - 1}", "quantity": 1 + i % 3, "unit_price": 10.0 + i % 7, "category": cat,
                   "payment_method": f"pm{i // 20}", "country": "US", "shipping_country": "US",
                   "account_age_days": float(i % 300), "device_id": f"d{i}"}  # fmt: skip
        elif i % 50 == 7 and orders:
            topic = "fraud-labels"
            doc = {"event_id": f"l{i}", "ts": ts, "order_id": orders[-1], "is_fraud": True}
        else:
            topic = "clicks"
            doc = {"event_id": f"c{i}", "ts": ts, "user_id": user, "item_id": item, "category": cat,
                   "price": 10.0 + i % 7}  # fmt: skip
        yield RecordedMessage(topic, 0, i, (1, ts), None, json.dumps(doc).encode())


class Discard:
    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        pass


def run(n: int, cfg: Any = None, start: int = 0, learners: list[Any] | None = None) -> list[Any]:
    cfg = cfg if cfg is not None else config()
    learners = (
        learners if learners is not None else [build_learner(name, s, TOPICS) for name, s in cfg.learners.items()]
    )
    pipeline = Pipeline(learners, Discard(), contract_topics=TOPICS, dead_letter_topic="dead")
    dead = []
    pipeline.dead_letter = lambda record, stage, error, learner=None: dead.append((stage, error))  # type: ignore[method-assign]
    for m in flood(n, start):
        pipeline.process(m)
    assert dead == []
    return learners


def by_kind(learners: list[Any]) -> dict[str, Any]:
    return {type(lr).__name__: lr for lr in learners}


@pytest.fixture(scope="module")
def flooded() -> dict[str, Any]:
    return by_kind(run(3_000))


def test_recommendation_state_and_latents_stay_within_max_users_and_max_items(flooded: dict[str, Any]) -> None:
    reco: RecommendationLearner = flooded["RecommendationLearner"]
    sizes = reco.state_sizes()
    assert reco._users.evicted_capacity > 1_000 and reco._items.evicted_capacity > 2_000  # passed many times
    assert sizes["users"] <= 50 and sizes["model_users"] <= 50
    assert sizes["items"] <= 30 and sizes["item_rows"] <= 30 and sizes["model_items"] <= 30
    assert sizes["categories"] <= 10 and sizes["category_tops"] <= 10
    assert sizes["negative_pool"] <= 100
    model = reco.model
    assert set(model.u_latents) <= set(reco._users) and set(model.i_latents) <= set(reco._items)


def test_pricing_items_views_and_category_weights_stay_bounded(flooded: dict[str, Any]) -> None:
    pricing: PricingLearner = flooded["PricingLearner"]
    sizes = pricing.state_sizes()
    assert sizes["items"] <= 20 and sizes["pending"] <= 40 and sizes["categories"] <= 10
    assert len(pricing.joins._by_key) <= 40 and len(pricing.joins._closed) <= 10_000
    assert pricing.n_learned > 200 and pricing._categories.evicted > 100
    # price_vs_ref, price_vs_competitor, time_sin, time_cos, stock, out_of_stock + 2 per category.
    tables = model_table_sizes(pricing.model)
    assert tables["_weights"] <= 6 + 2 * 10 and tables["optimizer.g2"] <= 6 + 2 * 10, tables
    names = set(pricing.model._weights.keys())
    categories = {n[4:] for n in names if n.startswith("cat=")}
    assert categories <= set(pricing._categories._names)


def test_risk_users_orders_and_one_hot_weights_stay_bounded(flooded: dict[str, Any]) -> None:
    risk: RiskLearner = flooded["RiskLearner"]
    sizes = risk.state_sizes()
    assert sizes["users"] <= 50 and sizes["pending"] <= 40 and sizes["payments"] <= 64
    assert len(risk.joins._by_key) <= 40 and len(risk.joins._closed) <= 40
    assert risk.n_learned > 200 and risk.source == "model"
    # 11 numeric features + at most 10 one-hot (cat=..., pay=...).
    assert sizes["one_hot"] <= 10 and sizes["model_table"] <= 11 + 10, model_table_sizes(risk.model)
    assert 0 < sizes["profile_values"] <= risk.profile.max_values


def test_configured_learner_one_hot_state_stays_bounded_through_the_scaler(flooded: dict[str, Any]) -> None:
    basket: ConfiguredLearner = flooded["ConfiguredLearner"]
    tables = model_table_sizes(basket.model)
    assert basket.n_learned >= 250
    assert basket.state_sizes()["features"] <= 10
    # unit_price, account_age_days + at most 10 one-hot, in every table (scaler stats, weights, AdaGrad).
    assert tables and max(tables.values()) <= 2 + 10, tables


def test_checkpoint_size_levels_off_once_the_bounds_are_passed() -> None:
    cfg = config(
        recommendation={"evaluation_window": 100},
        pricing={"evaluation_window": 100},
        risk={"evaluation_window": 100, "anomaly_reference": 100},
        basket_size={"evaluation_window": 100},
    )
    learners = run(4_000, cfg)  # every bound passed, the windows (event time, outcomes) full
    first = len(pickle.dumps(learners))
    run(6_000, cfg, start=4_000, learners=learners)
    second = len(pickle.dumps(learners))
    assert second < 1.05 * first, (first, second)


def test_within_the_bounds_predictions_are_unchanged() -> None:
    """A stream that never passes ``max_categories``/``max_one_hot`` gives the same
    predictions with tight bounds as with the defaults (nothing is evicted)."""
    tight = config(pricing={"max_categories": 400}, risk={"max_one_hot": 800}, basket_size={"max_one_hot": 2_000})
    loose = config(
        pricing={"max_categories": 10_000}, risk={"max_one_hot": 10_000}, basket_size={"max_one_hot": 10_000}
    )
    outputs = []
    for cfg in (tight, loose):
        learners = [build_learner(name, s, TOPICS) for name, s in cfg.learners.items() if name != "recommendation"]
        out: list[Any] = []
        pipeline = Pipeline(learners, Discard(), contract_topics=TOPICS, dead_letter_topic="dead")
        for m in flood(1_000):
            event = pipeline.routes[m.topic()].decode(m.value())  # type: ignore[index]
            for lr in pipeline.routes[m.topic()].learners:  # type: ignore[index]
                out.append(lr.predict(event))
                lr.learn(event)
        outputs.append(out)
        assert all(lr.state_sizes().get("categories", 0) < 400 for lr in learners)
    assert outputs[0] == outputs[1]


def test_forget_feature_reaches_scalers_optimizers_and_adaptive_models() -> None:
    model = AdaptiveModel(
        preprocessing.StandardScaler() | linear_model.LogisticRegression(optim.Adam()),
        DriftSpec(reaction="switch"),
        task="binary",
    )
    model.learn_one({"x": 1.0, "cat=a": 1.0}, True)
    model.candidate = model.current.clone()
    model.candidate.learn_one({"cat=a": 1.0}, False)
    assert forget_feature(model, "cat=a") == 2 * (3 + 1 + 2)  # scaler 3, weight 1, Adam m and v
    for m in (model.current, model.candidate):
        assert "cat=a" not in m["LogisticRegression"].weights and "cat=a" not in m["StandardScaler"].means
        assert "x" in m["StandardScaler"].means or m is model.candidate


def test_feature_bound_evicts_least_recently_used_and_survives_pickling() -> None:
    holder = _Holder()
    holder.model.learn_one({"a": 1.0, "b": 1.0, "c": 1.0}, 1.0)
    for name in ("a", "b", "a", "c"):  # b is the least recently used when c comes
        holder.bound.touch(name)
    assert set(holder.model.weights) == {"a", "c"} and holder.bound.evicted == 1
    copy = pickle.loads(pickle.dumps(holder))
    copy.bound.touch("d")
    assert set(copy.model.weights) == {"c"}


class _Holder:
    def __init__(self) -> None:
        self.model = linear_model.LinearRegression()
        self.bound = FeatureBound(2, self.serving)

    def serving(self) -> Any:
        return self.model
