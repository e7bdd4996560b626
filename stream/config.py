"""Typed configuration, read from TOML and validated once at start-up.

Everything after start-up receives these objects, never raw dicts. A bad key
or value is reported with its path (``$.kafka.bootstrap_server``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from stream.errors import ConfigError
from stream.events import EVENT_TYPES, contract_string_fields
from stream.learners import Learner, LearnerSpec, build_learner

__all__ = [
    "PUBLIC_CLIENT_PROPERTIES",
    "Config",
    "ConfigError",
    "all_topics",
    "build_learners",
    "default_config_text",
    "known_secrets",
    "load_config",
    "redact",
    "scrub",
]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
ClientValue = str | int | float | bool

#: The packaged default configuration (``stream/default.toml``; ``configs/default.toml`` links to it).
DEFAULT_CONFIG = "default.toml"
#: ``--config`` value naming the packaged default configuration explicitly.
DEFAULT_CONFIG_NAME = "default"

#: librdkafka properties known not to be secret: logged in clear. Every other property (including
#: misspelled and unknown ones) is logged as ``***``. Usernames and client ids are identities, not
#: secrets: they are shown, so an authentication failure can be traced to the principal it used.
PUBLIC_CLIENT_PROPERTIES = frozenset(
    (
        "bootstrap.servers",
        "metadata.broker.list",
        "client.id",
        "client.rack",
        "client.dns.lookup",
        "broker.address.family",
        "group.id",
        "group.instance.id",
        "group.protocol",
        "group.protocol.type",
        "group.remote.assignor",
        "partition.assignment.strategy",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "coordinator.query.interval.ms",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "isolation.level",
        "enable.partition.eof",
        "check.crcs",
        "allow.auto.create.topics",
        "fetch.wait.max.ms",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "max.partition.fetch.bytes",
        "fetch.message.max.bytes",
        "fetch.error.backoff.ms",
        "fetch.queue.backoff.ms",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.kerberos.service.name",
        "sasl.kerberos.principal",
        "sasl.kerberos.kinit.cmd",
        "sasl.kerberos.min.time.before.relogin",
        "sasl.oauthbearer.method",
        "sasl.oauthbearer.client.id",
        "sasl.oauthbearer.scope",
        "sasl.oauthbearer.extensions",
        "sasl.oauthbearer.token.endpoint.url",
        "enable.sasl.oauthbearer.unsecure.jwt",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.crl.location",
        "ssl.keystore.location",
        "ssl.endpoint.identification.algorithm",
        "enable.ssl.certificate.verification",
        "ssl.cipher.suites",
        "ssl.curves.list",
        "ssl.sigalgs.list",
        "ssl.providers",
        "ssl.engine.location",
        "https.ca.location",
        "acks",
        "request.required.acks",
        "linger.ms",
        "queue.buffering.max.ms",
        "batch.num.messages",
        "batch.size",
        "compression.type",
        "compression.codec",
        "compression.level",
        "enable.idempotence",
        "enable.gapless.guarantee",
        "max.in.flight",
        "max.in.flight.requests.per.connection",
        "message.max.bytes",
        "message.copy.max.bytes",
        "receive.message.max.bytes",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "request.timeout.ms",
        "socket.timeout.ms",
        "socket.connection.setup.timeout.ms",
        "socket.keepalive.enable",
        "socket.nagle.disable",
        "socket.send.buffer.bytes",
        "socket.receive.buffer.bytes",
        "socket.max.fails",
        "connections.max.idle.ms",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "queue.buffering.backpressure.threshold",
        "retries",
        "message.send.max.retries",
        "retry.backoff.ms",
        "retry.backoff.max.ms",
        "reconnect.backoff.ms",
        "reconnect.backoff.max.ms",
        "partitioner",
        "sticky.partitioning.linger.ms",
        "transactional.id",
        "transaction.timeout.ms",
        "statistics.interval.ms",
        "topic.metadata.refresh.interval.ms",
        "topic.metadata.refresh.fast.interval.ms",
        "topic.metadata.refresh.sparse",
        "topic.metadata.propagation.max.ms",
        "metadata.max.age.ms",
        "metadata.recovery.strategy",
        "api.version.request",
        "api.version.request.timeout.ms",
        "api.version.fallback.ms",
        "broker.version.fallback",
        "log_level",
        "log.queue",
        "log.thread.name",
        "log.connection.close",
        "enable.random.seed",
        "debug",
    )
)
#: Shorter secret values are not searched for in messages (they would match ordinary words).
_MIN_SCRUB = 4
#: Secrets at least this long are also caught when a message quotes only part of them.
_NGRAM = 8
_KNOWN_SECRETS: set[str] = set()


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
    #: Search and ads requests with their candidates (the ranking learner's input).
    searches: str = "searches"
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
    #: Learn the partitions one consumer reads in event-time order (the record timestamps), not
    #: in fetch order: a backlog is learned as the same events arriving live would be.
    align: bool = True
    #: An empty partition that the broker still has records for holds the others back at most
    #: this long (Kafka Streams' max.task.idle.ms); caught-up partitions never wait.
    align_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 500


class MetricsConfig(_Section):
    #: HTTP port of ``/metrics``; 0 disables the endpoint.
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9100
    #: Address ``/metrics`` listens on: every interface by default (containers, a Prometheus on
    #: another host); ``127.0.0.1`` for a local Prometheus or a sidecar, ``::`` for IPv6.
    host: str = "0.0.0.0"
    #: TLS: a PEM certificate (chain) and its private key; both or neither. Empty: plain HTTP.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: HTTP basic auth: the username (an identity, not a secret; ``STREAM_METRICS_USERNAME``
    #: overrides it). The password is never read from this file: ``basic_auth_password_file``
    #: names a file holding it, else the ``STREAM_METRICS_PASSWORD`` environment variable.
    #: Empty username and no password: no authentication.
    basic_auth_username: str = ""
    basic_auth_password_file: str = ""
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

    #: Where checkpoints live: a directory ("directory": ``dir``, local or a mount shared by the
    #: instances) or a compacted Kafka topic ("kafka": ``topic``; no shared filesystem needed).
    storage: Literal["directory", "kafka"] = "directory"
    #: Directory (local or a mount shared by the instances); checkpoints go in ``<dir>/<group_id>/``.
    dir: str = "var/checkpoints"
    #: The compacted checkpoint topic (created if missing). Empty: ``<group_id>.checkpoints``.
    topic: str = ""
    #: Checkpoints are split into records of this many bytes (under the brokers' message.max.bytes).
    chunk_bytes: Annotated[int, msgspec.Meta(ge=16 * 1024, le=8 * 1024 * 1024)] = 512 * 1024
    #: A checkpoint is written at the first commit after this many events ...
    every_events: PositiveInt = 100_000
    #: ... or this many seconds (whichever comes first), and always on task hand-over and shutdown.
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
    #: File holding the checkpoint key (HMAC-SHA256; at least 32 bytes, e.g. `openssl rand -hex 32`):
    #: checkpoints are signed with it and anything unsigned is refused before unpickling. Several
    #: whitespace-separated keys: the first signs, the others (previous keys) still verify.
    #: The STREAM_CHECKPOINT_KEY environment variable, when set, is used instead. Empty: unauthenticated.
    key_file: str = ""


class CoordinationConfig(_Section):
    """How instances share the work: the group assigns tasks (partitions of the tasks topic) to them."""

    #: Stable per instance (static group membership: a restarted instance takes its tasks
    #: back at once). Empty: the STREAM_INSTANCE_ID environment variable, else the host name.
    instance_id: str = ""
    #: Topic whose partitions the group assigns as tasks, one per partition number of the
    #: inputs (created if missing, no records). Empty: ``<group_id>.tasks``.
    tasks_topic: str = ""
    #: Streams (``prices``, ...) or topic names read as a global table: every task reads all
    #: their partitions and learns every record; the task ``partition mod P`` publishes and
    #: commits it. Not keyed by user (prices by item, fraud labels by order), so not split.
    global_topics: list[str] = msgspec.field(default_factory=lambda: ["prices", "fraud_labels"])
    #: Exactly-once producer id, one per instance: a restarted instance fences its own
    #: predecessor (zombie); other instances' stale commits are fenced by their group
    #: generation. ``{group_id}`` and ``{instance_id}`` are substituted.
    transactional_id: str = "{group_id}-{instance_id}"
    transaction_timeout_ms: Annotated[int, msgspec.Meta(ge=1000)] = 60_000


class SyncConfig(_Section):
    """Model sync between tasks (stream.sync, stream.sync_topic): what is global by nature (linear
    weights, scaler moments, label counts, item factors, popularity, co-clicks) merged across the
    tasks every ``every_events`` events or ``every_s`` seconds, through a compacted topic."""

    #: Off: each task learns alone (one task never syncs).
    enabled: bool = True
    #: A merge after this many events processed by the instance (what one task learns between merges
    #: must stay small: measured, 500 events per task let summed item-vector updates diverge once) ...
    every_events: PositiveInt = 500
    #: ... or this many seconds with events (whichever comes first).
    every_s: PositiveFloat = 5.0
    #: Linear weights: "sum" of the tasks' updates (as one model learning them all) or "average".
    mode: Literal["sum", "average"] = "sum"
    #: The compacted model-sync topic (created if missing). Empty: ``<group_id>.model-sync``.
    topic: str = ""
    #: Contributions are split into records of this many bytes (under the brokers' message.max.bytes).
    chunk_bytes: Annotated[int, msgspec.Meta(ge=16 * 1024, le=8 * 1024 * 1024)] = 512 * 1024


class PrivacyConfig(_Section):
    """Identifier fields pseudonymized at decode (stream.privacy, README "Privacy"); off while none is listed."""

    #: Top-level fields masked wherever they occur: in every contract that has them and in every
    #: topic a custom learner reads (e.g. ["user_id", "device_id", "order_id"]).
    fields: list[str] = []
    #: More fields for one topic: a contract stream (`purchases`) or a custom learner's topic name.
    per_topic: dict[str, list[str]] = {}
    #: The HMAC key: read from this file when set (whitespace around it stripped) ...
    key_file: str = ""
    #: ... else from this environment variable. At least 32 bytes; checked at start-up, never logged.
    key_env: str = "STREAM_PRIVACY_KEY"
    #: Dead letters: the original bytes ("keep", to reprocess them), identifier fields masked ("mask";
    #: a value that is not a JSON object is dropped) or the value dropped ("drop"). Keys are masked
    #: as outputs' are, except in "keep".
    dead_letters: Literal["keep", "mask", "drop"] = "keep"

    def __post_init__(self) -> None:
        """What can be checked without the key or the topic names (called while the config is parsed)."""
        for where, names in [("fields", self.fields), *((f"per_topic.{t}", v) for t, v in self.per_topic.items())]:
            for name in names:
                if not name or name != name.strip():
                    raise ValueError(
                        f"`{where}`: field names must be non-empty, without surrounding spaces, got {name!r}"
                    )
        for stream, event_type in EVENT_TYPES.items():
            _check_masked_fields(
                stream, contract_string_fields(event_type), self.fields, self.per_topic.get(stream, ())
            )
        if self.key_file and not self.key_file.strip():
            raise ValueError("`key_file` is blank")
        if not self.key_file and not self.key_env:
            raise ValueError("name the key: `key_file` or `key_env`")


def _check_masked_fields(stream: str, fields: dict[str, bool], listed: list[str], per_topic: Sequence[str]) -> None:
    """Only string fields (identifiers) can be masked; ``per_topic`` must name fields of its contract."""
    for name in listed:
        if name in fields and not fields[name]:
            raise ValueError(
                f"`fields`: `{name}` is not a string field of the {stream} contract; only identifiers can be masked"
            )
    for name in per_topic:
        if name not in fields:
            raise ValueError(f"`per_topic.{stream}`: the {stream} contract has no field `{name}`")
        if not fields[name]:
            raise ValueError(f"`per_topic.{stream}`: `{name}` is not a string field; only identifiers can be masked")


class Config(_Section):
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    topics: TopicsConfig = msgspec.field(default_factory=TopicsConfig)
    processing: ProcessingConfig = msgspec.field(default_factory=ProcessingConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    checkpoints: CheckpointsConfig = msgspec.field(default_factory=CheckpointsConfig)
    coordination: CoordinationConfig = msgspec.field(default_factory=CoordinationConfig)
    privacy: PrivacyConfig = msgspec.field(default_factory=PrivacyConfig)
    sync: SyncConfig = msgspec.field(default_factory=SyncConfig)
    learners: dict[str, LearnerSpec] = {}

    def input_topics(self) -> dict[str, str]:
        """Contract topic names by stream (``clicks`` -> the configured name)."""
        t = self.topics
        topics = {"clicks": t.clicks, "purchases": t.purchases, "prices": t.prices, "fraud_labels": t.fraud_labels}
        topics["searches"] = t.searches
        return topics


def _safe(message: str) -> str:
    """A msgspec validation message without the values it quotes (``Invalid enum value 'x'``):
    a secret put under the wrong key must not be echoed. Paths and field names stay."""
    return scrub(re.sub(r"'(?:[^'\\]|\\.)*'", "'***'", message))


def _parse_learner(name: str, data: Any, source: str) -> LearnerSpec:
    # Converted one by one so an error names the learner, not `$.learners[...]`.
    where = f"$.learners.{name}"
    try:
        spec: LearnerSpec = msgspec.convert(data, LearnerSpec, strict=True)  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        # Learner specs hold no secrets: values stay in the message (a misspelled kind is shown).
        message = scrub(str(exc)).replace("`$", f"`{where}")
        if "`$" not in str(exc):
            message = f"{message} - at `{where}`"
        raise ConfigError(f"{source}: {message}") from None
    try:
        spec.validate(name)
    except ValueError as exc:
        raise ConfigError(f"{source}: {where}: {exc}") from None
    return spec


def _remember_secrets(data: dict[str, Any]) -> None:
    """Note the values of the non-public client properties, before validation (so even a
    rejected configuration's secrets are scrubbed from what is printed afterwards)."""
    kafka = data.get("kafka")
    if not isinstance(kafka, dict):
        return
    for section in ("common", "consumer", "producer"):
        props = kafka.get(section)
        if isinstance(props, dict):
            _KNOWN_SECRETS.update(secret_values(props))


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    _remember_secrets(data)
    learners = data.get("learners", {})
    if not isinstance(learners, dict):
        raise ConfigError(f"{source}: Expected `object`, got `{type(learners).__name__}` - at `$.learners`")
    specs = {name: _parse_learner(name, spec, source) for name, spec in learners.items()}
    try:
        config = msgspec.convert({**data, "learners": {}}, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_safe(str(exc))}") from None
    config.learners = specs
    m = config.metrics
    if bool(m.tls_cert_file) != bool(m.tls_key_file):
        raise ConfigError(f"{source}: `$.metrics.tls_cert_file` and `$.metrics.tls_key_file` go together")
    return config


def default_config_text() -> str:
    """The packaged default configuration (``stream/default.toml``), wherever stream is installed."""
    return resources.files("stream").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")


def load_config(path: str | Path | None, *, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (or the packaged default configuration when ``path`` is None or
    ``"default"``), apply the ``STREAM_BOOTSTRAP_SERVERS`` environment variable and command-line
    ``overrides`` (dotted keys, e.g. ``{"kafka.group_id": "g"}``), validate."""
    data: dict[str, Any] = {}
    if path is None or str(path) == DEFAULT_CONFIG_NAME:
        source = "<packaged default.toml>"
        try:
            data = tomllib.loads(default_config_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:  # a broken installation
            raise ConfigError(f"{source}: cannot read the packaged default configuration: {exc}") from None
    else:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file (working directory {os.getcwd()})") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory, not a configuration file") from None
        except PermissionError:
            raise ConfigError(f"{source}: permission denied") from None
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


def redact(props: dict[str, Any]) -> dict[str, Any]:
    """Client properties safe to log: only those of ``PUBLIC_CLIENT_PROPERTIES`` in clear,
    every other value (secrets, misspelled and unknown keys, callbacks) as ``***``.

    >>> redact({"sasl.username": "svc", "sasl.password": "pw", "sasl.passwd": "pw", "linger.ms": 5})
    {'sasl.username': 'svc', 'sasl.password': '***', 'sasl.passwd': '***', 'linger.ms': 5}
    """
    return {k: (v if k in PUBLIC_CLIENT_PROPERTIES else "***") for k, v in props.items()}


def secret_values(props: dict[str, Any]) -> set[str]:
    """The values of ``props`` that ``redact`` hides, as text (callbacks and flags excluded)."""
    return {
        str(v)
        for k, v in props.items()
        if k not in PUBLIC_CLIENT_PROPERTIES and isinstance(v, str | int | float) and not isinstance(v, bool)
    }


def known_secrets() -> frozenset[str]:
    """Non-public client property values of every configuration parsed in this process."""
    return frozenset(_KNOWN_SECRETS)


@functools.lru_cache(maxsize=16)
def _patterns(secrets: frozenset[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """The forms of ``secrets`` searched for (as is, and as JSON prints them: log lines are JSON)
    and the 8-character pieces of the longer ones."""
    forms = {f for s in secrets if len(s) >= _MIN_SCRUB for f in (s, json.dumps(s)[1:-1])}
    grams = frozenset(f[i : i + _NGRAM] for f in forms if len(f) >= _NGRAM for i in range(len(f) - _NGRAM + 1))
    return tuple(sorted(forms, key=len, reverse=True)), grams


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every secret (default: ``known_secrets()``) replaced by ``***``: whole
    values, and for values of at least 8 characters any 8 or more consecutive characters of
    one (a message quoting part of a value, e.g. librdkafka's "unrecognized ... beginning at").

    >>> scrub('bad config "x clientSecret=s3cr3t-v4lue"', {"id=a clientSecret=s3cr3t-v4lue"})
    'bad config "x***"'
    """
    if not text:
        return text
    forms, grams = _patterns(known_secrets() if secrets is None else frozenset(secrets))
    if not forms:
        return text
    hidden = bytearray(len(text))
    for form in forms:
        start = text.find(form)
        while start >= 0:
            hidden[start : start + len(form)] = b"\x01" * len(form)
            start = text.find(form, start + 1)
    if grams:
        for i in range(len(text) - _NGRAM + 1):
            if text[i : i + _NGRAM] in grams:
                hidden[i : i + _NGRAM] = b"\x01" * _NGRAM
    if not any(hidden):
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if hidden[i]:
            while i < len(text) and hidden[i]:
                i += 1
            out.append("***")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


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
