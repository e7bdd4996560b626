"""Prometheus metrics of the pipeline.

Label values come from bounded sets (topics, learners, stages), never from
user or item ids. Children are looked up once and cached, so the hot path
pays one increment per event.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from stream.config import Config
from stream.learners import Learner

__all__ = ["PipelineMetrics", "serve_metrics"]


class PipelineMetrics:
    """The pipeline's observer: counts what happens to every record."""

    def __init__(self, registry: CollectorRegistry = DEFAULT_REGISTRY) -> None:
        self.events = Counter(
            "stream_events_consumed", "Input records consumed, by topic and outcome", ["topic", "outcome"], registry=registry
        )
        self.predictions = Counter(
            "stream_predictions_published", "Prediction records published, by learner", ["learner"], registry=registry
        )
        self._ok: dict[str, Any] = {}
        self._dead: dict[tuple[str, str], Any] = {}
        self._published: dict[str, Any] = {}

    def processed(self, topic: str, record: Any, event: Any) -> None:
        child = self._ok.get(topic)
        if child is None:
            child = self._ok[topic] = self.events.labels(topic, "ok")
        child.inc()

    def published(self, learner: Learner, event: Any, record: Any) -> None:
        child = self._published.get(learner.name)
        if child is None:
            child = self._published[learner.name] = self.predictions.labels(learner.name)
        child.inc()

    def dead_lettered(self, topic: str, stage: str) -> None:
        key = (topic, stage)
        child = self._dead.get(key)
        if child is None:
            child = self._dead[key] = self.events.labels(topic, f"dead_letter_{stage}")
        child.inc()


def serve_metrics(config: Config, registry: CollectorRegistry = DEFAULT_REGISTRY) -> PipelineMetrics:
    metrics = PipelineMetrics(registry)
    if config.metrics.port:
        start_http_server(config.metrics.port, registry=registry)
    return metrics
