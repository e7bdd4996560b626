"""Model sync between tasks: in one process, or across instances through a compacted topic.

``make_sync`` builds the ``stream.task_sync.TaskSync`` the application ticks
after every batch. A merge is due after ``[sync] every_events`` events or
``every_s`` seconds (with events); then, per learner (by name), every task
this instance owns contributes what it learned since its last merge
(``Learner.global_params``, merged by a ``stream.sync.Merger``), and continues
from the merged parameters (``set_global_params``).

* ``LocalSync``: the tasks of one process and nothing else (the broker-less
  bench, tests).
* ``TopicSync``: the tasks of every instance of the group, through the
  compacted topic ``<group_id>.model-sync`` (one partition). Each task's
  cumulative contribution is one record keyed ``<task>:<learner>``, so the
  latest record of every key is the whole model sync: an instance reads the
  topic, takes the other tasks' contributions, merges, and publishes its own
  tasks' (a re-send is idempotent). An instance taking a task over reads that
  task's contribution first and adopts the merged values (its learning is in
  the contribution already). Each instance also writes ``v:<instance>``: its
  merge count and the tasks it merged.

Records are msgpack (msgspec, typed: a planted record is data that fails to
decode, never code that runs; nothing is unpickled) of a ``_Envelope``. A
contribution larger than ``chunk_bytes`` is written as chunk records
``<task>:<learner>#<i>`` then the envelope naming their count, length and
sha256 (as ``stream.checkpoint_topic`` does): a reader assembles them or, if a
chunk is missing or altered, keeps the contribution it had. Broker trouble
never raises from ``tick``: what could not be sent is sent at the next merge.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Config
from stream.kafka import admin_config, consumer_config, producer_config
from stream.learners.base import Learner
from stream.sync import Merger, Mode, Params, Table, Value, scalar
from stream.task_sync import NoSync, TaskSync

__all__ = ["LocalSync", "TopicSync", "decode_params", "encode_params", "make_sync", "sync_topic"]

log = logging.getLogger(__name__)

#: Framing, key and headers of a record on top of its value.
_RECORD_OVERHEAD = 4096


def sync_topic(config: Config) -> str:
    return config.sync.topic or f"{config.kafka.group_id}.model-sync"


def make_sync(config: Config, instance_id: str, n_tasks: int) -> TaskSync:
    """The configured model sync: nothing for one task or ``[sync] enabled = false``, else the topic."""
    if not config.sync.enabled or n_tasks <= 1:
        return NoSync()
    return TopicSync(config, instance_id)


# -- the wire format ----------------------------------------------------------------------------


class _Table(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    ids: list[str]
    dim: int
    #: The matrix, row by row, as little-endian float64 bytes.
    data: bytes


class _Family(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    scalars: dict[str, float] = {}
    #: Vectors as little-endian float64 bytes.
    vectors: dict[str, bytes] = {}
    tables: dict[str, _Table] = {}


class _Wire(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    weights: _Family
    counts: _Family
    decayed: dict[str, float]
    ref_ms: float
    tau_ms: float


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    #: The writer's merge count when it wrote this.
    version: int
    #: The encoded ``_Wire`` inline, or empty with ``chunks`` chunk records before this one.
    data: bytes = b""
    chunks: int = 0
    length: int = 0
    sha256: str = ""


class _Marker(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    tasks: list[int]


def _family(values: Mapping[str, Value]) -> _Family:
    out = _Family({}, {}, {})
    for k, v in values.items():
        if isinstance(v, Table):
            dim = v.matrix.shape[1] if v.matrix.ndim == 2 else 0
            out.tables[k] = _Table(v.ids, dim, np.ascontiguousarray(v.matrix, dtype="<f8").tobytes())
        elif isinstance(v, np.ndarray):
            out.vectors[k] = np.ascontiguousarray(v, dtype="<f8").tobytes()
        else:
            out.scalars[k] = float(v)
    return out


def _table(t: _Table, key: str, where: str) -> Table:
    if t.dim < 1 or len(t.data) != 8 * t.dim * len(t.ids) or len(set(t.ids)) != len(t.ids):
        raise ValueError(f"{where}: table {key[:100]!r}: {len(t.ids)} ids x {t.dim} do not match {len(t.data)} bytes")
    matrix = np.frombuffer(t.data, dtype="<f8").astype(np.float64).reshape(len(t.ids), t.dim)
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where}: table {key[:100]!r} is not finite")
    return Table(list(t.ids), matrix)


def _values(family: _Family, where: str) -> dict[str, Value]:
    out: dict[str, Value] = {k: _table(t, k, where) for k, t in family.tables.items()}
    for k, x in family.scalars.items():
        if not math.isfinite(x):
            raise ValueError(f"{where}: parameter {k[:100]!r} is not finite")
        out[k] = x
    for k, b in family.vectors.items():
        if len(b) % 8:
            raise ValueError(f"{where}: vector {k[:100]!r} is {len(b)} bytes, not float64s")
        vec = np.frombuffer(b, dtype="<f8").astype(np.float64)
        if not np.isfinite(vec).all():
            raise ValueError(f"{where}: vector {k[:100]!r} is not finite")
        out[k] = vec
    return out


def encode_params(params: Params) -> bytes:
    """``params`` as msgpack (typed; vectors as raw float64 bytes).

    >>> p = decode_params(encode_params(Params(weights={"l0|x": 1.5, "i|a": np.ones(2)})))
    >>> p.weights["l0|x"], p.weights["i|a"].tolist()
    (1.5, [1.0, 1.0])
    """
    wire = _Wire(_family(params.weights), _family(params.counts), dict(params.decayed), params.ref_ms, params.tau_ms)
    return msgspec.msgpack.encode(wire)


def decode_params(data: bytes, where: str = "model sync") -> Params:
    """What ``encode_params`` wrote; ``ValueError`` naming ``where`` for anything else."""
    try:
        wire = msgspec.msgpack.decode(data, type=_Wire)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{where}: not a model-sync record: {exc}") from None
    decayed = _values(_Family(wire.decayed, {}, {}), where)
    if not (math.isfinite(wire.ref_ms) and math.isfinite(wire.tau_ms)) or (decayed and wire.tau_ms <= 0):
        raise ValueError(f"{where}: bad decay reference {wire.ref_ms!r} / {wire.tau_ms!r}")
    return Params(
        weights=_values(wire.weights, where),
        counts=_values(wire.counts, where),
        decayed={k: scalar(v) for k, v in decayed.items()},
        ref_ms=wire.ref_ms,
        tau_ms=wire.tau_ms,
    )


# -- merging the tasks of this instance ---------------------------------------------------------


class LocalSync:
    """Merges the tasks of one process (see the module doc); no broker."""

    def __init__(
        self,
        every_events: int,
        every_s: float,
        mode: Mode = "sum",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_events = every_events
        self.every_s = every_s
        self.mode: Mode = mode
        self.clock = clock
        #: One merger per learner name.
        self.mergers: dict[str, Merger] = {}
        self.merges = 0
        #: Seconds spent merging (reading, merging, setting the parameters), over all merges.
        self.merge_seconds = 0.0
        self._events = 0
        self._last = clock()
        self._versions: dict[int, int] = {}

    def tick(self, tasks: Mapping[int, Sequence[Learner]], events: int) -> None:
        self._events += events
        if not self._events or not tasks:
            return
        if self._events < self.every_events and self.clock() - self._last < self.every_s:
            return
        started = time.perf_counter()
        self.merge(tasks)
        self.merge_seconds += time.perf_counter() - started

    def version(self, task: int) -> int:
        return self._versions.get(task, 0)

    def close(self) -> None:
        return None

    def merge(self, tasks: Mapping[int, Sequence[Learner]]) -> None:
        """Merge now, whatever is due."""
        self._events = 0
        self._last = self.clock()
        self.merges += 1
        by_name = _by_name(tasks)
        self._before(by_name)
        for name, copies in by_name.items():
            merger = self._merger(name)
            for task, learner in copies.items():
                merger.update(task, learner.global_params())
            self._between(name, merger, copies)
            merged = merger.merged()
            merger.merges += 1
            for task, learner in copies.items():
                learner.set_global_params(merged)
                merger.applied(task, learner.global_params())
        for task in tasks:
            self._versions[task] = self.merges
        self._after(tasks)

    def _merger(self, name: str) -> Merger:
        merger = self.mergers.get(name)
        if merger is None:
            merger = self.mergers[name] = Merger(self.mode)
        return merger

    # Hooks for the topic: read before the merge, publish between update and merged, mark after.
    def _before(self, by_name: Mapping[str, Mapping[int, Learner]]) -> None:
        return None

    def _between(self, name: str, merger: Merger, copies: Mapping[int, Learner]) -> None:
        return None

    def _after(self, tasks: Mapping[int, Sequence[Learner]]) -> None:
        return None


def _by_name(tasks: Mapping[int, Sequence[Learner]]) -> dict[str, dict[int, Learner]]:
    out: dict[str, dict[int, Learner]] = {}
    for task, learners in tasks.items():
        for learner in learners:
            out.setdefault(learner.name, {})[task] = learner
    return out


# -- merging through the topic ------------------------------------------------------------------


class TopicSync(LocalSync):
    """Merges the tasks of every instance through the compacted model-sync topic (see the module doc)."""

    def __init__(self, config: Config, instance_id: str, *, timeout_s: float = 10.0) -> None:
        s = config.sync
        super().__init__(s.every_events, s.every_s, s.mode)
        self.config = config
        self.instance_id = instance_id
        self.topic = sync_topic(config)
        self.chunk_bytes = s.chunk_bytes
        self.timeout_s = timeout_s
        self._tp = TopicPartition(self.topic, 0)
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._ready = False
        self._position = 0
        #: Chunk records read and not yet assembled, by key.
        self._chunks: dict[str, bytes] = {}
        #: Tasks this instance merged at its last merge (their contributions are its own).
        self._mine: set[int] = set()
        #: Merge counts other instances announced (``v:<instance>``).
        self.peer_versions: dict[str, int] = {}
        #: Bytes of the contributions published, over all merges.
        self.bytes_sent = 0
        self._errors: list[str] = []

    # -- clients ----------------------------------------------------------------------------

    def _max_message_bytes(self) -> int:
        return self.chunk_bytes + _RECORD_OVERHEAD

    def _connect(self) -> bool:
        if self._ready:
            return True
        try:
            admin = AdminClient(admin_config(self.config))
            if self.topic not in admin.list_topics(timeout=self.timeout_s).topics:
                spec = NewTopic(self.topic, num_partitions=1, replication_factor=self.config.topics.replication_factor,
                                config={"cleanup.policy": "compact",
                                        "max.message.bytes": str(self._max_message_bytes())})  # fmt: skip
                try:
                    admin.create_topics([spec], request_timeout=self.timeout_s)[self.topic].result(self.timeout_s)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
            # A contribution that cannot be delivered is superseded by the next merge's (cumulative):
            # give up on it after a while instead of queueing every merge of an outage.
            props = {"message.max.bytes": self._max_message_bytes(), "message.timeout.ms": 60_000}
            self._producer = Producer(producer_config(self.config, **props))
            reader = {
                "group.id": f"{self.config.kafka.group_id}.model-sync-reader",  # assigned, never committed
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
                "fetch.message.max.bytes": self._max_message_bytes(),
            }
            self._consumer = Consumer(consumer_config(self.config, **reader))
            self._consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        except (KafkaException, OSError) as exc:
            log.warning("model sync: topic not reachable, merging later",
                        extra={"topic": self.topic, "error": str(exc)})  # fmt: skip
            return False
        self._ready = True
        return True

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout_s)
        if self._consumer is not None:
            self._consumer.close()
        self._producer = self._consumer = None
        self._ready = False

    # -- reading ----------------------------------------------------------------------------

    def read(self, timeout_s: float | None = None) -> int:
        """Read what the topic holds up to its current end (bounded by ``timeout_s``); returns the
        position reached. Other tasks' contributions replace what this instance had of them."""
        if not self._connect():
            return self._position
        consumer = self._consumer
        assert consumer is not None
        try:
            _, high = consumer.get_watermark_offsets(self._tp, timeout=self.timeout_s)
        except KafkaException as exc:
            log.warning("model sync: cannot read the topic end", extra={"topic": self.topic, "error": str(exc)})
            return self._position
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        self._pull(consumer, 0.2, lambda: self._position < high and time.monotonic() < deadline)
        return self._position

    def drain(self) -> int:
        """Index what the consumer has already fetched, without waiting: the merge in the loop's
        path must not wait for the broker (waiting for the topic's end there cost the loop most of
        its time); what is not fetched yet is merged at the next merge."""
        if self._consumer is not None:
            self._pull(self._consumer, 0.0, lambda: True)
        return self._position

    def _pull(self, consumer: Consumer, wait_s: float, more: Callable[[], bool]) -> None:
        """Index batches while ``more()``; without a wait, until nothing fetched is left."""
        try:
            while more():
                msgs = consumer.consume(1000, wait_s)
                if not msgs and not wait_s:
                    return
                for msg in msgs:
                    if msg.error() is not None:
                        log.warning("model sync: read error",
                                    extra={"topic": self.topic, "error": msg.error().str()})  # type: ignore[union-attr]
                        continue
                    self._index(msg)
                    self._position = max(self._position, (msg.offset() or 0) + 1)
        except KafkaException as exc:
            log.warning("model sync: read failed, merging what was read",
                        extra={"topic": self.topic, "error": str(exc)})  # fmt: skip

    def _index(self, msg: Message) -> None:
        key = (msg.key() or b"").decode("utf-8", "replace")
        value = msg.value()
        where = f"topic {self.topic} offset {msg.offset()} key {key[:200]!r}"
        if value is None:
            return
        try:
            if key.startswith("v:"):
                marker = msgspec.msgpack.decode(value, type=_Marker)
                self.peer_versions[key[2:]] = marker.version
                return
            if "#" in key:
                self._chunks[key] = value
                return
            task_text, sep, name = key.partition(":")
            if not sep or not task_text.isdigit():
                raise ValueError(f"{where}: not a model-sync key")
            task = int(task_text)
            envelope = msgspec.msgpack.decode(value, type=_Envelope)
            data = envelope.data if not envelope.chunks else self._assemble(key, envelope, where)
            params = decode_params(data, where)
        except (ValueError, msgspec.DecodeError) as exc:
            log.warning("model sync: record passed over",
                        extra={"topic": self.topic, "offset": msg.offset(), "key": key[:200], "error": str(exc)[:500]})
            return
        if task in self._mine:
            return  # this instance's own task: its contribution here is the newest
        self._merger(name).replace(task, params)

    def _assemble(self, key: str, envelope: _Envelope, where: str) -> bytes:
        parts = [self._chunks.get(f"{key}#{i:06d}") for i in range(envelope.chunks)]
        if any(p is None for p in parts):
            raise ValueError(f"{where}: chunks missing")
        data = b"".join(parts)  # type: ignore[arg-type]
        if len(data) != envelope.length or hashlib.sha256(data).hexdigest() != envelope.sha256:
            raise ValueError(f"{where}: chunks do not match their envelope (length or sha256)")
        for i in range(envelope.chunks):
            self._chunks.pop(f"{key}#{i:06d}", None)
        return data

    # -- writing ----------------------------------------------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(err.str())

    def _produce(self, key: str, value: bytes) -> None:
        producer = self._producer
        assert producer is not None
        try:
            producer.produce(self.topic, value, key.encode(), partition=0, on_delivery=self._on_delivery)
        except BufferError:
            # The queue is full (the broker is away): never block the loop; the next merge re-sends.
            producer.poll(0)
            raise BufferError(f"model sync: producer queue full writing {key} to {self.topic}") from None

    def publish(self, task: int, name: str, params: Params) -> None:
        """Write one task's contribution: inline, or chunks then the envelope."""
        data = encode_params(params)
        key = f"{task}:{name}"
        if len(data) <= self.chunk_bytes:
            envelope = _Envelope(self.merges, data=data)
        else:
            n = math.ceil(len(data) / self.chunk_bytes)
            view = memoryview(data)
            for i in range(n):
                self._produce(f"{key}#{i:06d}", bytes(view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]))
            envelope = _Envelope(self.merges, chunks=n, length=len(data), sha256=hashlib.sha256(data).hexdigest())
        self._produce(key, msgspec.msgpack.encode(envelope))
        self.bytes_sent += len(data)

    # -- the merge hooks --------------------------------------------------------------------

    def _before(self, by_name: Mapping[str, Mapping[int, Learner]]) -> None:
        owned = {task for copies in by_name.values() for task in copies}
        self._mine &= owned  # revoked tasks: their new owner's records are the newest from now on
        if self._connect():
            self.drain()
        self._mine = owned

    def _between(self, name: str, merger: Merger, copies: Mapping[int, Learner]) -> None:
        if not self._ready:
            return
        try:
            for task in copies:
                self.publish(task, name, merger.contribution(task))
        except (KafkaException, BufferError) as exc:
            log.warning("model sync: publish failed, sent again at the next merge",
                        extra={"topic": self.topic, "error": str(exc)})  # fmt: skip

    def _after(self, tasks: Mapping[int, Sequence[Learner]]) -> None:
        if not self._ready or self._producer is None:
            return
        try:
            self._produce(f"v:{self.instance_id}", msgspec.msgpack.encode(_Marker(self.merges, sorted(tasks))))
        except (KafkaException, BufferError) as exc:
            log.warning("model sync: version marker not sent", extra={"topic": self.topic, "error": str(exc)})
        self._producer.poll(0)
        if self._errors:
            log.warning("model sync: delivery failed, sent again at the next merge",
                        extra={"topic": self.topic, "error": self._errors[0]})  # fmt: skip
            self._errors.clear()

    def flush(self) -> int:
        """Wait for what was published (tests, shutdown); returns the records still queued."""
        return self._producer.flush(self.timeout_s) if self._producer is not None else 0

    def describe(self) -> dict[str, Any]:
        return {"topic": self.topic, "merges": self.merges, "position": self._position, "peers": self.peer_versions}
