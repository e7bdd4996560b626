"""Prometheus metrics of the pipeline: what it consumes, publishes, how fast,
how far behind, how good its models are and whether anything drifted.

Cost model. The pipeline calls the observer's hooks once per record
(``processed`` / ``dead_lettered``) and once per published prediction
(``published``): each is a dict lookup of a cached label child and an integer
increment on a plain slot, no lock (``prometheus_client``'s ``Counter.inc`` takes
one and costs ~8x more). Everything else is computed off the hot path:

* per batch (``batch_processed``, called by the Kafka loop): time inside the
  process, amortised over the batch's records; and, when the pipeline's sink
  reports acknowledgements (``stream.kafka.KafkaSink``), the time from the batch
  consumed to all its outputs acknowledged (the pipeline's own share of the
  latency, without the broker's hops before and after it);
* every ``statistics.interval.ms`` (librdkafka ``stats_cb``): consumer lag per
  partition;
* at scrape time, by this object as a custom collector: the learners'
  quality, drift and model state, and the data-drift scores (PSI, KS) of the
  sampled input features.

Label values come from bounded sets (topics, partitions, learners, tasks,
stages, quality metric names, a capped set of feature names), never from user
or item ids. With several tasks per instance (``stream.tasks``) each task has
its own copy of every learner: the learner families computed at scrape time
carry a ``task`` label, so a query sums or maxes over tasks. Every family is listed in ``docs/observability.md``.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> registry = CollectorRegistry()
>>> metrics = PipelineMetrics(registry)
>>> metrics.dead_lettered("clicks", "decode")
>>> b'stream_events_consumed_total{outcome="dead_letter_decode",topic="clicks"} 1.0' in generate_latest(registry)
True
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import river
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from stream import __version__
from stream.config import Config, MetricsConfig
from stream.drift import ks, psi
from stream.pipeline import Pipeline, TimedSink

__all__ = ["PipelineMetrics", "new_registry", "serve_metrics"]

log = logging.getLogger(__name__)

#: Pipeline stages that dead-letter a record (``stream.pipeline``, ``stream.events``).
STAGES = ("decode", "validate", "predict", "learn", "publish", "observe")
#: Event time to prediction: from "just now" to replays of hour-old data.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Time inside the process per record: River models take microseconds to milliseconds.
RECORD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1)
#: Consumed to outputs acknowledged: fine around the 20 ms goal, so its quantiles can be read.
OWN_LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.012, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04,
    0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
#: Fields never treated as input features for data drift: ids and the event time.
_NOT_FEATURES = frozenset({"ts", "id", "event_id"})
#: Feature names are label values: bound their length.
_MAX_FEATURE_NAME = 64
#: The ``task`` label of a pipeline attached without a task (a backtest, the demo): the one task there is.
UNTASKED = "0"


# -- lock-free children ------------------------------------------------------------


class _Value:
    """One counter or gauge child: the hot path does ``child.value += 1``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Buckets:
    """One histogram child: per-bucket (not cumulative) counts and the sum.

    Only the loop thread writes; a scrape copies the list, so a scrape sees
    each bucket as of some instant and ``_count`` always equals the ``+Inf``
    bucket (both come from the same copy).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """Add ``n`` observations of ``value`` (``n > 1``: a batch's amortised time)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n


class _Family:
    """A metric family whose children are looked up once and then cached."""

    def __init__(self, kind: str, name: str, doc: str, labels: Sequence[str], buckets: tuple[float, ...] = ()) -> None:
        self.kind, self.name, self.doc, self.labelnames, self.buckets = kind, name, doc, tuple(labels), buckets
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Buckets(self.buckets) if self.kind == "histogram" else _Value()
        return child

    def collect(self) -> Metric:
        family = _new_family(self.kind, self.name, self.doc, self.labelnames)
        for values, child in list(self.children.items()):
            if self.kind == "histogram":
                counts = list(child.counts)
                cumulative, buckets = 0, []
                for bound, count in zip((*self.bounds_str(), "+Inf"), counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                family.add_metric(list(values), buckets, child.sum)
            else:
                family.add_metric(list(values), child.value)
        return family

    def bounds_str(self) -> list[str]:
        return [repr(float(b)) for b in self.buckets]


def _new_family(kind: str, name: str, doc: str, labels: Sequence[str]) -> Any:
    # Any: the three families' ``add_metric`` signatures differ; callers know the kind.
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, doc, labels=labels)
    return HistogramMetricFamily(name, doc, labels=labels)


# -- data drift: sampled feature windows --------------------------------------------


class _FeatureWindow:
    """The last ``2 * size`` sampled values of one feature, in a ring: the older
    half is the reference window, the newer half the recent window, so the
    score compares the recent data with the data just before it (a sudden
    shift shows up for about one window, then the reference catches up).

    Scores appear once both windows are full: PSI over 10 bins has a noise
    floor of about ``18 / size`` on identical distributions (0.018 for the
    default 1000), far above the alert threshold on half-empty windows."""

    __slots__ = ("cache", "n", "ring", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = [0.0] * (2 * size)
        self.n = 0
        #: (n at computation, psi, ks): a scrape recomputes only what changed.
        self.cache: tuple[int, float, float] | None = None

    def add(self, value: float) -> None:
        self.ring[self.n % (2 * self.size)] = value
        self.n += 1

    def scores(self) -> tuple[float, float] | None:
        n = self.n
        if self.cache is not None and self.cache[0] == n:
            return self.cache[1], self.cache[2]
        if n < 2 * self.size:
            return None
        ring = np.array(self.ring, dtype=float)
        start = n % ring.size
        ordered = np.concatenate([ring[start:], ring[:start]])
        reference, recent = ordered[: self.size], ordered[self.size :]
        result = (psi(reference, recent), ks(reference, recent))
        self.cache = (n, *result)
        return result


class _TopicFeatures:
    """The numeric fields of one topic's sampled events (at most ``max_features``)."""

    __slots__ = ("fields_by_type", "max_features", "size", "windows")

    def __init__(self, size: int, max_features: int) -> None:
        self.size = size
        self.max_features = max_features
        self.windows: dict[str, _FeatureWindow] = {}
        self.fields_by_type: dict[type, tuple[str, ...]] = {}

    def sample(self, event: Any) -> None:
        if isinstance(event, Mapping):
            items: Iterable[tuple[str, Any]] = event.items()
        else:
            fields = self.fields_by_type.get(event.__class__)
            if fields is None:
                names = getattr(event.__class__, "__struct_fields__", ())
                fields = self.fields_by_type[event.__class__] = tuple(n for n in names if _is_feature_name(n))
            items = [(name, getattr(event, name)) for name in fields]
        windows = self.windows
        for name, value in items:
            # bool is an int subclass but not a numeric feature; NaN/inf would poison the quantiles.
            cls = value.__class__
            if (cls is not float and cls is not int) or not math.isfinite(value):
                continue
            window = windows.get(name)
            if window is None:
                if len(windows) >= self.max_features or not _is_feature_name(name):
                    continue
                window = windows[name] = _FeatureWindow(self.size)
            window.add(float(value))


def _is_feature_name(name: str) -> bool:
    return name not in _NOT_FEATURES and not name.endswith("_id") and 0 < len(name) <= _MAX_FEATURE_NAME


# -- the observer ---------------------------------------------------------------------


class PipelineMetrics:
    """The pipeline's observer and a Prometheus collector.

    Hooks (all optional for the caller; ``stream.pipeline`` and ``stream.app``
    call the ones they know): ``attach(pipeline)``,
    ``detach_task`` (``stream.task_state``), ``processed``,
    ``published``, ``dead_lettered``, ``batch_processed``,
    ``consumer_properties`` (librdkafka ``stats_cb`` for lag) and
    ``checkpoint_saved`` (for the checkpoint writer).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = DEFAULT_REGISTRY,
        config: MetricsConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        cfg = config if config is not None else MetricsConfig()
        self.config = cfg
        self.clock = clock
        self.http_server: Any = None
        #: The pipeline attached without a task (``attach``), exported as task ``UNTASKED``.
        self._pipeline: Pipeline | None = None
        #: Task label value -> that task's pipeline; replaced wholesale (a scrape reads it from another thread).
        self._tasks: dict[str, Pipeline] = {}
        self.events = _Family(
            "counter",
            "stream_events_consumed",
            "Input records consumed, by topic and outcome "
            "(ok, or dead_letter_<stage> with stage decode, validate, predict or learn)",
            ["topic", "outcome"],
        )
        self.predictions = _Family(
            "counter", "stream_predictions_published", "Prediction records published, by learner", ["learner"]
        )
        self.latency = _Family(
            "histogram",
            "stream_event_to_prediction_seconds",
            "Wall-clock time from an event's timestamp (its ts field) to its prediction being produced, by learner",
            ["learner"],
            LATENCY_BUCKETS,
        )
        self.record_time = _Family(
            "histogram",
            "stream_record_processing_seconds",
            "Time inside the process per input record, amortised over each consumed batch "
            "(decode, predict, learn, produce)",
            [],
            RECORD_BUCKETS,
        )
        self.own_latency = _Family(
            "histogram",
            "stream_pipeline_latency_seconds",
            "Time from an input record consumed to every output it made acknowledged by the broker "
            "(the pipeline's own share of the latency), per consumed batch, each record counted",
            [],
            OWN_LATENCY_BUCKETS,
        )
        self._families = (self.events, self.predictions, self.latency, self.record_time, self.own_latency)
        self._record_time = self.record_time.labels()
        self._own_latency = self.own_latency.labels()
        #: The pipeline's sink when it reports acknowledgements (``consumed``), else None.
        self._sink: Any = None
        self._ok: dict[str | None, _Value] = {}
        self._dead: dict[tuple[str | None, str], _Value] = {}
        # learner -> (published counter, latency histogram): one lookup per prediction.
        self._published: dict[str, tuple[_Value, _Buckets]] = {}
        # Data drift: every ``sample_every``-th processed record is sampled.
        self._sample_every = cfg.feature_sample_every
        self._countdown = cfg.feature_sample_every
        self._features: dict[str, _TopicFeatures] = {}
        # Consumer lag per client (each task has its own consumer), each replaced wholesale on
        # its statistics callback, with when it came: a closed client's stops coming and expires.
        self._lag: dict[str, tuple[float, dict[tuple[str, str], int]]] = {}
        self.checkpoints = 0
        self._checkpoint_ts: float | None = None
        if registry is not None:
            registry.register(self)

    # -- wiring ------------------------------------------------------------------

    def attach(self, pipeline: Pipeline) -> None:
        """Called by the ``Pipeline`` it observes: the learners are read from it at
        scrape time (so restored or replaced learners are seen), and every
        topic x outcome and learner child is created at zero so rates and
        alerts have series before the first record. A pipeline that runs a task
        (``pipeline.task``) has its learners exported with ``task="<task>"`` until
        ``detach_task``, and replaces the task's earlier pipeline."""
        if pipeline.task is None:
            self._pipeline = pipeline
        else:
            self._tasks = {**self._tasks, str(pipeline.task): pipeline}
        sink = pipeline.sink
        if isinstance(sink, TimedSink):
            sink.on_acknowledged = self._own_latency.observe
            self._sink = sink
        for topic in pipeline.topics:
            self._ok_child(topic)
            for stage in STAGES:
                self._dead_child(topic, stage)
        for learner in pipeline.learners:
            self._published_children(learner.name)

    def detach_task(self, task: int, pipeline: Pipeline) -> None:
        """``task`` was revoked (or dropped): its learners' series disappear from the next
        scrape. Only while ``pipeline`` is the task's (a restarted task may already run another)."""
        label = str(task)
        if self._tasks.get(label) is pipeline:
            self._tasks = {k: v for k, v in self._tasks.items() if k != label}

    @property
    def learners(self) -> Sequence[Any]:
        """Every attached pipeline's learners (each task's copies)."""
        return [learner for _, pipeline in self.attached() for learner in list(pipeline.learners)]

    def attached(self) -> list[tuple[str, Pipeline]]:
        """(task label, pipeline) of every pipeline whose learners are exported; a task's wins
        over the untasked pipeline with the same label."""
        tasks = self._tasks
        pipeline = self._pipeline
        if pipeline is not None and UNTASKED not in tasks:
            return [(UNTASKED, pipeline), *tasks.items()]
        return list(tasks.items())

    def consumer_properties(self) -> dict[str, Any]:
        """librdkafka properties that make the consumer report its lag to us."""
        return {
            "stats_cb": self.kafka_stats,
            "statistics.interval.ms": int(self.config.stats_interval_s * 1000),
        }

    def serve(
        self, port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = DEFAULT_REGISTRY, **endpoint: Any
    ) -> int:
        """Serve ``/metrics`` in a daemon thread; returns the bound port (``port=0``: any free one).
        ``endpoint``: ``certfile``, ``keyfile`` (TLS), ``auth`` (a ``BasicAuth``), see ``stream.metrics_http``."""
        from stream.metrics_http import MetricsEndpoint, start_metrics_server

        server = start_metrics_server(MetricsEndpoint(host=addr, port=port, **endpoint), registry)
        self.http_server = server
        return int(server.server_port)

    def close(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None

    # -- hot path ----------------------------------------------------------------

    def _ok_child(self, topic: str | None) -> _Value:
        child = self._ok[topic] = self.events.labels(str(topic), "ok")
        return child

    def _dead_child(self, topic: str | None, stage: str) -> _Value:
        child = self._dead[(topic, stage)] = self.events.labels(str(topic), f"dead_letter_{stage}")
        return child

    def _published_children(self, learner: str) -> tuple[_Value, _Buckets]:
        children = self._published[learner] = (self.predictions.labels(learner), self.latency.labels(learner))
        return children

    def processed(self, topic: str | None, record: Any, event: Any) -> None:
        child = self._ok.get(topic)
        if child is None:
            child = self._ok_child(topic)
        child.value += 1
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = self._sample_every
            self._sample(topic, event)

    def published(self, learner: Any, event: Any, record: Any) -> None:
        children = self._published.get(learner.name)
        if children is None:
            children = self._published_children(learner.name)
        count, hist = children
        count.value += 1
        ts = getattr(event, "ts", None)
        if ts is None and isinstance(event, Mapping):
            ts = event.get("ts")
        if ts.__class__ is int or ts.__class__ is float:
            latency = self.clock() - ts * 0.001
            # Clock skew between producer and us must not give negative latencies.
            if latency < 0.0:
                latency = 0.0
            hist.counts[bisect_left(LATENCY_BUCKETS, latency)] += 1
            hist.sum += latency

    def dead_lettered(self, topic: str | None, stage: str) -> None:
        child = self._dead.get((topic, stage))
        if child is None:
            child = self._dead_child(topic, stage)
        child.value += 1

    # -- amortised -----------------------------------------------------------------

    def batch_processed(self, records: int, seconds: float) -> None:
        """One consumed batch of ``records`` took ``seconds`` inside the process:
        each record is counted with the batch's mean time."""
        if records > 0:
            self._record_time.observe(seconds / records, records)
            if self._sink is not None:
                self._sink.consumed(time.time() - seconds, records)

    def _sample(self, topic: str | None, event: Any) -> None:
        key = str(topic)
        features = self._features.get(key)
        if features is None:
            features = self._features[key] = _TopicFeatures(self.config.feature_window, self.config.max_features)
        features.sample(event)

    def kafka_stats(self, stats_json: str) -> None:
        """librdkafka statistics (``stats_cb``, served by the consumer's poll in the
        loop thread every ``statistics.interval.ms``): lag per assigned partition,
        the log end (last stable offset under read_committed) minus the
        position the application has consumed up to."""
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        if stats.get("type") != "consumer":
            return
        lag: dict[tuple[str, str], int] = {}
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                if pid == "-1" or not p.get("desired"):
                    continue  # librdkafka's internal UA partition, or not assigned to us
                end = p.get("ls_offset", -1)
                if end < 0:
                    end = p.get("hi_offset", -1)
                if end < 0:
                    continue
                position = p.get("app_offset", -1)
                if position < 0:
                    position = p.get("committed_offset", -1)
                if position < 0:
                    position = max(p.get("lo_offset", 0), 0)
                lag[(topic, pid)] = max(end - position, 0)
        now = time.monotonic()
        horizon = now - 3 * max(self.config.stats_interval_s, 1.0)
        self._lag = {k: v for k, v in self._lag.items() if v[0] >= horizon}
        self._lag[str(stats.get("name", ""))] = (now, lag)

    def consumer_lag(self) -> dict[tuple[str, str], int]:
        """Lag per (topic, partition) over the clients reporting: a partition every task reads (a
        global table) counts with its largest lag, the slowest task's."""
        out: dict[tuple[str, str], int] = {}
        for _, lag in list(self._lag.values()):
            for tp, n in lag.items():
                out[tp] = max(n, out.get(tp, 0))
        return out

    def checkpoint_saved(self, ts: float | None = None) -> None:
        """For the checkpoint writer: a checkpoint (model state + offsets) was
        durably saved at ``ts`` (epoch seconds, default now)."""
        self._checkpoint_ts = self.clock() if ts is None else ts
        self.checkpoints += 1

    # -- scrape time -----------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering never runs a collection.
        for family in self._families:
            yield _new_family(family.kind, family.name, family.doc, family.labelnames)
        for kind, name, doc, labels in _SCRAPE_FAMILIES:
            yield _new_family(kind, name, doc, labels)

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()
        out = {name: _new_family(kind, name, doc, labels) for kind, name, doc, labels in _SCRAPE_FAMILIES}
        for task, pipeline in self.attached():
            for learner in list(pipeline.learners):
                self._collect_learner(learner, task, out)
        for (topic, partition), lag in self.consumer_lag().items():
            out["stream_consumer_lag_records"].add_metric([topic, partition], lag)
        for topic, features in list(self._features.items()):
            for feature, window in list(features.windows.items()):
                scores = window.scores()
                if scores is not None:
                    out["stream_data_drift_score"].add_metric([topic, feature, "psi"], scores[0])
                    out["stream_data_drift_score"].add_metric([topic, feature, "ks"], scores[1])
        if self._checkpoint_ts is not None:
            out["stream_checkpoint_last_success_timestamp_seconds"].add_metric([], self._checkpoint_ts)
        out["stream_checkpoints"].add_metric([], self.checkpoints)
        out["stream_build_info"].add_metric(
            [__version__, river.__version__, ".".join(map(str, sys.version_info[:3]))], 1
        )
        yield from out.values()

    def _collect_learner(self, learner: Any, task: str, out: dict[str, Any]) -> None:
        name = learner.name
        out["stream_model_version"].add_metric([name, task], getattr(learner, "model_version", 0))
        out["stream_model_events_learned"].add_metric([name, task], getattr(learner, "n_learned", 0))
        # The loop thread keeps learning while we read: a River metric can be
        # caught mid-update (a dict resized under us). Retry, then skip this scrape.
        for attempt in range(3):
            try:
                quality = list(learner.quality())
                stats = dict(learner.label_stats()) if hasattr(learner, "label_stats") else {}
                break
            except Exception:
                if attempt == 2:
                    log.debug("could not read learner state at scrape", exc_info=True, extra={"learner": name})
                    quality, stats = [], {}
        for metric, window, value in quality:
            if value == value:  # NaN: undefined so far (ROC AUC with one class), nothing exported
                out["stream_model_quality"].add_metric([name, task, metric, window], value)
        for outcome, count in sorted(stats.items())[:16]:
            out["stream_labels"].add_metric([name, task, str(outcome)], count)
        monitor = getattr(getattr(learner, "evaluation", None), "drift", None)
        if monitor is None:
            return
        worse = getattr(monitor, "worse", None)
        if worse is None:
            out["stream_concept_drift_detections"].add_metric([name, task, "unknown"], monitor.detections)
        else:
            out["stream_concept_drift_detections"].add_metric([name, task, "worse"], worse)
            out["stream_concept_drift_detections"].add_metric([name, task, "better"], monitor.better)
        if monitor.last_detection_ts is not None:
            out["stream_concept_drift_last_detection_timestamp_seconds"].add_metric(
                [name, task], monitor.last_detection_ts / 1000.0
            )
        switches = getattr(monitor, "switches", None)
        if switches is not None:
            rollbacks = getattr(monitor, "rollbacks", 0)
            out["stream_model_switches"].add_metric([name, task, "drift"], switches - rollbacks)
            out["stream_model_switches"].add_metric([name, task, "rollback"], rollbacks)
            out["stream_model_candidate_active"].add_metric([name, task], 1.0 if monitor.in_trial else 0.0)


#: Families computed at scrape time: (kind, name, help, labels).
_SCRAPE_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "gauge",
        "stream_model_quality",
        "Prequential quality of each learner's predictions (metric: roc_auc, "
        "log_loss, accuracy, mae, ...; window: cumulative since start or rolling over the last outcomes)",
        ("learner", "task", "metric", "window"),
    ),
    (
        "gauge",
        "stream_model_version",
        "Version of the model each learner serves (bumped on import, rollback or drift switch)",
        ("learner", "task"),
    ),
    ("counter", "stream_model_events_learned", "Events each learner's model has learned from", ("learner", "task")),
    (
        "counter",
        "stream_labels",
        "Label joins by learner and outcome (received, joined, expired, ... as reported by Learner.label_stats())",
        ("learner", "task", "outcome"),
    ),
    (
        "counter",
        "stream_concept_drift_detections",
        "Concept drifts detected on each learner's error stream, by "
        "direction of the error (worse: the concept changed; better: the model improved)",
        ("learner", "task", "direction"),
    ),
    (
        "gauge",
        "stream_concept_drift_last_detection_timestamp_seconds",
        "Event time of the last concept drift detected, per learner",
        ("learner", "task"),
    ),
    (
        "counter",
        "stream_model_switches",
        "Serving model replaced by a candidate after a drift, or rolled back",
        ("learner", "task", "reason"),
    ),
    (
        "gauge",
        "stream_model_candidate_active",
        "1 while a candidate model trains after a confirmed drift",
        ("learner", "task"),
    ),
    (
        "gauge",
        "stream_consumer_lag_records",
        "Records in each assigned partition not yet consumed (log end minus position), from librdkafka statistics",
        ("topic", "partition"),
    ),
    (
        "gauge",
        "stream_data_drift_score",
        "Data drift of a numeric input field: recent window of sampled values "
        "against the window before it (method psi or ks)",
        ("topic", "feature", "method"),
    ),
    ("gauge", "stream_checkpoint_last_success_timestamp_seconds", "When the last checkpoint was saved", ()),
    ("counter", "stream_checkpoints", "Checkpoints saved", ()),
    (
        "gauge",
        "stream_build_info",
        "Versions of stream, River and Python (value 1)",
        ("version", "river_version", "python_version"),
    ),
)


def new_registry() -> CollectorRegistry:
    """A fresh registry with the default process, platform and GC collectors
    (what the global registry has), for tests and embedding."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


#: The observer ``serve_metrics`` registered, per registry: one pipeline per process.
_served: dict[int, PipelineMetrics] = {}


def serve_metrics(config: Config, registry: CollectorRegistry | None = None) -> PipelineMetrics:
    """The observer of ``stream run``, with ``/metrics`` served on ``config.metrics.port`` (0: not served).

    Registers only once the port is bound (an ``OSError`` leaves nothing behind), and
    replaces, closing its server, an observer an earlier call left in the same registry.
    """
    registry = registry if registry is not None else DEFAULT_REGISTRY
    previous = _served.pop(id(registry), None)
    if previous is not None:
        previous.close()
        registry.unregister(previous)
    metrics = PipelineMetrics(None, config.metrics)
    if config.metrics.port:
        from stream.metrics_http import MetricsEndpoint

        # Validated before binding: TLS files, credentials (a ConfigError names the key).
        endpoint = MetricsEndpoint.from_config(config.metrics)
        metrics.serve(endpoint.port, endpoint.host, registry, certfile=endpoint.certfile, keyfile=endpoint.keyfile,
                      auth=endpoint.auth)  # fmt: skip
        log.info(
            "serving /metrics",
            extra={
                "url": f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}/metrics",
                "tls": endpoint.certfile is not None,
                "basic_auth": endpoint.auth is not None,
            },
        )
    registry.register(metrics)
    _served[id(registry)] = metrics
    return metrics
