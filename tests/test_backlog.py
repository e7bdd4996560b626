"""A backlog is learned like a live stream (real broker, real ``stream run``).

The simulated shop's history is produced to the topics (3 partitions each, keyed as the contracts say,
record timestamps = event time) before the service starts, so it meets a backlog: whole fetches of one
partition arrive before the next. The risk learner joins fraud labels (keyed by order) to the purchases
they answer (keyed by user) on event time; read in fetch order, labels run hours of event time ahead of
their purchases and are "late", and the supervised model never sees them. With the partitions aligned
on event time (``[processing] align``, the default) it learns like a broker-less run over the same
events in event-time order: at least 98 % of the labelled orders joined and of the outcomes learned,
the supervised model serving by the end as it does there, and going on over later events of the
same shop with a ROC AUC (against the simulator's truth) within 0.02 of that run's learner. So does
a catch-up after downtime: a service that learned the first half of the history, stopped, and started
again once the second half is in the topics (a backlog, learned from its checkpoint on).

Three partitions make three tasks (``stream.tasks``), each with its own risk learner over the purchases
of its partition and every fraud label (a global table). Each is compared with a broker-less run over
the same events its task reads: the records are produced to explicit partitions, so the test knows
which purchases each task reads.
"""

from __future__ import annotations

import copy
import time
import zlib
from pathlib import Path

import pytest
from confluent_kafka import Producer
from kafka_util import committed, end_offsets, group_toml, stop, stream_cli
from test_run_loop import wait_for

from stream.backtest import run_backtest
from stream.config import parse_config
from stream.demo import simulated_records
from stream.events import Decoder, FraudLabel, Purchase
from stream.learners.risk import RiskLearner
from stream.simulate import SimConfig, Simulation
from stream.state import CheckpointStore, LocalStorage
from stream.task_state import ScopedStorage

pytestmark = pytest.mark.kafka

PARTITIONS = 3
EVENTS = 20_000


def shop(start_ts: int, seed: int = 5, events: int = EVENTS) -> SimConfig:
    # Frauds far more often than in a real shop, so a short stream labels a few hundred orders.
    return SimConfig(seed=seed, events=events, n_users=2_000, n_items=300, fraud_rate=0.3, start_ts=start_ts)


def partition(key: bytes | None) -> int:
    """Where the test puts a record (the tasks' split of the purchases is then known)."""
    return zlib.crc32(key or b"") % PARTITIONS


def later_auc(learner: RiskLearner, start_ts: int) -> float:
    """ROC AUC of a copy of ``learner`` going on (test-then-train) over later events of a shop like it."""
    learner = copy.deepcopy(learner)
    sim = Simulation(shop(start_ts, seed=6, events=5_000))
    decoders = {"purchases": Decoder(Purchase), "fraud_labels": Decoder(FraudLabel)}
    scores: dict[str, float] = {}
    for stream, _, value, _ in sim:
        decoder = decoders.get(stream)
        if decoder is None:
            continue
        event = decoder.decode(value)
        out = learner.predict(event)
        learner.learn(event)
        if out is not None:
            scores[out.order_id] = out.fraud_probability
    auc = sim.truth.fraud_auc(scores)
    assert auc is not None
    return auc


def config_text(prefix: str, bootstrap: str, group: str, checkpoints: Path, align: bool) -> str:
    return group_toml(prefix, bootstrap, group, PARTITIONS) + f"""
[processing]
commit_interval_s = 0.5
align = {str(align).lower()}

[metrics]
port = 0

[checkpoints]
dir = "{checkpoints}"

[sync]
enabled = false  # each task learns alone, as the broker-less run of its events does

[learners.risk]
kind = "risk"
output_topic = "{prefix}-risk-scores"
label_window_s = 14400
fraud_weight = 20.0
min_labels = 200
min_fraud_labels = 10
model = {{ class = "linear_model.LogisticRegression" }}
"""


def learned(prefix: str, bootstrap: str, tmp: Path, align: bool, name: str) -> list[RiskLearner]:
    """The risk learner of each task a ``stream run`` left after reading everything in the topics
    (each task's last checkpoint)."""
    group = f"{prefix}-{name}"
    cfg = tmp / f"{name}.toml"
    cfg.write_text(config_text(prefix, bootstrap, group, tmp / name, align))
    log = tmp / f"{name}.log"
    topics = {f"{prefix}-{t}": PARTITIONS for t in ("purchases", "fraud-labels")}  # what the risk learner reads
    end = end_offsets(bootstrap, topics)
    proc = stream_cli("run", "--config", str(cfg), log=log)
    try:
        wait_for(lambda: committed(bootstrap, group, topics) == end, timeout=180, what=f"{name} to learn the backlog")
    finally:
        assert stop(proc, timeout=60) == 0, log.read_text()[-3000:]
    out: list[RiskLearner] = []
    for task in range(PARTITIONS):
        latest = CheckpointStore(ScopedStorage(LocalStorage(tmp / name / group), task)).latest()
        assert latest is not None, f"task {task}: no checkpoint"
        learner = latest.learner("risk")
        assert isinstance(learner, RiskLearner)
        out.append(learner)
    return out


def summary(learner: RiskLearner, later_ts: int) -> dict[str, object]:
    return {**learner.label_stats(), "n_labels": learner.n_labels, "n_frauds": learner.n_frauds,
            "source": learner.source, "later_auc": round(later_auc(learner, later_ts), 4)}  # fmt: skip


def test_a_backlog_learns_the_labels_a_live_stream_does(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    start_ts = int(time.time() * 1000) - 3 * 86_400_000  # recent: within the topics' time retention
    prefix = topic_prefix
    config = parse_config({"learners": {"risk": {"kind": "risk", "output_topic": "risk-scores",
                                                 "label_window_s": 14400, "fraud_weight": 20.0,
                                                 "min_labels": 200, "min_fraud_labels": 10,
                                                 "model": {"class": "linear_model.LogisticRegression"}}}})  # fmt: skip
    later_ts = start_ts + 2 * 86_400_000
    purchases = config.input_topics()["purchases"]
    want = []
    for task in range(PARTITIONS):  # what each task reads: its purchases, every label
        records = (r for r in simulated_records(Simulation(shop(start_ts)), config.input_topics())
                   if r.topic() != purchases or partition(r.key()) == task)  # fmt: skip
        _, run = run_backtest(records, config, progress=False)
        want.append(summary(run.learners[0], later_ts))
    assert sum(w["joined"] for w in want) >= 100, want  # type: ignore[misc]

    names = {s: f"{prefix}-{t}" for s, t in config.input_topics().items()}
    cfg = tmp_path / "topics.toml"
    cfg.write_text(config_text(prefix, kafka_bootstrap, f"{prefix}-admin", tmp_path, True))
    assert stream_cli("topics", "create", "--config", str(cfg), log=tmp_path / "topics.log").wait(60) == 0
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20, "enable.idempotence": True})
    history = list(Simulation(shop(start_ts)))
    half = len(history) // 2
    for part in (history[:half], history[half:]):
        for stream, key, value, ts in part:
            producer.produce(names[stream], value, key, timestamp=ts, partition=partition(key))
            producer.poll(0)
        assert producer.flush(60) == 0
        # The catch-up service learns the first half, is down while the second is produced, then catches up.
        catch_up = [summary(lr, later_ts) for lr in learned(prefix, kafka_bootstrap, tmp_path, True, "catch-up")]

    aligned = [summary(lr, later_ts) for lr in learned(prefix, kafka_bootstrap, tmp_path, True, "aligned")]
    fetch_order = [summary(lr, later_ts) for lr in learned(prefix, kafka_bootstrap, tmp_path, False, "fetch-order")]
    report = f"broker-less {want}, aligned {aligned}, fetch order {fetch_order}, catch-up {catch_up}"
    for tasks in (aligned, catch_up):
        for got, ref in zip(tasks, want, strict=True):
            assert got["received"] == ref["received"], report
            for count in ("joined", "n_labels", "n_frauds"):
                assert got[count] >= 0.98 * ref[count], report  # type: ignore[operator]
            assert got["source"] == ref["source"], report
            assert got["later_auc"] >= ref["later_auc"] - 0.02, report  # type: ignore[operator]
