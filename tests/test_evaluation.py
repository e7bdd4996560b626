"""The O(1) evaluation against River's metrics and the exact ROC AUC, and checkpoints pickled
with River metric objects (before the O(1) evaluation) still loading.

Means (MAE, RMSE, log loss, cross-entropy, accuracy, rates) must equal River's, cumulative and
under ``utils.Rolling``, to float rounding (1e-9). ROC AUC is bucketed on log-odds: it must
stay within half the share of positive-negative pairs that share a bucket without being tied
of the exact (Mann-Whitney) AUC, which on continuous scores is below 1e-3.
"""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import metrics, utils

from stream.checkpoint import decode
from stream.evaluation import Evaluation, bucket

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EPS = 1e-15

probabilities = st.one_of(
    st.floats(0.0, 1.0),
    st.sampled_from([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9, 0.3, 0.7]),  # ties and the clipped ends
)
outcomes = st.lists(st.tuples(st.booleans(), probabilities), min_size=1, max_size=150)
windows = st.integers(1, 40)


def clip(p: float) -> float:
    return min(max(p, EPS), 1 - EPS)


def exact_auc(pairs: list[tuple[bool, float]]) -> tuple[float, float]:
    """The exact AUC (ties count half) and the most a bucketed AUC may differ from it."""
    pos = [p for y, p in pairs if y]
    neg = [p for y, p in pairs if not y]
    if not pos or not neg:
        return math.nan, 0.0
    ordered = shared = 0.0
    for a in pos:
        for b in neg:
            ordered += 1.0 if a > b else 0.5 if a == b else 0.0
            shared += a != b and bucket(a) == bucket(b)
    return ordered / (len(pos) * len(neg)), 0.5 * shared / (len(pos) * len(neg))


def assert_close(ours: float, river: float) -> None:
    assert ours == pytest.approx(river, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- against River


@settings(max_examples=150, deadline=None)
@given(outcomes, windows)
def test_binary_means_equal_rivers(data: list[tuple[bool, float]], window: int) -> None:
    ev = Evaluation.for_binary(window)
    river = {
        "log_loss": (metrics.LogLoss(), utils.Rolling(metrics.LogLoss, window_size=window)),
        "accuracy": (metrics.Accuracy(), utils.Rolling(metrics.Accuracy, window_size=window)),
    }
    for i, (y, p) in enumerate(data):
        ev.binary(y, p, ts=i)
        for name, (cumulative, rolling) in river.items():
            y_pred = clip(p) if name == "log_loss" else clip(p) >= 0.5
            cumulative.update(y, y_pred)
            rolling.update(y, y_pred)
    for name, (cumulative, rolling) in river.items():
        assert_close(ev.get(name, "cumulative"), cumulative.get())
        assert_close(ev.get(name, "rolling"), rolling.get())
    recent = data[-window:]
    assert_close(ev.get("predicted_rate", "rolling"), sum(clip(p) for _, p in recent) / len(recent))
    assert_close(ev.get("observed_rate", "cumulative"), sum(y for y, _ in data) / len(data))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=150), windows)
def test_regression_equals_rivers(data: list[tuple[float, float]], window: int) -> None:
    ev = Evaluation.for_regression(window)
    river = {
        "mae": (metrics.MAE(), utils.Rolling(metrics.MAE, window_size=window)),
        "rmse": (metrics.RMSE(), utils.Rolling(metrics.RMSE, window_size=window)),
    }
    for i, (y, p) in enumerate(data):
        ev.regression(y, p, ts=i)
        for cumulative, rolling in river.values():
            cumulative.update(y, p)
            rolling.update(y, p)
    for name, (cumulative, rolling) in river.items():
        # River's rolling mean reverts values out of a Welford mean: its rounding error grows with
        # the spread of the errors; ours recomputes the window's sum once per window (fsum).
        assert ev.get(name, "cumulative") == pytest.approx(cumulative.get(), rel=1e-9, abs=1e-6)
        assert ev.get(name, "rolling") == pytest.approx(rolling.get(), rel=1e-6, abs=1e-3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3)),
                min_size=1, max_size=100), windows)  # fmt: skip
def test_multiclass_equals_rivers(data: list[tuple[str, list[float]]], window: int) -> None:
    ev = Evaluation.for_multiclass(window)
    river = {
        "accuracy": (metrics.Accuracy(), utils.Rolling(metrics.Accuracy, window_size=window)),
        "log_loss": (metrics.CrossEntropy(), utils.Rolling(metrics.CrossEntropy, window_size=window)),
    }
    for i, (y, weights) in enumerate(data):
        proba = {c: w / sum(weights) for c, w in zip("abc", weights, strict=True)}
        ev.multiclass(y, proba, ts=i)
        predicted = max(proba, key=proba.__getitem__)
        for name, (cumulative, rolling) in river.items():
            cumulative.update(y, predicted if name == "accuracy" else proba)
            rolling.update(y, predicted if name == "accuracy" else proba)
    for name, (cumulative, rolling) in river.items():
        assert_close(ev.get(name, "cumulative"), cumulative.get())
        assert ev.get(name, "rolling") == pytest.approx(rolling.get(), rel=1e-9, abs=1e-9)


def test_a_class_without_probability_costs_the_clipped_log_loss() -> None:
    ev = Evaluation.for_multiclass(10)
    ev.multiclass("d", {"a": 0.5, "b": 0.5}, ts=0)
    assert ev.get("log_loss", "cumulative") == pytest.approx(-math.log(EPS))
    assert ev.get("accuracy", "cumulative") == 0.0


def test_means_are_cumulative_and_over_the_window() -> None:
    ev = Evaluation.for_means(3, ("hit_rate",))
    for v in (1.0, 0.0, 1.0, 1.0, 1.0):
        ev.score("hit_rate", v)
    assert ev.get("hit_rate", "cumulative") == 0.8 and ev.get("hit_rate", "rolling") == 1.0
    assert [(n, w) for n, w, _ in ev.values()] == [("hit_rate", "cumulative"), ("hit_rate", "rolling")]


# --------------------------------------------------------------------------- ROC AUC


@settings(max_examples=200, deadline=None)
@given(outcomes, windows)
def test_bucketed_auc_is_within_its_bound_of_the_exact_auc(data: list[tuple[bool, float]], window: int) -> None:
    ev = Evaluation.for_binary(window)
    for i, (y, p) in enumerate(data):
        ev.binary(y, p, ts=i)
    clipped = [(y, clip(p)) for y, p in data]
    for name, pairs in (("cumulative", clipped), ("rolling", clipped[-window:])):
        exact, bound = exact_auc(pairs)
        ours = ev.get("roc_auc", name)
        if math.isnan(exact):
            assert math.isnan(ours)
        else:
            assert abs(ours - exact) <= bound + 1e-12, (name, ours, exact, bound)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate", [0.5, 0.01])
def test_bucketed_auc_on_continuous_scores_is_within_1e3(seed: int, rate: float) -> None:
    """Scores of a model that separates the classes somewhat, balanced and rare positives
    (p near 0.01): the bucketed AUC is within 0.001 of the exact one, where River's
    10-threshold ``ROCAUC`` is further off."""
    rng = random.Random(seed)
    data = []
    for _ in range(3000):
        y = rng.random() < rate
        logit = math.log(rate / (1 - rate)) + rng.gauss(1.0 if y else 0.0, 1.0)
        data.append((y, 1 / (1 + math.exp(-logit))))
    ev = Evaluation.for_binary(1000)
    river = metrics.ROCAUC()
    for i, (y, p) in enumerate(data):
        ev.binary(y, p, ts=i)
        river.update(y, {True: p, False: 1 - p})
    exact, _ = exact_auc(data)
    assert abs(ev.get("roc_auc", "cumulative") - exact) < 1e-3
    assert abs(ev.get("roc_auc", "rolling") - exact_auc(data[-1000:])[0]) < 1e-3
    assert abs(ev.get("roc_auc", "cumulative") - exact) <= abs(river.get() - exact)


def test_buckets_are_ordered_by_probability() -> None:
    ps = sorted({random.Random(3).random() for _ in range(2000)} | {EPS, 1 - EPS, 0.5})
    buckets = [bucket(p) for p in ps]
    assert buckets == sorted(buckets)


def test_a_nan_probability_counts_as_uninformative() -> None:
    ev = Evaluation.for_binary(10)
    ev.binary(True, math.nan, ts=0)
    assert ev.get("log_loss", "cumulative") == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- old checkpoints


def _fixture_outcomes() -> tuple[list[tuple[bool, float]], list[float]]:
    """The binary outcomes and the hit-rate scores the fixture was fed (its generator's draws, in order)."""
    rng = random.Random(17)
    binary, hits = [], []
    for _ in range(130):
        y = rng.random() < 0.3
        p = min(max(rng.betavariate(2, 5) + (0.25 if y else 0.0), 0.0), 1.0)
        binary.append((y, clip(p)))
        rng.gauss(3, 1), rng.gauss(0, 0.5), rng.choice("abc")
        [rng.random() for _ in "abc"]
        hits.append(float(rng.random() < 0.2))
        rng.gauss(0, 1)
    return binary, hits


def test_evaluations_pickled_with_river_metrics_load_and_carry_on() -> None:
    """``evaluation-river-metrics.pickle``: four evaluations (binary held in prediction order,
    regression, multiclass, means; window 50, 130 outcomes) pickled by the evaluation as it
    was at f632b1c (River metric objects under ``utils.Rolling``); the JSON holds their
    ``values()`` then. Every mean and its window carry over exactly, the cumulative AUC too
    (River's trapezoids over its 10 thresholds); the rolling AUC is counted again, exactly."""
    evaluations = pickle.loads((FIXTURES / "evaluation-river-metrics.pickle").read_bytes())
    before = json.loads((FIXTURES / "evaluation-river-metrics.json").read_text())
    for kind, ev in evaluations.items():
        for (name, window, value), (name0, window0, value0) in zip(ev.values(), before[kind], strict=True):
            assert (name, window) == (name0, window0)
            if (name, window) != ("roc_auc", "rolling"):
                assert value == pytest.approx(value0, rel=1e-9), (kind, name, window)
    data, hits = _fixture_outcomes()
    binary = evaluations["binary"]
    exact, bound = exact_auc(data[-50:])
    assert abs(binary.get("roc_auc", "rolling") - exact) <= bound + 1e-12
    assert binary._hold_ms == 600 and binary.n_evaluated == 130

    # It carries on: 20 more outcomes push the 20 oldest out of the windows (50).
    more = [(i % 3 == 0, 0.1 + 0.8 * ((i * 37) % 100) / 100) for i in range(20)]
    for i, (y, p) in enumerate(more):
        binary.binary(y, p, ts=2000 + i)
    window = [*data, *more][-50:]
    assert binary.get("accuracy", "rolling") == pytest.approx(sum((p >= 0.5) == y for y, p in window) / 50)
    assert binary.get("predicted_rate", "rolling") == pytest.approx(sum(p for _, p in window) / 50)
    exact, bound = exact_auc(window)
    assert abs(binary.get("roc_auc", "rolling") - exact) <= bound + 1e-12
    assert binary.get("observed_rate", "cumulative") == pytest.approx(sum(y for y, _ in [*data, *more]) / 150)
    means = evaluations["means"]
    for _ in range(20):
        means.score("hit_rate", 1.0)
    assert means.get("hit_rate", "rolling") == pytest.approx((sum(hits[-30:]) + 20) / 50)
    assert pickle.loads(pickle.dumps(binary)).get("roc_auc", "cumulative") == binary.get("roc_auc", "cumulative")


def test_golden_checkpoint_learners_evaluate_after_loading() -> None:
    """The golden checkpoint (config-defined learners pickled with the River-metric evaluation)
    loads into the O(1) evaluation, which then scores outcomes."""
    path = next(FIXTURES.glob("golden-river-*.ckpt"))
    reg, clf = decode(path.name, path.read_bytes()).learners
    for i in range(20):
        event = {"x1": i / 20, "x2": 0.5, "y": 3 * i / 20 - 1.0}
        reg.predict(event)
        reg.learn(event)
        labelled = {**event, "y": event["y"] > 0.5}
        clf.predict(labelled)
        clf.learn(labelled)
    assert reg.evaluation.n_evaluated == clf.evaluation.n_evaluated == 20
    assert reg.evaluation.get("mae", "cumulative") > 0.0
    assert 0.0 <= clf.evaluation.get("roc_auc", "rolling") <= 1.0
