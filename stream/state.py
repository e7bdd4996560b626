"""Checkpoints: the learners' whole state together with the input offsets it reflects.

This module is the store: where checkpoint files live (``Storage``: a directory,
written atomically with a temporary file, fsync, rename and fsync of the
directory; ``stream.checkpoint_topic`` keeps them in a Kafka topic), their names
and sequence numbers, choosing the one to restore, pruning, and swapping a
learner's model. The file format (header, MAC, keys, payload) is
``stream.checkpoint``.

Offsets semantics: a checkpoint's learners have learned exactly the events
*before* its offsets, once each. On start the application loads the best
checkpoint whose offsets are <= the group's committed offsets, seeks there,
and relearns up to the committed offsets without publishing (see
``stream.app`` and docs/guarantees.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stream import faults
from stream.checkpoint import (
    FORMAT_VERSION,
    MAC_SIZE,
    MAGIC,
    MAX_HEADER,
    PREFIX,
    Checkpoint,
    CheckpointInfo,
    CheckpointKeys,
    Offsets,
    StoredRecord,
    build,
    decode,
    decode_header,
    load_keys,
)
from stream.errors import (
    CheckpointError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    StateError,
    UnauthenticatedCheckpoint,
)
from stream.learners import Learner

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointKeys",
    "CheckpointStore",
    "CorruptCheckpoint",
    "IncompatibleCheckpoint",
    "LocalStorage",
    "Offsets",
    "StateError",
    "Storage",
    "StoredRecord",
    "UnauthenticatedCheckpoint",
    "load_keys",
    "missing_state",
    "swap_model",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{12})-([0-9a-f]{8})\.ckpt$")


# --------------------------------------------------------------------------- storage


class Storage(Protocol):
    """Where checkpoint files live. ``write`` must be atomic: a reader sees the
    whole new object or nothing (an object store's PUT is; a file system needs
    rename). Names are flat (no ``/``)."""

    def write(self, name: str, data: bytes) -> None: ...
    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes: ...
    def names(self) -> list[str]: ...
    def delete(self, name: str) -> None: ...
    def describe(self) -> str: ...


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


class LocalStorage:
    """A local or mounted directory (NFS, a Kubernetes volume shared by the instances)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            half = len(data) // 2
            _write_all(fd, memoryview(data)[:half])
            if faults.ARMED:
                faults.hit("mid_checkpoint_write")
            _write_all(fd, memoryview(data)[half:])
            # The data must be on disk before the rename makes it visible, or a
            # power loss could leave a complete-looking name over missing blocks.
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, final)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        # The rename itself is only durable once the directory entry is flushed.
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def remove_temporaries(self, older_than_s: float = 0.0) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        n = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for p in self.root.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name:
                    with contextlib.suppress(OSError):
                        if now - p.stat().st_mtime >= older_than_s:
                            p.unlink()
                            n += 1
        return n


# --------------------------------------------------------------------------- the store


@dataclass
class Selection:
    """The outcome of choosing a checkpoint to restore."""

    checkpoint: Checkpoint | None
    #: (name, reason) of every checkpoint passed over, newest first.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Names among ``skipped`` refused because they are not signed by the checkpoint key.
    refused: set[str] = field(default_factory=set)


class CheckpointStore:
    """Checkpoints of one consumer group: write, list, load, select, prune.

    With ``keys`` every checkpoint written is signed and every one read must be
    signed by one of them (checked before unpickling); without, none is signed or checked."""

    def __init__(
        self, storage: Storage, *, group_id: str = "", instance_id: str = "", keys: CheckpointKeys | None = None
    ) -> None:
        self.storage = storage
        self.group_id = group_id
        self.instance_id = instance_id
        self.keys = keys
        #: Random per process: checkpoint names never collide, even with a zombie of the same instance.
        self._token = uuid.uuid4().hex[:8]
        self._seq: int | None = None

    @classmethod
    def for_config(
        cls,
        config: Any,
        instance_id: str = "",
        keys: CheckpointKeys | bool | None = True,
        storage: Storage | None = None,
    ) -> CheckpointStore:
        """The configured group's store; ``keys=True``: from :func:`load_keys` (validated, warns if none);
        ``storage`` None: the group's directory (``stream.checkpoint_topic.checkpoint_storage`` picks
        the configured one)."""
        resolved = load_keys(config) if keys is True else (keys or None)
        where = storage if storage is not None else LocalStorage(checkpoint_dir(config))
        return cls(where, group_id=config.kafka.group_id, instance_id=instance_id, keys=resolved)

    def describe(self) -> str:
        return self.storage.describe()

    # -- names

    @staticmethod
    def seq_of(name: str) -> int | None:
        m = _NAME.match(name)
        return int(m.group(1)) if m else None

    def names(self) -> list[str]:
        """Checkpoint names, newest (highest sequence number) first."""
        found = [(s, n) for n in self.storage.names() if (s := self.seq_of(n)) is not None]
        return [n for _, n in sorted(found, reverse=True)]

    def next_seq(self) -> int:
        """The next sequence number (reserved: the next call returns a higher one)."""
        if self._seq is None:
            names = self.names()
            self._seq = (self.seq_of(names[0]) or 0) if names else 0
        else:
            # Another writer (a CLI import, a previous owner) may have gone ahead.
            names = self.names()
            if names:
                self._seq = max(self._seq, self.seq_of(names[0]) or 0)
        self._seq += 1
        return self._seq

    # -- write

    def write(
        self,
        learners: Sequence[Learner],
        offsets: Mapping[tuple[str, int], int],
        *,
        reason: str,
        holdout: Sequence[StoredRecord] = (),
        origin: dict[str, Any] | None = None,
        seq: int | None = None,
        storage: Storage | None = None,
    ) -> CheckpointInfo:
        """Write a checkpoint; ``seq`` reserved beforehand by :meth:`next_seq` and ``storage``
        other than the store's: a forked writer spooling to a local file for the parent to upload."""
        seq = self.next_seq() if seq is None else seq
        info, data = build(
            f"ckpt-{seq:012d}-{self._token}.ckpt", seq, learners, offsets, reason=reason, holdout=holdout,
            origin=origin, instance_id=self.instance_id, group_id=self.group_id, keys=self.keys,
        )
        (storage if storage is not None else self.storage).write(info.name, data)
        return info

    # -- read

    def info(self, name: str) -> CheckpointInfo:
        """The verified (with keys: authenticated) header only (the payload is checked by :meth:`load`)."""
        head = self.storage.read(name, 0, PREFIX.size)
        if len(head) == PREFIX.size:
            _, header_len, _ = PREFIX.unpack(head)
            head = self.storage.read(name, 0, PREFIX.size + min(header_len, MAX_HEADER) + MAC_SIZE)
        return decode_header(name, head, self.keys)[0]

    def load(self, name: str) -> Checkpoint:
        return decode(name, self.storage.read(name), self.keys)

    def verify(self, name: str) -> CheckpointInfo:
        """Check length, checksums and (with keys) the MAC, not the River version, without unpickling."""
        data = self.storage.read(name)
        info, start = decode_header(name, data, self.keys)
        payload = memoryview(data)[start:]
        if len(payload) != info.payload_length:
            raise CorruptCheckpoint(f"{name}: payload is {len(payload)} bytes, header says {info.payload_length}")
        if hashlib.sha256(payload).hexdigest() != info.payload_sha256:
            raise CorruptCheckpoint(f"{name}: payload checksum mismatch")
        return info

    def scan(self, verify: bool = True) -> Iterator[tuple[str, CheckpointInfo | None, str | None]]:
        """Every checkpoint, newest first: (name, info or None, error or None); a checkpoint
        refused by the keys comes with its unauthenticated header (for listing only) and the error."""
        for name in self.names():
            try:
                yield name, (self.verify(name) if verify else self.info(name)), None
            except UnauthenticatedCheckpoint as exc:
                # Listed (its header is only JSON), never loaded: the info is unauthenticated.
                unverified: CheckpointInfo | None = None
                with contextlib.suppress(CheckpointError, OSError):
                    unverified = CheckpointStore(self.storage).info(name)
                yield name, unverified, str(exc)
            except (CheckpointError, OSError) as exc:
                yield name, None, str(exc)

    def by_seq(self, seq: int) -> str:
        for name in self.names():
            if self.seq_of(name) == seq:
                return name
        raise CheckpointError(f"no checkpoint with version {seq} in {self.describe()}")

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies (corrupt ones are skipped with a warning,
        unauthenticated ones with an error)."""
        for name in self.names():
            try:
                return self.load(name)
            except CorruptCheckpoint as exc:
                log.warning("skipping corrupt checkpoint", extra={"checkpoint": name, "reason": str(exc)})
            except UnauthenticatedCheckpoint as exc:
                log.error(
                    "checkpoint refused: not signed by the checkpoint key",
                    extra={"checkpoint": name, "reason": str(exc)},
                )
        return None

    def select(self, committed: Mapping[tuple[str, int], int | None], low: Mapping[tuple[str, int], int]) -> Selection:
        """The checkpoint to restore: the one closest to the committed offsets
        among those whose offsets are all <= them (a checkpoint ahead of the
        committed offsets reflects events whose outputs were never committed).

        ``committed`` maps every current partition to its committed offset (None
        when the group has none: nothing was processed, it counts as ``low``);
        ``low`` to its low watermark (where a checkpoint without the partition starts).
        Corrupt checkpoints are passed over, and so are, with keys, those not signed
        by one of them (never unpickled; named in ``refused``); an authentic one written
        by another River version raises :class:`IncompatibleCheckpoint` (refusing beats
        silently using an older one)."""
        skipped: list[tuple[str, str]] = []
        refused: set[str] = set()
        candidates: list[CheckpointInfo] = []
        for name in self.names():
            try:
                info = self.info(name)
            except UnauthenticatedCheckpoint as exc:
                skipped.append((name, str(exc)))
                refused.add(name)
                continue
            except (CorruptCheckpoint, OSError) as exc:
                skipped.append((name, str(exc)))
                continue
            ahead = [
                f"{t}[{p}] {info.offsets.get((t, p), lo)} > {_limit(committed.get((t, p)), lo)}"
                for (t, p), lo in low.items()
                if info.offsets.get((t, p), lo) > _limit(committed.get((t, p)), lo)
            ]
            if ahead:
                skipped.append((name, "ahead of the committed offsets: " + ", ".join(ahead[:3])))
                continue
            candidates.append(info)
        # Closest to the committed offsets first; among equals the newest (an import or rollback).
        candidates.sort(key=lambda i: (sum(i.offsets.get(tp, lo) for tp, lo in low.items()), i.seq), reverse=True)
        for info in candidates:
            try:
                return Selection(self.load(info.name), skipped, refused)
            except UnauthenticatedCheckpoint as exc:  # replaced since its header was read
                skipped.append((info.name, str(exc)))
                refused.add(info.name)
            except CorruptCheckpoint as exc:
                skipped.append((info.name, str(exc)))
        return Selection(None, skipped, refused)

    # -- prune

    def prune(self, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Delete all but the ``keep`` newest checkpoints; never one in ``protect``
        (the checkpoint matching the offsets just committed)."""
        names = self.names()
        survivors = set(names[:keep]) | set(protect)
        deleted = [n for n in names if n not in survivors]
        for name in deleted:
            self.storage.delete(name)
        return deleted

    def delete(self, name: str) -> None:
        self.storage.delete(name)


def _limit(committed: int | None, low: int) -> int:
    return committed if committed is not None and committed >= 0 else low


def checkpoint_dir(config: Any) -> Path:
    """``[checkpoints] dir`` / the group id: each group's checkpoints match its own committed offsets."""
    group = re.sub(r"[^A-Za-z0-9._-]+", "_", config.kafka.group_id) or "_"
    return Path(config.checkpoints.dir) / group


# --------------------------------------------------------------------------- model swap and validation


def missing_state(restored: Any, template: Any) -> list[str]:
    """Attributes a freshly built learner has and a restored one lacks: its class gained
    state since the checkpoint was written (without a ``__setstate__`` giving it a
    default), so the restored object would fail at its first use of it."""
    fresh = getattr(template, "__dict__", None)
    old = getattr(restored, "__dict__", None)
    if fresh is None or old is None or type(restored) is not type(template):
        return [] if type(restored) is type(template) else [f"<class {type(template).__name__}>"]
    return sorted(set(fresh) - set(old))


def swap_model(learner: Learner, model: Any) -> None:
    """Make ``learner`` serve ``model`` (warm start, rollback) and bump its model version."""
    before = learner.model_version
    try:
        learner.replace_model(model)
    except NotImplementedError:
        if not hasattr(learner, "model"):
            raise StateError(f"learner `{learner.name}` ({type(learner).__name__}) cannot replace its model") from None
        learner.model = model  # type: ignore[attr-defined]
    if learner.model_version == before:
        learner.model_version = before + 1


def describe_offsets(offsets: Mapping[tuple[str, int], int], limit: int = 6) -> str:
    parts = [f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items())]
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def read_any(path: str | Path, keys: CheckpointKeys | None = None, *, trust_pickle: bool = False) -> Checkpoint | Any:
    """A checkpoint file or a plain pickle (a River model), by content.

    A checkpoint is verified, and with ``keys`` authenticated before it is unpickled.
    Unpickling runs code chosen by whoever wrote the file, so a bare pickle is
    refused unless ``trust_pickle`` (the operator vouches for the file), which also
    lets through a checkpoint not signed by ``keys`` (e.g. from another deployment)."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] == MAGIC:
        return decode(str(path), data, None if trust_pickle else keys)
    if not trust_pickle:
        raise UnauthenticatedCheckpoint(
            f"{path}: refused: not a stream checkpoint; loading it as a bare pickle would run whatever code it "
            "contains. If you trust where it comes from, pass --trust-pickle; nothing in it was loaded"
        )
    try:
        return pickle.load(io.BytesIO(data))
    except Exception as exc:
        raise CheckpointError(f"{path}: neither a stream checkpoint nor a readable pickle: {exc!r}") from None
