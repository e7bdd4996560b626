"""Record Kafka topics into recordings, and replay recordings back to Kafka.

``record`` consumes topics (partitions assigned explicitly, nothing committed)
into a recording (``stream.recording``: exact bytes, keys, headers,
timestamps and offsets); ``replay`` produces one back with the same keys,
values, timestamps, headers and partition numbers, optionally paced by the
recorded timestamps. The broker-less backtest of a recording is
``stream.backtest``.

Recorded timestamps are produced as they are (CreateTime). A broker deletes records
older than the destination topic's ``retention.ms`` (7 days by default) soon after
they are written, so replaying an old recording into a topic with time retention
can leave nothing to read: ``replay`` warns when that is the case, and
``rewrite_timestamps`` shifts every timestamp by one amount so the latest recorded
one becomes now (order and spacing kept; the event time in the payload is not
touched).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stream.config import Config
from stream.kafka import KafkaWriter, consumer_config, ensure_topics, topic_retention_ms
from stream.progress import Progress
from stream.recording import (
    TIMESTAMP_NOT_AVAILABLE,
    Manifest,
    PartitionEntry,
    Recording,
    RecordingError,
    RecordingWriter,
)

__all__ = ["ReplayResult", "TimestampRewrite", "record", "replay", "retention_warnings"]

log = logging.getLogger(__name__)

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


@dataclass
class ReplayResult:
    records: int
    by_topic: dict[str, int]
    elapsed_s: float
    #: Destination topics whose ``retention.ms`` is shorter than the age of the records produced to them.
    warnings: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _recorded_range(entries: Sequence[PartitionEntry]) -> tuple[int, int] | None:
    """The oldest and the latest recorded timestamp of these partitions (from the manifest:
    each partition's first and last record), or None when none has a timestamp."""
    ts = [t for e in entries for t in (e.first_timestamp, e.last_timestamp) if t is not None and t >= 0]
    return (min(ts), max(ts)) if ts else None


@dataclass(frozen=True)
class TimestampRewrite:
    """Shift every recorded timestamp by one amount so the latest becomes ``now_ms``:
    order and relative spacing are kept, nothing lands in the future (a timestamp
    past the latest one the manifest names is clamped to ``now_ms``; brokers reject
    CreateTime too far ahead), and a record without a timestamp keeps none (the broker
    stamps it).

    >>> r = TimestampRewrite.to_now(latest_ms=1_700_000_000_000, now_ms=1_800_000_000_000)
    >>> r(1_700_000_000_000), r(1_699_999_999_000), r(1_700_000_005_000)
    (1800000000000, 1799999999000, 1800000000000)
    """

    shift_ms: int
    now_ms: int

    @classmethod
    def to_now(cls, latest_ms: int | None, now_ms: int) -> TimestampRewrite:
        return cls(now_ms - latest_ms if latest_ms is not None else 0, now_ms)

    def __call__(self, ts: int) -> int:
        return min(ts + self.shift_ms, self.now_ms)


def retention_warnings(
    oldest_by_topic: Mapping[str, int], retention_ms: Mapping[str, int], now_ms: int, *, rewritten: bool
) -> list[str]:
    """One sentence per destination topic whose oldest produced timestamp is older than
    its ``retention.ms`` (-1 or absent: no time limit, no warning).

    >>> retention_warnings({"t": 0}, {"t": 86_400_000}, 3 * 86_400_000, rewritten=False)[0][:60]
    'topic t: the oldest record produced to it is 3.0 days old, m'
    >>> retention_warnings({"t": 0}, {"t": -1}, 3 * 86_400_000, rewritten=False)
    []
    """
    out = []
    for topic, oldest in sorted(oldest_by_topic.items()):
        retention = retention_ms.get(topic)
        age = now_ms - oldest
        if retention is None or retention < 0 or age <= retention:
            continue
        hint = (
            "the recording spans more than the retention even with timestamps rewritten to now"
            if rewritten
            else "pass --rewrite-timestamps to produce them with timestamps shifted to now"
        )
        out.append(
            f"topic {topic}: the oldest record produced to it is {age / 86_400_000:.1f} days old, more than its "
            f"retention.ms ({retention / 86_400_000:.1f} days): the broker deletes such records soon after they "
            f"are written, so consumers may read none of them; {hint}"
        )
    return out


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
    rewrite_timestamps: bool = False,
    check_retention: bool = True,
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

    ``rewrite_timestamps`` produces every timestamp shifted by one amount so the
    latest recorded one is the time the replay starts (order and spacing kept).
    ``check_retention`` reads each destination topic's ``retention.ms`` first and
    logs (and returns in ``warnings``) the topics the records would be too old for.
    """
    rec = recording if isinstance(recording, Recording) else Recording(recording)
    tmap = dict(topic_map or {})
    stop = stop or (lambda: False)
    need: dict[str, int] = {}
    for e in rec.partitions:
        dest = tmap.get(e.topic, e.topic)
        need[dest] = max(need.get(dest, 0), e.partition + 1)
    ensure_topics(config, need, create=create_topics)
    now_ms = int(time.time() * 1000)
    recorded = _recorded_range(rec.partitions)
    rewrite = TimestampRewrite.to_now(recorded[1] if recorded else None, now_ms) if rewrite_timestamps else None
    warnings: list[str] = []
    if check_retention:
        oldest: dict[str, int] = {}
        for dest in need:
            span = _recorded_range([e for e in rec.partitions if tmap.get(e.topic, e.topic) == dest])
            if span is not None:
                oldest[dest] = rewrite(span[0]) if rewrite is not None else span[0]
        warnings = retention_warnings(oldest, topic_retention_ms(config, oldest), now_ms,
                                      rewritten=rewrite is not None)  # fmt: skip
        for w in warnings:
            log.warning("recorded timestamps older than the topic's retention", extra={"detail": w})
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
            timestamp=(rewrite(ts) if rewrite is not None else ts) if ts_type != TIMESTAMP_NOT_AVAILABLE else 0,
            headers=msg._headers,
        )
        by_topic[msg._topic] += 1
        bar.update()
    writer.flush()
    if barrier is not None:
        barrier(dict(by_topic))
    bar.close()
    return ReplayResult(writer.produced, dict(by_topic), time.monotonic() - started, warnings)
