"""The checkpoint file format: header, MAC, keys, payload (the store is ``stream.state``).

A checkpoint is one file, verified on every read. Format 2::

    b"STRMCKPT" | u32 header length | sha256(header) | header (JSON) | mac (32 bytes) | payload (pickle)

``mac`` is HMAC-SHA256(key, b"stream-checkpoint-v2\\0" + header): the header names
the signing key (``"mac": {"alg": "hmac-sha256", "key_id": ...}``, a fingerprint,
never the key) and carries the payload's length and sha256, so the MAC over the
header authenticates the whole file. An unsigned checkpoint (no key configured)
has ``"mac": null`` and 32 zero bytes. With a key configured (:func:`load_keys`),
every read checks the MAC, in constant time, before anything is unpickled; an
unsigned or mis-signed file is refused (:class:`UnauthenticatedCheckpoint`).
Format 1 (no ``mac`` slot, the payload right after the header) is still read
for listing, and loaded only when no key is configured.

The header is readable without unpickling anything. It carries the format
version, the payload's length and sha256, the input offsets (``topic ->
partition -> next offset to read``), the River, Python and project versions,
and a summary of every learner (model version, events learned, quality), so
``stream model list`` and checkpoint selection never unpickle. A torn or
truncated file fails the length or checksum test and is never loaded; a
checkpoint written by another River version is refused with a clear error,
because River's pickles do not load across releases.

The payload is the pickled learner objects (``Learner`` says a learner's
whole state is its pickled self: River model, label joins, per-key state,
evaluation, drift detectors) plus a small holdout of recent input records,
used to validate an imported or rolled-back model before it serves.

Which checkpoint is restored, and what its offsets mean: ``stream.state``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import pickle
import platform
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import river

from stream import __version__
from stream.errors import (
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    UnauthenticatedCheckpoint,
)
from stream.learners import Learner

__all__ = [
    "FORMAT_VERSION",
    "KEY_ENV",
    "MAC_SIZE",
    "MAGIC",
    "MAX_HEADER",
    "PREFIX",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointKeys",
    "Offsets",
    "StoredRecord",
    "build",
    "check_versions",
    "decode",
    "decode_header",
    "encode",
    "load_keys",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: Formats this build reads: 1 (unsigned, before authentication) and 2 (a MAC slot after the header).
READABLE_FORMATS = (1, 2)
MAGIC = b"STRMCKPT"
PREFIX = struct.Struct(">8sI32s")
MAC_SIZE = 32
_NO_MAC = bytes(MAC_SIZE)
_MAC_DOMAIN = b"stream-checkpoint-v2\0"
_KEY_ID_DOMAIN = b"stream-checkpoint-key-id\0"
#: A key shorter than this (bytes) is refused at start-up.
MIN_KEY_BYTES = 32
#: Environment variable holding the checkpoint key(s); wins over ``[checkpoints] key_file``.
KEY_ENV = "STREAM_CHECKPOINT_KEY"
MAX_HEADER = 64 * 1024 * 1024

#: (topic, partition) -> next offset to read.
Offsets = dict[tuple[str, int], int]


# --------------------------------------------------------------------------- records


class StoredRecord:
    """An input record kept in a checkpoint (the holdout); quacks like ``pipeline.Record``."""

    __slots__ = ("_key", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(
        self, topic: str, partition: int, offset: int, timestamp: int, key: bytes | None, value: bytes | None
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._timestamp, self._key, self._value = timestamp, key, value

    @classmethod
    def of(cls, msg: Any) -> StoredRecord:
        return cls(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], msg.key(), msg.value())

    def as_tuple(self) -> tuple[str, int, int, int, bytes | None, bytes | None]:
        return (self._topic, self._partition, self._offset, self._timestamp, self._key, self._value)

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp)

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return None


# --------------------------------------------------------------------------- keys


class CheckpointKeys:
    """The checkpoint key(s): the first signs, every one verifies (rotation: current + previous).

    Keys are never shown: ``repr``, errors and headers name a key by its id, the
    first 16 hex digits of HMAC-SHA256(key, a constant), which reveals nothing of it."""

    __slots__ = ("_by_id", "ids", "source")

    def __init__(self, keys: Sequence[bytes], source: str) -> None:
        if not keys:
            raise ValueError("no checkpoint key")
        self.source = source
        self._by_id: dict[str, bytes] = {}
        for key in keys:
            self._by_id.setdefault(self.key_id(key), key)
        #: Key ids, the signing key first.
        self.ids = list(self._by_id)

    @staticmethod
    def key_id(key: bytes) -> str:
        return hmac.new(key, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]

    @property
    def signing_id(self) -> str:
        return self.ids[0]

    def sign(self, header: bytes) -> bytes:
        return hmac.new(self._by_id[self.ids[0]], _MAC_DOMAIN + header, hashlib.sha256).digest()

    def verify(self, key_id: str, header: bytes, mac: bytes) -> bool:
        key = self._by_id.get(key_id)
        if key is None:
            return False
        return hmac.compare_digest(hmac.new(key, _MAC_DOMAIN + header, hashlib.sha256).digest(), mac)

    def __repr__(self) -> str:
        return f"CheckpointKeys({len(self.ids)} key(s) from {self.source}, signing key id {self.signing_id})"

    __str__ = __repr__


def _parse_keys(raw: bytes, source: str) -> CheckpointKeys:
    """Whitespace-separated keys (a file's lines): the first signs, the rest verify only."""
    keys = raw.split()
    if not keys:
        raise _config_error(f"{source}: no checkpoint key in it")
    for n, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_BYTES:
            raise _config_error(
                f"{source}: checkpoint key #{n} is {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
                "(e.g. `openssl rand -hex 32`)"
            )
    return CheckpointKeys(keys, source)


def _config_error(message: str) -> Exception:
    from stream.config import ConfigError

    return ConfigError(message)


_warned_unauthenticated = False


def load_keys(config: Any, *, environ: Mapping[str, str] | None = None, warn: bool = True) -> CheckpointKeys | None:
    """The checkpoint keys: ``STREAM_CHECKPOINT_KEY`` if set, else the file named by
    ``[checkpoints] key_file``, else None (checkpoints are then unauthenticated: a
    warning, once per process). A key file that is missing, unreadable, empty or
    holds a key under :data:`MIN_KEY_BYTES` is a configuration error (never quoting it)."""
    global _warned_unauthenticated
    env = os.environ if environ is None else environ
    value = env.get(KEY_ENV, "")
    if value.strip():
        return _parse_keys(value.encode(), f"${KEY_ENV}")
    path = getattr(getattr(config, "checkpoints", None), "key_file", "") or ""
    if path:
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise _config_error(f"[checkpoints] key_file {path}: no such file") from None
        except OSError as exc:
            raise _config_error(f"[checkpoints] key_file {path}: cannot be read ({exc.strerror})") from None
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & 0o077:
                log.warning(
                    "checkpoint key file is readable by group or others; chmod 600 it", extra={"key_file": path}
                )
        return _parse_keys(raw, f"[checkpoints] key_file {path}")
    if warn and not _warned_unauthenticated:
        _warned_unauthenticated = True
        log.warning(
            "checkpoints are unauthenticated: no checkpoint key is configured, so anyone who can write the "
            f"checkpoint directory can make this process run code; set {KEY_ENV} or [checkpoints] key_file",
            extra={"checkpoints": str(getattr(getattr(config, "checkpoints", None), "dir", ""))},
        )
    return None


# --------------------------------------------------------------------------- format


def current_versions() -> dict[str, str]:
    import numpy

    return {
        "format": str(FORMAT_VERSION),
        "river": river.__version__,
        "python": platform.python_version(),
        "stream": __version__,
        "numpy": numpy.__version__,
    }


def _offsets_to_json(offsets: Mapping[tuple[str, int], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        out.setdefault(topic, {})[str(partition)] = int(offset)
    return out


def _offsets_from_json(doc: Mapping[str, Mapping[str, int]]) -> Offsets:
    return {(topic, int(p)): int(o) for topic, parts in doc.items() for p, o in parts.items()}


def _json_safe(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summarize(learner: Learner) -> dict[str, Any]:
    """What ``stream model list`` shows of a learner, computed at checkpoint time (never per event)."""
    model = getattr(learner, "model", None)
    quality: list[list[Any]] = []
    try:
        quality = [[m, w, _json_safe(float(v))] for m, w, v in learner.quality()]
    except Exception as exc:  # diagnostics only: a failing metric must not fail the checkpoint
        log.warning("learner quality unavailable", extra={"learner": learner.name, "error": repr(exc)})
    return {
        "name": learner.name,
        "kind": getattr(learner, "kind", type(learner).__name__),
        "class": f"{type(learner).__module__}.{type(learner).__qualname__}",
        "model_class": type(model).__name__ if model is not None else None,
        "model_version": int(learner.model_version),
        "n_learned": int(learner.n_learned),
        "quality": quality,
    }


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's verified header."""

    name: str
    seq: int
    created_at: float
    reason: str
    offsets: Offsets
    versions: dict[str, str]
    learners: list[dict[str, Any]]
    payload_length: int
    payload_sha256: str
    instance_id: str = ""
    group_id: str = ""
    holdout_events: int = 0
    origin: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    #: Id of the key that signed it ("" unsigned); verified only when read with keys.
    key_id: str = ""

    @property
    def total_offset(self) -> int:
        return sum(self.offsets.values())

    def learner(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.learners if s["name"] == name), None)

    def header(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "mac": {"alg": "hmac-sha256", "key_id": self.key_id} if self.key_id else None,
            "seq": self.seq,
            "created_at": self.created_at,
            "reason": self.reason,
            "instance_id": self.instance_id,
            "group_id": self.group_id,
            "offsets": _offsets_to_json(self.offsets),
            "versions": self.versions,
            "learners": self.learners,
            "holdout_events": self.holdout_events,
            "origin": self.origin,
            "payload_length": self.payload_length,
            "payload_sha256": self.payload_sha256,
        }

    @classmethod
    def from_header(cls, name: str, doc: Mapping[str, Any]) -> CheckpointInfo:
        mac = doc.get("mac")
        return cls(
            name=name,
            seq=int(doc["seq"]),
            created_at=float(doc["created_at"]),
            reason=str(doc.get("reason", "")),
            offsets=_offsets_from_json(doc["offsets"]),
            versions={k: str(v) for k, v in doc["versions"].items()},
            learners=list(doc.get("learners", [])),
            payload_length=int(doc["payload_length"]),
            payload_sha256=str(doc["payload_sha256"]),
            instance_id=str(doc.get("instance_id", "")),
            group_id=str(doc.get("group_id", "")),
            holdout_events=int(doc.get("holdout_events", 0)),
            origin=doc.get("origin"),
            format_version=int(doc["format_version"]),
            key_id=str(mac["key_id"]) if isinstance(mac, Mapping) else "",
        )


@dataclass
class Checkpoint:
    """A loaded checkpoint: the learners (in configuration order) and the holdout."""

    info: CheckpointInfo
    learners: list[Learner]
    holdout: list[StoredRecord] = field(default_factory=list)

    def learner(self, name: str) -> Learner | None:
        return next((lr for lr in self.learners if lr.name == name), None)


def encode(info: CheckpointInfo, payload: bytes, keys: CheckpointKeys | None = None) -> bytes:
    """The file: always the current format, signed by ``keys``' signing key (unsigned without keys)."""
    doc = info.header()
    doc["format_version"] = FORMAT_VERSION
    doc["mac"] = {"alg": "hmac-sha256", "key_id": keys.signing_id} if keys is not None else None
    header = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    mac = keys.sign(header) if keys is not None else _NO_MAC
    return PREFIX.pack(MAGIC, len(header), hashlib.sha256(header).digest()) + header + mac + payload


def pack_payload(learners: Sequence[Learner], holdout: Sequence[StoredRecord]) -> bytes:
    return pickle.dumps(
        {"learners": list(learners), "holdout": [r.as_tuple() for r in holdout]}, protocol=pickle.HIGHEST_PROTOCOL
    )


def build(
    name: str,
    seq: int,
    learners: Sequence[Learner],
    offsets: Mapping[tuple[str, int], int],
    *,
    reason: str,
    holdout: Sequence[StoredRecord] = (),
    origin: dict[str, Any] | None = None,
    instance_id: str = "",
    group_id: str = "",
    keys: CheckpointKeys | None = None,
) -> tuple[CheckpointInfo, bytes]:
    """A checkpoint's header and complete file contents, signed when ``keys`` are given."""
    payload = pack_payload(learners, holdout)
    info = CheckpointInfo(
        name=name,
        seq=seq,
        created_at=time.time(),
        reason=reason,
        offsets=dict(offsets),
        versions=current_versions(),
        learners=[summarize(lr) for lr in learners],
        payload_length=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        instance_id=instance_id,
        group_id=group_id,
        holdout_events=len(holdout),
        origin=origin,
        key_id=keys.signing_id if keys is not None else "",
    )
    return info, encode(info, payload, keys)


def decode_header(name: str, head: bytes, keys: CheckpointKeys | None = None) -> tuple[CheckpointInfo, int]:
    """Parse and verify the header at the start of ``head``; returns it and the payload's start.

    With ``keys``, the header's MAC is checked too (it binds the payload's length and
    sha256): anything but a format-2 file signed by one of the keys raises
    :class:`UnauthenticatedCheckpoint`, whatever version it claims."""
    if len(head) < PREFIX.size:
        raise CorruptCheckpoint(f"{name}: truncated ({len(head)} bytes, shorter than the fixed prefix)")
    magic, header_len, digest = PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise CorruptCheckpoint(f"{name}: not a stream checkpoint (bad magic {magic!r})")
    if header_len > MAX_HEADER:
        raise CorruptCheckpoint(f"{name}: implausible header length {header_len}")
    raw = head[PREFIX.size : PREFIX.size + header_len]
    if len(raw) != header_len:
        raise CorruptCheckpoint(f"{name}: truncated inside the header")
    if hashlib.sha256(raw).digest() != digest:
        raise CorruptCheckpoint(f"{name}: header checksum mismatch")
    try:
        doc = json.loads(raw)
        version = int(doc["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{name}: unreadable header: {exc}") from None
    if keys is not None and version != FORMAT_VERSION:
        raise UnauthenticatedCheckpoint(
            f"{name}: refused: not signed (checkpoint format {version}, unauthenticated) and a checkpoint key "
            "is configured; nothing in it was loaded"
        )
    if version not in READABLE_FORMATS:
        readable = ", ".join(map(str, READABLE_FORMATS))
        raise IncompatibleCheckpoint(f"{name}: checkpoint format {version}, this build reads formats {readable}")
    start = PREFIX.size + header_len
    if version >= 2:
        mac = head[start : start + MAC_SIZE]
        if len(mac) != MAC_SIZE:
            raise CorruptCheckpoint(f"{name}: truncated inside the MAC")
        start += MAC_SIZE
        if keys is not None:
            _authenticate(name, doc, raw, mac, keys)
    try:
        info = CheckpointInfo.from_header(name, doc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpoint(f"{name}: unreadable header: {exc}") from None
    return info, start


def _authenticate(name: str, doc: Mapping[str, Any], header: bytes, mac: bytes, keys: CheckpointKeys) -> None:
    spec = doc.get("mac")
    if not isinstance(spec, Mapping):
        raise UnauthenticatedCheckpoint(
            f"{name}: refused: unsigned checkpoint and a checkpoint key is configured; nothing in it was loaded"
        )
    key_id = str(spec.get("key_id", ""))
    if spec.get("alg") != "hmac-sha256" or not keys.verify(key_id, header, mac):
        if key_id in keys.ids:
            why = "its MAC does not match (altered or forged)"
        else:
            why = f"signed with key id {key_id[:16]!r}, not one of this process's keys ({', '.join(keys.ids)})"
        raise UnauthenticatedCheckpoint(f"{name}: refused: bad signature: {why}; nothing in it was loaded")


def check_versions(info: CheckpointInfo) -> None:
    """Refuse a checkpoint whose pickles were made by another River version."""
    theirs, ours = info.versions.get("river"), river.__version__
    if theirs != ours:
        raise IncompatibleCheckpoint(
            f"checkpoint {info.name} was written with river {theirs}, this process runs river {ours}: "
            "River's pickles do not load reliably across releases, so it is refused. Run the River version "
            "that wrote it (then `stream model export --format pickle` is still tied to it), or start the "
            "learners over with a model trained by this version (`stream model import`)."
        )
    py = info.versions.get("python", "")
    if py.rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        log.warning(
            "checkpoint written by another Python minor version",
            extra={"checkpoint": info.name, "python": py, "running": platform.python_version()},
        )


def decode(name: str, data: bytes, keys: CheckpointKeys | None = None) -> Checkpoint:
    """Verify (with ``keys``: authenticate) and only then unpickle a whole checkpoint file."""
    info, start = decode_header(name, data, keys)
    payload = data[start:]
    if len(payload) != info.payload_length:
        raise CorruptCheckpoint(
            f"{name}: payload is {len(payload)} bytes, header says {info.payload_length} (torn or truncated write)"
        )
    if hashlib.sha256(payload).hexdigest() != info.payload_sha256:
        raise CorruptCheckpoint(f"{name}: payload checksum mismatch")
    check_versions(info)
    try:
        doc = pickle.loads(payload)
        learners = list(doc["learners"])
        holdout = [StoredRecord(*t) for t in doc.get("holdout", [])]
    except Exception as exc:  # any unpickling failure means this build cannot use it
        raise IncompatibleCheckpoint(f"{name}: verified but cannot be unpickled by this build: {exc!r}") from exc
    return Checkpoint(info, learners, holdout)
