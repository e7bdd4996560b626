"""The Kafka application: consume, run the pipeline, produce, commit.

At-least-once with explicit offset handling: offsets are committed only after
every output produced before them is acknowledged by the broker (flush, then
a synchronous commit of the consumer's positions). Bad records are
dead-lettered by the pipeline and never stop the loop; broker outages are
retried by librdkafka while outputs wait in the producer queue.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from stream.config import Config
from stream.kafka import (
    KafkaSink,
    consumer_config,
    describe_clients,
    log_error_cb,
    producer_config,
    wait_for_broker,
)
from stream.learners import Learner, build_learner
from stream.pipeline import Pipeline

__all__ = ["Application", "build_learners"]

log = logging.getLogger(__name__)


def build_learners(config: Config) -> list[Learner]:
    topics = config.input_topics()
    return [build_learner(name, spec, topics) for name, spec in config.learners.items()]


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
    """Wires the consumer, the pipeline and the producer, and owns the commit protocol."""

    def __init__(self, config: Config, learners: Sequence[Learner] | None = None, observer: Any = None) -> None:
        self.config = config
        self.learners = list(learners) if learners is not None else build_learners(config)
        self.observer = observer
        self._stop = threading.Event()
        self._warn = _RateLimited()
        self.consumer: Consumer | None = None
        self.sink: KafkaSink | None = None
        self.pipeline: Pipeline | None = None
        self._uncommitted = False

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
                "learners": [learner.name for learner in self.learners],
                "group_id": cfg.kafka.group_id,
                **describe_clients(cfg),
            },
        )
        if not wait_for_broker(cfg, self._stop.is_set):
            return 0
        producer = Producer(producer_config(cfg, error_cb=self._client_error))
        self.sink = KafkaSink(producer)
        self.pipeline = Pipeline(
            self.learners,
            self.sink,
            contract_topics=cfg.input_topics(),
            dead_letter_topic=cfg.topics.dead_letters,
            max_value_bytes=cfg.processing.max_value_bytes,
            observer=self.observer,
        )
        self.consumer = Consumer(consumer_config(cfg, error_cb=self._client_error))
        self.consumer.subscribe(
            self.pipeline.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("consuming", extra={"topics": self.pipeline.topics})
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        assert self.consumer is not None and self.sink is not None and self.pipeline is not None
        consume = self.consumer.consume
        process = self.pipeline.process
        poll = self.sink.poll
        p = self.config.processing
        batch_size, timeout, interval = p.batch_size, p.poll_timeout_s, p.commit_interval_s
        next_commit = time.monotonic() + interval
        while not self._stop.is_set():
            batch = consume(batch_size, timeout)
            for msg in batch:
                if msg.error() is not None:
                    self._consume_error(msg)
                    continue
                process(msg)
            if batch:
                self._uncommitted = True
            poll()
            if time.monotonic() >= next_commit:
                self.commit()
                next_commit = time.monotonic() + interval

    # -- commit protocol ---------------------------------------------------------

    def _drain(self, budget_s: float | None) -> bool:
        """Wait for every produced output to be acknowledged. ``None`` waits
        as long as the loop runs (a broker outage pauses commits, not the process)."""
        assert self.sink is not None
        deadline = None if budget_s is None else time.monotonic() + budget_s
        while True:
            if self.sink.flush(1.0):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if deadline is None and self._stop.is_set():
                return False
            self._warn("flush", "outputs not yet acknowledged; commit waits", pending=len(self.sink.producer))

    def commit(self, partitions: list[TopicPartition] | None = None, budget_s: float | None = None) -> bool:
        """Flush outputs, then commit the positions of ``partitions`` (default:
        all assigned). Returns whether offsets were committed."""
        assert self.consumer is not None
        if partitions is None and not self._uncommitted:
            return True
        if not self._drain(budget_s):
            return False
        targets = partitions if partitions is not None else self.consumer.assignment()
        if not targets:
            return True
        offsets = [tp for tp in self.consumer.position(targets) if tp.offset >= 0]
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError._NO_OFFSET:
                return True
            self._warn("commit", "offset commit failed; will retry", code=err.name(), reason=err.str())
            return False
        if partitions is None:
            self._uncommitted = False
        return True

    # -- rebalance ---------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})
        # Commit what was processed so the next owner starts right after it.
        self.commit(partitions, budget_s=self.config.processing.shutdown_timeout_s)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost", extra={"partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})

    # -- errors and shutdown -----------------------------------------------------

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            log_error_cb(err)
            self.stop()
            return
        self._warn(err.name(), "kafka client error", code=err.name(), reason=err.str())

    def _consume_error(self, msg: Message) -> None:
        err = msg.error()
        if err.fatal():
            raise KafkaException(err)
        self._warn(f"consume:{err.name()}", "consume error", code=err.name(), reason=err.str(), topic=msg.topic())

    def _shutdown(self) -> None:
        budget = self.config.processing.shutdown_timeout_s
        committed = False
        if self.consumer is not None and self.sink is not None:
            try:
                committed = self.commit(budget_s=budget)
            except Exception:
                log.exception("final commit failed")
            try:
                self.consumer.close()
            except Exception:
                log.exception("consumer close failed")
        log.info("stopped", extra={"committed": committed})
