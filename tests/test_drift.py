"""Concept drift detection, the switch-to-a-candidate reaction, and data-drift scores.

The reaction is tested on a stream with an abrupt concept change: the same
model with ``reaction = "switch"`` must switch once, after the change, and
recover its accuracy much faster than with ``reaction = "report"``.
"""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from river import linear_model, naive_bayes, preprocessing

from stream.config import ConfigError, parse_config
from stream.drift import AdaptiveModel, BlockCusum, ConceptDrift, DriftSpec, cusum_arl, cusum_threshold, ks, psi
from stream.evaluation import Evaluation
from stream.learners import build_learner

CHANGE = 2000
N = 5000


def concept_stream(n: int = N, change: int = CHANGE, seed: int = 7) -> Iterator[tuple[int, dict[str, float], bool]]:
    """Two features uniform in [-1, 1]; the label is ``a + b > 0`` and, from
    ``change`` on, ``a - b > 0`` (an abrupt concept change); 5 % label noise."""
    rng = random.Random(seed)
    for i in range(n):
        x = {"a": rng.uniform(-1, 1), "b": rng.uniform(-1, 1)}
        s = x["a"] + x["b"] if i < change else x["a"] - x["b"]
        y = (s > 0) != (rng.random() < 0.05)
        yield i, x, y


def run_binary(model_factory: Any, reaction: str, **spec: Any) -> tuple[Any, Any, list[bool]]:
    """Test-then-train the model on the concept stream, the way a learner does:
    predict, report the error to the Evaluation (which feeds the monitor), learn."""
    model, monitor = DriftSpec(reaction=reaction, **spec).build(model_factory(), task="binary", name="t")  # type: ignore[arg-type]
    evaluation = Evaluation.for_binary(window=500, drift=monitor)
    hits = []
    for i, x, y in concept_stream():
        proba = model.predict_proba_one(x)
        p = proba.get(True, 0.5) if proba else 0.5
        evaluation.binary(y, p, ts=i)
        hits.append((p >= 0.5) == y)
        model.learn_one(x, y)
    return model, monitor, hits


def accuracy(hits: list[bool], start: int, end: int) -> float:
    return sum(hits[start:end]) / (end - start)


# -- ConceptDrift -----------------------------------------------------------------


def test_concept_drift_detects_an_abrupt_rise_of_the_error_as_worse() -> None:
    monitor = ConceptDrift("adwin")
    detected_at = [i for i in range(4000) if monitor.update(0.1 if i < 2000 else 0.6, ts=1000 * i)]
    assert detected_at and all(i >= 2000 for i in detected_at)
    assert detected_at[0] < 2100, "ADWIN should see a 0.1 -> 0.6 jump within 100 outcomes"
    assert monitor.detections == len(detected_at) == monitor.worse + monitor.better
    assert monitor.worse >= 1 and monitor.last_direction == "worse"
    assert monitor.last_detection_ts == 1000 * detected_at[-1]


def test_concept_drift_on_a_stationary_stream_stays_quiet() -> None:
    rng = random.Random(1)
    monitor = ConceptDrift("adwin")
    for i in range(5000):
        monitor.update(float(rng.random() < 0.2), ts=i)
    assert monitor.worse == 0


@pytest.mark.parametrize("kind", ["page_hinkley", "kswin"])
def test_other_detectors(kind: str) -> None:
    params: dict[str, Any] = {"seed": 1} if kind == "kswin" else {}
    monitor = ConceptDrift(kind, **params)  # type: ignore[arg-type]
    for i in range(3000):
        monitor.update(0.1 if i < 1500 else 0.9, ts=i)
    assert monitor.worse >= 1 and monitor.last_detection_ts is not None and monitor.last_detection_ts >= 1500


def test_unknown_detector() -> None:
    with pytest.raises(ValueError, match="unknown drift detector"):
        ConceptDrift("ddm")  # type: ignore[arg-type]


# -- DriftSpec and config ------------------------------------------------------------


def custom(drift: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "custom",
        "input": "events",
        "output_topic": "out",
        "label": "y",
        "task": "binary",
        "features": ["a", "b"],
        "model": {"class": "naive_bayes.GaussianNB"},
    }
    if drift is not None:
        spec["drift"] = drift
    return spec


def test_drift_config_is_part_of_a_learner_spec() -> None:
    config = parse_config(
        {
            "learners": {
                "clf": custom(
                    {"detector": "adwin", "reaction": "switch", "params": {"delta": 0.01}, "min_samples": 100}
                )
            }
        }
    )
    spec = config.learners["clf"].drift
    assert spec is not None and spec.reaction == "switch" and spec.params == {"delta": 0.01} and spec.min_samples == 100
    learner: Any = build_learner("clf", config.learners["clf"], config.input_topics())
    assert isinstance(learner.model, AdaptiveModel)
    assert learner.evaluation.drift is learner.model


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        ({"detector": "nope"}, "Invalid enum value .nope."),
        ({"reaction": "retrain"}, "Invalid enum value .retrain."),
        ({"params": {"alpha": 1}}, "drift.params"),
        ({"min_samples": 500, "max_trial": 100}, "min_samples"),
        ({"window": 0}, "Expected `int` >= 1"),
        ({"reactions": "switch"}, "unknown field"),
        ({"detector": "block_cusum", "params": {"blocks": 100}}, "drift.params"),
        ({"detector": "block_cusum", "params": {"block": 1000, "arl": 1500}}, "arl"),
    ],
)
def test_bad_drift_config_is_reported_with_its_path(drift: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({"learners": {"clf": custom(drift)}})
    assert "learners.clf" in str(info.value)


def test_report_only_leaves_the_model_unwrapped() -> None:
    model = linear_model.LogisticRegression()
    served, monitor = DriftSpec().build(model, task="binary")
    assert served is model and isinstance(monitor, ConceptDrift)


# -- AdaptiveModel: the reaction ---------------------------------------------------------


def test_switch_recovers_faster_than_report_after_an_abrupt_change() -> None:
    _plain, plain_monitor, plain_hits = run_binary(naive_bayes.GaussianNB, "report")
    adaptive, monitor, hits = run_binary(naive_bayes.GaussianNB, "switch")

    # Both learned the first concept equally well: the wrapper changes nothing before a drift.
    assert accuracy(hits, 1000, CHANGE) == accuracy(plain_hits, 1000, CHANGE) > 0.85
    # The change was detected, in the right direction, soon after it happened.
    assert plain_monitor.worse >= 1 and monitor.worse >= 1
    # Exactly one switch, started by a drift after the change, with a better rolling error.
    assert adaptive.switches == 1 and adaptive.rollbacks == 0
    switch = adaptive.history[0]
    assert switch.reason == "drift" and switch.drift_ts is not None and CHANGE <= switch.drift_ts < CHANGE + 300
    assert switch.after < switch.before
    assert adaptive.fallback is not None and adaptive.current is not adaptive.fallback
    # Recovery: GaussianNB never forgets, so without the switch it stays confused for long.
    after = (CHANGE + 500, CHANGE + 1500)
    assert accuracy(hits, *after) > 0.85
    assert accuracy(hits, *after) - accuracy(plain_hits, *after) > 0.15


def test_switch_on_a_block_cusum_detection_recovers_faster_than_report() -> None:
    spec: dict[str, Any] = {"detector": "block_cusum", "params": {"block": 20, "arl": 100_000}}
    _, plain_monitor, plain_hits = run_binary(naive_bayes.GaussianNB, "report", **spec)
    adaptive, _, hits = run_binary(naive_bayes.GaussianNB, "switch", **spec)
    assert plain_monitor.detections >= 1 and plain_monitor.last_detection_ts >= CHANGE
    assert adaptive.switches == 1 and CHANGE <= adaptive.history[0].drift_ts < CHANGE + 300
    after = (CHANGE + 500, CHANGE + 1500)
    assert accuracy(hits, *after) - accuracy(plain_hits, *after) > 0.15


def test_switch_is_harmless_on_a_model_that_adapts_by_itself() -> None:
    def factory() -> Any:
        return preprocessing.StandardScaler() | linear_model.LogisticRegression()

    _, _, plain_hits = run_binary(factory, "report")
    adaptive, _, hits = run_binary(factory, "switch")
    assert adaptive.switches <= 1
    assert accuracy(hits, CHANGE + 500, N) >= accuracy(plain_hits, CHANGE + 500, N) - 0.02


def test_no_switch_and_no_candidate_without_a_drift() -> None:
    rng = random.Random(3)
    model = AdaptiveModel(naive_bayes.GaussianNB(), DriftSpec(reaction="switch"), task="binary")
    evaluation = Evaluation.for_binary(window=500, drift=model)
    for i in range(4000):
        x = {"a": rng.uniform(-1, 1)}
        y = (x["a"] > 0) != (rng.random() < 0.05)
        proba = model.predict_proba_one(x)
        evaluation.binary(y, proba.get(True, 0.5) if proba else 0.5, ts=i)
        model.learn_one(x, y)
    assert model.worse == 0 and model.trials == 0 and model.switches == 0


def test_a_candidate_that_does_not_win_is_dropped() -> None:
    model = AdaptiveModel(
        linear_model.LinearRegression(),
        DriftSpec(reaction="switch", min_samples=10, max_trial=50),
        task="regression",
        error=lambda m, x, y: 1.0,
    )  # the candidate never looks better
    model._start_trial(ts=5)
    assert model.in_trial
    for i in range(60):
        model.update(0.5, ts=i)
        model.learn_one({"x": 1.0}, 2.0)
    assert not model.in_trial and model.abandoned == 1 and model.switches == 0


def test_rollback_serves_the_fallback_again_and_is_counted() -> None:
    switched: list[Any] = []
    model = AdaptiveModel(
        linear_model.LinearRegression(),
        DriftSpec(reaction="switch", min_samples=5),
        task="regression",
        on_switch=switched.append,
    )
    assert model.rollback() is False
    original = model.current
    model._start_trial(ts=1)
    model._switch("drift", before=2.0, after=1.0, trial=5)
    assert model.current is not original and model.fallback is original
    assert model.rollback() is True
    assert model.current is original and model.switches == 2 and model.rollbacks == 1
    assert [s.reason for s in switched] == ["drift", "rollback"]


def test_switch_is_logged_with_the_metric_before_and_after(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="stream.drift")
    adaptive, _, _ = run_binary(naive_bayes.GaussianNB, "switch")
    records = [r for r in caplog.records if r.getMessage() == "model switched"]
    assert len(records) == adaptive.switches == 1
    record: Any = records[0]
    assert record.learner == "t" and record.reason == "drift" and record.after < record.before


def test_adaptive_model_pickles_mid_trial_like_a_checkpoint() -> None:
    model = AdaptiveModel(naive_bayes.GaussianNB(), DriftSpec(reaction="switch"), task="binary", name="t")
    for i, x, y in concept_stream(n=300):
        model.learn_one(x, y)
        model.update(0.1, ts=i)
    model._start_trial(ts=300)
    restored = pickle.loads(pickle.dumps(model))
    assert restored.in_trial and restored.trials == 1
    x = {"a": 0.3, "b": -0.1}
    assert restored.predict_proba_one(x) == model.predict_proba_one(x)
    # Attributes of the served model are reachable through the wrapper.
    assert restored.gaussians.keys() == model.current.gaussians.keys()


def test_configured_learner_switch_bumps_the_model_version() -> None:
    config = parse_config({"learners": {"clf": custom({"reaction": "switch"})}})
    learner: Any = build_learner("clf", config.learners["clf"], config.input_topics())
    for i, x, y in concept_stream():
        event = {"event_id": str(i), "ts": i, **x, "y": y}
        learner.predict(event)
        learner.learn(event)
    assert learner.model.switches == 1
    assert learner.model_version == 2
    assert learner.evaluation.n_evaluated == N


# -- data drift -------------------------------------------------------------------------


def psi_reference(reference: list[float], recent: list[float], bins: int = 10) -> float:
    """A tiny independent PSI: quantile edges by sorting, linear counting."""
    ordered = sorted(reference)
    edges: list[float] = []
    for k in range(1, bins):
        # numpy's default "linear" quantile
        pos = k / bins * (len(ordered) - 1)
        lo = math.floor(pos)
        value = ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (pos - lo)
        if not edges or value != edges[-1]:
            edges.append(value)

    def proportions(values: list[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in values:
            counts[sum(1 for e in edges if v >= e)] += 1
        return [(c + 0.5) / (len(values) + 0.5 * len(counts)) for c in counts]

    p, q = proportions(reference), proportions(recent)
    return sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))


def ks_reference(a: list[float], b: list[float]) -> float:
    def cdf(values: list[float], t: float) -> float:
        return sum(1 for v in values if v <= t) / len(values)

    return max(abs(cdf(a, t) - cdf(b, t)) for t in a + b)


def test_psi_and_ks_match_independent_implementations() -> None:
    rng = random.Random(5)
    reference = [rng.gauss(0, 1) for _ in range(500)]
    for shift in (0.0, 0.3, 1.5):
        recent = [rng.gauss(shift, 1) for _ in range(400)]
        assert psi(reference, recent) == pytest.approx(psi_reference(reference, recent), rel=1e-9)
        assert ks(reference, recent) == pytest.approx(ks_reference(reference, recent), rel=1e-9)
    # Discrete features with many ties (quantities): merged edges, finite score.
    quantities = [float(rng.choice([1, 1, 1, 2, 3])) for _ in range(500)]
    bigger = [float(rng.choice([2, 3, 4, 5])) for _ in range(500)]
    assert psi(quantities, bigger) == pytest.approx(psi_reference(quantities, bigger), rel=1e-9)
    assert psi(quantities, bigger) > 0.25 and ks(quantities, bigger) > 0.5
    assert math.isnan(psi([], [1.0])) and math.isnan(ks([1.0], []))


def test_drift_spec_round_trips_through_msgspec() -> None:
    spec = DriftSpec(detector="page_hinkley", params={"threshold": 20.0}, reaction="switch", margin=0.1)
    assert msgspec.convert(msgspec.to_builtins(spec), DriftSpec) == spec


# -- cusum: a controlled false-alarm rate, binary outcomes, prediction order -----------


def test_cusum_quiet_on_calibrated_binary_outcomes_and_catches_a_new_rare_class_pattern() -> None:
    rng = random.Random(3)
    monitor = ConceptDrift("cusum")
    alarms = []
    for i in range(60_000):
        p = 0.01 + 0.03 * rng.random()  # a calibrated model of a rare class
        true_p = p if i < 40_000 else min(1.0, 3 * p)  # then the class becomes 3x as frequent as predicted
        y = rng.random() < true_p
        if monitor.update(0.0, ts=i, outcome=(y, p)):
            alarms.append(i)
    assert alarms and all(i >= 40_000 for i in alarms), alarms
    assert alarms[0] < 45_000, "the rise should be caught within 5,000 outcomes"
    assert monitor.last_direction == "worse"


def test_cusum_quiet_on_a_stationary_error_rate_and_on_a_falling_one() -> None:
    rng = random.Random(4)
    monitor = ConceptDrift("cusum")
    for i in range(100_000):
        rate = 0.35 if i < 50_000 else 0.25  # a model that gets better: no alarm
        monitor.update(float(rng.random() < rate), ts=i)
    quiet = monitor.detections
    assert quiet <= 1, "the target: at most one false alarm per 100,000 stationary outcomes"
    for i in range(100_000, 110_000):
        monitor.update(float(rng.random() < 0.5), ts=i)
    assert monitor.detections > quiet and monitor.worse == monitor.detections


def test_cusum_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match=r"drift\.params"):
        DriftSpec(detector="cusum", params={"nope": 1}).validate()
    with pytest.raises(ValueError, match="cusum"):
        ConceptDrift("cusum", theta=0.5)


# -- block_cusum --------------------------------------------------------------------


def _alarms(detector: BlockCusum, values: Iterator[float]) -> list[int]:
    out = []
    for i, v in enumerate(values):
        detector.update(v)
        if detector.drift_detected:
            out.append(i)
    return out


def test_block_cusum_threshold_follows_the_asked_run_length() -> None:
    # A larger arl means a higher threshold; the approximation's in-control ARL is the one asked.
    hs = [cusum_threshold(arl, 0.5) for arl in (1_000, 10_000, 100_000)]
    assert hs == sorted(hs) and hs[0] > 0
    assert all(abs(cusum_arl(h, 0.5) / arl - 1) < 1e-6 for h, arl in zip(hs, (1_000, 10_000, 100_000), strict=True))
    assert BlockCusum(block=100, arl=1_000_000).h == pytest.approx(cusum_threshold(10_000, 0.5))
    # After a shift of one standard deviation the delay is short: tens of blocks, not thousands.
    assert cusum_arl(hs[1], 0.5, shift=1.0) < 20


def test_block_cusum_false_alarms_stay_near_the_asked_rate_on_clustered_errors() -> None:
    # Errors come in sessions (1-20 outcomes sharing a miss probability): not independent, as on a shop.
    rng = random.Random(5)

    def sessions(n: int) -> Iterator[float]:
        i = 0
        while i < n:
            p = rng.betavariate(2, 4)
            for _ in range(rng.randint(1, 20)):
                yield float(rng.random() < p)
                i += 1

    alarms = _alarms(BlockCusum(block=100, arl=100_000), sessions(1_000_000))
    # 10 expected at the nominal rate; the reference's estimation noise costs up to ~1.7x (docs/drift.md).
    assert len(alarms) <= 20, len(alarms)


def test_block_cusum_catches_a_small_rise_and_ignores_a_fall() -> None:
    rng = random.Random(6)
    rates = [0.30] * 40_000 + [0.25] * 40_000 + [0.30] * 20_000  # learning (a fall), then a rise of 0.05
    alarms = _alarms(BlockCusum(), (float(rng.random() < r) for r in rates))
    assert alarms and all(i >= 80_000 for i in alarms), alarms
    assert alarms[0] < 85_000, "a rise of a fifth of the error within 5,000 outcomes"


def test_block_cusum_through_the_monitor_watches_the_squared_error_of_binary_outcomes() -> None:
    rng = random.Random(7)
    monitor = ConceptDrift("block_cusum", block=200)
    alarms = []
    for i in range(60_000):
        p = 0.05 + 0.2 * rng.random()
        true_p = p if i < 40_000 else min(1.0, 1.6 * p)  # conversions 1.6x what the model says
        if monitor.update(99.0, ts=i, outcome=(rng.random() < true_p, p)):  # the error argument is not used
            alarms.append(i)
    assert alarms and all(i >= 40_000 for i in alarms) and alarms[0] < 45_000, alarms
    assert monitor.last_direction == "worse" and monitor.recent_width is not None


def test_block_cusum_is_configured_validated_and_pickled() -> None:
    spec = msgspec.convert({"detector": "block_cusum", "params": {"block": 50, "arl": 500_000}}, DriftSpec)
    spec.validate()
    monitor = spec.monitor()
    for i in range(3_000):
        monitor.update(float(i % 3 == 0), ts=i)
    again = pickle.loads(pickle.dumps(monitor))
    assert again.detector.n_reference == monitor.detector.n_reference > 0 and again.detector.h == monitor.detector.h
    with pytest.raises(ValueError, match=r"drift\.params"):
        DriftSpec(detector="block_cusum", params={"nope": 1}).validate()
    with pytest.raises(ValueError, match="arl"):
        BlockCusum(block=1_000, arl=1_500)
    with pytest.raises(ValueError, match="block_cusum"):
        BlockCusum(k=0)


def test_outcomes_reach_the_monitor_in_prediction_order() -> None:
    class Seen:
        detections = 0
        last_detection_ts = None

        def __init__(self) -> None:
            self.ts: list[int] = []

        def update(self, error: float, ts: int, outcome: Any = None) -> bool:
            self.ts.append(ts)
            return False

    seen = Seen()
    ev = Evaluation.for_binary(100, drift=seen).order_outcomes(600)
    ev.binary(True, 0.5, ts=100, predicted_ts=50)  # a conversion, known early: held until 650
    ev.binary(False, 0.5, ts=640, predicted_ts=40)  # a negative, known when its window closed
    ev.binary(False, 0.5, ts=700, predicted_ts=100)
    assert seen.ts == [640, 650, 700]
    assert ev.n_evaluated == 3


def test_roc_auc_is_undefined_until_both_classes_are_seen() -> None:
    ev = Evaluation.for_binary(100)
    for p in (0.9, 0.8):
        ev.binary(True, p, ts=0)
    values = {(m, w): v for m, w, v in ev.values()}
    assert math.isnan(values[("roc_auc", "cumulative")]) and math.isnan(values[("roc_auc", "rolling")])
    ev.binary(False, 0.1, ts=1)
    assert ev.get("roc_auc", "cumulative") == 1.0


def test_backtest_chart_marks_caught_and_false_detections_against_the_learners_true_drifts() -> None:
    from stream.backtest import _mark_drifts
    from stream.simulate import SimConfig, Simulation

    sim = Simulation(SimConfig(seed=0, events=3_000))
    for _ in sim:
        pass
    change = next(d for d in sim.truth.drifts if d.kind == "elasticity_change")
    assert change.index is not None

    class Axes:
        def __init__(self) -> None:
            self.lines: list[tuple[int, str, str | None]] = []
            self.notes: list[str] = []

        def axvline(self, x: int, *, color: str, label: str | None = None, **style: Any) -> None:
            self.lines.append((x, color, label))

        def annotate(self, text: str, *args: Any, **kwargs: Any) -> None:
            self.notes.append(text)

    ax = Axes()
    dets = [{"ts": change.ts + 1_000, "index": change.index + 10}, {"ts": sim.truth.start_ts + 5, "index": 3}]
    _mark_drifts(ax, {"kind": "pricing", "drift": [{"monitor": "pricing", "detections": dets}]}, sim.truth)
    colors = {x: color for x, color, _ in ax.lines}
    assert colors[change.index] == "green"
    assert all(colors[d.index] == "grey" for d in sim.truth.drifts if d is not change and d.index is not None)
    assert colors[change.index + 10] == "red" and "+10 events" in ax.notes
    assert (3, "darkorange", "false alarm") in ax.lines


def test_report_lines_place_each_detection_against_its_true_drift() -> None:
    from stream.backtest import truth_lines

    truth = {
        "drift_points": [{"kind": "elasticity_change", "ts": 100, "index": 18_000}],
        "drift": {
            "pricing": {"drifts": [{"kind": "elasticity_change", "ts": 100, "delay_ms": 738_000,
                                    "delay_events": 1_234}], "false_alarms": 1, "detections": 2},
            "risk": {"drifts": [{"kind": "elasticity_change", "ts": 100, "delay_ms": None, "delay_events": None}],
                     "false_alarms": 0, "detections": 0},
        },
    }  # fmt: skip
    lines = truth_lines(truth)
    assert "drift pricing: elasticity_change at #18,000 caught at #19,234, +1,234 events, 12.3 min later; " \
           "false alarms 1 of 2 detections" in lines  # fmt: skip
    assert "drift risk: elasticity_change at #18,000 missed; false alarms 0 of 0 detections" in lines
