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

from stream.config import Config, ConfigError, load_config
from stream.evaluation import RunningMean
from stream.progress import Progress
from stream.replay import RecordedMessage
from stream.simulate import GroundTruth, SimConfig, Simulation

__all__ = [
    "TruthScorer",
    "isolated_config",
    "run_demo",
    "score_against_truth",
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


# --------------------------------------------------------------------------- scoring


def _get(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, Mapping) else getattr(event, name, None)


class TruthScorer:
    """Scores each published prediction against the simulator's ground truth.

    Attach it with ``wrap_sink`` (sees the output value) and as a pipeline
    observer (``published`` sees the event it belongs to): the pipeline calls
    the two back to back for every prediction.
    """

    def __init__(self, truth: GroundTruth) -> None:
        self.truth = truth
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
                self.hit_baseline.setdefault(name, RunningMean()).update(base / float(truth.category_weights.sum()))
                if self._since("taste_shift", ts):
                    self.hits_after_shift.setdefault(name, RunningMean()).update(hit)
        price = prediction.get("recommended_price")
        item = _get(event, "item_id")
        if isinstance(price, (int, float)) and price > 0 and isinstance(item, str) and truth.category_of(item):
            self.regret.setdefault(name, RunningMean()).update(truth.pricing_regret(item, float(price), ts))
            current = _get(event, "unit_price") or _get(event, "price")
            if isinstance(current, (int, float)) and current > 0:
                regret = truth.pricing_regret(item, float(current), ts)
                self.regret_baseline.setdefault(name, RunningMean()).update(regret)
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
            if decision in ("block", "review"):
                counts[1] += 1
                counts[0] += fraud
            counts[2] += fraud

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


# --------------------------------------------------------------------------- the demo


def _metrics_observer(config: Config) -> Any:
    """The Prometheus observer serving ``/metrics``; without it if the port is taken."""
    from stream.metrics import serve_metrics

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
) -> dict[str, Any]:
    """Run the demo and print its report; returns the report as a dict."""
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
    sim = Simulation(SimConfig(seed=seed, events=events, bad_records=max(events // 20_000, 4)))
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
    from stream.replay import run_backtest

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

    from confluent_kafka.admin import AdminClient

    from stream.app import Application, lease_topic
    from stream.kafka import admin_config, create_topics
    from stream.replay import BacktestResult, DriftTracker, KafkaWriter

    run_id = uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix="stream-demo-")
    cfg = isolated_config(config, prefix=f"demo-{run_id}-", group_id=f"stream-demo-{run_id}", checkpoint_dir=workdir)
    # Short polls: the application must not sit out its poll timeout at every chunk.
    cfg = msgspec.structs.replace(cfg, processing=msgspec.structs.replace(cfg.processing, poll_timeout_s=0.01))
    created = create_topics(cfg)
    out(f"  topics: {', '.join(sorted(created))}")

    counter = _Counting(metrics)
    app = Application(cfg, observer=counter)
    tracker = DriftTracker(app.learners)
    # Checked after every record, in the application's thread (where the learners change).
    counter.after = lambda ts: tracker.check(-1, ts)
    # The application reads only the topics its learners read.
    read = {t for learner in app.learners for t in learner.reads}
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
                expected += 1
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
        doomed = sorted({*created, lease_topic(cfg)})
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            try:
                future.result(30)
            except Exception as exc:  # leftover demo topics are harmless; say so and go on
                log.warning("could not delete demo topic", extra={"error": str(exc)})
    else:
        text += f"\n  topics kept: {', '.join(sorted(created))}"
    return {"text": text, **result.to_dict()}


class _Counting:
    """Application observer for the Kafka demo: counts records (processed or
    dead-lettered) and forwards to the metrics observer."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.records = 0
        self.dead: dict[str, int] = {}
        self._p = getattr(inner, "processed", None)
        self._pub = getattr(inner, "published", None)
        self._d = getattr(inner, "dead_lettered", None)
        #: Called with the event time of every successfully processed record.
        self.after: Callable[[int], None] | None = None

    def processed(self, topic: str, record: Any, event: Any) -> None:
        self.records += 1
        if self._p is not None:
            self._p(topic, record, event)
        if self.after is not None:
            self.after(record.timestamp()[1])

    def published(self, learner: Any, event: Any, record: Any) -> None:
        if self._pub is not None:
            self._pub(learner, event, record)

    def dead_lettered(self, topic: str, stage: str) -> None:
        self.records += 1
        self.dead[stage] = self.dead.get(stage, 0) + 1
        if self._d is not None:
            self._d(topic, stage)

    def __getattr__(self, name: str) -> Any:
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)


def _read_outputs(config: Config, topics: list[str], idle_s: float = 3.0) -> dict[str, list[bytes]]:
    """Every record of ``topics`` (read from the beginning until nothing new arrives for ``idle_s``)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from stream.kafka import consumer_config

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


def demo_command(args: Any) -> int:
    """``stream demo``: see ``stream demo --help``."""
    import sys

    from stream.config import ConfigError
    from stream.replay import RecordingError

    if args.events < 1000:
        print("stream: demo needs --events >= 1000", file=sys.stderr)
        return 2
    try:
        run_demo(
            events=args.events,
            seed=args.seed,
            config_path=args.config,
            metrics_port=args.metrics_port,
            metrics_host=getattr(args, "metrics_host", None),
            bootstrap_servers=args.bootstrap_servers,
            progress=args.progress,
            keep_topics=args.keep_topics,
        )
    except ConfigError:
        raise
    except (RecordingError, RuntimeError) as exc:
        print(f"stream: {exc}", file=sys.stderr)
        return 1
    return 0
