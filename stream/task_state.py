"""The state of one task: its learners, pipeline, offsets, alignment, holdout and checkpoints.

A task (``stream.tasks``) owns its own copy of every configured learner, and
with it every piece of per-key state (user histories, pending label joins,
per-user features). Its checkpoints are its own: ``ScopedStorage`` names them
``task-<p>.ckpt-...`` in the shared storage (a directory every instance mounts,
or the compacted checkpoint topic of ``stream.checkpoint_topic``, which needs
no shared filesystem), unscoped when there is one task, so checkpoints written
before scale-out still load. A checkpoint holds the task's learners and the
offsets of the task's partitions that they reflect.

Moving a task (``TaskState.restore``): the new owner restores the task's
checkpoint closest to the committed offsets, reads each partition from the
checkpoint's offset and relearns up to the committed offset without publishing
(the outputs were published by the previous owner). An instance with an empty
disk does the same from the checkpoint topic. On revocation the owner commits
and checkpoints the task first (``stream.app``), so the successor relearns
nothing.

Each task reads its partitions with its own consumer (manual assignment): its
per-task partitions and every partition of the global tables, at its own
positions, so a task restored anywhere resumes exactly where its checkpoint
is. Global partitions another task publishes are learned silently
(``silent``); their positions are kept in the task's checkpoints, never
committed. Within a task the next record comes from the buffered partition
with the smallest timestamp (``stream.alignment``), with a bounded wait for a
lagging partition, as Kafka Streams does within its tasks.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, NoReturn

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from stream import faults
from stream.alignment import Aligner
from stream.config import Config
from stream.errors import CheckpointError, StateError
from stream.kafka import TP
from stream.learners import Learner
from stream.metrics import PipelineMetrics
from stream.pipeline import DeadLetterBudget, Headers, Observer, Pipeline, Sink, TimedSink
from stream.privacy import Pseudonymizer
from stream.state import (
    CheckpointInfo,
    CheckpointKeys,
    CheckpointStore,
    LocalStorage,
    Offsets,
    Selection,
    Storage,
    StoredRecord,
    describe_offsets,
    missing_state,
)

__all__ = ["ScopedStorage", "TaskSink", "TaskState", "adopt", "task_store"]

log = logging.getLogger(__name__)

Warn = Callable[..., None]

#: Records the aligner may hold for one partition before the consumer pauses it.
ALIGN_PAUSE_AT = 10_000

#: Output headers naming the task and the model-sync version an output came from.
H_TASK = "stream.task"
H_MODEL_VERSION = "stream.model_version"


class ScopedStorage:
    """One task's view of a shared ``Storage``: its names carry the prefix ``task-<p>.``.

    >>> import tempfile
    >>> shared = LocalStorage(tempfile.mkdtemp())
    >>> t1 = ScopedStorage(shared, 1)
    >>> t1.write("ckpt-000000000001-abcdef01.ckpt", b"x")
    >>> t1.names(), shared.names(), ScopedStorage(shared, 2).names()
    (['ckpt-000000000001-abcdef01.ckpt'], ['task-1.ckpt-000000000001-abcdef01.ckpt'], [])
    """

    def __init__(self, inner: Storage, task: int) -> None:
        self.inner = inner
        self.task = task
        self.prefix = f"task-{task}."

    def write(self, name: str, data: bytes) -> None:
        self.inner.write(self.prefix + name, data)

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        return self.inner.read(self.prefix + name, start, length)

    def names(self) -> list[str]:
        n = len(self.prefix)
        return [name[n:] for name in self.inner.names() if name.startswith(self.prefix)]

    def delete(self, name: str) -> None:
        self.inner.delete(self.prefix + name)

    def describe(self) -> str:
        return f"{self.inner.describe()} (task {self.task})"

    def remove_temporaries(self, older_than_s: float = 0.0) -> int:
        remove = getattr(self.inner, "remove_temporaries", None)
        return int(remove(older_than_s=older_than_s)) if remove is not None else 0


def task_store(config: Config, storage: Storage, instance: str, task: int, n_tasks: int,
               keys: CheckpointKeys | None = None) -> CheckpointStore:  # fmt: skip
    """The checkpoint store of ``task``: scoped in ``storage`` unless it is the only task
    (``keys``: loaded once at start-up, see ``stream.state.load_keys``)."""
    scoped: Storage = storage if n_tasks == 1 else ScopedStorage(storage, task)
    return CheckpointStore(scoped, group_id=config.kafka.group_id, instance_id=instance, keys=keys)


class TaskSink:
    """The shared sink with this task's headers on every output: ``stream.task`` and
    ``stream.model_version`` (the model-sync version, updated after each sync tick).
    Dead letters keep their provenance headers and get the task's appended."""

    def __init__(self, sink: Sink, task: int) -> None:
        self.sink = sink
        # Checked once: the loop reports every batch (``consumed``) to a timed sink.
        self._timed = sink if isinstance(sink, TimedSink) else None
        self.task = task
        self._task = (H_TASK, str(task).encode())
        self.headers: Headers = [self._task, (H_MODEL_VERSION, b"0")]
        self.version = 0

    def set_version(self, version: int) -> None:
        if version != self.version:
            self.version = version
            self.headers = [self._task, (H_MODEL_VERSION, str(version).encode())]

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        self.sink.produce(topic, key, value, [*headers, self._task] if headers else self.headers)

    # The pipeline's own latency share (``stream.metrics`` hooks ``consumed``/``on_acknowledged`` on a
    # pipeline's sink): every task's batches go through the shared sink, which counts the acknowledgements.
    def consumed(self, consumed_at: float, records: int) -> None:
        if self._timed is not None:
            self._timed.consumed(consumed_at, records)

    @property
    def on_acknowledged(self) -> Callable[[float, int], None] | None:
        return self._timed.on_acknowledged if self._timed is not None else None

    @on_acknowledged.setter
    def on_acknowledged(self, report: Callable[[float, int], None] | None) -> None:
        if self._timed is not None:
            self._timed.on_acknowledged = report


class _Background(NamedTuple):
    """A checkpoint being written by a forked child."""

    pid: int
    fd: int  # read end of the child's report pipe
    offsets: Offsets
    pause_s: float  # what the fork cost the loop
    #: Remote storage (a Kafka topic): the child writes here, the parent uploads when it reaps.
    spool: LocalStorage | None = None


def adopt(restored: Sequence[Learner], templates: Sequence[Learner]) -> list[Learner]:
    """The checkpoint's learners in configuration order; configured ones it lacks start untrained."""
    by_name = {lr.name: lr for lr in restored}
    out: list[Learner] = []
    for template in templates:
        learner = by_name.pop(template.name, None)
        if learner is None:
            log.warning(
                "learner not in the checkpoint: it starts untrained, at the checkpoint's offsets",
                extra={"learner": template.name},
            )
            out.append(copy.deepcopy(template))
            continue
        missing = missing_state(learner, template)
        if missing:
            raise StateError(
                f"learner `{template.name}` in the checkpoint lacks state this build's "
                f"{type(template).__name__} has ({', '.join(missing[:8])}): its class changed since the "
                "checkpoint was written. Give the class a `__setstate__` that fills the new attributes "
                "in, or run the version that wrote the checkpoint."
            )
        if getattr(learner, "spec", None) != getattr(template, "spec", None):
            log.warning(
                "learner configuration changed since the checkpoint; the checkpointed learner is kept",
                extra={"learner": template.name},
            )
        out.append(learner)
    for name in by_name:
        log.warning("checkpoint learner no longer configured: dropped", extra={"learner": name})
    return out


class TaskState:
    """One task's learners and everything that moves with them (see the module doc)."""

    def __init__(self, task: int, config: Config, store: CheckpointStore, partitions: Sequence[TP],
                 silent: Collection[TP], metrics: PipelineMetrics | None, privacy: Pseudonymizer | None,
                 warn: Warn) -> None:  # fmt: skip
        self.task = task
        self.config = config
        self.store = store
        #: Every partition the task reads; ``silent``: those it learns without publishing or committing.
        self.partitions = list(partitions)
        self.silent = frozenset(silent)
        self.consumer: Consumer | None = None
        self.metrics = metrics
        self.privacy = privacy
        self._warn = warn
        self.learners: list[Learner] = []
        self.pipeline: Pipeline | None = None
        self.sink: TaskSink | None = None
        self.offsets: dict[TP, int] = {}
        #: Partitions relearning up to their committed offset (outputs suppressed), and that offset.
        self.catchup: dict[TP, int] = {}
        self.aligner: Aligner[Message] | None = None
        self.paused: set[TP] = set()
        self.recent: collections.deque[list[Message]] = collections.deque()
        self.recent_n = 0
        self.holdout_seed: list[StoredRecord] = []
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.background: _Background | None = None
        #: A checkpoint written for the open transaction: deleted if it aborts.
        self.txn_checkpoint: str | None = None
        self.uncommitted = False
        self.replayed = 0
        self.checkpoints = 0
        self.restored: CheckpointInfo | None = None

    # -- restoring ---------------------------------------------------------------

    def restore(self, committed: dict[TP, int | None], low: dict[TP, int], templates: Sequence[Learner],
                fresh: list[Learner] | None) -> dict[TP, int]:  # fmt: skip
        """Load the checkpoint consistent with ``committed`` (or start untrained, from ``fresh``
        or copies of ``templates``); returns where to read each partition from. ``low`` holds
        every partition's low watermark; the silent ones bound nothing (nothing was published
        from them), so any checkpoint position in them is consistent."""
        bounded = {k: lo for k, lo in low.items() if k not in self.silent}
        cfg = self.config
        remove = getattr(self.store.storage, "remove_temporaries", None)
        if remove is not None:
            # Half-written files of a crash mid-write; old enough that no live writer owns them.
            remove(older_than_s=600)
        selection = self.store.select(committed, bounded)
        self._report_skipped(selection)
        ckpt = selection.checkpoint
        behind = {k: c for k, c in committed.items() if c is not None and c > bounded[k]}
        if ckpt is None:
            if behind and cfg.checkpoints.on_missing == "fail":
                raise StateError(
                    f"group `{cfg.kafka.group_id}` has committed offsets ({describe_offsets(behind)}) but no "
                    f"checkpoint in {self.store.describe()} is consistent with them "
                    f"({len(selection.skipped)} passed over). "
                    "Starting a fresh model at those offsets would silently skip learning everything before them. "
                    "Restore the checkpoint directory, import a model (`stream model import`), or set "
                    '[checkpoints] on_missing = "rewind" to relearn from the beginning without publishing.'
                )
            self.learners = fresh if fresh is not None else copy.deepcopy(list(templates))
            start = dict(low)
            self.holdout_seed = []
        else:
            self.learners = adopt(ckpt.learners, templates)
            start = {k: ckpt.info.offsets.get(k, lo) for k, lo in low.items()}
            self.holdout_seed = ckpt.holdout
            self.restored = ckpt.info
        self.catchup = {k: c for k, c in committed.items() if c is not None and c > start[k]}
        self.offsets = dict(start)
        return start

    def _report_skipped(self, selection: Selection) -> None:
        for name, reason in selection.skipped:
            if name in selection.refused:
                # Not signed by our key: possibly planted. Never unpickled; loud, but not fatal.
                log.error(
                    "checkpoint passed over: not signed by the checkpoint key (possibly planted)",
                    extra={"checkpoint": name, "reason": reason, "refused": True, "task": self.task},
                )
            else:
                log.warning("checkpoint passed over", extra={"checkpoint": name, "reason": reason, "task": self.task})

    def start(self, sink: Sink, observer: Observer | None, budget: DeadLetterBudget,
              lagging: Callable[[TP], bool] | None) -> None:  # fmt: skip
        """Build the pipeline over the restored learners (``lagging``: align partitions in event time)."""
        cfg = self.config
        self.sink = TaskSink(sink, self.task)
        self.pipeline = Pipeline(
            self.learners,
            self.sink,
            contract_topics=cfg.input_topics(),
            dead_letter_topic=cfg.topics.dead_letters,
            max_value_bytes=cfg.processing.max_value_bytes,
            observer=observer,
            privacy=self.privacy,
            dead_letter_budget=budget,
            # The client failing is the service failing: never contained to a record.
            service_errors=(KafkaException,),
            task=self.task,
        )
        if lagging is not None:
            self.aligner = Aligner(cfg.processing.align_wait_ms / 1000.0, lagging)
            self.aligner.assign(self.partitions)
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()

    @property
    def relearn(self) -> int:
        """Records to relearn without publishing before this task publishes again."""
        return sum(c - self.offsets[k] for k, c in self.catchup.items())

    # -- processing --------------------------------------------------------------

    def process(self, batch: list[Message], on_error: Callable[[Message], None]) -> int:
        """Align (when on) and process what was fetched for this task; returns how many records went through."""
        aligner = self.aligner
        if aligner is not None:
            for failed in aligner.add(batch):
                on_error(failed)
            batch = aligner.release()
        if not batch:
            return 0
        if self.catchup or self.silent or faults.ARMED:
            self._process_slow(batch, on_error)
        else:
            process = self.pipeline.process  # type: ignore[union-attr]
            for msg in batch:
                if msg.error() is not None:
                    on_error(msg)
                    continue
                process(msg)  # type: ignore[arg-type]
        self.uncommitted = True
        self.since_checkpoint += len(batch)
        keep = self.config.checkpoints.holdout_events
        if keep:
            # Whole batches by reference (no per-record cost); trimmed to the holdout size.
            recent = self.recent
            recent.append(batch)
            self.recent_n += len(batch)
            while self.recent_n - len(recent[0]) >= keep:
                self.recent_n -= len(recent.popleft())
        return len(batch)

    def _process_slow(self, batch: list[Message], on_error: Callable[[Message], None]) -> None:
        """The loop body while some partition is relearning up to its committed offset, for
        the global partitions other tasks publish (outputs suppressed per partition), or when
        faults are armed."""
        pipeline = self.pipeline
        assert pipeline is not None
        process = pipeline.process
        catchup, silent = self.catchup, self.silent
        armed = faults.ARMED
        for msg in batch:
            if msg.error() is not None:
                on_error(msg)
                continue
            if catchup or silent:
                key: TP = (msg.topic(), msg.partition())  # type: ignore[assignment]
                if key in silent:
                    # Another task publishes this global record: learn it only.
                    pipeline.publish = False
                    try:
                        process(msg)  # type: ignore[arg-type]
                    finally:
                        pipeline.publish = True
                    continue
                target = catchup.get(key)
                if target is not None:
                    offset: int = msg.offset()  # type: ignore[assignment]
                    if offset < target:
                        # Already published (and committed) before the restart: learn only.
                        pipeline.publish = False
                        try:
                            process(msg)  # type: ignore[arg-type]
                        finally:
                            pipeline.publish = True
                        self.replayed += 1
                        if offset + 1 >= target:
                            self.caught_up(key)
                        if armed:
                            faults.hit("mid_batch")
                        continue
                    self.caught_up(key)
            process(msg)  # type: ignore[arg-type]
            if armed:
                faults.hit("mid_batch")

    def caught_up(self, key: TP) -> None:
        self.catchup.pop(key, None)
        if not self.catchup:
            log.info(
                "caught up with the committed offsets; publishing again",
                extra={"relearned": self.replayed, "task": self.task},
            )

    def runaways(self) -> list[TopicPartition]:
        """Partitions far ahead of the others in event time (a backlog held back for an earlier
        one), to pause: the aligner's buffers stay bounded, as Kafka Streams'
        ``buffered.records.per.partition`` keeps its queues. Marked paused here."""
        if self.aligner is None or self.aligner.buffered < ALIGN_PAUSE_AT:
            return []
        full = [tp for tp, n in self.aligner.sizes().items() if n >= ALIGN_PAUSE_AT and tp not in self.paused]
        self.paused.update(full)
        return [TopicPartition(*tp) for tp in full]

    def resumable(self) -> list[TopicPartition]:
        """Paused partitions to resume once the aligner has drained below its bound."""
        if not self.paused or (self.aligner is not None and self.aligner.buffered >= ALIGN_PAUSE_AT):
            return []
        out = [TopicPartition(*tp) for tp in self.paused]
        self.paused.clear()
        return out

    # -- offsets -----------------------------------------------------------------

    def pending(self, final: bool) -> bool:
        # On shutdown and hand-over the state is checkpointed even if its offsets are already committed.
        return self.uncommitted or (final and self.since_checkpoint > 0)

    def positions(self) -> Offsets:
        """Next offset to read of each partition (the start offset where nothing was read yet)."""
        assert self.consumer is not None
        for tp in self.consumer.position([TopicPartition(*p) for p in self.partitions]):
            if tp.offset >= 0:
                self.offsets[(tp.topic, tp.partition)] = tp.offset
        if self.aligner is not None:
            # Fetched but not released (so neither learned nor published): read again after a restart.
            self.offsets.update(self.aligner.pending())
        if self.catchup:
            # A partition can end on a transaction marker, never yielding a record at its target.
            for key, target in list(self.catchup.items()):
                if self.offsets[key] >= target:
                    self.caught_up(key)
        return dict(self.offsets)

    def to_commit(self, offsets: Offsets) -> Offsets:
        """The offsets to commit for state at ``offsets``: never behind what is already
        committed (a partition still relearning keeps its committed offset), or a restart
        would publish its relearned records a second time; none of the silent partitions."""
        catchup, silent = self.catchup, self.silent
        if not catchup and not silent:
            return offsets
        return {k: max(o, catchup.get(k, o)) for k, o in offsets.items() if k not in silent}

    # -- checkpoints -------------------------------------------------------------

    def checkpoint_due(self) -> bool:
        c = self.config.checkpoints
        n = self.since_checkpoint
        return n >= c.every_events or (n > 0 and time.monotonic() - self.last_checkpoint >= c.every_seconds)

    def maybe_checkpoint(self, offsets: Offsets, final: bool, background: bool = False) -> CheckpointInfo | None:
        if not (self.checkpoint_due() or (final and self.since_checkpoint > 0)):
            return None
        if background and self.config.checkpoints.background and hasattr(os, "fork") and not faults.ARMED:
            # Committing before the child has written stays correct, as when a write fails:
            # a restart restores an older checkpoint and relearns up to the committed offsets.
            if self.background is None:
                self._fork_checkpoint(offsets)
            return None
        try:
            info = self.write_checkpoint(offsets, "final" if final else "periodic")
        except (OSError, CheckpointError) as exc:
            # Committing without a new checkpoint stays correct (an older one is <= the
            # offsets); only the relearning after a restart grows. Loud, not fatal.
            self._warn("checkpoint", "checkpoint write failed; offsets are still committed", reason=repr(exc))
            return None
        if faults.ARMED:
            faults.hit("after_checkpoint_before_commit")
        return info

    def write_checkpoint(self, offsets: Offsets, reason: str) -> CheckpointInfo:
        self.reap(wait=True)  # one writer at a time: sequence numbers stay in order
        started = time.perf_counter()
        info = self.store.write(self.learners, offsets, reason=reason, holdout=self.holdout())
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.checkpoints += 1
        log.info(
            "checkpoint written",
            extra={
                "checkpoint": info.name,
                "seq": info.seq,
                "reason": reason,
                "bytes": info.payload_length,
                "seconds": round(time.perf_counter() - started, 4),
                "offsets": describe_offsets(offsets),
                "task": self.task,
            },
        )
        if self.metrics is not None:
            self.metrics.checkpoint_saved(info.created_at)
        return info

    def _fork_checkpoint(self, offsets: Offsets) -> None:
        """Write a checkpoint from a forked child: the fork is a copy-on-write snapshot of
        the learners at these offsets (as Redis' BGSAVE), so the loop pauses for the fork
        only, not for pickling a model that grows with the users. The child touches no
        Kafka client, lock or log; it reports on a pipe and leaves with ``os._exit``."""
        holdout = self.holdout()
        # The child must not touch a Kafka client (librdkafka is not fork-safe): with the
        # checkpoints in a topic it pickles to a local spool file, and the parent uploads it.
        remote = not isinstance(self.store.storage, LocalStorage)
        seq = self.store.next_seq() if remote else None
        spool = LocalStorage(tempfile.mkdtemp(prefix="stream-checkpoint-")) if remote else None
        read_fd, write_fd = os.pipe()
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _checkpoint_child(self.store, self.learners, offsets, holdout, write_fd, seq, spool)
        os.close(write_fd)
        self.background = _Background(pid, read_fd, offsets, time.perf_counter() - started, spool)
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()

    def reap(self, wait: bool) -> None:
        """Collect the child's report once it has exited (``wait``: block until then)."""
        bg = self.background
        if bg is None:
            return
        try:
            pid, status = os.waitpid(bg.pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            pid, status = bg.pid, -1
        if pid == 0:
            return
        self.background = None
        with os.fdopen(bg.fd, "rb") as report:
            raw = report.read()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if status == 0 and "name" in doc and bg.spool is not None:
            doc = self._upload(bg.spool, doc)
        if status != 0 or "name" not in doc:
            self._warn(
                "checkpoint",
                "background checkpoint failed; offsets are still committed",
                reason=str(doc.get("error", f"child exit status {status}")),
            )
            return
        self.checkpoints += 1
        log.info(
            "checkpoint written",
            extra={
                "checkpoint": doc["name"],
                "seq": doc["seq"],
                "reason": "periodic",
                "bytes": doc["bytes"],
                "seconds": doc["seconds"],
                "pause_seconds": round(bg.pause_s, 4),
                "background": True,
                "offsets": describe_offsets(bg.offsets),
                "task": self.task,
            },
        )
        if self.metrics is not None:
            self.metrics.checkpoint_saved(doc["created_at"])
        self.prune_keeping(doc["name"])

    def _upload(self, spool: LocalStorage, doc: dict[str, Any]) -> dict[str, Any]:
        """Move a spooled checkpoint file to the store's (remote) storage; the report, or an error."""
        try:
            self.store.storage.write(doc["name"], spool.read(doc["name"]))
            return doc
        except OSError as exc:
            return {"error": f"uploading {doc['name']} to {self.store.describe()}: {exc}"}
        finally:
            shutil.rmtree(spool.root, ignore_errors=True)

    def holdout(self) -> list[StoredRecord]:
        n = self.config.checkpoints.holdout_events
        if not n:
            return []
        limit = self.config.processing.max_value_bytes  # oversized records are dead letters: not worth keeping
        fresh = [
            StoredRecord.of(m) for batch in self.recent for m in batch
            if m.error() is None and len(m.value() or b"") <= limit
        ]  # fmt: skip
        if self.privacy is not None:
            # Checkpoints never hold raw identifiers: the holdout keeps the masked records, which
            # validation replays as they are (the restored seed was masked when first written).
            fresh = self.privacy.mask_records(fresh[-n:])
        return (self.holdout_seed + fresh)[-n:]

    def prune_keeping(self, name: str) -> None:
        try:
            self.store.prune(self.config.checkpoints.keep, protect=[name])
        except OSError as exc:
            self._warn("prune", "could not prune old checkpoints", reason=repr(exc))

    def discard_txn_checkpoint(self) -> None:
        """The transaction its offsets were to commit in aborted: the checkpoint is ahead of them."""
        if self.txn_checkpoint is not None:
            with contextlib.suppress(OSError):
                self.store.delete(self.txn_checkpoint)
            self.txn_checkpoint = None

    def close(self) -> None:
        """Dropped (revoked, lost, aborted, shut down): wait for a background writer, forget
        buffers, close the consumer."""
        if self.metrics is not None and self.pipeline is not None:
            self.metrics.detach_task(self.task, self.pipeline)
        self.reap(wait=True)
        if self.consumer is not None:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing a task's consumer failed", extra={"task": self.task, "reason": str(exc)})
            self.consumer = None
        if self.aligner is not None:
            self.aligner.clear()
        self.paused.clear()
        self.catchup = {}
        self.recent.clear()
        self.recent_n = 0


def _checkpoint_child(
    store: CheckpointStore,
    learners: Sequence[Learner],
    offsets: Offsets,
    holdout: list[StoredRecord],
    fd: int,
    seq: int | None = None,
    spool: LocalStorage | None = None,
) -> NoReturn:
    """In the forked child: write the checkpoint, report it on ``fd``, and leave with
    ``os._exit`` (no atexit handlers, no flushing of the parent's buffers or clients)."""
    code = 1
    try:
        started = time.perf_counter()
        info = store.write(learners, offsets, reason="periodic", holdout=holdout, seq=seq, storage=spool)
        report = {"name": info.name, "seq": info.seq, "bytes": info.payload_length, "created_at": info.created_at,
                  "seconds": round(time.perf_counter() - started, 4)}  # fmt: skip
        code = 0
    except BaseException as exc:  # the child must reach os._exit whatever happens
        report = {"error": repr(exc)[:500]}
    finally:
        with contextlib.suppress(BaseException):
            os.write(fd, json.dumps(report).encode())
        os._exit(code)
