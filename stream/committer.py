"""The commit protocol, one implementation per guarantee.

The application decides *what* to commit (the positions its tasks reached, a
checkpoint written at them); a ``Committer`` decides *how* the outputs and
those offsets become durable together:

* ``AtLeastOnce``: one idempotent producer for the process; flush the outputs,
  then commit the offsets through the consumer-group member. A crash between
  the two repeats predictions, never learning (the checkpoint protocol).
* ``ExactlyOnce``: one transactional producer per instance
  (``transactional.id`` = ``{group_id}-{instance_id}`` by default): outputs,
  dead letters and offsets in one transaction. A restarted instance's
  ``init_transactions`` fences its own zombie (same id); a deposed group member
  is fenced by its generation: the broker refuses offsets sent with a stale
  group metadata (KIP-447), so its transaction can only abort.

Either way the group member's generation fences a member that lost its tasks.
Failures reach the application as exceptions it handles in one place:
``Abort`` (abort the open transaction, restore the checkpoints consistent with
the committed offsets), ``Fenced`` (a newer producer owns the transactional id:
stand down), ``MembershipLost`` (the group no longer counts this member: drop
the tasks without committing).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from stream import faults
from stream.config import Config
from stream.errors import FatalError
from stream.kafka import KafkaSink, producer_config
from stream.pipeline import DeadLetterBudget

__all__ = [
    "MEMBERSHIP_LOST",
    "Abort",
    "AtLeastOnce",
    "Committer",
    "ExactlyOnce",
    "Fenced",
    "MembershipLost",
    "make_committer",
    "transactional_id",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Offsets = Mapping[tuple[str, int], int]
Warn = Callable[..., None]

#: Commit errors meaning this instance is no longer the group member that owns its tasks.
MEMBERSHIP_LOST = frozenset(
    {KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.FENCED_INSTANCE_ID}
)

#: Transactional errors meaning a newer producer took this instance's transactional.id.
_PRODUCER_FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


class Abort(Exception):
    """The open transaction must be aborted (exactly-once), then the state restored."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


class Fenced(Exception):
    """A newer producer took the transactional id: this one is a zombie and must stand down."""


class MembershipLost(Exception):
    """The group refused the commit: this member's tasks may be someone else's now.
    ``client_failed``: the member's client hit a fatal error and must be replaced."""

    def __init__(self, reason: str, client_failed: bool = False) -> None:
        super().__init__(reason)
        self.client_failed = client_failed
        self.error: KafkaError | None = None


def transactional_id(config: Config, instance: str) -> str:
    """``[coordination] transactional_id`` with ``{group_id}`` and ``{instance_id}`` substituted.

    >>> from stream.config import Config
    >>> transactional_id(Config(), "pod-1")
    'stream-pod-1'
    """
    template = config.coordination.transactional_id
    return template.replace("{group_id}", config.kafka.group_id).replace("{instance_id}", instance)


class Committer(Protocol):
    """How outputs and input offsets become durable together (see the module doc)."""

    #: Outputs in a transaction: a failed delivery aborts instead of exiting.
    exactly_once: bool
    #: Checkpoints may be written by a forked child after the commit (at-least-once only:
    #: exactly-once needs the checkpoint written before its offsets commit).
    background_checkpoints: bool

    @property
    def sink(self) -> KafkaSink | None:
        """Where the pipeline produces outputs and dead letters (None before ``open``)."""

    def open(self) -> None:
        """Ready to process, before the committed offsets are read (exactly-once: a fresh
        producer whose ``init_transactions`` aborts this instance's predecessor's transaction)."""

    def begin(self) -> None:
        """Start the unit of work that the next ``commit`` makes durable (no-op if one is open)."""

    def drain(self, budget_s: float | None) -> bool:
        """Before the positions are read: wait for the outputs if they must be acknowledged first."""

    def commit(self, member: Consumer, offsets: Offsets, budget_s: float | None) -> bool:
        """Make the outputs and ``offsets`` durable; False: not now, retry later. Raises
        ``Abort``, ``Fenced``, ``MembershipLost``, ``FatalError``."""

    def abort(self) -> bool:
        """Abort what is open (outputs of an open transaction are discarded). False if asked
        to stop while the broker was away."""

    def release(self, abort: bool = True) -> None:
        """The instance deactivates: abort what is open (``abort``) and drop per-activation clients."""

    def close(self, budget_s: float) -> None:
        """Process exit: deliver what can be delivered."""


class AtLeastOnce:
    """Flush the outputs, then commit the offsets (one producer for the process)."""

    exactly_once = False
    background_checkpoints = True

    def __init__(self, config: Config, producer_props: Mapping[str, Any], budget: DeadLetterBudget,
                 stop: threading.Event, warn: Warn) -> None:  # fmt: skip
        self.producer = Producer(producer_config(config, **producer_props))
        self._sink = KafkaSink(self.producer, config.topics.dead_letters, budget)
        self._stop = stop
        self._warn = warn

    @property
    def sink(self) -> KafkaSink:
        return self._sink

    def open(self) -> None:
        return None

    def begin(self) -> None:
        return None

    def drain(self, budget_s: float | None) -> bool:
        """Wait for every produced output to be acknowledged. ``None`` waits as long as
        the loop runs (a broker outage pauses commits, not the process)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        while True:
            if self._sink.flush(1.0):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if deadline is None and self._stop.is_set():
                return False
            self._warn("flush", "outputs not yet acknowledged; commit waits", pending=len(self.producer))

    def commit(self, member: Consumer, offsets: Offsets, budget_s: float | None) -> bool:
        try:
            result = member.commit(offsets=tps(offsets), asynchronous=False)
        except KafkaException as exc:
            return self._failed(exc.args[0])
        failed = [tp.error for tp in result or [] if tp.error is not None]
        return self._failed(failed[0]) if failed else True

    def _failed(self, err: KafkaError) -> bool:
        if err.code() == KafkaError._NO_OFFSET:
            return True
        if is_fatal(err):
            lost = MembershipLost(f"offset commit failed: {err.name()}", client_failed=True)
            lost.error = err
            raise lost
        if err.code() in MEMBERSHIP_LOST:
            raise MembershipLost(f"offset commit rejected: {err.name()}")
        self._warn("commit", "offset commit failed; will retry", code=err.name(), reason=err.str())
        return False

    def abort(self) -> bool:
        return True

    def release(self, abort: bool = True) -> None:
        return None

    def close(self, budget_s: float) -> None:
        self.producer.flush(budget_s)


class ExactlyOnce:
    """Outputs and offsets in one transaction (one transactional producer per instance)."""

    exactly_once = True
    background_checkpoints = False

    def __init__(self, config: Config, instance: str, producer_props: Mapping[str, Any], budget: DeadLetterBudget,
                 stop: threading.Event, warn: Warn, error_cb: Callable[[KafkaError], None]) -> None:  # fmt: skip
        self.config = config
        self.transactional_id = transactional_id(config, instance)
        self._props = dict(producer_props)
        self._budget = budget
        self._stop = stop
        self._warn = warn
        self._error_cb = error_cb
        self.producer: Producer | None = None
        self._sink: KafkaSink | None = None
        self.in_txn = False

    @property
    def sink(self) -> KafkaSink | None:
        return self._sink

    def open(self) -> None:
        if self.producer is not None:
            return
        cfg = self.config
        timeout_ms = cfg.coordination.transaction_timeout_ms
        props = {"transactional.id": self.transactional_id, "transaction.timeout.ms": timeout_ms,
                 "message.timeout.ms": timeout_ms, **self._props}  # fmt: skip
        producer = Producer(producer_config(cfg, error_cb=self._error_cb, **props))
        log.info("initialising transactions", extra={"transactional_id": self.transactional_id})
        timeout_s = timeout_ms / 1000
        self._txn("init_transactions", lambda: producer.init_transactions(timeout_s), budget_s=timeout_s * 3)
        self.producer = producer
        self._sink = KafkaSink(producer, cfg.topics.dead_letters, self._budget, transactional=True)

    def begin(self) -> None:
        assert self.producer is not None
        if self.in_txn:
            return  # a task started while the others' transaction is open joins it
        self._txn("begin_transaction", self.producer.begin_transaction)
        self.in_txn = True

    def drain(self, budget_s: float | None) -> bool:
        return True  # commit_transaction flushes

    def commit(self, member: Consumer, offsets: Offsets, budget_s: float | None) -> bool:
        producer = self.producer
        assert producer is not None
        group = member.consumer_group_metadata()
        timeout = self._timeout_s(budget_s)
        parts = tps(offsets)
        self._txn("send_offsets_to_transaction", lambda: producer.send_offsets_to_transaction(parts, group, timeout))
        if faults.ARMED:
            faults.hit("after_send_offsets_before_commit")
        self._txn("commit_transaction", lambda: producer.commit_transaction(timeout), budget_s)
        self.in_txn = False
        return True

    def abort(self) -> bool:
        producer = self.producer
        if producer is None or not self.in_txn:
            return True
        if not self._abort_transaction(producer):
            return False  # asked to stop mid-outage: nothing was committed, a restart restores
        self.in_txn = False
        producer.poll(0)  # serve the purged outputs' delivery reports ...
        if self._sink is not None:
            self._sink.failed.clear()  # ... which are failures by design, not news
        return True

    def release(self, abort: bool = True) -> None:
        if abort and self.in_txn and self.producer is not None:
            with contextlib.suppress(KafkaException):
                self.producer.abort_transaction(self.config.processing.shutdown_timeout_s)
        self.in_txn = False
        # The next activation makes a fresh producer: a newer one may have taken the transactional id.
        self.producer = None
        self._sink = None

    def close(self, budget_s: float) -> None:
        return None  # what was not committed is aborted by the broker (or by the next init_transactions)

    def _timeout_s(self, budget_s: float | None) -> float:
        limit = self.config.coordination.transaction_timeout_ms / 1000
        return min(budget_s, limit) if budget_s is not None else limit

    def _txn(self, what: str, call: Callable[[], T], budget_s: float | None = None) -> T:
        """Run one transactional call: retry what is retriable, raise ``Abort`` for what
        requires an abort, ``Fenced`` for a fenced producer, ``FatalError`` for the rest."""
        deadline = time.monotonic() + (budget_s if budget_s is not None else self._timeout_s(None))
        while True:
            try:
                return call()
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() in _PRODUCER_FENCED:
                    raise Fenced(f"{what}: {err.name()}") from exc
                if err.fatal():
                    raise FatalError(f"{what}: {err.name()}: {err.str()}") from exc
                if err.txn_requires_abort():
                    raise Abort(f"{what}: {err.name()}: {err.str()}", err.code()) from exc
                if err.retriable() and time.monotonic() < deadline:
                    self._warn(f"txn:{what}", "transactional call failed; retrying", call=what, code=err.name())
                    time.sleep(0.2)
                    continue
                if err.retriable():
                    # Out of time: give the transaction up; restoring is always safe.
                    raise Abort(f"{what}: still failing after retries: {err.name()}: {err.str()}", err.code()) from exc
                # Unclassified errors are treated as fatal, as the client's documentation advises.
                raise FatalError(f"{what}: {err.name()}: {err.str()}") from exc

    def _abort_transaction(self, producer: Producer) -> bool:
        """Abort, retrying for as long as the broker is away (nothing commits meanwhile).
        False if asked to stop first; ``Fenced``/``FatalError`` if the producer cannot."""
        timeout = self._timeout_s(None)
        while True:
            try:
                producer.abort_transaction(timeout)
                return True
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() in _PRODUCER_FENCED:
                    raise Fenced(f"abort_transaction: {err.name()}") from exc
                if err.fatal() or not (err.retriable() or err.txn_requires_abort()):
                    raise FatalError(f"abort_transaction: {err.name()}: {err.str()}") from exc
                self._warn("txn:abort", "abort_transaction failed; retrying", code=err.name())
            if self._stop.wait(0.5):
                return False


def make_committer(config: Config, instance: str, producer_props: Mapping[str, Any], budget: DeadLetterBudget,
                   stop: threading.Event, warn: Warn, error_cb: Callable[[KafkaError], None]) -> Committer:  # fmt: skip
    """The committer of the configured guarantee."""
    if config.processing.guarantee == "exactly_once":
        return ExactlyOnce(config, instance, producer_props, budget, stop, warn, error_cb)
    return AtLeastOnce(config, {**producer_props, "error_cb": error_cb}, budget, stop, warn)


def is_fatal(err: KafkaError) -> bool:
    # A consumer reports its fatal error as a consumer error with code _FATAL.
    return err.fatal() or err.code() == KafkaError._FATAL


def tps(offsets: Offsets) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
