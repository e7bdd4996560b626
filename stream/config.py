"""Typed configuration, read from TOML and validated once at start-up.

Everything after start-up receives these objects, never raw dicts. A bad key
or value is reported with its path (``$.kafka.bootstrap_server``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from stream.errors import ConfigError
from stream.learners import Learner, LearnerSpec, build_learner

__all__ = ["Config", "ConfigError", "all_topics", "build_learners", "load_config", "redact"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
ClientValue = str | int | float | bool
_SECRET_WORDS = ("password", "secret", "jaas", "token", "key.pem", "credentials")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class KafkaConfig(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "stream"
    client_id: str = "stream"
    #: librdkafka properties for every client: security.protocol, sasl.*, ssl.* ...
    common: dict[str, ClientValue] = {}
    #: librdkafka properties for the consumer only, over ours.
    consumer: dict[str, ClientValue] = {}
    #: librdkafka properties for the producer only, over ours.
    producer: dict[str, ClientValue] = {}


class TopicsConfig(_Section):
    clicks: str = "clicks"
    purchases: str = "purchases"
    prices: str = "prices"
    fraud_labels: str = "fraud-labels"
    dead_letters: str = "dead-letters"
    #: Partition count used by ``stream topics create``.
    partitions: PositiveInt = 3
    replication_factor: PositiveInt = 1


class ProcessingConfig(_Section):
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    #: At most this many records per batch: whatever the client has already fetched, never
    #: waiting for a full batch (busy: large batches; quiet: each record as it comes).
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    #: How long an idle loop blocks waiting for the next record.
    poll_timeout_s: PositiveFloat = 0.2
    #: Outputs are flushed and offsets committed at least this often.
    commit_interval_s: PositiveFloat = 1.0
    #: Larger record values are dead-lettered without decoding.
    max_value_bytes: PositiveInt = 64 * 1024
    #: Budget for draining and committing after SIGTERM.
    shutdown_timeout_s: PositiveFloat = 10.0


class MetricsConfig(_Section):
    #: HTTP port of ``/metrics``; 0 disables the endpoint.
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9100
    #: Rolling window (labelled events) for the windowed quality metrics.
    rolling_window: PositiveInt = 10_000
    #: How often librdkafka reports statistics, from which consumer lag is read.
    stats_interval_s: PositiveFloat = 5.0
    #: Data drift: one processed record in N is sampled (amortises the cost).
    feature_sample_every: PositiveInt = 16
    #: Data drift: sampled values per window (recent window vs the window before it).
    feature_window: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 1000
    #: Data drift: numeric fields tracked per topic, at most (they are label values).
    max_features: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32


class CheckpointsConfig(_Section):
    """Where and how often the learners' state is checkpointed (see stream.state, docs/guarantees.md)."""

    #: Directory (local or a mount shared by the instances); checkpoints go in ``<dir>/<group_id>/``.
    dir: str = "var/checkpoints"
    #: A checkpoint is written at the first commit after this many events ...
    every_events: PositiveInt = 100_000
    #: ... or this many seconds (whichever comes first), and always on lease hand-over and shutdown.
    every_seconds: PositiveFloat = 60.0
    #: At-least-once periodic checkpoints are written by a forked child from a copy-on-write
    #: snapshot (as Redis' BGSAVE): the loop pauses for the fork, not for pickling the model.
    #: Final, hand-over and exactly-once checkpoints are always written in the loop.
    background: bool = True
    #: Recent checkpoints kept (>= 2: the newest may be ahead of the committed offsets).
    keep: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 5
    #: Committed offsets but no usable checkpoint: refuse to start ("fail"), or
    #: relearn from the beginning of the topics without publishing ("rewind").
    on_missing: Literal["fail", "rewind"] = "fail"
    #: Recent input records kept in each checkpoint to validate imported or rolled-back models (0: none).
    holdout_events: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1000
    #: Validate `stream model import/rollback` candidates on the holdout before they serve.
    validate: bool = True
    #: Refuse a candidate whose holdout error exceeds the current model's by more than this fraction.
    max_degradation: Annotated[float, msgspec.Meta(ge=0)] = 0.05


class CoordinationConfig(_Section):
    """Single active instance: the holder of the lease partition runs the (global) model."""

    #: Stable per instance (static group membership: a restarted instance takes its lease
    #: back at once). Empty: the STREAM_INSTANCE_ID environment variable, else the host name.
    instance_id: str = ""
    #: One-partition topic whose owner in the consumer group is the active instance
    #: (created if missing). Empty: ``<group_id>.lease``.
    lease_topic: str = ""
    #: Exactly-once producer id; shared by all instances so the new active one fences
    #: the old at once. ``{group_id}`` and ``{instance_id}`` are substituted.
    transactional_id: str = "{group_id}-active"
    transaction_timeout_ms: Annotated[int, msgspec.Meta(ge=1000)] = 60_000


class Config(_Section):
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    topics: TopicsConfig = msgspec.field(default_factory=TopicsConfig)
    processing: ProcessingConfig = msgspec.field(default_factory=ProcessingConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    checkpoints: CheckpointsConfig = msgspec.field(default_factory=CheckpointsConfig)
    coordination: CoordinationConfig = msgspec.field(default_factory=CoordinationConfig)
    learners: dict[str, LearnerSpec] = {}

    def input_topics(self) -> dict[str, str]:
        """Contract topic names by stream (``clicks`` -> the configured name)."""
        t = self.topics
        return {"clicks": t.clicks, "purchases": t.purchases, "prices": t.prices, "fraud_labels": t.fraud_labels}


def _parse_learner(name: str, data: Any, source: str) -> LearnerSpec:
    # Converted one by one so an error names the learner, not `$.learners[...]`.
    where = f"$.learners.{name}"
    try:
        spec: LearnerSpec = msgspec.convert(data, LearnerSpec, strict=True)  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$", f"`{where}")
        if "`$" not in str(exc):
            message = f"{message} - at `{where}`"
        raise ConfigError(f"{source}: {message}") from None
    try:
        spec.validate(name)
    except ValueError as exc:
        raise ConfigError(f"{source}: {where}: {exc}") from None
    return spec


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    learners = data.get("learners", {})
    if not isinstance(learners, dict):
        raise ConfigError(f"{source}: Expected `object`, got `{type(learners).__name__}` - at `$.learners`")
    specs = {name: _parse_learner(name, spec, source) for name, spec in learners.items()}
    try:
        config = msgspec.convert({**data, "learners": {}}, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config.learners = specs
    return config


def load_config(path: str | Path | None, *, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (or the defaults when ``path`` is None), apply the
    ``STREAM_BOOTSTRAP_SERVERS`` environment variable and command-line
    ``overrides`` (dotted keys, e.g. ``{"kafka.group_id": "g"}``), validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    env = os.environ.get("STREAM_BOOTSTRAP_SERVERS")
    if env:
        data.setdefault("kafka", {})["bootstrap_servers"] = env
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, source)


def redact(props: dict[str, ClientValue]) -> dict[str, ClientValue]:
    """Client properties safe to log: secrets replaced by ``***``."""
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in props.items()}


def build_learners(config: Config) -> list[Learner]:
    """The configured learners, untrained, in configuration order."""
    topics = config.input_topics()
    return [build_learner(name, spec, topics) for name, spec in config.learners.items()]


def all_topics(config: Config) -> dict[str, int]:
    """Every topic the configuration reads or writes, with its partition count."""
    n = config.topics.partitions
    topics = dict.fromkeys(config.input_topics().values(), n)
    topics[config.topics.dead_letters] = n
    for learner in build_learners(config):  # the learners know their output topics
        for t in learner.reads:
            topics.setdefault(t, n)
        topics.setdefault(learner.output_topic, n)
    return topics
