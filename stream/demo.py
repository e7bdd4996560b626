"""``stream demo``: simulator -> learners -> metrics, scored against the ground truth.

Without a broker (the default) the simulated events go through the very
pipeline ``stream run`` uses, in one process (the backtest path); with
``--bootstrap-servers`` they are produced to fresh topics on the cluster and
consumed by the ``Application``. Either way the run shows progress (events/s,
each learner's rolling quality, drifts caught so far), serves ``/metrics``
meanwhile, and ends with a short report: each learner's prequential quality,
its quality against what the simulator knows (taste hit-rate, pricing regret,
fraud AUC), and each drift detector's delay and false alarms.

The scorer reads the predictions the README documents: ``items`` (ranked
``{item_id, score}``) for recommendations, ``recommended_price`` for pricing,
``fraud_probability`` for risk; learners defined in config are scored by
their own prequential metrics only.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from stream.app import Application, tasks_topic
from stream.backtest import BacktestResult, DriftTracker, run_backtest
from stream.config import Config, ConfigError, build_learners, load_config
from stream.kafka import KafkaWriter, admin_config, consumer_config, create_topics
from stream.metrics import serve_metrics
from stream.pipeline import BaseObserver, Record, Tally
from stream.progress import Progress
from stream.recording import RecordedMessage
from stream.scoring import TruthScorer, score_against_truth
from stream.simulate import SimConfig, Simulation
from stream.tasks import global_topics

__all__ = [
    "isolated_config",
    "run_demo",
    "simulated_records",
]

log = logging.getLogger(__name__)

#: About 30-60 s on a laptop core with the default learners.
DEFAULT_EVENTS = 100_000


def simulated_records(sim: Simulation, topics: Mapping[str, str]) -> Iterator[RecordedMessage]:
    """The simulation as records of single-partition topics (``topics``: stream -> topic),
    offsets counted per topic, CreateTime timestamps = event time."""
    offsets = dict.fromkeys(topics.values(), 0)
    headers = sim.headers
    for n, (stream, key, value, ts) in enumerate(sim):
        topic = topics[stream]
        offset = offsets[topic]
        offsets[topic] = offset + 1
        yield RecordedMessage(topic, 0, offset, (1, ts), key, value, headers(n))


# --------------------------------------------------------------------------- the demo


def _metrics_observer(config: Config) -> Any:
    """The Prometheus observer serving ``/metrics``; without it if the port is taken."""

    try:
        return serve_metrics(config)
    except OSError as exc:
        print(f"demo: cannot serve /metrics on port {config.metrics.port} ({exc}); going on without it")
        return None


def run_demo(
    *,
    events: int = DEFAULT_EVENTS,
    seed: int = 0,
    config_path: str | Path | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    bootstrap_servers: str | None = None,
    progress: bool = True,
    keep_topics: bool = False,
    out: Callable[[str], None] = print,
    searches_per_session: float = 0.0,
) -> dict[str, Any]:
    """Run the demo and print its report; returns the report as a dict. ``searches_per_session``
    adds search and ads requests (the ranking learner's input) to the simulation."""
    path = config_path  # None: the packaged default.toml
    config = load_config(
        path,
        overrides={
            "metrics.port": metrics_port,
            "metrics.host": metrics_host,
            "kafka.bootstrap_servers": bootstrap_servers,
        },
    )
    if not config.learners:
        where = path if path is not None else "the packaged default.toml"
        raise ConfigError(f"{where}: no learners configured (no [learners.NAME] table): nothing to demonstrate")
    sim = Simulation(
        SimConfig(
            seed=seed, events=events, bad_records=max(events // 20_000, 4), searches_per_session=searches_per_session
        )
    )
    # The ``kind`` of a learner spec is its msgspec tag.
    learners = [f"{name} ({type(spec).__struct_config__.tag})" for name, spec in config.learners.items()]
    out(
        f"stream demo: {events:,} simulated events (seed {seed}) -> {len(learners)} learners from "
        f"{path or 'the packaged default.toml'}: {', '.join(learners)}"
    )
    c = sim.config
    out(
        f"  world: {c.n_users:,} users, {c.n_items:,} items in {c.n_categories} categories; drifts at "
        f"{c.taste_shift_at:.0%} (taste shift), {c.elasticity_change_at:.0%} (elasticity), "
        f"{c.fraud_pattern_at:.0%} (fraud pattern) of the stream"
    )
    metrics = _metrics_observer(config)
    if metrics is not None and config.metrics.port:
        out(f"  serving /metrics on http://localhost:{config.metrics.port}/metrics while it runs")
    try:
        if bootstrap_servers:
            report = _demo_kafka(sim, config, metrics, progress=progress, keep_topics=keep_topics, out=out)
        else:
            report = _demo_local(sim, config, metrics, progress=progress)
    finally:
        if metrics is not None and hasattr(metrics, "close"):
            metrics.close()
    out("")
    out(report["text"])
    return report


def _demo_local(sim: Simulation, config: Config, metrics: Any, *, progress: bool) -> dict[str, Any]:

    records = simulated_records(sim, config.input_topics())
    result, _ = run_backtest(
        records,
        config,
        source=f"simulator (seed {sim.config.seed})",
        total=sim.config.events,
        observer=metrics,
        progress=progress,
        status=True,
        truth=sim.truth,
        desc="demo",
        title="Demo run",
    )
    return {"text": result.text(), **result.to_dict()}


def isolated_config(config: Config, *, prefix: str, group_id: str, checkpoint_dir: str | Path) -> Config:
    """``config`` on topics of its own: every input, output and dead-letter topic
    prefixed, its own consumer group and checkpoint directory (a demo or a test
    next to real data on the same cluster).

    >>> cfg = isolated_config(load_config(None), prefix="t1-", group_id="g1", checkpoint_dir="/tmp/c")
    >>> cfg.topics.clicks, cfg.topics.dead_letters, cfg.kafka.group_id, cfg.checkpoints.dir
    ('t1-clicks', 't1-dead-letters', 'g1', '/tmp/c')
    >>> all(spec.output_topic.startswith("t1-") for spec in cfg.learners.values())
    True
    """
    t = config.topics
    topics = msgspec.structs.replace(
        t,
        clicks=prefix + t.clicks,
        purchases=prefix + t.purchases,
        prices=prefix + t.prices,
        fraud_labels=prefix + t.fraud_labels,
        searches=prefix + t.searches,
        dead_letters=prefix + t.dead_letters,
    )
    learners = {
        name: msgspec.structs.replace(spec, output_topic=prefix + spec.output_topic)  # type: ignore[attr-defined]
        for name, spec in config.learners.items()
    }
    changes: dict[str, Any] = {
        "topics": topics,
        "learners": learners,
        "kafka": msgspec.structs.replace(config.kafka, group_id=group_id),
    }
    if hasattr(config, "checkpoints"):
        changes["checkpoints"] = msgspec.structs.replace(config.checkpoints, dir=str(checkpoint_dir))
    return msgspec.structs.replace(config, **changes)


#: Kafka demo flow control: produce this many events, then wait until the application consumed them.
_CHUNK = 500


def _demo_kafka(
    sim: Simulation, config: Config, metrics: Any, *, progress: bool, keep_topics: bool, out: Callable[[str], None]
) -> dict[str, Any]:
    """Stream the simulation into fresh topics while the Application consumes
    them, then score what it published.

    Events are produced in chunks of ``_CHUNK``, each once the application
    has consumed the previous one: as live traffic would, the consumer then
    sees the topics interleaved roughly in event time (within a chunk), not
    one whole topic after another, which is what consuming topics filled
    beforehand gives (labels before the predictions they label ...)."""
    from bisect import bisect_right

    run_id = uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix="stream-demo-")
    cfg = isolated_config(config, prefix=f"demo-{run_id}-", group_id=f"stream-demo-{run_id}", checkpoint_dir=workdir)
    # Short polls: the application must not sit out its poll timeout at every chunk.
    cfg = msgspec.structs.replace(cfg, processing=msgspec.structs.replace(cfg.processing, poll_timeout_s=0.01))
    created = create_topics(cfg)
    out(f"  topics: {', '.join(sorted(created))}")

    learners = build_learners(cfg)
    tracker = DriftTracker(learners)
    # Checked after every record, in the application's thread (where the learners change).
    counter = Tally(*([metrics] if metrics is not None else []), _DriftCheck(tracker))
    app = Application(cfg, learners, observer=counter, metrics=metrics)
    # The application reads only the topics its learners read.
    read = {t for learner in app.learners for t in learner.reads}
    # A record of a global table (prices, fraud labels) is processed by every task: one per partition.
    shared = global_topics(cfg, read) if cfg.topics.partitions > 1 else set()
    thread = threading.Thread(target=app.run, name="stream-demo-app", daemon=True)

    names = cfg.input_topics()
    per_topic: dict[str, int] = {}
    writer = KafkaWriter(cfg)
    events: dict[str, Any] = {}  # what the scorer needs of each event, by event id
    stamps: list[int] = []  # event time of each position in the stream
    decode = msgspec.json.Decoder().decode
    expected = 0

    def catch_up() -> None:
        writer.flush()
        deadline = time.monotonic() + 120
        while counter.records < expected:
            if not thread.is_alive():
                raise RuntimeError("the application stopped; see the log above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the application consumed {counter.records:,} of {expected:,} records in 120 s")
            time.sleep(0.005)

    started = time.monotonic()
    thread.start()
    bar = Progress(sim.config.events, desc="demo (kafka)", enabled=progress, status=tracker.status)
    try:
        for n, (stream, key, value, ts) in enumerate(sim):
            topic = names[stream]
            writer.produce(topic, key, value, timestamp=ts, headers=sim.headers(n))
            per_topic[topic] = per_topic.get(topic, 0) + 1
            stamps.append(ts)
            if topic in read:
                expected += cfg.topics.partitions if topic in shared else 1
            if stream in ("clicks", "purchases", "prices"):
                try:
                    ev = decode(value)
                    events[ev["event_id"]] = ev
                except (msgspec.DecodeError, UnicodeDecodeError, KeyError, TypeError):
                    pass  # a deliberately invalid record: the pipeline dead-letters it
            bar.update()
            if (n + 1) % _CHUNK == 0:
                catch_up()
        catch_up()
    finally:
        app.stop()
        thread.join(60)
        bar.close()
    elapsed = time.monotonic() - started
    # Place each detection at its event time's position in the stream.
    for dets in tracker.detections.values():
        for d in dets:
            d["index"] = max(bisect_right(stamps, d["ts"]) - 1, 0)

    scorer = TruthScorer(sim.truth)
    outputs = _read_outputs(cfg, sorted({lrn.output_topic for lrn in app.learners}))
    for values in outputs.values():
        for value in values:
            doc = decode(value)
            ev = events.get(doc.get("event_id"))
            if ev is not None and isinstance(doc.get("prediction"), dict):
                scorer.score(doc["learner"], ev, doc["prediction"])
    result = BacktestResult(
        source=f"{cfg.kafka.bootstrap_servers}, simulator seed {sim.config.seed}",
        records=counter.records,
        by_topic={t: n for t, n in per_topic.items() if t in read},
        skipped={t: n for t, n in per_topic.items() if t not in read},
        outputs={t: len(v) for t, v in outputs.items()},
        dead_letters=dict(counter.dead),
        learners=tracker.learner_report(),
        timeline=[],
        elapsed_s=elapsed,
        truth=score_against_truth(sim.truth, tracker, cfg, scorer),
        title="Kafka demo run",
    )
    text = result.text()
    shutil.rmtree(workdir, ignore_errors=True)
    if not keep_topics:
        admin = AdminClient(admin_config(cfg))
        doomed = sorted({*created, tasks_topic(cfg)})
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            try:
                future.result(30)
            except Exception as exc:  # leftover demo topics are harmless; say so and go on
                log.warning("could not delete demo topic", extra={"error": str(exc)})
    else:
        text += f"\n  topics kept: {', '.join(sorted(created))}"
    return {"text": text, **result.to_dict()}


def _read_outputs(config: Config, topics: list[str], idle_s: float = 3.0) -> dict[str, list[bytes]]:
    """Every record of ``topics`` (read from the beginning until nothing new arrives for ``idle_s``)."""

    consumer = Consumer(consumer_config(config, **{"group.id": f"stream-demo-read-{uuid.uuid4().hex[:8]}"}))
    out: dict[str, list[bytes]] = {t: [] for t in topics}
    try:
        meta = consumer.list_topics(timeout=30)
        consumer.assign(
            [
                TopicPartition(t, p, OFFSET_BEGINNING)
                for t in topics
                if t in meta.topics
                for p in meta.topics[t].partitions
            ]
        )
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            for msg in consumer.consume(1000, 0.5):
                value = msg.value()
                if msg.error() is None and value is not None:
                    out[str(msg.topic())].append(value)
                    last = time.monotonic()
    finally:
        consumer.close()
    return out


class _DriftCheck(BaseObserver):
    """Looks for new drift detections after every record processed, in the
    application's thread (where the learners change)."""

    def __init__(self, tracker: DriftTracker) -> None:
        self.tracker = tracker

    def processed(self, topic: str, record: Record, event: Any) -> None:
        self.tracker.check(-1, record.timestamp()[1])
