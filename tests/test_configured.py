"""Learners defined in config: same-event labels, labels joined from another topic, evaluation."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stream.config import ConfigError, load_config
from stream.events import FraudLabel, Purchase
from stream.learners.configured import ConfiguredLearner, CustomSpec
from stream.pipeline import Pipeline
from stream.recording import RecordedMessage

CONTRACTS = {"clicks": "clicks", "purchases": "purchases", "prices": "prices", "fraud_labels": "fraud-labels"}
LOGISTIC = {"class": "linear_model.LogisticRegression", "params": {"optimizer": {"class": "optim.SGD",
                                                                                 "params": {"lr": 0.1}}}}  # fmt: skip


def build(topics: dict[str, str] | None = None, **kw: Any) -> ConfiguredLearner:
    fields: dict[str, Any] = {"input": "orders", "output_topic": "out", "label": "y", "task": "binary",
                              "model": LOGISTIC, **kw}  # fmt: skip
    spec = CustomSpec(**fields)
    spec.validate("custom")
    return spec.build("custom", topics or {})


def run(learner: ConfiguredLearner, events: list[Any]) -> list[Any]:
    out = []
    for event in events:
        prediction = learner.predict(event)
        learner.learn(event)
        if prediction is not None:
            out.append(prediction)
    return out


def joined_stream(seed: int, n: int, label_share: float = 0.8) -> list[dict[str, Any]]:
    """Inputs ``{id, ts, a, b}`` (y = a + b > 0, 5 % noise) and, for ``label_share`` of
    them, a label record ``{id, ts, y}`` 1-30 s later, in event-time order."""
    rng = random.Random(seed)
    timed = []
    for i in range(n):
        ts = 1_000 * i
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        y = (a + b > 0) != (rng.random() < 0.05)
        timed.append((ts, 0, {"id": f"k{i}", "ts": ts, "a": a, "b": b, "source": rng.choice("xyz")}))
        if rng.random() < label_share:
            lt = ts + rng.randint(1_000, 30_000)
            timed.append((lt, 1, {"id": f"k{i}", "ts": lt, "y": y}))
    timed.sort(key=lambda e: (e[0], e[1]))
    return [e for _, _, e in timed]


def test_same_event_labels_still_learn_and_are_evaluated() -> None:
    learner = build()
    rng = random.Random(0)
    for i in range(2_000):
        a = rng.uniform(-1, 1)
        run(learner, [{"ts": i, "a": a, "y": a > 0}])
    assert learner.n_learned == 2_000 and learner.label_stats() == {}
    assert learner.evaluation.get("accuracy", "rolling") > 0.9


def test_joined_labels_are_learned_when_they_arrive() -> None:
    learner = build(label_topic="labels", join_on="id", label_window_s=60)
    assert learner.reads == {"orders", "labels"}
    events = joined_stream(seed=1, n=4_000)
    outputs = run(learner, events)
    n_inputs = sum("a" in e for e in events)
    n_labels = len(events) - n_inputs
    assert len(outputs) == n_inputs  # label records publish nothing
    stats = learner.label_stats()
    assert stats["received"] == stats["joined"] == n_labels == learner.n_learned
    assert stats["expired"] + len(learner.joins) == n_inputs - n_labels  # unlabelled: dropped, counted
    assert learner.evaluation.n_evaluated == n_labels
    assert learner.evaluation.get("accuracy", "rolling") > 0.85  # the model learned a + b > 0
    assert learner.evaluation.get("roc_auc", "cumulative") > 0.9
    # The features never include the join id or the label.
    assert set(learner.features(events[0])) == {"a", "b", f"source={events[0]['source']}"}


def test_unlabelled_predictions_past_the_window_are_dropped() -> None:
    learner = build(label_topic="labels", join_on="id", label_window_s=10)
    run(learner, [{"id": 1, "ts": 0, "a": 1.0}, {"id": 2, "ts": 5_000, "a": 1.0}])
    run(learner, [{"id": 1, "ts": 20_000, "y": True}, {"id": 2, "ts": 14_000, "y": True}])
    stats = learner.label_stats()
    # id 1's window closed at 10 s; the label of id 2 at 14 s was in time but event time had reached 20 s.
    assert (stats["expired"], stats["late"], stats["joined"], learner.n_learned) == (2, 2, 0, 0)


def test_contract_topics_are_told_apart_by_type() -> None:
    learner = build(CONTRACTS, input="purchases", label="is_fraud", label_topic="fraud_labels", join_on="order_id",
                    features=["unit_price", "quantity", "payment_method"])  # fmt: skip
    assert learner.reads == {"purchases", "fraud-labels"}
    buy = Purchase(event_id="p1", ts=0, order_id="o1", user_id="u", item_id="i", quantity=2, unit_price=5.0,
                   payment_method="card")  # fmt: skip
    label = FraudLabel(event_id="l1", ts=60_000, order_id="o1", is_fraud=True)
    assert run(learner, [buy, label]) == [{"probability": 0.5}]
    assert learner.n_learned == 1 and learner.evaluation.n_evaluated == 1


def test_a_contract_input_with_labels_from_a_plain_json_topic() -> None:
    learner = build(CONTRACTS, input="purchases", label="returned", label_topic="returns", join_on="order_id",
                    features=["unit_price"])  # fmt: skip
    buy = Purchase(event_id="p1", ts=0, order_id="o1", user_id="u", item_id="i", quantity=1, unit_price=5.0)
    run(learner, [buy, {"order_id": "o1", "ts": 1_000, "returned": False}])
    assert learner.n_learned == 1


def test_joined_labels_through_the_pipeline() -> None:
    learner = build(label_topic="labels", join_on="id", label_window_s=60, task="regression",
                    model={"class": "linear_model.LinearRegression"}, label="value")  # fmt: skip
    produced: list[tuple[str, bytes | None]] = []

    class Sink:
        def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
            produced.append((topic, value))

    pipe = Pipeline([learner], Sink(), contract_topics=CONTRACTS, dead_letter_topic="dlq")
    records = [
        ("orders", {"event_id": "e1", "id": "a", "ts": 0, "x": 1.0}),
        ("orders", {"event_id": "e2", "id": "b", "ts": 10, "x": 2.0}),
        ("orders", {"event_id": "e3", "ts": 20, "x": 3.0}),  # no join id: predicted, then dead-lettered at learn
        ("labels", {"event_id": "e4", "id": "a", "ts": 1_000, "value": 3.0}),
        ("labels", {"event_id": "e5", "id": "b", "ts": 2_000, "value": None}),  # no label value: dead-lettered
    ]
    for offset, (topic, doc) in enumerate(records):
        pipe.process(RecordedMessage(topic, 0, offset, (1, 0), None, json.dumps(doc).encode(), None))
    assert [t for t, _ in produced] == ["out", "out", "out", "dlq", "dlq"]
    assert learner.n_learned == 1 and learner.evaluation.get("mae", "cumulative") == pytest.approx(3.0)


def test_join_needs_the_id_and_event_time() -> None:
    learner = build(label_topic="labels", join_on="id")
    with pytest.raises(ValueError, match="join field `id`"):
        learner.learn({"ts": 0, "a": 1.0})
    with pytest.raises(ValueError, match="`ts`"):
        learner.learn({"id": "k", "a": 1.0})
    with pytest.raises(ValueError, match="label field `y`"):
        learner.learn({"id": "k", "ts": 0, "y": None})


def test_evaluation_window_and_tasks() -> None:
    learner = build(evaluation_window=50, task="multiclass", label="c",
                    model={"class": "tree.HoeffdingTreeClassifier"})  # fmt: skip
    run(learner, [{"ts": i, "a": float(i % 3), "c": str(i % 3)} for i in range(300)])
    assert learner.evaluation.window == 50
    assert {m for m, _, _ in learner.quality()} == {"accuracy", "log_loss"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text('[learners.returns]\nkind = "custom"\ninput = "orders"\noutput_topic = "o"\nlabel = "y"\n'
                    f'task = "binary"\nmodel = {{ class = "linear_model.LogisticRegression" }}\n{text}\n')  # fmt: skip
    return path


def test_joined_label_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'label_topic = "labels"\njoin_on = "id"\nlabel_window_s = 600'))
    learner = config.learners["returns"].build("returns", config.input_topics())
    assert isinstance(learner, ConfiguredLearner) and learner.joins is not None
    assert learner.joins.window_ms == 600_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('label_topic = "labels"', "`label_topic` and `join_on` go together"),
        ('label_topic = "orders"\njoin_on = "id"', "`label_topic` is the input topic"),
        ("label_window_s = 0", "label_window_s"),
        ('join_key = "id"', "unknown field `join_key`"),
        ("evaluation_window = 0", "evaluation_window"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_spec_decodes_strictly() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `lable`"):
        msgspec.convert({"input": "x", "output_topic": "o", "lable": "y", "task": "binary", "model": {}}, CustomSpec)
