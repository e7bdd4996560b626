"""The Kafka application: consume, run the pipeline, produce, checkpoint, commit.

One global model per learner cannot be split across consumer-group members,
so one instance is *active* at a time: instances join the consumer group on a
one-partition lease topic, and the member that owns the lease partition
assigns itself every input partition (manual assignment) and runs the
learners; the others wait as standbys. The lease member also commits the
input offsets, with its group generation, so a deposed instance's commits are
rejected (``UNKNOWN_MEMBER_ID``/``FENCED_INSTANCE_ID``). Static membership
(``group.instance.id``) lets a restarted instance take its lease back at once.

State and offsets (see ``stream.state`` and docs/guarantees.md):

* a checkpoint holds the learners' whole state and the offsets it reflects
  (they learned exactly the events before them);
* on activation the best checkpoint with offsets <= the committed offsets is
  restored, each partition is read from the checkpoint's offset, and events
  before the committed offset are relearned without publishing;
* at-least-once: flush outputs, (checkpoint when due), commit the positions;
  predictions may repeat after a crash, learning never does;
* exactly-once: outputs, dead letters and offsets in one transaction; a
  checkpoint is written with the offsets being committed, before
  ``commit_transaction``; on an abortable error, abort, restore the checkpoint
  consistent with the committed offsets and rewind.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from stream import faults
from stream.alignment import Aligner
from stream.checkpoint_topic import checkpoint_storage
from stream.committer import (
    MEMBERSHIP_LOST,
    Abort,
    Committer,
    Fenced,
    MembershipLost,
    is_fatal,
    make_committer,
    transactional_id,
)
from stream.config import Config, build_learners
from stream.errors import FatalError
from stream.kafka import (
    DeliveryFailed,
    admin_config,
    batch_size_for,
    consumer_config,
    dead_letter_budget,
    describe_clients,
    log_error_cb,
    producer_config,
    wait_for_broker,
)
from stream.learners import Learner
from stream.metrics import PipelineMetrics
from stream.pipeline import DeadLetterBudget, Observer, Pipeline
from stream.privacy import Pseudonymizer
from stream.state import (
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    LocalStorage,
    Offsets,
    StateError,
    StoredRecord,
    describe_offsets,
    missing_state,
)

__all__ = ["Application", "FatalError", "instance_id", "lease_topic", "transactional_id"]

log = logging.getLogger(__name__)

TP = tuple[str, int]

#: Records the aligner may hold for one partition before the consumer pauses it.
_ALIGN_PAUSE_AT = 10_000

#: Exit codes of ``run``: refusing the state found (missing or incompatible checkpoints), fatal Kafka error.
EXIT_STATE = 3
EXIT_FATAL = 1


def _topic_safe(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "_", name)[:249] or "_"


def instance_id(config: Config) -> str:
    """Stable across restarts of the same instance (a StatefulSet pod name, a host name)."""
    return config.coordination.instance_id or os.environ.get("STREAM_INSTANCE_ID") or socket.gethostname()


def lease_topic(config: Config) -> str:
    return config.coordination.lease_topic or _topic_safe(f"{config.kafka.group_id}.lease")


class _Stopped(Exception):
    """Asked to stop while waiting for the cluster during activation."""


class _RateLimited:
    """Logs each distinct condition at most once per ``interval_s``: a broker
    outage must be visible, not flood the log."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, key: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval_s:
            self._last[key] = now
            log.warning(msg, extra=fields)


class Application:
    """Wires the lease, the consumer, the pipeline, the producer and the checkpoint
    store, and owns the commit protocol (at-least-once or exactly-once)."""

    def __init__(
        self,
        config: Config,
        learners: Sequence[Learner] | None = None,
        observer: Observer | None = None,
        metrics: PipelineMetrics | None = None,
    ) -> None:
        self.config = config
        self.learners = list(learners) if learners is not None else build_learners(config)
        if metrics is None and isinstance(observer, PipelineMetrics):
            metrics = observer
        #: What the pipeline reports per record to (the metrics unless told otherwise).
        self.observer: Observer | None = observer if observer is not None else metrics
        #: The loop's own reports: consumer lag, batch timings, checkpoints.
        self.metrics = metrics
        self._stop = threading.Event()
        self._warn = _RateLimited()
        self.instance_id = instance_id(config)
        self.lease_topic = lease_topic(config)
        self.store = CheckpointStore.for_config(config, self.instance_id, storage=checkpoint_storage(config))
        #: Identifier fields masked at decode ([privacy]); the key is read and checked here, at start-up.
        self.privacy = Pseudonymizer.from_config(config)
        #: Untrained copies: a fresh start after a deactivation must not reuse stale learners.
        self._pristine = copy.deepcopy(self.learners)
        self._first_activation = True
        self._topics = sorted({t for learner in self.learners for t in learner.reads})
        self.consumer: Consumer | None = None  # input partitions, assigned manually while active
        self.lease: Consumer | None = None  # the consumer-group member that holds (or awaits) the lease
        #: The commit protocol of the configured guarantee (made once the dead-letter budget is known).
        self.committer: Committer | None = None
        self.pipeline: Pipeline | None = None
        # Counters for logs and tests (restores, transaction aborts, checkpoints, relearned events).
        self.restores = 0
        self.aborts = 0
        self.checkpoints = 0
        self.replayed = 0
        # Per activation.
        self._fatal: str | None = None
        self._lease_held = False
        self._lease_failed: KafkaError | None = None
        self._lost_at = -1e9
        self._session_timeout_s = float(config.kafka.consumer.get("session.timeout.ms", 45_000)) / 1000
        self._active = False
        self._assignment: list[TopicPartition] = []
        self._offsets: Offsets = {}
        self._catchup: dict[TP, int] = {}
        self._uncommitted = False
        self._txn_checkpoint: str | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._holdout_seed: list[StoredRecord] = []
        self._background: _Background | None = None
        self._recent: collections.deque[list[Message]] = collections.deque()
        #: Releases fetched records across partitions in event-time order (None: fetch order).
        self._paused: set[TP] = set()
        self._aligner: Aligner[Message] | None = (
            Aligner(config.processing.align_wait_ms / 1000.0, self._lagging) if config.processing.align else None
        )
        self._recent_n = 0
        #: Size budget of one dead letter (known at start-up, lowered if a delivery still fails as too large).
        self._dl_budget = DeadLetterBudget()
        #: Producer properties that keep batches of dead letters under the topic's limit.
        self._dl_producer_props: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask the loop to drain and exit; safe from a signal handler or another thread."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)

    def run(self) -> int:
        cfg = self.config
        log.info(
            "starting",
            extra={
                "learners": [lr.name for lr in self.learners],
                "group_id": cfg.kafka.group_id,
                "guarantee": cfg.processing.guarantee,
                "instance_id": self.instance_id,
                "lease_topic": self.lease_topic,
                "checkpoints": self.store.describe(),
                "privacy": self.privacy.describe() if self.privacy is not None else "off",
                # The key's id (a fingerprint), never the key; None: unauthenticated checkpoints.
                "checkpoint_key_id": self.store.keys.signing_id if self.store.keys is not None else None,
                **describe_clients(cfg),
            },
        )
        if not wait_for_broker(cfg, self._stop.is_set):
            return 0
        clean = False
        code = 0
        try:
            self._start_clients()
            self._main()
            clean = self._fatal is None
            if self._fatal is not None:
                log.error("fatal client error, exiting", extra={"reason": self._fatal})
                code = EXIT_FATAL
        except (StateError, CheckpointError) as exc:
            log.error("refusing to run", extra={"reason": str(exc)})
            code = EXIT_STATE
        except FatalError as exc:
            log.error("fatal error, exiting", extra={"reason": str(exc)})
            code = EXIT_FATAL
        finally:
            # After an unexpected exception the learners may be mid-batch: never checkpoint or commit them.
            self._shutdown(clean)
        return code

    def _start_clients(self) -> None:
        cfg = self.config
        self._ensure_lease_topic()
        # The metrics ask for librdkafka statistics (stats_cb): consumer lag per partition.
        observed = self.metrics.consumer_properties() if self.metrics is not None else {}
        self.consumer = Consumer(consumer_config(cfg, error_cb=self._client_error, **observed))
        self._join_lease()
        # Know the dead letters' size budget up front instead of discovering it by failing.
        limit, topic_max = dead_letter_budget(cfg, producer_config(cfg))
        self._dl_budget.max_bytes = limit
        self._dl_producer_props = batch_size_for(topic_max, producer_config(cfg))
        log.info("dead-letter size budget", extra={"topic": cfg.topics.dead_letters, "max_bytes": limit,
                                                   "topic_max_message_bytes": topic_max, **self._dl_producer_props})
        # At-least-once keeps one producer for the process; exactly-once makes one per activation.
        self.committer = make_committer(cfg, self.instance_id, self._dl_producer_props, self._dl_budget,
                                        self._stop, self._warn, self._client_error)  # fmt: skip

    def _join_lease(self) -> None:
        self.lease = Consumer(
            consumer_config(self.config, error_cb=self._client_error, **{"group.instance.id": self.instance_id})
        )
        self.lease.subscribe(
            [self.lease_topic],
            on_assign=self._on_lease_assign,
            on_revoke=self._on_lease_revoke,
            on_lost=self._on_lease_lost,
        )

    def _poll_lease(self, timeout: float) -> None:
        """Serve the lease member's rebalance callbacks. The lease topic carries no
        records, so whatever poll returns is an error."""
        assert self.lease is not None
        msg = self.lease.poll(timeout)
        if msg is not None and (err := msg.error()) is not None:
            if is_fatal(err):
                self._lease_failed = err
            else:
                self._warn(f"lease:{err.name()}", "lease member error", code=err.name(), reason=err.str())
        if self._lease_failed is not None:
            # Here, not where the failure is seen: that may be inside the client's own callback.
            self._rejoin_lease(self._lease_failed)

    def _rejoin_lease(self, err: KafkaError) -> None:
        """A fatal error leaves the lease member unusable. The usual one: the broker was
        unreachable past the session timeout, the client rejoined under the same static
        ``group.instance.id``, and the broker fenced the old member, which is this very
        client. A new client rejoins under the same id; the group hands the lease to it
        (or to another instance) as usual. Whatever this instance held is gone."""
        assert self.lease is not None
        if self._active:
            self._lost(f"lease member failed: {err.name()}")
        log.warning(
            "lease member failed; rejoining the group with a new client",
            extra={"code": err.name(), "reason": err.str(), "instance_id": self.instance_id},
        )
        self._lease_failed = None
        self._lease_held = False
        try:
            self.lease.close()
        except KafkaException as exc:
            log.warning("closing the failed lease member failed", extra={"reason": str(exc)})
        self._join_lease()

    def _ensure_lease_topic(self) -> None:
        admin = AdminClient(admin_config(self.config))
        topic = NewTopic(self.lease_topic, num_partitions=1, replication_factor=self.config.topics.replication_factor)
        try:
            admin.create_topics([topic], request_timeout=15)[self.lease_topic].result(timeout=20)
            log.info("lease topic created", extra={"topic": self.lease_topic})
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                # Maybe no permission to create topics: it may have been created by an operator.
                log.warning("could not create the lease topic", extra={"topic": self.lease_topic, "reason": str(exc)})

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._active:
                    self._await_lease()
                    if self._stop.is_set():
                        return
                    self._activate()
                else:
                    self._loop()
            except _Stopped:
                return
            except Abort as exc:
                self._abort(str(exc), exc.code)
            except Fenced as exc:
                # Its open transaction can never commit; the broker aborts it for the new owner.
                assert self.committer is not None
                self.committer.release(abort=False)
                self._lost(f"producer fenced by a newer instance ({exc})")
            except DeliveryFailed as exc:
                assert self.committer is not None
                if not self.committer.exactly_once:
                    raise  # at-least-once: exit without committing; a restart redoes the batch
                self._abort(str(exc), None)

    # -- the lease ---------------------------------------------------------------

    def _await_lease(self) -> None:
        assert self.lease is not None
        announced = False
        while not self._stop.is_set() and not self._holds_lease():
            if not announced:
                log.info(
                    "standby: waiting for the lease",
                    extra={"lease_topic": self.lease_topic, "instance_id": self.instance_id},
                )
                announced = True
            self._poll_lease(0.2)

    def _holds_lease(self) -> bool:
        if self._lease_held:
            return True
        assert self.lease is not None
        # After a rejected commit the client normally reports the loss (on_lost) and the
        # lease comes back through on_assign. If the group kept the lease with us, no
        # callback says so: once a session timeout has passed (the client has surely
        # noticed any real loss by then), its own assignment is the truth.
        if time.monotonic() - self._lost_at < self._session_timeout_s:
            return False
        if any(tp.topic == self.lease_topic for tp in self.lease.assignment()):
            log.info("lease still assigned to this instance", extra={"instance_id": self.instance_id})
            self._lease_held = True
        self._lost_at = time.monotonic()
        return self._lease_held

    def _on_lease_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.topic == self.lease_topic for tp in partitions):
            log.info("lease acquired", extra={"instance_id": self.instance_id})
            self._lease_held = True

    def _on_lease_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not any(tp.topic == self.lease_topic for tp in partitions):
            return
        self._lease_held = False
        if not self._active:
            return
        log.info("lease revoked: checkpointing and handing over", extra={"instance_id": self.instance_id})
        if faults.ARMED:
            faults.hit("in_revoke")
        committed = False
        try:
            # Still a member of this generation here: the commit is accepted, and the next owner starts right after it.
            committed = self.commit(budget_s=self.config.processing.shutdown_timeout_s, final=True)
        except (Abort, Fenced, DeliveryFailed, KafkaException) as exc:
            log.warning(
                "hand-over commit failed; the next owner resumes from the last commit", extra={"reason": str(exc)}
            )
        self._deactivate(committed=committed)

    def _on_lease_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.topic == self.lease_topic for tp in partitions):
            self._lease_held = False
            if self._active:
                self._lost("lease lost (session timed out or fenced)")

    def _lost(self, reason: str) -> None:
        # Another instance may own the lease now: nothing may be committed or checkpointed any more.
        log.warning("no longer the active instance; dropping in-memory state", extra={"reason": reason})
        self._lease_held = False
        self._lost_at = time.monotonic()
        self._deactivate(committed=False)

    # -- activation: restore and seek --------------------------------------------

    def _activate(self) -> None:
        """Become the active instance: restore the checkpoint consistent with the
        committed offsets and read every input partition from its offsets."""
        assert self.consumer is not None and self.lease is not None and self.committer is not None
        cfg = self.config
        tps = self._partitions()
        remove = getattr(self.store.storage, "remove_temporaries", None)
        if remove is not None:
            # Half-written files of a crash mid-write; old enough that no live writer owns them.
            remove(older_than_s=600)
        # Before reading the committed offsets: exactly-once's init_transactions aborts the
        # predecessor's open transaction (same transactional.id), so they are stable.
        self.committer.open()
        committed = self._committed(tps)
        low = self._low_watermarks(tps)
        selection = self.store.select(committed, low)
        for name, reason in selection.skipped:
            if name in selection.refused:
                # Not signed by our key: possibly planted. Never unpickled; loud, but not fatal.
                log.error(
                    "checkpoint passed over: not signed by the checkpoint key (possibly planted)",
                    extra={"checkpoint": name, "reason": reason, "refused": True},
                )
            else:
                log.warning("checkpoint passed over", extra={"checkpoint": name, "reason": reason})
        ckpt = selection.checkpoint
        behind = {k: c for k, c in committed.items() if c is not None and c > low[k]}
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
            learners = self.learners if self._first_activation else copy.deepcopy(self._pristine)
            start = dict(low)
            self._holdout_seed = []
        else:
            learners = self._adopt(ckpt.learners)
            start = {k: ckpt.info.offsets.get(k, lo) for k, lo in low.items()}
            self._holdout_seed = ckpt.holdout
            self.restores += 1
        self._first_activation = False
        self.learners[:] = learners
        self.pipeline = Pipeline(
            self.learners,
            self.committer.sink,  # type: ignore[arg-type]
            contract_topics=cfg.input_topics(),
            dead_letter_topic=cfg.topics.dead_letters,
            max_value_bytes=cfg.processing.max_value_bytes,
            observer=self.observer,
            privacy=self.privacy,
            dead_letter_budget=self._dl_budget,
            # The client failing is the service failing: never contained to a record.
            service_errors=(KafkaException,),
        )
        self._catchup = {k: c for k, c in committed.items() if c is not None and c > start[k]}
        self._offsets = dict(start)
        self._assignment = [TopicPartition(t, p, start[(t, p)]) for t, p in tps]
        if self._aligner is not None:
            self._aligner.clear()
            self._aligner.assign(tps)
        self._paused.clear()  # a new assignment starts unpaused
        self._recent.clear()
        self._recent_n = 0
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._uncommitted = False
        replay = sum(c - start[k] for k, c in self._catchup.items())
        self.consumer.assign(self._assignment)
        log.info("partitions assigned", extra={"partitions": [f"{t}[{p}]" for t, p in tps]})
        if ckpt is not None:
            log.info(
                "restored from checkpoint",
                extra={
                    "checkpoint": ckpt.info.name,
                    "seq": ckpt.info.seq,
                    "offsets": describe_offsets(ckpt.info.offsets),
                    "relearn_without_publishing": replay,
                    "restores": self.restores,
                    "origin": ckpt.info.origin,
                },
            )
        else:
            log.info(
                "no checkpoint: starting untrained learners",
                extra={"from": describe_offsets(start), "relearn_without_publishing": replay},
            )
            # A commit must never exist without a checkpoint at or before it, or a crash
            # before the first periodic checkpoint would leave offsets with no state.
            try:
                self._write_checkpoint(start, "initial")
            except (OSError, CheckpointError) as exc:
                raise StateError(f"cannot write checkpoints to {self.store.describe()}: {exc}") from exc
        self.committer.begin()
        # What exists now (the restored learners, the clients, the modules) lives as long as this
        # activation: moved out of the collector's generations, so the loop's collections scan
        # only what it allocates (~5 % of a small job's time per event); undone on deactivation.
        gc.collect()
        gc.freeze()
        self._active = True

    def _adopt(self, restored: Sequence[Learner]) -> list[Learner]:
        """The checkpoint's learners in configuration order; configured ones it lacks start untrained."""
        by_name = {lr.name: lr for lr in restored}
        out: list[Learner] = []
        for template in self._pristine:
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

    def _partitions(self) -> list[TP]:
        assert self.lease is not None
        while True:
            missing: list[str] = []
            tps: list[TP] = []
            try:
                for topic in self._topics:
                    meta = self.lease.list_topics(topic, timeout=10).topics.get(topic)
                    if meta is None or meta.error is not None or not meta.partitions:
                        missing.append(topic)
                    else:
                        tps.extend((topic, p) for p in sorted(meta.partitions))
            except KafkaException as exc:
                missing.append(str(exc))
            if not missing:
                return tps
            self._warn("topics", "input topics not available yet; waiting", missing=missing)
            if self._stop.wait(1.0):
                raise _Stopped

    def _committed(self, tps: list[TP]) -> dict[TP, int | None]:
        assert self.lease is not None
        while True:
            try:
                result = self.lease.committed([TopicPartition(t, p) for t, p in tps], timeout=15)
                return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result}
            except KafkaException as exc:
                self._warn("committed", "cannot read the committed offsets yet; retrying", reason=str(exc))
            if self._stop.wait(1.0):
                raise _Stopped

    def _low_watermarks(self, tps: list[TP]) -> dict[TP, int]:
        """Earliest offset of every partition, in one ListOffsets round (an admin request:
        a consumer's cached metadata can stay stale after a broker outage)."""
        admin = AdminClient(admin_config(self.config) | {"error_cb": lambda err: None})
        while True:
            try:
                futures = admin.list_offsets(
                    {TopicPartition(t, p): OffsetSpec.earliest() for t, p in tps}, request_timeout=10
                )
                return {(tp.topic, tp.partition): max(f.result().offset, 0) for tp, f in futures.items()}
            except KafkaException as exc:
                self._warn("watermarks", "cannot read the partition offsets yet; retrying", reason=str(exc))
            if self._stop.wait(1.0):
                raise _Stopped

    def _deactivate(self, committed: bool) -> None:
        self._reap_checkpoint(wait=True)
        if self.committer is not None:
            self.committer.release()
        if self._txn_checkpoint is not None:
            self.store.delete(self._txn_checkpoint)
            self._txn_checkpoint = None
        if self.consumer is not None:
            with contextlib.suppress(KafkaException):
                self.consumer.unassign()
        self._assignment = []
        if self._aligner is not None:
            self._aligner.clear()
        self._paused.clear()  # unassigning resumes
        self._catchup = {}
        self._active = False
        gc.unfreeze()  # what the activation froze can be collected again (learners replaced by a restore)
        log.info("deactivated", extra={"committed": committed})

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        assert self.consumer is not None and self.pipeline is not None and self.committer is not None
        assert self.lease is not None and self.committer.sink is not None
        consume = self.consumer.consume
        process = self.pipeline.process
        sink_poll = self.committer.sink.poll
        lease_poll = self._poll_lease
        p = self.config.processing
        batch_size, timeout, interval = p.batch_size, p.poll_timeout_s, p.commit_interval_s
        keep_recent = self.config.checkpoints.holdout_events
        recent = self._recent
        next_commit = time.monotonic() + interval
        # Time inside the process is measured per batch, not per record (amortised).
        on_batch = self.metrics.batch_processed if self.metrics is not None else None
        aligner = self._aligner
        while not self._stop.is_set() and self._active:
            # What is already fetched, without waiting for a full batch (the latency of a
            # consume(n, timeout) that waits for n); if nothing is, block for the first record.
            batch = consume(batch_size, 0) or consume(1, timeout)
            if aligner is not None:
                for failed in aligner.add(batch):
                    self._consume_error(failed)
                batch = aligner.release()
                if aligner.buffered >= _ALIGN_PAUSE_AT:
                    self._pause_runaways(aligner)
                elif self._paused:
                    self._resume_paused()
            if batch:
                started = time.perf_counter()
                if self._catchup or faults.ARMED:
                    self._process_slow(batch)
                else:
                    for msg in batch:
                        if msg.error() is not None:
                            self._consume_error(msg)
                            continue
                        process(msg)  # type: ignore[arg-type]
                self._uncommitted = True
                self._since_checkpoint += len(batch)
                if keep_recent:
                    # Whole batches by reference (no per-record cost); trimmed to the holdout size.
                    recent.append(batch)
                    self._recent_n += len(batch)
                    while self._recent_n - len(recent[0]) >= keep_recent:
                        self._recent_n -= len(recent.popleft())
                if on_batch is not None:
                    on_batch(len(batch), time.perf_counter() - started)
            sink_poll()
            lease_poll(0)  # serves the lease's rebalance callbacks, which may deactivate us
            if not self._active:
                return
            if time.monotonic() >= next_commit:
                self.commit()
                next_commit = time.monotonic() + interval

    def _pause_runaways(self, aligner: Aligner[Message]) -> None:
        """Pause the partitions that run far ahead of the others in event time (a backlog held
        back for an earlier one): the aligner's buffers stay bounded, as Kafka Streams'
        ``buffered.records.per.partition`` keeps its queues."""
        assert self.consumer is not None
        sizes = aligner.sizes()
        full = [TopicPartition(*tp) for tp, n in sizes.items() if n >= _ALIGN_PAUSE_AT and tp not in self._paused]
        if full:
            self.consumer.pause(full)
            self._paused.update((tp.topic, tp.partition) for tp in full)

    def _resume_paused(self) -> None:
        assert self.consumer is not None
        with contextlib.suppress(KafkaException):  # a partition revoked meanwhile
            self.consumer.resume([TopicPartition(*tp) for tp in self._paused])
        self._paused.clear()

    def _lagging(self, tp: TP) -> bool:
        """Whether the broker holds records of ``tp`` this consumer has not fetched yet (from the
        high watermark of its last fetch; unknown before the first one counts as lagging). A lag
        of one is a transaction marker at the end of a transactional input, not a record."""
        assert self.consumer is not None
        part = TopicPartition(*tp)
        _, high = self.consumer.get_watermark_offsets(part, cached=True)
        if high < 0:
            return True
        position = self.consumer.position([part])[0].offset
        if position < 0:  # nothing handed to us yet: where it starts is where we assigned it
            position = self._offsets.get(tp, 0)
        return high - position > 1

    def _process_slow(self, batch: list[Message]) -> None:
        """The loop body while some partition is relearning up to its committed
        offset (outputs suppressed per partition), or when faults are armed."""
        assert self.pipeline is not None
        pipeline = self.pipeline
        process = pipeline.process
        catchup = self._catchup
        armed = faults.ARMED
        for msg in batch:
            if msg.error() is not None:
                self._consume_error(msg)
                continue
            if catchup:
                key: TP = (msg.topic(), msg.partition())  # type: ignore[assignment]
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
                            self._caught_up(key)
                        if armed:
                            faults.hit("mid_batch")
                        continue
                    self._caught_up(key)
            process(msg)  # type: ignore[arg-type]
            if armed:
                faults.hit("mid_batch")

    def _caught_up(self, key: TP) -> None:
        self._catchup.pop(key, None)
        if not self._catchup:
            log.info("caught up with the committed offsets; publishing again", extra={"relearned": self.replayed})

    # -- commit protocol ---------------------------------------------------------

    def commit(self, budget_s: float | None = None, *, final: bool = False) -> bool:
        """Commit what was processed (and checkpoint when due, or when ``final``:
        shutdown, hand-over). Returns whether the offsets were committed."""
        if not self._active:
            return False
        committer, member = self.committer, self.lease
        assert committer is not None and member is not None
        self._reap_checkpoint(wait=False)  # a background checkpoint is reported even when idle
        if not self._pending(final):
            return True
        if not committer.drain(budget_s):
            return False
        if faults.ARMED:
            faults.hit("after_produce_before_commit")
        offsets = self._positions()
        written = self._maybe_checkpoint(offsets, final, background=committer.background_checkpoints and not final)
        # Written before the commit and named here: if the transaction aborts it is deleted
        # (its offsets were never committed); a crash leaves it ahead of the committed
        # offsets, so it is never selected.
        self._txn_checkpoint = written.name if written is not None and committer.exactly_once else None
        try:
            done = committer.commit(member, self._to_commit(offsets), budget_s)
        except MembershipLost as exc:
            if exc.client_failed:
                self._lease_failed = exc.error  # the next lease poll replaces the client
            self._lost(str(exc))
            return False
        if not done:
            return False
        self._txn_checkpoint = None
        if faults.ARMED:
            faults.hit("after_commit")
        self._uncommitted = False
        if written is not None:
            self._prune(written)
        if not final:
            committer.begin()
        return True

    def _pending(self, final: bool) -> bool:
        # On shutdown and hand-over the state is checkpointed even if its offsets are already committed.
        return self._uncommitted or (final and self._since_checkpoint > 0)

    def _checkpoint_due(self) -> bool:
        c = self.config.checkpoints
        n = self._since_checkpoint
        return n >= c.every_events or (n > 0 and time.monotonic() - self._last_checkpoint >= c.every_seconds)

    def _positions(self) -> Offsets:
        """Next offset to read of every assigned partition (the start offset where nothing was read yet)."""
        assert self.consumer is not None
        for tp in self.consumer.position(self._assignment):
            if tp.offset >= 0:
                self._offsets[(tp.topic, tp.partition)] = tp.offset
        if self._aligner is not None:
            # Fetched but not released (so neither learned nor published): read again after a restart.
            self._offsets.update(self._aligner.pending())
        if self._catchup:
            # A partition can end on a transaction marker, never yielding a record at its target.
            for key, target in list(self._catchup.items()):
                if self._offsets[key] >= target:
                    self._caught_up(key)
        return dict(self._offsets)

    def _to_commit(self, offsets: Offsets) -> Offsets:
        """The offsets to commit for state at ``offsets``: never behind what is already
        committed (a partition still relearning keeps its committed offset), or a restart
        would publish its relearned records a second time."""
        catchup = self._catchup
        if not catchup:
            return offsets
        return {k: max(o, catchup.get(k, o)) for k, o in offsets.items()}

    def _abort(self, reason: str, code: int | None) -> None:
        """Abort the open transaction and deactivate; the main loop then restores the
        checkpoint consistent with the committed offsets and rewinds (``_activate``)."""
        self.aborts += 1
        log.warning("transaction aborted; restoring", extra={"reason": reason, "aborts": self.aborts})
        assert self.committer is not None
        if not self.committer.abort():
            return  # asked to stop mid-outage: nothing was committed, a restart restores
        if self._txn_checkpoint is not None:
            self.store.delete(self._txn_checkpoint)
            self._txn_checkpoint = None
        if code is not None and code in MEMBERSHIP_LOST:
            self._lost(f"transaction offsets rejected: {KafkaError(code).name()}")
            return
        if self.consumer is not None:
            with contextlib.suppress(KafkaException):
                self.consumer.unassign()
        self._assignment = []
        if self._aligner is not None:
            self._aligner.clear()
        self._paused.clear()  # unassigning resumes
        self._catchup = {}
        # Keep the producer (not fenced): the next activation reuses it.
        self._active = False
        gc.unfreeze()  # the activation that follows restores new learners and freezes again

    # -- checkpoints -------------------------------------------------------------

    def _maybe_checkpoint(self, offsets: Offsets, final: bool, background: bool = False) -> CheckpointInfo | None:
        if not (self._checkpoint_due() or (final and self._since_checkpoint > 0)):
            return None
        if background and self.config.checkpoints.background and hasattr(os, "fork") and not faults.ARMED:
            # Committing before the child has written stays correct, as when a write fails:
            # a restart restores an older checkpoint and relearns up to the committed offsets.
            if self._background is None:
                self._fork_checkpoint(offsets)
            return None
        try:
            info = self._write_checkpoint(offsets, "final" if final else "periodic")
        except (OSError, CheckpointError) as exc:
            # Committing without a new checkpoint stays correct (an older one is <= the
            # offsets); only the relearning after a restart grows. Loud, not fatal.
            self._warn("checkpoint", "checkpoint write failed; offsets are still committed", reason=repr(exc))
            return None
        if faults.ARMED:
            faults.hit("after_checkpoint_before_commit")
        return info

    def _fork_checkpoint(self, offsets: Offsets) -> None:
        """Write a checkpoint from a forked child: the fork is a copy-on-write snapshot of
        the learners at these offsets (as Redis' BGSAVE), so the loop pauses for the fork
        only, not for pickling a model that grows with the users. The child touches no
        Kafka client, lock or log; it reports on a pipe and leaves with ``os._exit``."""
        holdout = self._holdout()
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
        self._background = _Background(pid, read_fd, offsets, time.perf_counter() - started, spool)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def _reap_checkpoint(self, wait: bool) -> None:
        """Collect the child's report once it has exited (``wait``: block until then)."""
        bg = self._background
        if bg is None:
            return
        try:
            pid, status = os.waitpid(bg.pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            pid, status = bg.pid, -1
        if pid == 0:
            return
        self._background = None
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
            },
        )
        if self.metrics is not None:
            self.metrics.checkpoint_saved(doc["created_at"])
        self._prune_keeping(doc["name"])

    def _upload(self, spool: LocalStorage, doc: dict[str, Any]) -> dict[str, Any]:
        """Move a spooled checkpoint file to the store's (remote) storage; the report, or an error."""
        try:
            self.store.storage.write(doc["name"], spool.read(doc["name"]))
            return doc
        except OSError as exc:
            return {"error": f"uploading {doc['name']} to {self.store.describe()}: {exc}"}
        finally:
            shutil.rmtree(spool.root, ignore_errors=True)

    def _write_checkpoint(self, offsets: Offsets, reason: str) -> CheckpointInfo:
        self._reap_checkpoint(wait=True)  # one writer at a time: sequence numbers stay in order
        started = time.perf_counter()
        info = self.store.write(self.learners, offsets, reason=reason, holdout=self._holdout())
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
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
            },
        )
        if self.metrics is not None:
            self.metrics.checkpoint_saved(info.created_at)
        return info

    def _holdout(self) -> list[StoredRecord]:
        n = self.config.checkpoints.holdout_events
        if not n:
            return []
        limit = self.config.processing.max_value_bytes  # oversized records are dead letters: not worth keeping
        fresh = [
            StoredRecord.of(m) for batch in self._recent for m in batch
            if m.error() is None and len(m.value() or b"") <= limit
        ]  # fmt: skip
        if self.privacy is not None:
            # Checkpoints never hold raw identifiers: the holdout keeps the masked records, which
            # validation replays as they are (the restored seed was masked when first written).
            fresh = self.privacy.mask_records(fresh[-n:])
        return (self._holdout_seed + fresh)[-n:]

    def _prune(self, just_committed: CheckpointInfo) -> None:
        self._prune_keeping(just_committed.name)

    def _prune_keeping(self, name: str) -> None:
        try:
            self.store.prune(self.config.checkpoints.keep, protect=[name])
        except OSError as exc:
            self._warn("prune", "could not prune old checkpoints", reason=repr(exc))

    # -- errors and shutdown -----------------------------------------------------

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            # A client with a fatal error is unusable (e.g. the lease member fenced after its
            # session expired during a broker pause): exit non-zero without committing; the
            # supervisor's restart rejoins and restores.
            log_error_cb(err)
            self._fatal = f"{err.name()}: {err.str()}"
            self.stop()
            return
        self._warn(err.name(), "kafka client error", code=err.name(), reason=err.str())

    def _consume_error(self, msg: Message) -> None:
        err = msg.error()
        assert err is not None
        if err.fatal():
            raise KafkaException(err)
        self._warn(f"consume:{err.name()}", "consume error", code=err.name(), reason=err.str(), topic=msg.topic())

    def _shutdown(self, clean: bool) -> None:
        budget = self.config.processing.shutdown_timeout_s
        committed = False
        if self._active and clean:
            try:
                committed = self.commit(budget_s=budget, final=True)
            except (Abort, Fenced, FatalError, DeliveryFailed, KafkaException) as exc:
                log.warning("final commit failed; a restart resumes from the last commit", extra={"reason": str(exc)})
        if self._active:
            self._deactivate(committed=committed)
        for client in (self.consumer, self.lease):
            if client is not None:
                try:
                    client.close()
                except Exception:
                    log.exception("consumer close failed")
        if self.committer is not None:
            self.committer.close(budget)
        log.info(
            "stopped",
            extra={
                "committed": committed,
                "restores": self.restores,
                "aborts": self.aborts,
                "checkpoints": self.checkpoints,
                "relearned": self.replayed,
            },
        )


class _Background(NamedTuple):
    """A checkpoint being written by a forked child."""

    pid: int
    fd: int  # read end of the child's report pipe
    offsets: Offsets
    pause_s: float  # what the fork cost the loop
    #: Remote storage (a Kafka topic): the child writes here, the parent uploads when it reaps.
    spool: LocalStorage | None = None


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
