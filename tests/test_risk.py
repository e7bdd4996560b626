"""The risk learner: fraud patterns learned from late partial labels, anomaly cold start, state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from stream.config import ConfigError, load_config
from stream.events import FraudLabel, Purchase
from stream.learners import LearnerSpec
from stream.learners.risk import NUMERIC, RiskLearner, RiskScore, RiskSpec, as_dict

TOPICS = {"purchases": "purchases", "fraud_labels": "fraud-labels"}
COUNTRIES = ("US", "GB", "DE", "FR")


def build(**kw: Any) -> RiskLearner:
    spec = RiskSpec(**kw)
    spec.validate("risk")
    return spec.build("risk", TOPICS)


def run(learner: RiskLearner, events: list[Any]) -> list[RiskScore]:
    out = []
    for event in events:
        prediction = learner.predict(event)
        learner.learn(event)
        if prediction is not None:
            out.append(prediction)
    return out


def order(i: int, user: str, ts: int, amount: float = 30.0, **kw: Any) -> Purchase:
    fields: dict[str, Any] = {"payment_method": "card", "country": "US", "shipping_country": "US",
                              "account_age_days": 400.0, "device_id": f"d-{user}", "quantity": 1, **kw}  # fmt: skip
    return Purchase(event_id=f"p{i}", ts=ts, order_id=f"o{i}", user_id=user, item_id="i", unit_price=amount, **fields)


def fraud_stream(seed: int, n_orders: int, fraud_rate: float = 0.02) -> tuple[list[Any], set[str]]:
    """Orders every ~20 s of 2,000 regular users and of new customers (3 %), and frauds
    (about ``fraud_rate`` of the orders, in bursts) of two patterns: stolen cards on fresh
    accounts (new device, ships abroad, expensive) and account takeovers (new device,
    gift cards, bulk quantities). 90 % of the frauds get a label 10 min to 2 h later;
    legitimate orders never do."""
    rng = np.random.default_rng(seed)
    n_users = 2_000
    country = rng.integers(0, len(COUNTRIES), n_users)
    age0 = rng.uniform(30, 2_000, n_users)
    usual = np.exp(rng.normal(3.5, 0.6, n_users))
    pay = np.where(rng.random(n_users) < 0.7, "card", "paypal")
    timed: list[tuple[int, int, Any]] = []
    frauds: set[str] = set()
    ts = 0
    i = 0
    while i < n_orders:
        ts += int(rng.exponential(20_000)) + 1
        if rng.random() >= fraud_rate / 2:  # bursts of 2 on average
            u = int(rng.integers(n_users))
            user = f"u{u}"
            device = f"d{u}-new{i}" if rng.random() < 0.03 else f"d{u}-{int(rng.integers(2))}"
            age = float(age0[u] + ts / 86_400_000)
            if rng.random() < 0.03:  # a new customer: a young account on its first device
                user, device, age = f"new{i}", f"d-new{i}", float(rng.uniform(0, 30))
            home = COUNTRIES[country[u]]
            ship = COUNTRIES[int(rng.integers(len(COUNTRIES)))] if rng.random() < 0.02 else home
            amount = float(usual[u] * np.exp(rng.normal(0, 0.3)))
            method = str(pay[u]) if rng.random() < 0.9 else "apple_pay"
            timed.append((ts, i, order(i, user, ts, amount, payment_method=method, country=home, shipping_country=ship,
                                       account_age_days=age, device_id=device,
                                       quantity=int(rng.integers(1, 3)))))  # fmt: skip
            i += 1
            continue
        takeover = rng.random() < 0.4
        burst = int(rng.integers(1, 4))
        u = int(rng.integers(n_users))
        user = f"u{u}" if takeover else f"fresh{i}"
        home = COUNTRIES[country[u]]
        for _ in range(burst):
            t = ts + int(rng.integers(0, 600_000))
            if takeover:
                o = order(i, user, t, float(usual[u] * np.exp(rng.normal(0.5, 0.3))), payment_method="gift_card",
                          country=home, shipping_country=home, account_age_days=float(age0[u]),
                          device_id=f"stolen{i}", quantity=int(rng.integers(3, 7)))  # fmt: skip
            else:
                abroad = COUNTRIES[(country[u] + 1) % len(COUNTRIES)] if rng.random() < 0.8 else home
                amount, age = float(np.exp(rng.normal(5.5, 0.4))), float(rng.uniform(0, 2))
                o = order(
                    i,
                    user,
                    t,
                    amount,
                    payment_method="card",
                    country=home,
                    shipping_country=abroad,
                    account_age_days=age,
                    device_id=f"new{i}",
                )
            timed.append((t, i, o))
            frauds.add(o.order_id)
            if rng.random() < 0.9:
                lt = t + int(rng.integers(600_000, 7_200_000))
                timed.append((lt, i, FraudLabel(event_id=f"l{i}", ts=lt, order_id=o.order_id, is_fraud=True)))
            i += 1
    timed.sort(key=lambda e: (e[0], e[1]))
    return [e for _, _, e in timed], frauds


def auc(labels: list[bool], scores: list[float]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    order_ = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order_]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order_[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def scored() -> tuple[RiskLearner, list[Any], list[RiskScore], set[str]]:
    events, frauds = fraud_stream(seed=1, n_orders=20_000)
    learner = build(label_window_s=3 * 3_600, min_labels=500, min_fraud_labels=10)
    return learner, events, run(learner, events), frauds


def test_risk_beats_a_constant_baseline(scored: tuple[RiskLearner, list[Any], list[RiskScore], set[str]]) -> None:
    learner, _, outputs, frauds = scored
    model = [o for o in outputs if o.source == "model"]
    y = [o.order_id in frauds for o in model]
    assert 0.01 < sum(y) / len(y) < 0.04
    assert auc(y, [o.fraud_probability for o in model]) > 0.9  # a constant scores 0.5
    # The prequential AUC on the labelled outcomes (what the metrics expose) agrees.
    assert learner.evaluation.get("roc_auc", "cumulative") > 0.7
    # Calibrated despite the fraud weight: the mean probability is near the fraud rate.
    mean_p = float(np.mean([o.fraud_probability for o in model]))
    assert 0.5 * (sum(y) / len(y)) < mean_p < 2 * (sum(y) / len(y))
    # Flagged orders are mostly frauds, and most frauds are flagged.
    flagged = [o for o in model if o.decision != "approve"]
    hits = sum(o.order_id in frauds for o in flagged)
    assert hits / len(flagged) > 0.5 and hits / sum(y) > 0.5


def test_anomaly_source_before_enough_labels_then_model(
    scored: tuple[RiskLearner, list[Any], list[RiskScore], set[str]],
) -> None:
    learner, _, outputs, frauds = scored
    sources = [o.source for o in outputs]
    switch = sources.index("model")
    assert switch > 500 and set(sources[:switch]) == {"anomaly"} and set(sources[switch:]) == {"model"}
    assert learner.n_labels >= 500 and learner.n_frauds >= 10 and learner.detector is None
    anomaly = outputs[300:switch]  # past the detector's first window
    # Unsupervised, but frauds still stand out; the probability mean is scaled to the expected rate.
    assert auc([o.order_id in frauds for o in anomaly], [o.fraud_probability for o in anomaly]) > 0.7
    assert np.mean([o.fraud_probability for o in anomaly]) < 0.05


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fraud_profile_ranks_frauds_before_the_model_serves(seed: int) -> None:
    """The cold-start score on its own (the model never serves here): rare feature values, then
    what the labelled frauds look like. It ranks frauds well above River's HalfSpaceTrees."""
    events, frauds = fraud_stream(seed=seed, n_orders=5_000)
    aucs = {}
    for anomaly in ("profile", "half_space_trees"):
        learner = build(label_window_s=3 * 3_600, min_labels=10**9, min_fraud_labels=0, anomaly=anomaly)
        outputs = run(learner, events)
        assert {o.source for o in outputs} == {"anomaly"}
        aucs[anomaly] = auc([o.order_id in frauds for o in outputs], [o.fraud_probability for o in outputs])
    assert aucs["profile"] >= 0.97 and aucs["profile"] > aucs["half_space_trees"], aucs


@pytest.mark.parametrize("anomaly", ["profile", "half_space_trees"])
def test_a_checkpoint_without_the_fraud_profile_loads_with_an_empty_one(anomaly: str) -> None:
    learner = build(anomaly=anomaly)
    state = learner.__dict__.copy()
    del state["profile"]
    # As pickled before the profile: no `anomaly` field, HalfSpaceTrees while the detector lives.
    state["spec"] = msgspec.structs.replace(learner.spec, anomaly="profile")
    restored = RiskLearner.__new__(RiskLearner)
    restored.__setstate__(state)
    assert restored.profile.n_all.sum() == 0
    assert restored.spec.anomaly == anomaly  # the detector goes on scoring where there is one
    restored.learn(order(1, "u1", 0))
    assert restored.predict(order(2, "u2", 1_000)) is not None


def test_decisions_follow_the_thresholds(scored: tuple[RiskLearner, list[Any], list[RiskScore], set[str]]) -> None:
    learner, _, outputs, _ = scored
    spec = learner.spec
    for o in outputs:
        expected = (
            "block" if o.fraud_probability >= spec.block_threshold
            else "review" if o.fraud_probability >= spec.review_threshold else "approve"
        )  # fmt: skip
        assert o.decision == expected
    assert {o.decision for o in outputs} == {"approve", "review", "block"}


def test_labels_are_joined_late_or_legitimate_by_window(
    scored: tuple[RiskLearner, list[Any], list[RiskScore], set[str]],
) -> None:
    learner, events, outputs, _ = scored
    stats = learner.label_stats()
    n_labels = sum(isinstance(e, FraudLabel) for e in events)
    assert stats["received"] == n_labels and stats["joined"] == n_labels  # every label within 2 h < 3 h
    assert stats["expired"] + learner.n_frauds + len(learner.joins) == len(outputs)
    assert stats["evicted"] == 0


def test_a_fraud_label_after_the_window_is_counted_late() -> None:
    learner = build(label_window_s=60)
    run(learner, [order(1, "u", 0), order(2, "u", 120_000)])  # o1 learned legitimate at 60 s
    assert learner.n_learned == 1 and learner.n_frauds == 0
    run(learner, [FraudLabel(event_id="l1", ts=130_000, order_id="o1", is_fraud=True)])
    stats = learner.label_stats()
    assert (stats["late"], stats["unmatched"], learner.n_frauds) == (1, 1, 0)


def test_one_label_answers_every_line_of_the_order() -> None:
    learner = build(label_window_s=600)
    lines = [order(1, "u", 0), msgspec.structs.replace(order(1, "u", 0), event_id="p1b", item_id="j")]
    run(learner, [*lines, FraudLabel(event_id="l", ts=1_000, order_id="o1", is_fraud=True)])
    assert learner.n_frauds == 2 and learner.label_stats()["joined"] == 1


class _Counting:
    """A model without sample weights: frauds are oversampled instead."""

    def __init__(self) -> None:
        self.learned: list[bool] = []

    def learn_one(self, x: dict[str, float], y: bool) -> None:
        self.learned.append(y)

    def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
        return {True: 0.5, False: 0.5}


def test_fraud_weight_is_a_sample_weight_or_oversampling() -> None:
    learner = build(label_window_s=60, fraud_weight=5.0, min_labels=1, min_fraud_labels=1)
    model = _Counting()
    learner.replace_model(model)
    run(learner, [order(1, "u", 0), order(2, "v", 1), FraudLabel(event_id="l", ts=10, order_id="o1", is_fraud=True)])
    run(learner, [order(3, "w", 100_000)])
    assert model.learned == [True] * 5 + [False]
    # Weighted odds are divided back out: a 50 % model output is a 1/6 probability.
    assert run(learner, [order(4, "x", 100_001)])[0].fraud_probability == pytest.approx(0.5 / (0.5 + 5 * 0.5))


def test_user_features_from_history() -> None:
    learner = build()
    history = [order(1, "u", 0, 20.0), order(2, "u", 1_800_000, 20.0), order(3, "u", 7_200_000, 20.0)]
    run(learner, history)
    probe = order(4, "u", 7_300_000, 20.0 * math.e, device_id="another")
    nums, payment, _ = learner._features(probe)
    values = dict(zip(NUMERIC, nums, strict=True))
    assert values["purchases_1h"] == pytest.approx(math.log1p(1))  # only the one at 2 h is within the hour
    assert values["purchases_1d"] == pytest.approx(math.log1p(3))
    assert values["amount_vs_usual"] == pytest.approx(1.0)
    assert values["new_device"] == 1.0 and values["first_purchase"] == 0.0 and values["ships_abroad"] == 0.0
    assert payment == "card" and values["payment_rarity"] == pytest.approx(0.0)  # every order so far paid by card
    assert all(0.0 <= v <= 1.0 for v in as_dict((nums, payment, None)).values())


def test_lines_of_one_order_are_not_a_burst() -> None:
    learner = build()
    first = order(1, "u", 0)
    second_line = msgspec.structs.replace(first, event_id="p1b", item_id="j")
    run(learner, [first])
    assert learner._features(second_line) == learner._features(first)  # still the user's first purchase
    run(learner, [second_line, order(2, "u", 60_000, device_id="new")])
    line = msgspec.structs.replace(order(2, "u", 60_000, device_id="new"), event_id="p2b", item_id="j")
    values = dict(zip(NUMERIC, learner._features(line)[0], strict=True))
    # The second line of order 2 sees the history before order 2: one order in the hour, a new device.
    assert values["purchases_1h"] == pytest.approx(math.log1p(1)) and values["new_device"] == 1.0
    nums, _, _ = learner._features(order(3, "u", 120_000))
    assert dict(zip(NUMERIC, nums, strict=True))["purchases_1h"] == pytest.approx(math.log1p(2))


def test_user_state_is_bounded() -> None:
    learner = build(max_users=10)
    run(learner, [order(i, f"u{i}", i) for i in range(50)])
    assert len(learner._users) == 10


def test_unknown_spec_key_and_bad_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `fraud_wieght`"):
        msgspec.convert({"kind": "risk", "fraud_wieght": 3}, LearnerSpec)
    path = tmp_path / "c.toml"
    for toml, message in [
        ("review_threshold = 0.9\nblock_threshold = 0.5", "review_threshold"),
        ("fraud_weight = 0.5", r"fraud_weight"),
        ("min_labels = 5\nmin_fraud_labels = 10", "min_fraud_labels"),
        ('model = { class = "anomaly.HalfSpaceTrees" }', "model: .*classifier"),
    ]:
        path.write_text(f'[learners.fraud]\nkind = "risk"\n{toml}\n')
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_default_config_builds_a_risk_learner() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.toml")
    spec = config.learners["risk"]
    assert isinstance(spec, RiskSpec)
    learner = spec.build("risk", config.input_topics())
    assert learner.reads == {"purchases", "fraud-labels"} and learner.output_topic == "risk-scores"
