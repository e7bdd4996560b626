"""Delayed labels: join each prediction to its label, which arrives later, on event time.

A learner whose outcome is known only later (did the view convert? was the
order a chargeback?) hands the ``LabelJoin`` what it needs to learn from the
prediction later (features, and the prediction actually made) under a join
id, and goes on. Then either

* a label arrives for that id within ``window_ms`` of the prediction's ``ts``:
  ``on_label(payload, label, ts)`` is called for every prediction waiting
  under the id (several order lines share an order id; one label answers
  them all), and the learner learns and evaluates the prediction made then; or
* the window closes first: ``on_expire(payload, deadline)``. What that means
  is the learner's business: a negative (no purchase followed the view), a
  legitimate order (no chargeback came), or nothing (dropped).

Labels that find nothing waiting are counted, never an error: ``late`` when
the id's window closed already (it is remembered for a while), else
``unmatched`` (an id never predicted, or seen longer ago than remembered).
A label earlier in event time than a prediction under the same id does not
answer it (a purchase made before the view is not that view's conversion).

Everything runs on event time. ``now`` is the largest ``ts`` seen (a
watermark, so out-of-order events cannot move time back); a window closes
once ``now`` passes ``ts + window_ms``. Call ``advance(ts)`` on every event
the learner reads (``add`` and ``label`` do it themselves): it costs one
comparison unless a window is due, and each prediction expires once, so it
is amortised O(1). Windows close in the order the predictions were added;
with out-of-order input a prediction may wait behind an earlier-added one
with a later deadline, i.e. at most as long as the input is out of order.

Memory is bounded: at most ``max_pending`` predictions wait; adding one more
evicts the oldest (``on_evict``, counted ``evicted``), and at most
``remember`` closed ids are kept to tell ``late`` from ``unmatched``.

The callbacks are bound methods of the learner (no lambdas), so the join is
part of the learner's pickled state and checkpoints carry what is pending.

>>> learned = []
>>> class Learner:
...     def labelled(self, payload, label, ts): learned.append((payload, label))
...     def expired(self, payload, ts): learned.append((payload, "expired"))
>>> me = Learner()
>>> join = LabelJoin(window_ms=1_000, max_pending=10, on_label=me.labelled, on_expire=me.expired)
>>> join.add("o1", "features of o1", ts=0)
>>> join.add("o2", "features of o2", ts=100)
>>> join.label("o1", True, ts=500)      # in time: joined
1
>>> join.advance(1_200)                 # o2's window closed at 1_100
>>> learned
[('features of o1', True), ('features of o2', 'expired')]
>>> join.label("o2", True, ts=1_300), join.label("o9", True, ts=1_300)   # too late, unknown
(0, 0)
>>> join.stats()
{'received': 3, 'joined': 1, 'unmatched': 2, 'late': 1, 'expired': 1, 'evicted': 0}
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["LabelJoin"]

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")


class LabelJoin(Generic[K, P]):
    """Predictions waiting for their label, keyed by a join id (see the module doc).

    ``on_label(payload, label, ts)``: a label arrived in time (``ts`` is the label's).
    ``on_expire(payload, deadline)``: the window closed without a label.
    ``on_evict(payload, ts)``: pushed out by ``max_pending`` before its window closed.
    """

    __slots__ = (
        "_by_key",
        "_closed",
        "_entries",
        "_next_deadline",
        "_seq",
        "evicted",
        "expired",
        "joined",
        "late",
        "max_pending",
        "now",
        "on_evict",
        "on_expire",
        "on_label",
        "received",
        "remember",
        "unmatched",
        "window_ms",
    )

    def __init__(
        self,
        window_ms: int,
        max_pending: int,
        on_label: Callable[[P, Any, int], None],
        on_expire: Callable[[P, int], None] | None = None,
        on_evict: Callable[[P, int], None] | None = None,
        *,
        remember: int | None = None,
    ) -> None:
        if window_ms <= 0 or max_pending < 1:
            raise ValueError("window_ms and max_pending must be positive")
        self.window_ms = int(window_ms)
        self.max_pending = max_pending
        self.remember = max_pending if remember is None else remember
        self.on_label = on_label
        self.on_expire = on_expire
        self.on_evict = on_evict
        #: The event-time watermark: the largest ``ts`` seen (epoch ms).
        self.now = -(2**62)
        self.received = 0
        self.joined = 0
        self.unmatched = 0
        self.late = 0
        self.expired = 0
        self.evicted = 0
        # seq -> (key, ts, deadline, payload), in the order added. A sequence number
        # rather than the key, since several predictions may wait under one key.
        self._entries: OrderedDict[int, tuple[K, int, int, P]] = OrderedDict()
        self._by_key: dict[K, list[int]] = {}
        self._closed: OrderedDict[K, None] = OrderedDict()
        self._seq = 0
        # A lower bound of the first entry's deadline: advance() does nothing until
        # the watermark passes it (it is only stale-low after a label pops the first).
        self._next_deadline: float = math.inf

    def __len__(self) -> int:
        """Predictions waiting for a label."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def stats(self) -> dict[str, int]:
        """Cumulative counts (the ``Learner.label_stats`` vocabulary): labels
        ``received``, ``joined`` (answered at least one prediction), ``unmatched``
        (answered none; includes ``late``), ``late`` (its id's window had closed);
        predictions ``expired`` (window closed unlabelled) and ``evicted`` (capacity)."""
        return {
            "received": self.received,
            "joined": self.joined,
            "unmatched": self.unmatched,
            "late": self.late,
            "expired": self.expired,
            "evicted": self.evicted,
        }

    # -- the hot path ------------------------------------------------------------------

    def advance(self, ts: int) -> None:
        """Move event time to ``ts`` (if later) and close the windows that passed."""
        if ts > self.now:
            self.now = ts
            if ts > self._next_deadline:
                self._expire()

    def add(self, key: K, payload: P, ts: int) -> None:
        """A prediction made at ``ts`` waits under ``key`` for its label until ``ts + window_ms``."""
        self.advance(ts)
        entries = self._entries
        seq = self._seq
        self._seq = seq + 1
        deadline = ts + self.window_ms
        if not entries:
            self._next_deadline = deadline
        entries[seq] = (key, ts, deadline, payload)
        waiting = self._by_key.get(key)
        if waiting is None:
            self._by_key[key] = [seq]
        else:
            waiting.append(seq)
        if len(entries) > self.max_pending:
            old_seq, (old_key, _, _, old_payload) = entries.popitem(last=False)
            self._unlink(old_key, old_seq)
            self.evicted += 1
            if self.on_evict is not None:
                self.on_evict(old_payload, ts)

    def label(self, key: K, label: Any, ts: int) -> int:
        """The label of ``key``, known at ``ts``: answers every prediction waiting
        under ``key`` made at or before ``ts``; returns how many it answered."""
        self.received += 1
        self.advance(ts)
        waiting = self._by_key.get(key)
        if waiting is None:
            self.unmatched += 1
            if key in self._closed:
                self.late += 1
            return 0
        entries = self._entries
        answered: list[P] = []
        keep: list[int] = []
        for seq in waiting:
            entry = entries[seq]
            if entry[1] <= ts:
                del entries[seq]
                answered.append(entry[3])
            else:
                keep.append(seq)
        if keep:
            self._by_key[key] = keep
        else:
            del self._by_key[key]
        if not answered:
            self.unmatched += 1
            return 0
        self.joined += 1
        for payload in answered:
            self.on_label(payload, label, ts)
        return len(answered)

    # -- windows closing -----------------------------------------------------------------

    def _expire(self) -> None:
        entries = self._entries
        now = self.now
        while entries:
            seq = next(iter(entries))
            key, _, deadline, payload = entries[seq]
            if deadline >= now:
                self._next_deadline = deadline
                return
            del entries[seq]
            self._unlink(key, seq)
            self.expired += 1
            if self.on_expire is not None:
                self.on_expire(payload, deadline)
        self._next_deadline = math.inf

    def _unlink(self, key: K, seq: int) -> None:
        waiting = self._by_key[key]
        if len(waiting) == 1:
            del self._by_key[key]
        else:
            waiting.remove(seq)
        if self.remember:
            closed = self._closed
            closed[key] = None
            closed.move_to_end(key)
            if len(closed) > self.remember:
                closed.popitem(last=False)
