"""Delayed-label joining (stream.labels): in time, window closed, late, unknown, bounded."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from stream.labels import LabelJoin


class Recorder:
    """Stands in for a learner: bound-method callbacks, picklable with the join."""

    def __init__(self, window_ms: int = 1_000, max_pending: int = 100, **kw: Any) -> None:
        self.events: list[tuple[str, Any, Any, int]] = []
        self.join: LabelJoin[str, str] = LabelJoin(
            window_ms, max_pending, on_label=self.labelled, on_expire=self.expired, on_evict=self.evicted, **kw
        )

    def labelled(self, payload: str, label: Any, ts: int) -> None:
        self.events.append(("label", payload, label, ts))

    def expired(self, payload: str, deadline: int) -> None:
        self.events.append(("expire", payload, None, deadline))

    def evicted(self, payload: str, ts: int) -> None:
        self.events.append(("evict", payload, None, ts))


def test_label_before_window_close_is_learned_with_its_prediction() -> None:
    r = Recorder()
    r.join.add("o1", "x1", ts=0)
    assert r.join.label("o1", True, ts=1_000) == 1  # the window includes its last millisecond
    assert r.events == [("label", "x1", True, 1_000)]
    assert len(r.join) == 0
    assert r.join.stats() == {"received": 1, "joined": 1, "unmatched": 0, "late": 0, "expired": 0, "evicted": 0}


def test_window_close_expires_on_event_time_only() -> None:
    r = Recorder()
    r.join.add("o1", "x1", ts=0)
    r.join.add("o2", "x2", ts=500)
    r.join.advance(1_000)
    assert r.events == []  # o1's window closes after 1_000, not at it
    r.join.advance(1_001)
    assert r.events == [("expire", "x1", None, 1_000)]
    r.join.advance(900)  # out of order: time never moves back
    assert r.join.now == 1_001
    r.join.advance(10_000)
    assert [e[1] for e in r.events] == ["x1", "x2"]
    assert r.join.stats()["expired"] == 2


def test_late_label_after_expiry_is_counted_not_learned() -> None:
    r = Recorder()
    r.join.add("o1", "x1", ts=0)
    r.join.advance(5_000)
    assert r.join.label("o1", True, ts=5_000) == 0
    assert r.join.label("never-seen", True, ts=5_000) == 0
    assert [e[0] for e in r.events] == ["expire"]
    stats = r.join.stats()
    assert (stats["received"], stats["joined"], stats["unmatched"], stats["late"]) == (2, 0, 2, 1)


def test_label_arriving_late_in_processing_order_finds_the_window_closed() -> None:
    """The label's own ts is in time, but the watermark had passed the deadline already."""
    r = Recorder()
    r.join.add("o1", "x1", ts=0)
    r.join.advance(2_000)  # another partition ran ahead
    assert r.join.label("o1", True, ts=800) == 0
    assert r.join.stats()["late"] == 1


def test_bounded_entries_evict_the_oldest_with_counts() -> None:
    r = Recorder(max_pending=3, remember=2)
    for i in range(5):
        r.join.add(f"o{i}", f"x{i}", ts=i)
    assert len(r.join) == 3
    assert r.events == [("evict", "x0", None, 3), ("evict", "x1", None, 4)]
    assert r.join.label("o0", True, ts=10) == 0 and r.join.label("o1", True, ts=10) == 0
    assert r.join.label("o4", True, ts=10) == 1
    stats = r.join.stats()
    assert (stats["evicted"], stats["late"], stats["joined"]) == (2, 2, 1)
    for i in range(5, 9):  # at most `remember` closed ids are kept
        r.join.add(f"o{i}", f"x{i}", ts=i)
    assert len(r.join._closed) == 2


def test_one_label_answers_every_prediction_under_its_id() -> None:
    r = Recorder()
    r.join.add("order", "line1", ts=0)
    r.join.add("order", "line2", ts=10)
    r.join.add("other", "x", ts=20)
    assert r.join.label("order", False, ts=30) == 2
    assert [e[1] for e in r.events] == ["line1", "line2"]
    assert "order" not in r.join and "other" in r.join


def test_label_earlier_than_a_prediction_does_not_answer_it() -> None:
    r = Recorder()
    r.join.add("u|i", "view at 100", ts=100)
    assert r.join.label("u|i", True, ts=50) == 0  # bought before the view
    assert r.join.label("u|i", True, ts=150) == 1
    assert r.join.stats()["unmatched"] == 1


def test_expiry_is_amortised_each_prediction_expires_once() -> None:
    r = Recorder(window_ms=10, max_pending=10_000)
    for ts in range(0, 5_000):
        r.join.add(f"k{ts}", ts, ts=ts)
    assert r.join.expired == 5_000 - 11  # all but the last window's
    assert len(r.join) == 11
    assert [e[1] for e in r.events] == list(range(5_000 - 11))


def test_pickle_keeps_pending_predictions_and_callbacks() -> None:
    r = Recorder()
    r.join.add("o1", "x1", ts=0)
    r.join.add("o2", "x2", ts=0)
    copy = pickle.loads(pickle.dumps(r))
    assert copy.join.on_label.__self__ is copy  # the restored join calls the restored learner
    copy.join.label("o1", True, ts=10)
    copy.join.advance(2_000)
    assert copy.events == [("label", "x1", True, 10), ("expire", "x2", None, 1_000)]
    assert r.events == []


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match="window_ms"):
        LabelJoin(0, 10, on_label=print)
