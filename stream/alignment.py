"""Event-time alignment of the partitions one consumer reads (Kafka Streams' ``PartitionGroup``).

A consumer hands over records in fetch order: during a backlog (a first start
over topics that hold history, a catch-up after downtime) whole fetches of one
partition arrive before the next partition's, so one topic can be learned hours
of event time ahead of another: fraud labels before the purchases they answer,
purchases before the clicks that led to them. Joins then miss and the models
learn a different stream than a live run does.

``Aligner`` buffers what was fetched, per partition, and releases records in
timestamp order: the head with the smallest timestamp goes next, as long as
no partition that may still hold an earlier record is empty. A partition with
nothing buffered blocks the others only while it is *lagging* (the broker has
records it has not fetched yet), and at most ``max_wait_s`` (Kafka Streams'
``max.task.idle.ms``); a caught-up partition never blocks, so live streams
are not delayed. Order within a partition is always kept.

>>> from stream.recording import RecordedMessage as M
>>> a = Aligner(max_wait_s=0.0, lagging=lambda tp: False)
>>> a.assign([("clicks", 0), ("labels", 0)])
>>> a.add([M("labels", 0, 0, (1, 30), None, b""), M("labels", 0, 1, (1, 40), None, b"")])
[]
>>> a.add([M("clicks", 0, 0, (1, 10), None, b""), M("clicks", 0, 1, (1, 35), None, b"")])
[]
>>> [(m.topic(), m.timestamp()[1]) for m in a.release()]
[('clicks', 10), ('labels', 30), ('clicks', 35), ('labels', 40)]
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

__all__ = ["Aligner", "Fetched"]

TP = tuple[str, int]


class Fetched(Protocol):
    """What the aligner needs of a record (a confluent-kafka ``Message``)."""

    def error(self) -> object | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def timestamp(self) -> tuple[int, int]: ...


M = TypeVar("M", bound=Fetched)


class Aligner(Generic[M]):
    """Per-partition buffers released in timestamp order (see the module doc).

    ``lagging(tp)`` says whether the broker holds records of ``tp`` not fetched
    yet; ``clock`` is monotonic seconds (the wait is wall-clock by nature: it
    waits for a fetch, not for event time)."""

    def __init__(
        self, max_wait_s: float, lagging: Callable[[TP], bool], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_wait_s = max_wait_s
        self.lagging = lagging
        self.clock = clock
        self._buffers: dict[TP, deque[M]] = {}
        #: Empty partitions and since when (clock) they hold the others back, to bound it; None
        #: until they first do (the wait starts when a record is held, not at assignment).
        self._empty_since: dict[TP, float | None] = {}
        #: Heads of the non-empty buffers: (timestamp, arrival sequence, partition).
        self._heads: list[tuple[int, int, TP]] = []
        self._seq = 0
        self.buffered = 0

    def assign(self, tps: Iterable[TP]) -> None:
        """Track these partitions (those never fetched block like emptied ones)."""
        for tp in tps:
            if tp not in self._buffers:
                self._buffers[tp] = deque()
                self._empty_since[tp] = None

    def clear(self) -> None:
        """Forget every partition and buffered record (revocation, deactivation)."""
        self._buffers.clear()
        self._empty_since.clear()
        self._heads.clear()
        self.buffered = 0

    def add(self, batch: Iterable[M]) -> list[M]:
        """Buffer ``batch``; returns the consumer errors in it (they belong to no partition's order)."""
        buffers = self._buffers
        errors: list[M] = []
        for msg in batch:
            if msg.error() is not None:
                errors.append(msg)
                continue
            tp: TP = (msg.topic(), msg.partition())  # type: ignore[assignment]
            buf = buffers.get(tp)
            if buf is None:
                buf = buffers[tp] = deque()
            if not buf:
                self._empty_since.pop(tp, None)
                self._push(tp, msg)
            buf.append(msg)
            self.buffered += 1
        return errors

    def _push(self, tp: TP, msg: M) -> None:
        self._seq += 1
        heapq.heappush(self._heads, (msg.timestamp()[1], self._seq, tp))

    def _blocked(self) -> bool:
        """Whether an empty partition may still deliver a record earlier than every head."""
        if not self._empty_since or not self._heads:
            return False
        now = self.clock()
        blocked = False
        for tp, since in self._empty_since.items():
            if since is None:
                since = self._empty_since[tp] = now
            if now - since < self.max_wait_s and self.lagging(tp):
                blocked = True
        return blocked

    def release(self) -> list[M]:
        """Every record that can go now, in timestamp order (ties: arrival order)."""
        out: list[M] = []
        heads, buffers = self._heads, self._buffers
        if self._blocked():
            return out
        while heads:
            _, _, tp = heapq.heappop(heads)
            buf = buffers[tp]
            out.append(buf.popleft())
            if buf:
                self._push(tp, buf[0])
            else:
                self._empty_since[tp] = None
                if self.lagging(tp) and self.max_wait_s > 0:
                    break  # its next fetch may hold an earlier record than the other heads
        self.buffered -= len(out)
        return out

    def sizes(self) -> dict[TP, int]:
        """Records buffered per partition (the consumer pauses partitions that run far ahead)."""
        return {tp: len(buf) for tp, buf in self._buffers.items()}

    def pending(self) -> dict[TP, int]:
        """The first buffered (not yet released) offset of each partition: where to commit up to."""
        return {tp: buf[0].offset() for tp, buf in self._buffers.items() if buf}  # type: ignore[misc]
