"""The Kafka application: consume, run each task's pipeline, produce, checkpoint, commit.

Work is split into *tasks* (``stream.tasks``): task ``p`` is partition ``p`` of
every per-task input topic, with its own copy of the learners
(``stream.task_state``). Every instance joins the consumer group on the tasks
topic; the group's assignment (cooperative-sticky, static membership) spreads
the tasks over the instances, and each instance reads the input partitions of
its tasks (one consumer per task, manual assignment) and commits their offsets through its group
member, so a deposed member's commits are refused for its stale generation.
With one task this is the former single-active lease: one instance works, the
others wait as standbys. Parameters that are global by nature are merged
across tasks by a ``TaskSync`` (``stream.task_sync``).

State and offsets, per task (see ``stream.state`` and docs/guarantees.md):

* a checkpoint holds the task's learners and the offsets of its partitions
  that they reflect (they learned exactly the events before them);
* on assignment the task's checkpoint with offsets <= the committed offsets is
  restored, each partition is read from the checkpoint's offset, and events
  before the committed offset are relearned without publishing;
* on revocation the task is committed and checkpointed, then dropped;
* the commit protocol is the ``Committer`` of the guarantee
  (``stream.committer``): at-least-once flushes the outputs then commits the
  positions; exactly-once puts outputs, dead letters and the offsets of every
  task of the instance in one transaction, a checkpoint being written with the
  offsets it commits; on an abortable error the transaction aborts and every
  task is restored from its checkpoint consistent with the committed offsets.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from stream import faults
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
    TP,
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
from stream.pipeline import DeadLetterBudget, Observer
from stream.privacy import Pseudonymizer
from stream.state import CheckpointError, CheckpointInfo, StateError, describe_offsets, load_keys
from stream.task_state import TaskState, task_store
from stream.task_sync import NoSync, TaskSync
from stream.tasks import TaskAssignment, ensure_tasks_topic, global_topics, task_count, tasks_topic

__all__ = ["Application", "FatalError", "instance_id", "tasks_topic", "transactional_id"]

log = logging.getLogger(__name__)


#: Exit codes of ``run``: refusing the state found (missing or incompatible checkpoints,
#: inputs not co-partitioned), fatal Kafka error.
EXIT_STATE = 3
EXIT_FATAL = 1

#: Logged when this instance owns no task (any more): the fault tests wait for it.
STANDBY = "standby: waiting for a task"
DROPPED = "tasks lost; dropping their in-memory state"


def instance_id(config: Config) -> str:
    """Stable across restarts of the same instance (a StatefulSet pod name, a host name)."""
    return config.coordination.instance_id or os.environ.get("STREAM_INSTANCE_ID") or socket.gethostname()


class _Stopped(Exception):
    """Asked to stop while waiting for the cluster."""


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
    """Wires the group member, the consumer, the tasks, the committer and model sync."""

    def __init__(
        self,
        config: Config,
        learners: Sequence[Learner] | None = None,
        observer: Observer | None = None,
        metrics: PipelineMetrics | None = None,
        sync: TaskSync | None = None,
        sync_for: Callable[[int], TaskSync] | None = None,
    ) -> None:
        self.config = config
        #: The learners of the only task while there is one (kept after it stops, for callers that
        #: inspect the trained models); the untrained configuration otherwise.
        self.learners = list(learners) if learners is not None else build_learners(config)
        if metrics is None and isinstance(observer, PipelineMetrics):
            metrics = observer
        #: What the pipelines report per record to (the metrics unless told otherwise).
        self.observer: Observer | None = observer if observer is not None else metrics
        #: The loop's own reports: consumer lag, batch timings, checkpoints.
        self.metrics = metrics
        self.sync: TaskSync = sync if sync is not None else NoSync()
        #: Makes the model sync once the task count is known at start (``stream.sync_topic.make_sync``).
        self._sync_for = sync_for
        self._stop = threading.Event()
        self._warn = _RateLimited()
        self.instance_id = instance_id(config)
        self.tasks_topic = tasks_topic(config)
        self.storage = checkpoint_storage(config)
        #: The checkpoint key (validated here, at start-up; None: unauthenticated checkpoints).
        self.keys = load_keys(config)
        #: Identifier fields masked at decode ([privacy]); the key is read and checked here, at start-up.
        self.privacy = Pseudonymizer.from_config(config)
        #: Untrained copies: a task starting fresh never reuses another task's or a dropped task's learners.
        self._pristine = copy.deepcopy(self.learners)
        self._fresh: list[Learner] | None = self.learners  # the caller's objects serve the first fresh start
        self._topics = sorted({t for learner in self.learners for t in learner.reads})
        self.assignment = TaskAssignment(dict.fromkeys(self._topics, 1), 1)
        self.member: Consumer | None = None  # the consumer-group member the tasks are assigned to
        #: The commit protocol of the configured guarantee (made once the dead-letter budget is known).
        self.committer: Committer | None = None
        #: Tasks running here, and their learners (what model sync merges).
        self.tasks: dict[int, TaskState] = {}
        self._task_learners: dict[int, list[Learner]] = {}
        #: Tasks the group assigned to this member (running or about to be).
        self._owned: set[int] = set()
        self._changed = False
        # Counters for logs and tests (restores, transaction aborts, checkpoints, relearned events).
        self.restores = 0
        self.aborts = 0
        self._fatal: str | None = None
        self._member_failed: KafkaError | None = None
        self._deferred: Exception | None = None
        self._lost_at = -1e9
        self._session_timeout_s = float(config.kafka.consumer.get("session.timeout.ms", 45_000)) / 1000
        self._announced_standby = False
        #: Size budget of one dead letter (known at start-up, lowered if a delivery still fails as too large).
        self._dl_budget = DeadLetterBudget()
        #: Producer properties that keep batches of dead letters under the topic's limit.
        self._dl_producer_props: dict[str, Any] = {}

    @property
    def checkpoints(self) -> int:
        return sum(ts.checkpoints for ts in self.tasks.values())

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
                "tasks_topic": self.tasks_topic,
                "checkpoints": self.storage.describe(),
                "privacy": self.privacy.describe() if self.privacy is not None else "off",
                # The key's id (a fingerprint), never the key; None: unauthenticated checkpoints.
                "checkpoint_key_id": self.keys.signing_id if self.keys is not None else None,
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
        except _Stopped:
            clean = True
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
        counts = self._partition_counts()
        shared = global_topics(cfg, self._topics)
        per_task = {t: n for t, n in counts.items() if t not in shared}
        reads = {lr.name: [t for t in lr.reads if t not in shared] for lr in self.learners}
        n_tasks = task_count(per_task, reads)
        self.assignment = TaskAssignment(per_task, n_tasks, {t: counts[t] for t in shared})
        ensure_tasks_topic(cfg, self.tasks_topic, n_tasks)
        if self._sync_for is not None:
            self.sync = self._sync_for(n_tasks)
        log.info("tasks", extra={"tasks": n_tasks, "topics": sorted(per_task), "global_topics": sorted(shared),
                                 "tasks_topic": self.tasks_topic})  # fmt: skip
        # Know the dead letters' size budget up front instead of discovering it by failing.
        limit, topic_max = dead_letter_budget(cfg, producer_config(cfg))
        self._dl_budget.max_bytes = limit
        self._dl_producer_props = batch_size_for(topic_max, producer_config(cfg))
        log.info("dead-letter size budget", extra={"topic": cfg.topics.dead_letters, "max_bytes": limit,
                                                   "topic_max_message_bytes": topic_max, **self._dl_producer_props})
        self.committer = make_committer(cfg, self.instance_id, self._dl_producer_props, self._dl_budget,
                                        self._stop, self._warn, self._client_error)  # fmt: skip
        self._join()

    def _partition_counts(self) -> dict[str, int]:
        """Partition count of every input topic, waiting for missing ones."""
        admin = AdminClient(admin_config(self.config) | {"error_cb": lambda err: None})
        while True:
            missing: list[str] = []
            counts: dict[str, int] = {}
            try:
                for topic in self._topics:
                    meta = admin.list_topics(topic, timeout=10).topics.get(topic)
                    if meta is None or meta.error is not None or not meta.partitions:
                        missing.append(topic)
                    else:
                        counts[topic] = len(meta.partitions)
            except KafkaException as exc:
                missing.append(str(exc))
            if not missing:
                return counts
            self._warn("topics", "input topics not available yet; waiting", missing=missing)
            if self._stop.wait(1.0):
                raise _Stopped

    # -- the group member --------------------------------------------------------

    def _join(self) -> None:
        self.member = Consumer(
            consumer_config(self.config, error_cb=self._client_error, **{"group.instance.id": self.instance_id})
        )
        self.member.subscribe(
            [self.tasks_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _poll_member(self, timeout: float) -> None:
        """Serve the member's rebalance callbacks. The tasks topic carries no records,
        so whatever poll returns is an error."""
        assert self.member is not None
        msg = self.member.poll(timeout)
        if msg is not None and (err := msg.error()) is not None:
            if is_fatal(err):
                self._member_failed = err
            else:
                self._warn(f"member:{err.name()}", "group member error", code=err.name(), reason=err.str())
        if self._member_failed is not None:
            # Here, not where the failure is seen: that may be inside the client's own callback.
            self._rejoin(self._member_failed)
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc

    def _rejoin(self, err: KafkaError) -> None:
        """A fatal error leaves the member unusable. The usual one: the broker was
        unreachable past the session timeout, the client rejoined under the same static
        ``group.instance.id``, and the broker fenced the old member, which is this very
        client. A new client rejoins under the same id; the group hands tasks to it
        (or to other instances) as usual. Whatever this instance held is gone."""
        assert self.member is not None
        if self.tasks:
            self._lost(f"group member failed: {err.name()}")
        log.warning(
            "group member failed; rejoining the group with a new client",
            extra={"code": err.name(), "reason": err.str(), "instance_id": self.instance_id},
        )
        self._member_failed = None
        self._owned = set()
        try:
            self.member.close()
        except KafkaException as exc:
            log.warning("closing the failed group member failed", extra={"reason": str(exc)})
        self._join()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tasks = self.assignment.tasks_in(partitions, self.tasks_topic)
        if tasks:
            log.info("tasks assigned", extra={"tasks": sorted(tasks), "instance_id": self.instance_id})
            self._owned |= tasks
            self._changed = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = self.assignment.tasks_in(partitions, self.tasks_topic)
        self._owned -= gone
        running = gone & self.tasks.keys()
        if not running:
            return
        log.info("tasks revoked: checkpointing and handing over", extra={"tasks": sorted(running)})
        if faults.ARMED:
            faults.hit("in_revoke")
        committed = False
        try:
            # Still a member of this generation here: the commit is accepted, and the next owner starts right after it.
            committed = self.commit(budget_s=self.config.processing.shutdown_timeout_s,
                                    final=running == self.tasks.keys(), closing=running)  # fmt: skip
        except (Abort, Fenced, DeliveryFailed, KafkaException) as exc:
            log.warning(
                "hand-over commit failed; the next owner resumes from the last commit", extra={"reason": str(exc)}
            )
            assert self.committer is not None
            if self.committer.exactly_once and running != self.tasks.keys():
                self._deferred = exc  # the tasks that stay restore once the loop aborts
        for task in running:
            self._drop(task, committed)
        self._changed = True

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = self.assignment.tasks_in(partitions, self.tasks_topic)
        self._owned -= gone
        if gone & self.tasks.keys():
            still = set(self._owned)
            self._lost("tasks lost (session timed out or fenced)")
            self._owned = still  # still assigned here: restored from their checkpoints at once

    def _lost(self, reason: str) -> None:
        # Another instance may own the tasks now: nothing may be committed or checkpointed any more.
        # One transaction holds every task's outputs, so every task is dropped; those still
        # assigned here are restored from their checkpoints.
        log.warning(DROPPED, extra={"reason": reason, "tasks": sorted(self.tasks)})
        self._lost_at = time.monotonic()
        self._owned = set()
        if self.committer is not None:
            self.committer.release()
        self._drop_all(committed=False)

    def _refresh_owned(self) -> None:
        """After a rejected commit the client normally reports the loss (on_lost) and the
        tasks come back through on_assign. If the group kept them with us, no callback says
        so: once a session timeout has passed (the client has surely noticed any real loss
        by then), its own assignment is the truth."""
        assert self.member is not None
        if self._owned or time.monotonic() - self._lost_at < self._session_timeout_s:
            return
        owned = self.assignment.tasks_in(self.member.assignment(), self.tasks_topic)
        if owned:
            log.info("tasks still assigned to this instance", extra={"tasks": sorted(owned)})
            self._owned = owned
        self._lost_at = time.monotonic()

    # -- the main loop -----------------------------------------------------------

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll_member(0.0 if self.tasks else 0.2)
                self._settle()
                if self.tasks:
                    self._loop()
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

    def _settle(self) -> None:
        """Start the tasks assigned here that do not run yet; announce a standby once."""
        self._changed = False
        if not self._owned:
            self._refresh_owned()
        for task in sorted(self._owned - self.tasks.keys()):
            if self._stop.is_set():
                return
            self._activate(task)
        if not self.tasks and not self._announced_standby:
            log.info(STANDBY, extra={"tasks_topic": self.tasks_topic, "instance_id": self.instance_id})
            self._announced_standby = True
        elif self.tasks:
            self._announced_standby = False

    def _loop(self) -> None:
        member, committer = self.member, self.committer
        assert member is not None and committer is not None and committer.sink is not None
        sink_poll = committer.sink.poll
        poll_member = self._poll_member
        p = self.config.processing
        batch_size, timeout, interval = p.batch_size, p.poll_timeout_s, p.commit_interval_s
        next_commit = time.monotonic() + interval
        # Time inside the process is measured per batch, not per record (amortised).
        on_batch = self.metrics.batch_processed if self.metrics is not None else None
        tasks = self.tasks
        on_error = self._consume_error
        tick, version = self.sync.tick, self.sync.version
        # The task set changes only in rebalance callbacks, which end this loop (``_changed``).
        only = next(iter(tasks.values())) if len(tasks) == 1 else None
        consume = only.consumer.consume if only is not None else None  # type: ignore[union-attr]
        while not self._stop.is_set() and tasks and not self._changed:
            started = time.perf_counter()
            if only is not None:
                # What is already fetched, without waiting for a full batch (the latency of a
                # consume(n, timeout) that waits for n); if nothing is, block for the first record.
                n = only.process(consume(batch_size, 0) or consume(1, timeout), on_error)  # type: ignore[misc]
            else:
                n = self._round(batch_size, timeout)
            if n:
                if on_batch is not None:
                    on_batch(n, time.perf_counter() - started)
                tick(self._task_learners, n)
                for task, ts in tasks.items():
                    ts.sink.set_version(version(task))  # type: ignore[union-attr]
            self._pace()
            sink_poll()
            poll_member(0)  # serves the rebalance callbacks, which may drop tasks
            if time.monotonic() >= next_commit:
                self.commit()
                next_commit = time.monotonic() + interval

    def _round(self, batch_size: int, timeout: float) -> int:
        """One batch from every task's consumer; if none had anything fetched, wait a share of
        ``timeout`` on each in turn. Returns how many records were processed."""
        on_error = self._consume_error
        n, fetched = 0, False
        for ts in self.tasks.values():
            batch = ts.consumer.consume(batch_size, 0)  # type: ignore[union-attr]
            fetched = fetched or bool(batch)
            # Every task, fed or not: an aligner may release what waited for a partition's wait to end.
            n += ts.process(batch, on_error)
        if not fetched:
            wait = timeout / len(self.tasks)
            for ts in self.tasks.values():
                batch = ts.consumer.consume(1, wait)  # type: ignore[union-attr]
                if batch:
                    return n + ts.process(batch, on_error)
        return n

    def _pace(self) -> None:
        """Pause partitions far ahead in event time, resume them once their task's aligner drained."""
        for ts in self.tasks.values():
            consumer = ts.consumer
            assert consumer is not None
            full = ts.runaways()
            if full:
                consumer.pause(full)
            back = ts.resumable()
            if back:
                with contextlib.suppress(KafkaException):
                    consumer.resume(back)

    def _lagging_for(self, ts: TaskState) -> Any:
        consumer = ts.consumer
        assert consumer is not None

        def lagging(tp: TP) -> bool:
            """Whether the broker holds records of ``tp`` this consumer has not fetched yet (from
            the high watermark of its last fetch; unknown before the first one counts as lagging).
            A lag of one is a transaction marker at the end of a transactional input, not a record."""
            part = TopicPartition(*tp)
            _, high = consumer.get_watermark_offsets(part, cached=True)
            if high < 0:
                return True
            position = consumer.position([part])[0].offset
            if position < 0:  # nothing handed to us yet: where it starts is where we assigned it
                position = ts.offsets.get(tp, 0)
            return high - position > 1

        return lagging

    # -- starting and dropping a task --------------------------------------------

    def _activate(self, task: int) -> None:
        """Run ``task`` here: restore its checkpoint consistent with the committed offsets and
        read its partitions from the checkpoint's offsets."""
        assert self.committer is not None
        cfg = self.config
        published = self.assignment.committed(task)
        silent = self.assignment.silent(task)
        parts = published + silent
        # Before reading the committed offsets: exactly-once's init_transactions aborts this
        # instance's predecessor's open transaction (same transactional.id), so they are stable.
        self.committer.open()
        committed = self._committed(published)
        low = self._low_watermarks(parts)
        store = task_store(cfg, self.storage, self.instance_id, task, self.assignment.n_tasks, self.keys)
        ts = TaskState(task, cfg, store, parts, silent, self.metrics, self.privacy, self._warn)
        fresh, self._fresh = self._fresh, None
        start = ts.restore(committed, low, self._pristine, fresh)
        if ts.restored is not None:
            self.restores += 1
        assert self.committer.sink is not None
        # The metrics ask for librdkafka statistics (stats_cb): consumer lag per partition.
        observed = self.metrics.consumer_properties() if self.metrics is not None else {}
        ts.consumer = Consumer(consumer_config(cfg, error_cb=self._client_error, **observed))
        ts.start(self.committer.sink, self.observer, self._dl_budget,
                 self._lagging_for(ts) if cfg.processing.align else None)  # fmt: skip
        self.tasks[task] = ts
        self._task_learners[task] = ts.learners
        if self.assignment.n_tasks == 1:
            self.learners[:] = ts.learners
        ts.consumer.assign([TopicPartition(t, p, start[(t, p)]) for t, p in parts])
        log.info("partitions assigned", extra={"task": task, "partitions": [f"{t}[{p}]" for t, p in parts]})
        if ts.restored is not None:
            info = ts.restored
            log.info(
                "restored from checkpoint",
                extra={"task": task, "checkpoint": info.name, "seq": info.seq,
                       "offsets": describe_offsets(info.offsets), "relearn_without_publishing": ts.relearn,
                       "restores": self.restores, "origin": info.origin},
            )  # fmt: skip
        else:
            log.info(
                "no checkpoint: starting untrained learners",
                extra={"task": task, "from": describe_offsets(start), "relearn_without_publishing": ts.relearn},
            )
            # A commit must never exist without a checkpoint at or before it, or a crash
            # before the first periodic checkpoint would leave offsets with no state.
            try:
                ts.write_checkpoint(start, "initial")
            except (OSError, CheckpointError) as exc:
                raise StateError(f"cannot write checkpoints to {store.describe()}: {exc}") from exc
        self.committer.begin()
        # What exists now (the restored learners, the clients, the modules) lives as long as the
        # task runs: moved out of the collector's generations, so the loop's collections scan
        # only what it allocates (~5 % of a small job's time per event); undone when a task drops.
        gc.collect()
        gc.freeze()

    def _drop(self, task: int, committed: bool) -> None:
        ts = self.tasks.pop(task, None)
        self._task_learners.pop(task, None)
        if ts is None:
            return
        ts.close()
        ts.discard_txn_checkpoint()
        gc.unfreeze()  # what the activation froze can be collected again (learners replaced by a restore)
        log.info("deactivated", extra={"task": task, "committed": committed})

    def _drop_all(self, committed: bool) -> None:
        for task in list(self.tasks):
            self._drop(task, committed)

    def _committed(self, parts: list[TP]) -> dict[TP, int | None]:
        assert self.member is not None
        while True:
            try:
                result = self.member.committed([TopicPartition(t, p) for t, p in parts], timeout=15)
                return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result}
            except KafkaException as exc:
                self._warn("committed", "cannot read the committed offsets yet; retrying", reason=str(exc))
            if self._stop.wait(1.0):
                raise _Stopped

    def _low_watermarks(self, parts: list[TP]) -> dict[TP, int]:
        """Earliest offset of every partition, in one ListOffsets round (an admin request:
        a consumer's cached metadata can stay stale after a broker outage)."""
        admin = AdminClient(admin_config(self.config) | {"error_cb": lambda err: None})
        while True:
            try:
                futures = admin.list_offsets(
                    {TopicPartition(t, p): OffsetSpec.earliest() for t, p in parts}, request_timeout=10
                )
                return {(tp.topic, tp.partition): max(f.result().offset, 0) for tp, f in futures.items()}
            except KafkaException as exc:
                self._warn("watermarks", "cannot read the partition offsets yet; retrying", reason=str(exc))
            if self._stop.wait(1.0):
                raise _Stopped

    # -- commit protocol ---------------------------------------------------------

    def commit(self, budget_s: float | None = None, *, final: bool = False, closing: set[int] | None = None) -> bool:
        """Commit what every task processed (and checkpoint the tasks when due, or those
        ``closing``: revoked; every task when ``final``: shutdown). Returns whether the
        offsets were committed."""
        tasks = self.tasks
        if not tasks:
            return False
        committer, member = self.committer, self.member
        assert committer is not None and member is not None
        closing = set(tasks) if final else (closing or set())
        for ts in tasks.values():
            ts.reap(wait=False)  # a background checkpoint is reported even when idle
        if not any(ts.pending(ts.task in closing) for ts in tasks.values()):
            return True
        if not committer.drain(budget_s):
            return False
        if faults.ARMED:
            faults.hit("after_produce_before_commit")
        offsets: dict[TP, int] = {}
        written: list[tuple[TaskState, CheckpointInfo]] = []
        for ts in tasks.values():
            last = ts.task in closing
            pos = ts.positions()
            info = ts.maybe_checkpoint(pos, last, background=committer.background_checkpoints and not last)
            if info is not None:
                written.append((ts, info))
                # Named here: if the transaction aborts it is deleted (its offsets were never
                # committed); a crash leaves it ahead of the committed offsets: never selected.
                if committer.exactly_once:
                    ts.txn_checkpoint = info.name
            offsets.update(ts.to_commit(pos))
        try:
            done = committer.commit(member, offsets, budget_s)
        except MembershipLost as exc:
            if exc.client_failed:
                self._member_failed = exc.error  # the next member poll replaces the client
            self._lost(str(exc))
            return False
        if not done:
            return False
        if faults.ARMED:
            faults.hit("after_commit")
        for ts in tasks.values():
            ts.txn_checkpoint = None
            ts.uncommitted = False
        for ts, info in written:
            ts.prune_keeping(info.name)
        if not final:
            committer.begin()
        return True

    def _abort(self, reason: str, code: int | None) -> None:
        """Abort the open transaction and drop every task; the main loop then restores each
        task still assigned here from its checkpoint consistent with the committed offsets."""
        self.aborts += 1
        log.warning("transaction aborted; restoring", extra={"reason": reason, "aborts": self.aborts})
        assert self.committer is not None
        if not self.committer.abort():
            return  # asked to stop mid-outage: nothing was committed, a restart restores
        for ts in self.tasks.values():
            ts.discard_txn_checkpoint()
        if code is not None and code in MEMBERSHIP_LOST:
            self._lost(f"transaction offsets rejected: {KafkaError(code).name()}")
            return
        # Keep the producer (not fenced): the restored tasks reuse it.
        self._drop_all(committed=False)

    # -- errors and shutdown -----------------------------------------------------

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            # A client with a fatal error is unusable (e.g. the group member fenced after its
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
        if self.tasks and clean:
            try:
                committed = self.commit(budget_s=budget, final=True)
            except (Abort, Fenced, FatalError, DeliveryFailed, KafkaException) as exc:
                log.warning("final commit failed; a restart resumes from the last commit", extra={"reason": str(exc)})
        replayed = sum(ts.replayed for ts in self.tasks.values())
        checkpoints = self.checkpoints
        if self.committer is not None:
            self.committer.release()
        self._drop_all(committed)
        if self.member is not None:
            try:
                self.member.close()
            except Exception:
                log.exception("group member close failed")
        if self.committer is not None:
            self.committer.close(budget)
        with contextlib.suppress(Exception):
            self.sync.close()
        log.info(
            "stopped",
            extra={"committed": committed, "restores": self.restores, "aborts": self.aborts,
                   "checkpoints": checkpoints, "relearned": replayed},
        )  # fmt: skip
