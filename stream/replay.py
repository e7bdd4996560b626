"""Recordings of Kafka topics: record, replay to Kafka, backtest without a broker.

A *recording* is a directory::

    manifest.json                      what is inside (topics, partitions, counts, checksums)
    topics/<topic>/<partition>.frames.gz   the records of one topic-partition, in offset order
    truth.json                         (simulator recordings only) the ground truth

Each ``.frames.gz`` file is a gzip stream of frames, one per record: a 4-byte
big-endian length, then a msgpack array ``[offset, timestamp_type,
timestamp, key, value, headers]`` where ``key`` and ``value`` are msgpack
``bin`` (or nil) and ``headers`` is nil or a list of ``[name, bin-or-nil]``.
Topic and partition are those of the file. Bytes are kept exactly, so values
that are not UTF-8 (or not JSON) round-trip; gzip is in the standard library
and written with a zero mtime, so the same records give the same bytes.

:class:`RecordedMessage` implements the pipeline's ``Record`` protocol (the
methods of a confluent-kafka ``Message``), so recordings feed
``stream.pipeline.Pipeline`` directly: :func:`backtest` runs the configured
learners through the very pipeline ``stream run`` uses, in recorded
per-partition order, partitions merged by timestamp.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with RecordingWriter(d, source={"kind": "example"}) as w:
...     w.add("clicks", 0, 0, (1, 1700000000000), b"u1", b'{"x": 1}', [("h", b"\\xff")])
...     w.add("clicks", 0, 1, (1, 1700000000001), None, b"\\xff\\xfe not utf-8", None)
>>> rec = Recording(d)
>>> [(m.offset(), m.key(), m.value(), m.headers()) for m in rec.messages()]
[(0, b'u1', b'{"x": 1}', [('h', b'\\xff')]), (1, None, b'\\xff\\xfe not utf-8', None)]
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import heapq
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import msgspec

from stream import __version__
from stream.config import Config
from stream.pipeline import Pipeline, Record
from stream.privacy import Pseudonymizer
from stream.progress import Progress

__all__ = [
    "BacktestResult",
    "KafkaWriter",
    "Manifest",
    "PartitionEntry",
    "RecordedMessage",
    "Recording",
    "RecordingError",
    "RecordingWriter",
    "ReplayResult",
    "backtest",
    "parse_duration",
    "parse_speed",
    "parse_time",
    "parse_topic_map",
    "record",
    "replay",
    "run_backtest",
]

log = logging.getLogger(__name__)

FORMAT = "stream-recording"
VERSION = 1
MANIFEST = "manifest.json"
#: confluent-kafka's timestamp types.
TIMESTAMP_NOT_AVAILABLE, TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME = 0, 1, 2

_LEN = struct.Struct(">I")
_Headers = list[tuple[str, bytes | None]]
_Frame = tuple[int, int, int, bytes | None, bytes | None, _Headers | None]


class RecordingError(ValueError):
    """A directory that is not a usable recording (missing, corrupt, wrong version)."""


# --------------------------------------------------------------------------- the record


class RecordedMessage:
    """One recorded Kafka record, with the methods of a confluent-kafka ``Message``.

    >>> m = RecordedMessage("clicks", 0, 7, (1, 1700000000000), b"k", b"v", None)
    >>> m.topic(), m.partition(), m.offset(), m.timestamp(), m.error(), len(m)
    ('clicks', 0, 7, (1, 1700000000000), None, 1)
    """

    __slots__ = ("_headers", "_key", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp: tuple[int, int],
        key: bytes | None,
        value: bytes | None,
        headers: _Headers | None = None,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._timestamp = timestamp
        self._key = key
        self._value = value
        self._headers = headers

    @classmethod
    def of(cls, record: Record) -> RecordedMessage:
        """A copy of any ``Record`` (a consumed ``Message``); text keys/values become UTF-8."""
        key, value = record.key(), record.value()
        headers = record.headers()
        ts_type, ts = record.timestamp()
        return cls(
            str(record.topic()),
            int(record.partition()),  # type: ignore[arg-type]
            int(record.offset()),  # type: ignore[arg-type]
            (int(ts_type), int(ts)),
            key.encode() if isinstance(key, str) else key,
            value.encode() if isinstance(value, str) else value,
            [(str(k), v.encode() if isinstance(v, str) else v) for k, v in headers] if headers else None,
        )

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        # Kafka header values may be null (None); the Record protocol types them narrower.
        return self._headers  # type: ignore[return-value]

    def error(self) -> None:
        return None

    def latency(self) -> None:
        return None

    def leader_epoch(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._value) if self._value is not None else 0

    def with_topic(self, topic: str) -> RecordedMessage:
        return RecordedMessage(
            topic, self._partition, self._offset, self._timestamp, self._key, self._value, self._headers
        )

    def _fields(self) -> tuple[Any, ...]:
        return (
            self._topic, self._partition, self._offset, self._timestamp, self._key, self._value, self._headers,
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordedMessage) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self._topic, self._partition, self._offset))

    def __repr__(self) -> str:
        return f"RecordedMessage({self._topic}[{self._partition}]@{self._offset}, ts={self._timestamp[1]})"


# --------------------------------------------------------------------------- manifest


class PartitionEntry(msgspec.Struct, kw_only=True):
    """One topic-partition of a recording."""

    topic: str
    partition: int
    #: Path of the frames file, relative to the recording directory.
    file: str
    records: int = 0
    first_offset: int | None = None
    last_offset: int | None = None
    first_timestamp: int | None = None
    last_timestamp: int | None = None
    #: sha256 of the compressed file, checked by ``Recording.verify``.
    sha256: str | None = None


class Manifest(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    version: int = VERSION
    created_by: str = f"stream {__version__}"
    #: Where the records came from: ``{"kind": "kafka", ...}`` or ``{"kind": "simulator", ...}``.
    source: dict[str, Any] = {}
    #: Contract stream -> topic name at recording time (``clicks`` -> ``clicks``), when known.
    streams: dict[str, str] = {}
    records: int = 0
    #: False when recording stopped before reaching what it was asked for.
    complete: bool = True
    partitions: list[PartitionEntry] = []
    #: Ground-truth file of a simulator recording, relative to the directory.
    truth: str | None = None


# --------------------------------------------------------------------------- writing


class _PartitionWriter:
    """Frames of one topic-partition, buffered and gzip-compressed."""

    __slots__ = ("_buf", "_encode", "entry", "gz", "raw")

    def __init__(self, root: Path, entry: PartitionEntry) -> None:
        path = root / entry.file
        path.parent.mkdir(parents=True, exist_ok=True)
        self.entry = entry
        self.raw: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed in close())
        # mtime=0 and no file name in the header: identical records give identical bytes.
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, compresslevel=6, mtime=0)
        self._buf = bytearray()
        self._encode = msgspec.msgpack.Encoder().encode

    def add(
        self, offset: int, ts: tuple[int, int], key: bytes | None, value: bytes | None, headers: _Headers | None
    ) -> None:
        frame = self._encode((offset, ts[0], ts[1], key, value, headers))
        self._buf += _LEN.pack(len(frame))
        self._buf += frame
        e = self.entry
        if e.first_offset is None:
            e.first_offset, e.first_timestamp = offset, ts[1]
        e.last_offset, e.last_timestamp = offset, ts[1]
        e.records += 1
        if len(self._buf) >= 1 << 20:
            self.gz.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        if self._buf:
            self.gz.write(self._buf)
            self._buf.clear()
        self.gz.close()
        self.raw.close()


class RecordingWriter:
    """Writes a recording directory; the manifest is written (atomically) on ``close``.

    Records of one topic-partition must be added in offset order, which is
    what consuming a partition gives.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        source: dict[str, Any] | None = None,
        streams: Mapping[str, str] | None = None,
        truth: str | None = None,
    ) -> None:
        self.path = Path(path)
        if (self.path / MANIFEST).exists():
            raise RecordingError(f"{self.path} already holds a recording; choose another directory or delete it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(source=dict(source or {}), streams=dict(streams or {}), truth=truth)
        self._writers: dict[tuple[str, int], _PartitionWriter] = {}
        self._closed = False

    def _writer(self, topic: str, partition: int) -> _PartitionWriter:
        w = self._writers.get((topic, partition))
        if w is None:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", topic) or topic in (".", ".."):
                raise RecordingError(f"`{topic}` is not a legal Kafka topic name")
            entry = PartitionEntry(topic=topic, partition=partition, file=f"topics/{topic}/{partition}.frames.gz")
            w = self._writers[(topic, partition)] = _PartitionWriter(self.path, entry)
        return w

    def declare(self, topic: str, partition: int) -> None:
        """Make ``topic[partition]`` part of the recording even if no record
        of it is added (an empty partition was recorded, and is replayed as such)."""
        self._writer(topic, partition)

    def add(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp: tuple[int, int],
        key: bytes | None,
        value: bytes | None,
        headers: _Headers | None = None,
    ) -> None:
        """Add one record (keys, values and header values as bytes)."""
        self._writer(topic, partition).add(offset, timestamp, key, value, headers or None)

    def write(self, record: Record | Any) -> None:
        """Add a consumed message (or any ``Record``) as it is."""
        m = record if isinstance(record, RecordedMessage) else RecordedMessage.of(record)
        self._writer(m._topic, m._partition).add(m._offset, m._timestamp, m._key, m._value, m._headers)

    def close(self, complete: bool = True) -> Manifest:
        """Finish the files, checksum them and write ``manifest.json``."""
        if self._closed:
            return self.manifest
        self._closed = True
        for w in self._writers.values():
            w.close()
        entries = sorted((w.entry for w in self._writers.values()), key=lambda e: (e.topic, e.partition))
        for e in entries:
            with open(self.path / e.file, "rb") as f:
                e.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        m = self.manifest
        m.partitions = entries
        m.records = sum(e.records for e in entries)
        m.complete = complete
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(m), indent=2) + b"\n")
        os.replace(tmp, self.path / MANIFEST)
        return m

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(complete=exc_type is None)


# --------------------------------------------------------------------------- reading


def _frames(path: Path) -> Iterator[_Frame]:
    decode = msgspec.msgpack.Decoder(_Frame).decode
    size = _LEN.size
    with gzip.open(path, "rb") as f:
        buf = b""
        pos = 0
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            buf = buf[pos:] + chunk
            pos = 0
            end = len(buf)
            while pos + size <= end:
                (n,) = _LEN.unpack_from(buf, pos)
                if pos + size + n > end:
                    break
                yield decode(buf[pos + size : pos + size + n])
                pos += size + n
        if pos != len(buf):
            raise RecordingError(f"{path}: truncated frame at the end of the file")


class Recording:
    """A recording directory, read lazily."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            raw = (self.path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise RecordingError(f"{self.path}: no {MANIFEST}; not a recording directory") from None
        try:
            self.manifest = msgspec.json.decode(raw, type=Manifest)
        except msgspec.ValidationError as exc:
            raise RecordingError(f"{self.path / MANIFEST}: {exc}") from None
        if self.manifest.format != FORMAT:
            raise RecordingError(f"{self.path}: not a {FORMAT} (format {self.manifest.format!r})")
        if self.manifest.version > VERSION:
            raise RecordingError(
                f"{self.path}: recording format v{self.manifest.version}; this stream reads v{VERSION}"
            )

    def __len__(self) -> int:
        return self.manifest.records

    @property
    def partitions(self) -> list[PartitionEntry]:
        return list(self.manifest.partitions)

    @property
    def topics(self) -> list[str]:
        return sorted({e.topic for e in self.manifest.partitions})

    def read(self, topic: str, partition: int, as_topic: str | None = None) -> Iterator[RecordedMessage]:
        """The records of one topic-partition in recorded (offset) order."""
        entry = next((e for e in self.manifest.partitions if e.topic == topic and e.partition == partition), None)
        if entry is None:
            raise RecordingError(f"{self.path}: no partition {topic}[{partition}]")
        name = as_topic or topic
        for offset, ts_type, ts, key, value, headers in _frames(self.path / entry.file):
            yield RecordedMessage(name, partition, offset, (ts_type, ts), key, value, headers)

    def messages(
        self, *, topic_map: Mapping[str, str] | None = None, topics: Iterable[str] | None = None
    ) -> Iterator[RecordedMessage]:
        """Every record, each partition in recorded order, partitions merged by
        timestamp (ties: topic, then partition), so the order is the same on
        every run. ``topic_map`` renames recorded topics; ``topics`` keeps
        only those (recorded names)."""
        wanted = set(topics) if topics is not None else None
        tmap = topic_map or {}
        streams = [
            self.read(e.topic, e.partition, tmap.get(e.topic))
            for e in self.manifest.partitions
            if wanted is None or e.topic in wanted
        ]
        if len(streams) == 1:
            return streams[0]
        return heapq.merge(*streams, key=_ts_of)

    def verify(self) -> None:
        """Check every file's checksum and record count; RecordingError on a mismatch."""
        for e in self.manifest.partitions:
            path = self.path / e.file
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if e.sha256 is not None and digest != e.sha256:
                raise RecordingError(f"{path}: checksum mismatch (file changed or corrupt)")
            n = sum(1 for _ in _frames(path))
            if n != e.records:
                raise RecordingError(f"{path}: {n} records, the manifest says {e.records}")

    def truth(self) -> Any:
        """The simulator's ``GroundTruth`` of this recording, or None."""
        if self.manifest.truth is None or not (self.path / self.manifest.truth).exists():
            return None
        from stream.simulate import GroundTruth

        return GroundTruth.load(self.path / self.manifest.truth)


def _ts_of(m: RecordedMessage) -> int:
    return m._timestamp[1]


# --------------------------------------------------------------------------- argument parsing


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, None: 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``6h``, ``2d``.

    >>> parse_duration("90"), parse_duration("30m"), parse_duration("1.5h")
    (90.0, 1800.0, 5400.0)
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"`{text}` is not a duration (examples: 90s, 30m, 6h, 2d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Epoch milliseconds from an epoch-ms number, an ISO-8601 time (UTC
    unless it says otherwise) or a duration ago (``-2h``, ``2h ago``).

    >>> parse_time("1700000000000"), parse_time("2023-11-14T22:13:20Z")
    (1700000000000, 1700000000000)
    >>> parse_time("-1h", now_ms=1700003600000)
    1700000000000
    """
    text = text.strip()
    if re.fullmatch(r"\d{10,}", text):
        return int(text)
    ago = re.fullmatch(r"-\s*(.+)|(.+?)\s+ago", text)
    if ago:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        return now - int(parse_duration(ago.group(1) or ago.group(2)) * 1000)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"`{text}` is not a time (epoch ms, ISO-8601 like 2024-05-01T12:00:00Z, or -2h)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def parse_speed(text: str) -> float | None:
    """Replay speed: ``max`` (None: as fast as possible) or a factor (``x10``, ``10x``, ``0.5``).

    >>> parse_speed("max"), parse_speed("x10"), parse_speed("2.5x"), parse_speed("1")
    (None, 10.0, 2.5, 1.0)
    """
    t = text.strip().lower()
    if t in ("max", "inf", "unlimited"):
        return None
    m = re.fullmatch(r"x?(\d+(?:\.\d+)?)x?", t)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"`{text}` is not a speed (max, x10, 0.5)")
    return float(m.group(1))


def parse_topic_map(items: Sequence[str] | None) -> dict[str, str]:
    """``["a=b", "c=d,e=f"]`` -> ``{"a": "b", "c": "d", "e": "f"}``.

    >>> parse_topic_map(["clicks=clicks-copy", "prices=p2,purchases=p3"])
    {'clicks': 'clicks-copy', 'prices': 'p2', 'purchases': 'p3'}
    """
    out: dict[str, str] = {}
    for item in items or ():
        for pair in item.split(","):
            if not pair.strip():
                continue
            src, sep, dst = pair.partition("=")
            if not sep or not src.strip() or not dst.strip():
                raise ValueError(f"`{pair}` is not a topic mapping (recorded=destination)")
            out[src.strip()] = dst.strip()
    return out


# --------------------------------------------------------------------------- Kafka: record


def record(
    config: Config,
    topics: Sequence[str],
    out: str | Path,
    *,
    start: str | int = "end",
    until_end: bool = False,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    timeout_s: float = 30.0,
) -> Manifest:
    """Consume ``topics`` into a recording at ``out``.

    Partitions are assigned explicitly and nothing is committed, so no
    consumer group is disturbed. ``start`` is ``"beginning"``, ``"end"`` or
    an epoch-ms time (resolved per partition with ``offsets_for_times``).
    ``until_end`` stops at the high watermarks taken at start; otherwise
    recording goes on until ``stop()`` returns True (Ctrl-C in the CLI).
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

    from stream.kafka import consumer_config

    stop = stop or (lambda: False)
    props = consumer_config(
        config,
        **{"group.id": f"stream-record-{uuid.uuid4().hex[:12]}", "enable.partition.eof": True},
    )
    consumer = Consumer(props)
    writer: RecordingWriter | None = None
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None]
        if missing:
            raise RecordingError(f"topic(s) not found on {config.kafka.bootstrap_servers}: {', '.join(missing)}")
        tps = [TopicPartition(t, p) for t in topics for p in sorted(metadata.topics[t].partitions)]
        high: dict[tuple[str, int], int] = {}
        low: dict[tuple[str, int], int] = {}
        for tp in tps:
            low[(tp.topic, tp.partition)], high[(tp.topic, tp.partition)] = consumer.get_watermark_offsets(
                tp, timeout=timeout_s, cached=False
            )
        if start == "beginning":
            for tp in tps:
                tp.offset = OFFSET_BEGINNING
            first = dict(low)
        elif start == "end":
            for tp in tps:
                tp.offset = OFFSET_END
            first = dict(high)
        else:
            at = [TopicPartition(tp.topic, tp.partition, int(start)) for tp in tps]
            resolved = consumer.offsets_for_times(at, timeout=timeout_s)
            first = {}
            for tp, r in zip(tps, resolved, strict=True):
                # -1: no record at or after the time; start at the end.
                tp.offset = r.offset if r.offset >= 0 else OFFSET_END
                first[(tp.topic, tp.partition)] = r.offset if r.offset >= 0 else high[(tp.topic, tp.partition)]
        done: set[tuple[str, int]] = set()
        if until_end:
            done = {k for k in high if first[k] >= high[k]}
        total = sum(max(high[k] - first[k], 0) for k in high) if until_end else None
        source = {
            "kind": "kafka",
            "bootstrap_servers": config.kafka.bootstrap_servers,
            "topics": list(topics),
            "start": start,
            "until_end": until_end,
            "high_watermarks": {f"{t}[{p}]": h for (t, p), h in sorted(high.items())},
            "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        streams = {s: t for s, t in config.input_topics().items() if t in topics}
        writer = RecordingWriter(out, source=source, streams=streams)
        for tp in tps:
            writer.declare(tp.topic, tp.partition)
        consumer.assign([tp for tp in tps if (tp.topic, tp.partition) not in done])
        bar = Progress(total, desc=f"record {','.join(topics)}", unit="records", enabled=progress)
        while not stop():
            if until_end and len(done) == len(high):
                break
            for msg in consumer.consume(1000, 0.5):
                err = msg.error()
                key = (str(msg.topic()), int(msg.partition() or 0))
                offset = int(msg.offset() or 0)
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if until_end and key in high and offset >= high[key]:
                            done.add(key)
                        continue
                    if err.fatal():
                        raise RecordingError(f"consumer error: {err.str()}")
                    log.warning("consume error", extra={"code": err.name(), "reason": err.str()})
                    continue
                if until_end:
                    # Records past the watermarks taken at the start are not part of this recording.
                    if key in done or offset >= high[key]:
                        done.add(key)
                        continue
                    if offset >= high[key] - 1:
                        done.add(key)
                writer.write(msg)
                bar.update()
        bar.close()
        complete = not until_end or len(done) == len(high)
        return writer.close(complete=complete)
    finally:
        if writer is not None:
            writer.close(complete=False)
        consumer.close()


# --------------------------------------------------------------------------- Kafka: produce


class KafkaWriter:
    """An idempotent producer that keeps partitions, keys, timestamps and
    headers, and checks every delivery report (``flush`` raises on any failure)."""

    def __init__(self, config: Config, **extra: Any) -> None:
        from confluent_kafka import Producer

        from stream.kafka import producer_config

        # A bounded delivery timeout: a CLI replay should fail, not wait forever.
        props = producer_config(config, **{"message.timeout.ms": 300_000, **extra})
        self.producer = Producer(props)
        self.produced = 0
        self.delivered = 0
        self.failed = 0
        #: The first few delivery errors, for the message.
        self.errors: list[str] = []
        self._produce = self.producer.produce
        self._poll = self.producer.poll

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err.name()}: {err.str()}")

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        timestamp: int = 0,
        headers: _Headers | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"timestamp": timestamp, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self._produce(topic, value, key, **kwargs)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._poll(0.05)
        self.produced += 1
        if self.produced % 1000 == 0:
            self._poll(0)

    def poll(self, timeout_s: float = 0) -> None:
        self._poll(timeout_s)

    def flush(self, timeout_s: float = 600.0) -> None:
        """Wait for every delivery report; raise if any record failed or is still pending."""
        remaining = self.producer.flush(timeout_s)
        if self.failed:
            raise RecordingError(f"{self.failed} records not delivered: {'; '.join(self.errors)}")
        if remaining:
            raise RecordingError(f"{remaining} records still undelivered after {timeout_s:.0f}s")


def ensure_topics(config: Config, partitions: Mapping[str, int], *, create: bool, timeout_s: float = 30.0) -> None:
    """Check that each topic exists with at least the given partition count;
    create missing ones when ``create`` (replication factor from config)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from stream.kafka import admin_config

    admin = AdminClient(admin_config(config))
    meta = admin.list_topics(timeout=timeout_s)
    missing = {t: n for t, n in partitions.items() if t not in meta.topics}
    if missing and create:
        rf = config.topics.replication_factor
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=n, replication_factor=rf) for t, n in missing.items()]
        )
        for topic, future in futures.items():
            try:
                future.result(timeout_s)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
            log.info("topic created", extra={"topic": topic, "partitions": missing[topic]})
        missing = {}
        meta = admin.list_topics(timeout=timeout_s)
    if missing:
        need = ", ".join(f"{t} ({n} partition{'s' if n > 1 else ''})" for t, n in sorted(missing.items()))
        raise RecordingError(
            f"topic(s) missing on {config.kafka.bootstrap_servers}: {need}; create them or pass --create-topics"
        )
    for topic, n in partitions.items():
        have = len(meta.topics[topic].partitions)
        if have < n:
            raise RecordingError(
                f"topic {topic} has {have} partitions; the recording needs {n} (same partition numbers)"
            )


@dataclass
class ReplayResult:
    records: int
    by_topic: dict[str, int]
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0


def replay(
    recording: Recording | str | Path,
    config: Config,
    *,
    speed: float | None = None,
    topic_map: Mapping[str, str] | None = None,
    create_topics: bool = False,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    barrier: Callable[[Mapping[str, int]], None] | None = None,
) -> ReplayResult:
    """Produce a recording back to Kafka: same keys, values, timestamps,
    headers and partition numbers, each partition in recorded order
    (idempotent producer), partitions interleaved by timestamp.

    ``speed`` None produces as fast as possible; a factor paces records by
    their recorded timestamps (``10`` = ten times faster than recorded).
    ``barrier(counts)``, if given, is called with the records produced (and
    delivered) so far per destination topic whenever the next record is of
    another topic-partition than the last, and once at the end: a test uses
    it to replay in lockstep with a consumer, so the consumer sees exactly
    the recorded interleaving.
    """
    rec = recording if isinstance(recording, Recording) else Recording(recording)
    tmap = dict(topic_map or {})
    stop = stop or (lambda: False)
    need: dict[str, int] = {}
    for e in rec.partitions:
        dest = tmap.get(e.topic, e.topic)
        need[dest] = max(need.get(dest, 0), e.partition + 1)
    ensure_topics(config, need, create=create_topics)
    writer = KafkaWriter(config)
    by_topic: Counter[str] = Counter()
    bar = Progress(len(rec), desc="replay", unit="records", enabled=progress)
    started = time.monotonic()
    first_ts: int | None = None
    last_tp: tuple[str, int] | None = None
    for msg in rec.messages(topic_map=tmap):
        if stop():
            break
        ts_type, ts = msg._timestamp
        if speed is not None and ts_type != TIMESTAMP_NOT_AVAILABLE:
            if first_ts is None:
                first_ts = ts
            due = started + (ts - first_ts) / 1000.0 / speed
            # Serve delivery reports while waiting for the record's time.
            while (wait := due - time.monotonic()) > 0:
                writer.poll(min(wait, 0.1))
        if barrier is not None:
            tp = (msg._topic, msg._partition)
            if last_tp is not None and tp != last_tp:
                writer.flush()
                barrier(dict(by_topic))
            last_tp = tp
        writer.produce(
            msg._topic,
            msg._key,
            msg._value,
            partition=msg._partition,
            # Kafka sets the time itself when none was recorded (0 = now).
            timestamp=ts if ts_type != TIMESTAMP_NOT_AVAILABLE else 0,
            headers=msg._headers,
        )
        by_topic[msg._topic] += 1
        bar.update()
    writer.flush()
    if barrier is not None:
        barrier(dict(by_topic))
    bar.close()
    return ReplayResult(writer.produced, dict(by_topic), time.monotonic() - started)


# --------------------------------------------------------------------------- backtest


def _key_text(key: bytes | None) -> Any:
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        import base64

        return {"base64": base64.b64encode(key).decode()}


class _OutputSink:
    """The pipeline's sink in a backtest: outputs to JSON-lines files (and/or memory).

    Each line is ``{"key": ..., "value": <the output JSON>}``; dead letters
    keep their original bytes as ``value_base64`` and their headers."""

    def __init__(self, out_dir: Path | None, dead_letter_topic: str, keep: bool) -> None:
        self.out_dir = out_dir
        self.dead_letter_topic = dead_letter_topic
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.produced: dict[str, list[tuple[bytes | None, bytes | None, _Headers | None]]] = defaultdict(list)
        self._files: dict[str, IO[bytes]] = {}
        self._encode = msgspec.json.Encoder().encode
        if out_dir is not None:
            (out_dir / "outputs").mkdir(parents=True, exist_ok=True)

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: _Headers | None = None) -> None:
        self.counts[topic] += 1
        if self.keep:
            self.produced[topic].append((key, value, headers))
        if self.out_dir is None:
            return
        f = self._files.get(topic)
        if f is None:
            f = self._files[topic] = open(self.out_dir / "outputs" / f"{topic}.jsonl", "wb")  # noqa: SIM115
        if topic == self.dead_letter_topic or value is None:
            import base64

            line: dict[str, Any] = {
                "key": _key_text(key),
                "value_base64": base64.b64encode(value).decode() if value is not None else None,
                "headers": {k: (v or b"").decode("utf-8", "replace") for k, v in headers or ()},
            }
            f.write(self._encode(line) + b"\n")
        else:
            # The output envelope is already JSON: embed it as it is.
            f.write(self._encode({"key": _key_text(key), "value": msgspec.Raw(value)}) + b"\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class _Counter:
    """Pipeline observer of the backtest: counts per topic and per dead-letter
    stage, and forwards to another observer (the Prometheus metrics)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.ok: Counter[str] = Counter()
        self.dead: Counter[str] = Counter()
        self.n_published: Counter[str] = Counter()
        self._p = getattr(inner, "processed", None)
        self._pub = getattr(inner, "published", None)
        self._d = getattr(inner, "dead_lettered", None)
        #: A second observer of published predictions (the truth scorer).
        self.also: Any = None

    def processed(self, topic: str, record: Any, event: Any) -> None:
        self.ok[topic] += 1
        if self._p is not None:
            self._p(topic, record, event)

    def published(self, learner: Any, event: Any, record: Any) -> None:
        self.n_published[learner.name] += 1
        if self.also is not None:
            self.also.published(learner, event, record)
        if self._pub is not None:
            self._pub(learner, event, record)

    def dead_lettered(self, topic: str, stage: str) -> None:
        self.dead[stage] += 1
        if self._d is not None:
            self._d(topic, stage)

    def __getattr__(self, name: str) -> Any:
        # Anything else the metrics observer offers (batch timings ...) passes through.
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)


def drift_monitors(learner: Any) -> list[tuple[str, Any]]:
    """``(name, monitor)`` of a learner's concept-drift monitors: objects with
    a ``detections`` count (``stream.drift.DriftMonitor``), found on the
    learner's ``evaluation`` (or ``evaluations``) and on the learner itself."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def add(name: str, obj: Any) -> None:
        if obj is not None and isinstance(getattr(obj, "detections", None), int) and id(obj) not in seen:
            seen.add(id(obj))
            found.append((name, obj))

    evaluation = getattr(learner, "evaluation", None)
    if evaluation is not None:
        add(learner.name, getattr(evaluation, "drift", None))
    evaluations = getattr(learner, "evaluations", None)
    if isinstance(evaluations, Mapping):
        for key, ev in evaluations.items():
            add(f"{learner.name}.{key}", getattr(ev, "drift", None))
    for attr in ("drift", "drift_monitor", "monitor"):
        add(learner.name if not found else f"{learner.name}.{attr}", getattr(learner, attr, None))
    return found


def quality_of(learner: Any) -> dict[str, dict[str, float]]:
    """``{metric: {window: value}}`` from ``learner.quality()``."""
    out: dict[str, dict[str, float]] = {}
    try:
        for metric, window, value in learner.quality():
            out.setdefault(metric, {})[window] = float(value)
    except Exception as exc:  # a half-written learner must not kill the report
        log.warning("quality() failed", extra={"learner": learner.name, "error": repr(exc)})
    return out


@dataclass
class BacktestResult:
    """What a backtest did and how well the learners did (``to_dict`` is report.json)."""

    source: str
    records: int
    by_topic: dict[str, int]
    #: Records of topics no learner reads (not processed).
    skipped: dict[str, int]
    outputs: dict[str, int]
    dead_letters: dict[str, int]
    learners: dict[str, dict[str, Any]]
    #: Sampled quality over the run: ``{"index", "ts", "quality": {learner: {metric: {window: value}}}}``,
    #: ``index`` = records read so far (the position in the recording, like drift indexes).
    timeline: list[dict[str, Any]]
    elapsed_s: float
    #: Scores against a simulator's ground truth, when the recording has one.
    truth: dict[str, Any] | None = None
    #: Output records in memory (``keep_outputs=True``): topic -> [(key, value, headers)].
    produced: dict[str, list[tuple[bytes | None, bytes | None, _Headers | None]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    #: First word of the readable report.
    title: str = "Backtest"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "records": self.records,
            "by_topic": self.by_topic,
            "skipped": self.skipped,
            "outputs": self.outputs,
            "dead_letters": self.dead_letters,
            "learners": self.learners,
            "truth": self.truth,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.records / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
            "timeline": self.timeline,
            "files": self.files,
        }

    def text(self) -> str:
        """The readable report."""
        lines = [f"{self.title} of {self.source}"]
        rate = self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0
        topics = ", ".join(f"{t} {n:,}" for t, n in sorted(self.by_topic.items()))
        lines.append(f"  records    {self.records:,} ({topics}) in {self.elapsed_s:.1f}s, {rate:,.0f} records/s")
        if self.skipped:
            lines.append(
                "  skipped    "
                + ", ".join(f"{t} {n:,}" for t, n in sorted(self.skipped.items()))
                + " (no learner reads them)"
            )
        outs = ", ".join(f"{t} {n:,}" for t, n in sorted(self.outputs.items())) or "none"
        lines.append(f"  outputs    {outs}")
        dead = sum(self.dead_letters.values())
        stages = ", ".join(f"{s} {n}" for s, n in sorted(self.dead_letters.items()))
        lines.append(f"  dead letters {dead:,}" + (f" ({stages})" if stages else ""))
        for name, info in self.learners.items():
            lines.append("")
            lines.append(
                f"  {name} ({info['kind']}, reads {', '.join(info['reads'])} -> {info['output_topic']}): "
                f"{info['n_learned']:,} learned, model v{info['model_version']}"
            )
            for metric, windows in info["quality"].items():
                vals = "  ".join(f"{w} {_fmt(v)}" for w, v in windows.items())
                lines.append(f"    {metric:<22} {vals}")
            for mon in info["drift"]:
                dets = mon["detections"]
                when = ", ".join(
                    f"{_iso(d['ts'])} (#{d['index']:,}{', ' + d['direction'] if d.get('direction') else ''})"
                    for d in dets[:8]
                )
                more = f" (+{len(dets) - 8} more)" if len(dets) > 8 else ""
                lines.append(f"    drift {mon['monitor']}: {len(dets)} detection(s){': ' + when if dets else ''}{more}")
        if self.truth:
            lines.append("")
            lines.append("  against the simulator's ground truth:")
            lines.extend("    " + line for line in truth_lines(self.truth))
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def _iso(ts: int | None) -> str:
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truth_lines(truth: dict[str, Any]) -> list[str]:
    """Readable lines for the ``truth`` section of a report."""
    lines = []
    points = truth.get("drift_points", [])
    if points:
        where = ", ".join(
            f"{d['kind']} at #{d['index']:,}" if d.get("index") is not None else f"{d['kind']} (not reached)"
            for d in points
        )
        lines.append(f"true drifts: {where}")
    for name, scores in truth.get("learners", {}).items():
        vals = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in scores.items())
        lines.append(f"{name}: {vals}")
    for mon, score in truth.get("drift", {}).items():
        parts = []
        for d in score["drifts"]:
            if d["delay_ms"] is None:
                parts.append(f"{d['kind']} missed")
            else:
                ev = f", {d['delay_events']:,} events" if d.get("delay_events") is not None else ""
                parts.append(f"{d['kind']} caught after {d['delay_ms'] / 60000:.1f} min{ev}")
        found = "; ".join(parts) or "no relevant drift"
        alarms = f"false alarms {score['false_alarms']} of {score['detections']} detections"
        worse = score.get("worse_only")
        if worse is not None:
            # Detections of the error going down are a model still learning, not a concept drift.
            alarms += f" ({worse['false_alarms']} of {worse['detections']} counting only error increases)"
        lines.append(f"drift {mon}: {found}; {alarms}")
    if not truth.get("learners") and not truth.get("drift"):
        lines.append("(no learner here has predictions or drift monitors to score)")
    return lines


class DriftTracker:
    """Watches learners' drift monitors and keeps every detection with the
    event time and the index (records processed) at which it was seen."""

    def __init__(self, learners: Sequence[Any]) -> None:
        self.learners = list(learners)
        self.monitors = [(learner, name, mon) for learner in self.learners for name, mon in drift_monitors(learner)]
        self._seen = [mon.detections for _, _, mon in self.monitors]
        #: monitor name -> [{"ts", "index", "direction"}]
        self.detections: dict[str, list[dict[str, Any]]] = {name: [] for _, name, _ in self.monitors}

    def check(self, index: int, ts: int) -> None:
        """Record detections made since the last check (cheap: one int compare per monitor)."""
        for k, (_, name, mon) in enumerate(self.monitors):
            count = mon.detections
            if count != self._seen[k]:
                new = count - self._seen[k]
                self._seen[k] = count
                at = mon.last_detection_ts if mon.last_detection_ts is not None else ts
                direction = getattr(mon, "last_direction", None)
                # Several detections between two checks (only when polled) share the last one's time.
                for _ in range(new):
                    self.detections[name].append({"ts": at, "index": index, "direction": direction})

    def learner_report(self) -> dict[str, dict[str, Any]]:
        out = {}
        for learner in self.learners:
            out[learner.name] = {
                "kind": getattr(learner, "kind", type(learner).__name__),
                "reads": sorted(learner.reads),
                "output_topic": learner.output_topic,
                "n_learned": learner.n_learned,
                "model_version": learner.model_version,
                "quality": quality_of(learner),
                "drift": [
                    {"monitor": name, "detections": self.detections[name]}
                    for owner, name, _ in self.monitors
                    if owner is learner
                ],
            }
        return out

    def status(self) -> str:
        """One short line: each learner's rolling quality (first metric) and drifts so far."""
        parts = []
        for learner in self.learners:
            q = quality_of(learner)
            if q:
                metric, windows = next(iter(q.items()))
                value = windows.get("rolling", next(iter(windows.values())))
                parts.append(f"{learner.name} {metric} {_fmt(value)}")
        parts.append(f"drifts {sum(len(v) for v in self.detections.values())}")
        return ", ".join(parts)


class _BacktestRun(DriftTracker):
    """The loop shared by ``backtest`` and the demo: records -> pipeline, with
    drift detections tracked per record and quality sampled over time."""

    def __init__(
        self,
        config: Config,
        *,
        learners: Sequence[Any] | None = None,
        sink: Any,
        observer: Any = None,
        sample_every: int = 1000,
    ) -> None:
        from stream.app import build_learners

        super().__init__(list(learners) if learners is not None else build_learners(config))
        self.config = config
        self.counter = _Counter(observer)
        self.current_ts = 0
        # Outputs carry the input's event time as ``predicted_at``: two backtests
        # of one recording give byte-identical outputs.
        self.pipeline = Pipeline(
            self.learners,
            sink,
            contract_topics=config.input_topics(),
            dead_letter_topic=config.topics.dead_letters,
            max_value_bytes=config.processing.max_value_bytes,
            clock=lambda: self.current_ts / 1000.0,
            observer=self.counter,
            privacy=Pseudonymizer.from_config(config),
        )
        self.sample_every = max(int(sample_every), 1)
        self.timeline: list[dict[str, Any]] = []
        self.records = 0
        #: Records read, processed or skipped.
        self.position = 0
        self.by_topic: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    def feed(
        self,
        records: Iterable[Record] | Iterable[RecordedMessage],
        bar: Progress | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Process ``records`` in order. Detections and quality samples are
        indexed by position in ``records`` (skipped topics included), the
        index a simulator's drift points use."""
        routes = self.pipeline.routes
        process = self.pipeline.process
        check = self.check
        sample_every = self.sample_every
        update = bar.update if bar is not None else None
        n, pos = self.records, self.position
        try:
            for rec in records:
                pos += 1
                if update is not None:
                    update()
                topic = rec.topic()
                if topic in routes:
                    ts = self.current_ts = rec.timestamp()[1]
                    process(rec)
                    n += 1
                    self.by_topic[topic] += 1  # type: ignore[index]
                    check(pos - 1, ts)
                else:
                    self.skipped[topic] += 1  # type: ignore[index]
                if pos % sample_every == 0:
                    self.records, self.position = n, pos
                    self.sample()
                    if stop is not None and stop():
                        break
        finally:
            self.records, self.position = n, pos

    def sample(self) -> None:
        quality = {lr.name: quality_of(lr) for lr in self.learners}
        self.timeline.append({"index": self.position, "ts": self.current_ts, "quality": quality})


def run_backtest(
    records: Iterable[Record] | Iterable[RecordedMessage],
    config: Config,
    *,
    source: str = "<records>",
    total: int | None = None,
    learners: Sequence[Any] | None = None,
    out_dir: str | Path | None = None,
    keep_outputs: bool = False,
    observer: Any = None,
    progress: bool = True,
    status: bool = False,
    stop: Callable[[], bool] | None = None,
    truth: Any = None,
    desc: str = "backtest",
    title: str = "Backtest",
) -> tuple[BacktestResult, _BacktestRun]:
    """Run ``records`` through the configured learners and the pipeline, no broker.

    ``truth`` (a simulator's ``GroundTruth``) adds scores against it. Returns
    the result and the run (its learners, for further inspection)."""
    out = Path(out_dir) if out_dir is not None else None
    files = _OutputSink(out, config.topics.dead_letters, keep_outputs)
    sink: Any = files
    scorer = None
    if truth is not None:
        from stream.demo import TruthScorer

        scorer = TruthScorer(truth)
        sink = scorer.wrap_sink(files)
    sample_every = max((total or 100_000) // 200, 100)
    run = _BacktestRun(config, learners=learners, sink=sink, observer=observer, sample_every=sample_every)
    run.counter.also = scorer
    bar = Progress(total, desc=desc, enabled=progress, status=run.status if status else None)
    started = time.monotonic()
    try:
        run.feed(records, bar, stop)
    finally:
        files.close()
    elapsed = time.monotonic() - started
    run.sample()
    bar.close()
    result = BacktestResult(
        source=source,
        records=run.records,
        by_topic=dict(run.by_topic),
        skipped=dict(run.skipped),
        outputs={t: n for t, n in files.counts.items() if t != config.topics.dead_letters},
        dead_letters=dict(run.counter.dead),
        learners=run.learner_report(),
        timeline=run.timeline,
        elapsed_s=elapsed,
        produced=dict(files.produced),
        title=title,
    )
    if truth is not None:
        from stream.demo import score_against_truth

        result.truth = score_against_truth(truth, run, config, scorer)
    return result, run


def backtest(
    recording: Recording | str | Path,
    config: Config,
    *,
    out_dir: str | Path | None = None,
    topic_map: Mapping[str, str] | None = None,
    keep_outputs: bool = False,
    progress: bool = True,
    chart: bool = True,
) -> BacktestResult:
    """Backtest the configured learners on a recording, without a broker.

    Records are processed in recorded order per partition, partitions merged
    by timestamp; for a single-partition recording that is the file order,
    and the predictions equal those of a live ``stream run`` of the same
    records. With ``out_dir``: ``outputs/<topic>.jsonl`` per output topic,
    ``report.txt``, ``report.json`` and (with matplotlib) ``quality.png``.
    """
    rec = recording if isinstance(recording, Recording) else Recording(recording)
    tmap = dict(topic_map or {})
    truth = rec.truth()
    result, _ = run_backtest(
        rec.messages(topic_map=tmap),
        config,
        source=str(rec.path),
        total=len(rec),
        out_dir=out_dir,
        keep_outputs=keep_outputs,
        progress=progress,
        truth=truth,
    )
    if out_dir is not None:
        out = Path(out_dir)
        result.files["outputs"] = str(out / "outputs")
        if chart:
            png = out / "quality.png"
            message = plot_quality(result, png, truth)
            if message is None:
                result.files["chart"] = str(png)
            else:
                result.files["chart_skipped"] = message
        (out / "report.txt").write_text(result.text() + "\n")
        result.files["report"] = str(out / "report.txt")
        result.files["report_json"] = str(out / "report.json")
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def plot_quality(result: BacktestResult, path: Path, truth: Any = None) -> str | None:
    """A PNG of each learner's quality over the run, drift detections and true
    drift points marked. Returns None, or why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'stream[chart]'); no chart"
    names = [n for n in result.learners if any(p["quality"].get(n) for p in result.timeline)]
    if not names or len(result.timeline) < 2:
        return "not enough quality samples to chart"
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        metrics = sorted({m for p in result.timeline for m in p["quality"].get(name, {})})
        for metric in metrics[:4]:
            xs, ys = [], []
            for p in result.timeline:
                windows = p["quality"].get(name, {}).get(metric)
                if windows:
                    xs.append(p["index"])
                    ys.append(windows.get("rolling", next(iter(windows.values()))))
            ax.plot(xs, ys, label=f"{metric} (rolling)", linewidth=1.2)
        for mon in result.learners[name]["drift"]:
            for k, d in enumerate(mon["detections"]):
                ax.axvline(
                    d["index"], color="red", linestyle="--", linewidth=0.8, label="drift detected" if k == 0 else None
                )
        if truth is not None:
            for k, d in enumerate(truth.drifts):
                if d.index is not None:
                    ax.axvline(d.index, color="green", linewidth=1.5, alpha=0.6, label="true drift" if k == 0 else None)
                    ax.annotate(d.kind, (d.index, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color="green",
                                ha="left", va="top")  # fmt: skip
        ax.set_title(name, fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("records read")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """``stop()`` turns True on SIGINT/SIGTERM (restored afterwards), so a CLI
    loop ends cleanly and still writes its manifest or report."""
    import signal

    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event.is_set
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: event.set())
    try:
        yield event.is_set
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- CLI commands


def _fail(message: str) -> int:
    import sys

    print(f"stream: {message}", file=sys.stderr)
    return 1


def record_command(args: Any, config: Config) -> int:
    """``stream record``: see ``stream record --help``."""
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    if not topics:
        return _fail("--topics names no topic")
    try:
        start: str | int = "beginning" if args.from_beginning else "end"
        if args.from_time:
            start = parse_time(args.from_time)
        with stop_on_signals() as stop:
            manifest = record(
                config, topics, args.out, start=start, until_end=args.until_end, progress=args.progress, stop=stop
            )
    except (RecordingError, ValueError) as exc:
        return _fail(str(exc))
    state = "complete" if manifest.complete else "stopped early"
    parts = ", ".join(f"{e.topic}[{e.partition}] {e.records:,}" for e in manifest.partitions) or "nothing"
    print(f"recorded {manifest.records:,} records to {args.out} ({state}): {parts}")
    return 0


def replay_command(args: Any, config: Config) -> int:
    """``stream replay``: see ``stream replay --help``."""
    try:
        speed = parse_speed(args.speed)
        topic_map = parse_topic_map(args.topic_map)
        with stop_on_signals() as stop:
            result = replay(
                args.recording,
                config,
                speed=speed,
                topic_map=topic_map,
                create_topics=args.create_topics,
                progress=args.progress,
                stop=stop,
            )
    except (RecordingError, ValueError) as exc:
        return _fail(str(exc))
    parts = ", ".join(f"{t} {n:,}" for t, n in sorted(result.by_topic.items()))
    print(
        f"replayed {result.records:,} records to {config.kafka.bootstrap_servers} in {result.elapsed_s:.1f}s "
        f"({result.rate:,.0f}/s), all delivered: {parts}"
    )
    return 0


def backtest_command(args: Any, config: Config) -> int:
    """``stream backtest``: see ``stream backtest --help``."""
    try:
        result = backtest(
            args.recording,
            config,
            out_dir=args.out,
            topic_map=parse_topic_map(args.topic_map),
            progress=args.progress,
            chart=args.chart,
        )
    except (RecordingError, ValueError) as exc:
        return _fail(str(exc))
    print(result.text())
    if args.out:
        print("")
        for what, where in result.files.items():
            print(f"  {what:<14} {where}")
    return 0
