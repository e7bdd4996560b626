"""Event-time alignment of partitions (``stream.alignment.Aligner``): pure logic, no broker."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.alignment import Aligner
from stream.recording import RecordedMessage as M


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def msg(topic: str, offset: int, ts: int, partition: int = 0) -> M:
    return M(topic, partition, offset, (1, ts), None, b"")


def seen(records: list[M]) -> list[tuple[str, int]]:
    return [(m.topic(), m.offset()) for m in records]


def test_a_lagging_empty_partition_holds_the_others_back_until_it_delivers() -> None:
    lag = {("labels", 0): True, ("purchases", 0): True}
    a = Aligner(max_wait_s=10.0, lagging=lambda tp: lag[tp], clock=Clock())
    a.assign(lag)
    # A backlog: labels fetched first, far ahead in event time.
    a.add([msg("labels", 0, 500), msg("labels", 1, 600)])
    assert a.release() == []  # purchases may hold earlier records: wait for their fetch
    assert a.pending() == {("labels", 0): 0}
    a.add([msg("purchases", 0, 100), msg("purchases", 1, 550)])
    assert seen(a.release()) == [("purchases", 0), ("labels", 0), ("purchases", 1)]  # purchases emptied: wait
    lag[("purchases", 0)] = False  # caught up: nothing earlier can come from it
    assert seen(a.release()) == [("labels", 1)]
    assert a.pending() == {} and a.buffered == 0


def test_the_wait_is_bounded() -> None:
    clock = Clock()
    a = Aligner(max_wait_s=0.5, lagging=lambda tp: True, clock=clock)
    a.assign([("a", 0), ("b", 0)])
    a.add([msg("a", 0, 10)])
    assert a.release() == []
    clock.now = 0.6
    assert seen(a.release()) == [("a", 0)]


def test_caught_up_partitions_never_wait_and_errors_pass_through() -> None:
    class Failed(M):
        def error(self) -> object:  # type: ignore[override]
            return "broker down"

    a = Aligner(max_wait_s=10.0, lagging=lambda tp: False)
    a.assign([("a", 0), ("b", 0)])
    bad = Failed("a", 0, -1, (0, 0), None, None)
    assert a.add([msg("a", 0, 30), bad, msg("a", 1, 20)]) == [bad]
    # Order within a partition is kept even when its timestamps go backwards.
    assert seen(a.release()) == [("a", 0), ("a", 1)]


def test_clear_forgets_everything() -> None:
    a = Aligner(max_wait_s=1.0, lagging=lambda tp: False)
    a.add([msg("a", 0, 1), msg("b", 0, 2)])
    a.clear()
    assert a.release() == [] and a.pending() == {} and a.buffered == 0


fetches = st.lists(
    st.tuples(st.sampled_from(["clicks", "purchases", "labels"]), st.integers(0, 1), st.integers(1, 20)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(fetches, st.integers(0, 2**32))
def test_every_record_once_in_partition_order_and_heads_in_time_order(
    plan: list[tuple[str, int, int]], seed: int
) -> None:
    import random

    rng = random.Random(seed)
    a = Aligner(max_wait_s=0.0, lagging=lambda tp: False)
    offsets: dict[tuple[str, int], int] = {}
    waiting: dict[tuple[str, int], list[M]] = {}  # added, not yet released, per partition
    sent: list[M] = []
    out: list[M] = []
    for topic, partition, n in plan:
        batch = []
        for _ in range(n):
            off = offsets.get((topic, partition), 0)
            offsets[(topic, partition)] = off + 1
            batch.append(msg(topic, off, rng.randrange(1000), partition))
        sent += batch
        waiting.setdefault((topic, partition), []).extend(batch)
        a.add(batch)
        for r in a.release():
            tp = (r.topic(), r.partition())
            assert waiting[tp][0] is r  # each partition in its own order
            # No other partition's next record is earlier (nothing is lagging, so nothing waits).
            assert all(q[0].timestamp()[1] >= r.timestamp()[1] for k, q in waiting.items() if q and k != tp)
            waiting[tp].pop(0)
            out.append(r)
    assert sorted(seen(out)) == sorted(seen(sent)) and len(out) == len(sent)
