"""Recordings of Kafka topics: the format on disk, its writer and its reader.

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
``stream.pipeline.Pipeline`` directly: ``stream.backtest`` runs the configured
learners through the very pipeline ``stream run`` uses, in recorded
per-partition order, partitions merged by timestamp; ``stream.replay``
records topics into recordings and produces them back to Kafka.

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

import gzip
import hashlib
import heapq
import logging
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import msgspec

from stream import __version__
from stream.errors import RecordingError
from stream.pipeline import Record
from stream.world import GroundTruth

__all__ = [
    "MANIFEST",
    "TIMESTAMP_CREATE_TIME",
    "TIMESTAMP_LOG_APPEND_TIME",
    "TIMESTAMP_NOT_AVAILABLE",
    "Manifest",
    "PartitionEntry",
    "RecordedMessage",
    "Recording",
    "RecordingError",
    "RecordingWriter",
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
        return GroundTruth.load(self.path / self.manifest.truth)


def _ts_of(m: RecordedMessage) -> int:
    return m._timestamp[1]
