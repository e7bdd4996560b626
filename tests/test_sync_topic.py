"""Model sync between tasks (``stream.sync_topic``): LocalSync, the wire format, and TopicSync over a real broker."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from river import linear_model, optim

from stream.config import parse_config
from stream.learners.base import Learner
from stream.sync import Params, Table, count_params
from stream.sync_topic import LocalSync, TopicSync, decode_params, encode_params, make_sync
from stream.task_sync import NoSync


class Lin(Learner):
    """A learner with a linear model and a counter: the smallest thing with global parameters."""

    kind = "lin"

    def __init__(self) -> None:
        super().__init__("lin", "out", frozenset({"in"}))
        self.model = linear_model.LinearRegression(optimizer=optim.SGD(0.05), intercept_lr=0.05)
        self.seen = 0

    def predict(self, event: Any) -> None:
        return None

    def learn(self, event: Any) -> None:
        self.model.learn_one(event, sum(event.values()))
        self.seen += 1

    def global_params(self) -> Params:
        params = super().global_params()
        params.update(count_params({"seen": self.seen}))
        return params

    def set_global_params(self, params: Params) -> None:
        super().set_global_params(params)
        self.seen = round(params.counts.get("c|seen", self.seen))


def learn(learner: Lin, task: int, n: int, features: int = 3) -> None:
    rng = np.random.default_rng(task)
    for _ in range(n):
        learner.learn({f"f{j}": float(rng.random()) for j in rng.choice(features, size=min(3, features))})


def test_local_sync_merges_when_due_and_stamps_the_version() -> None:
    now = [0.0]
    sync = LocalSync(every_events=10, every_s=60.0, clock=lambda: now[0])
    tasks = {0: [Lin()], 1: [Lin()]}
    learn(tasks[0][0], 0, 6)  # type: ignore[arg-type]
    sync.tick(tasks, 6)
    assert sync.merges == 0 and sync.version(0) == 0
    learn(tasks[1][0], 1, 4)  # type: ignore[arg-type]
    sync.tick(tasks, 4)  # 10 events: due
    assert sync.merges == 1 and sync.version(0) == sync.version(1) == 1
    a, b = tasks[0][0].model, tasks[1][0].model
    assert a.weights == b.weights and a.intercept == b.intercept
    assert tasks[0][0].seen == tasks[1][0].seen == 10  # type: ignore[attr-defined]
    sync.tick(tasks, 1)
    assert sync.merges == 1
    now[0] = 61.0  # the clock makes it due too, but only with events
    sync.tick(tasks, 0)
    assert sync.merges == 2
    sync.tick(tasks, 0)
    assert sync.merges == 2


def test_a_task_that_joins_later_adds_its_learning_and_takes_the_merged_model() -> None:
    sync = LocalSync(every_events=1, every_s=60.0)
    tasks = {0: [Lin()]}
    learn(tasks[0][0], 0, 5)  # type: ignore[arg-type]
    sync.tick(tasks, 5)
    late = Lin()
    learn(late, 7, 3)
    tasks[7] = [late]
    sync.tick(tasks, 3)
    assert late.seen == tasks[0][0].seen == 8  # type: ignore[attr-defined]
    assert late.model.weights == tasks[0][0].model.weights  # type: ignore[attr-defined]


def test_make_sync_is_nothing_for_one_task_or_when_off() -> None:
    config = parse_config({})
    assert isinstance(make_sync(config, "a", 1), NoSync)
    assert isinstance(make_sync(parse_config({"sync": {"enabled": False}}), "a", 4), NoSync)
    sync = make_sync(config, "a", 4)  # no broker contacted until the first merge
    assert isinstance(sync, TopicSync) and sync.topic == "stream.model-sync"


def test_sync_config_is_validated_at_start_up() -> None:
    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        parse_config({"sync": {"mode": "median"}})
    with pytest.raises(ConfigError, match="chunk_bytes"):
        parse_config({"sync": {"chunk_bytes": 10}})


def test_the_wire_format_round_trips_and_refuses_what_it_did_not_write() -> None:
    params = Params(weights={"l0|x": 0.5, "l0|": -1.0, "i|a": np.arange(3.0),
                             "t": Table(["x", "y"], np.arange(6.0).reshape(2, 3))}, counts={"c|n": 3.0},
                    decayed={"a": 2.5}, ref_ms=1e12, tau_ms=5e6)  # fmt: skip
    back = decode_params(encode_params(params))
    assert back.weights.pop("i|a").tolist() == [0.0, 1.0, 2.0]  # type: ignore[union-attr]
    table = back.weights.pop("t")
    assert isinstance(table, Table) and table.ids == ["x", "y"] and table.matrix.tolist()[1] == [3.0, 4.0, 5.0]
    assert back.weights == {"l0|x": 0.5, "l0|": -1.0} and back.counts == params.counts
    assert back.decayed == params.decayed and (back.ref_ms, back.tau_ms) == (1e12, 5e6)
    with pytest.raises(ValueError, match="where-it-was"):
        decode_params(b"\x93not msgpack of params", "where-it-was")
    bad = Params(weights={"i|a": np.array([np.nan])})
    with pytest.raises(ValueError, match="not finite"):
        decode_params(encode_params(bad))
    torn = encode_params(Params(weights={"t": Table(["x", "y"], np.ones((2, 3)))})).replace(b"\xa1y", b"\xa1x")
    with pytest.raises(ValueError, match="table"):
        decode_params(torn)  # the same id twice


class _Msg:
    def __init__(self, key: str, value: bytes, offset: int = 5) -> None:
        self._key, self._value, self._offset = key.encode(), value, offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return self._offset


class _Planted:
    """Unpickling this would create a file: the sync topic must never unpickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_a_planted_record_is_passed_over_never_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sync = TopicSync(parse_config({}), "a")
    marker = tmp_path / "ran"
    with caplog.at_level(logging.WARNING, logger="stream.sync_topic"):
        sync._index(_Msg("3:lin", pickle.dumps(_Planted(marker)), offset=42))  # type: ignore[arg-type]
        sync._index(_Msg("nonsense", b"\x80"))  # type: ignore[arg-type]
    assert not marker.exists()
    assert "lin" not in sync.mergers
    warnings = [r for r in caplog.records if r.getMessage() == "model sync: record passed over"]
    assert len(warnings) == 2 and warnings[0].offset == 42 and warnings[0].key == "3:lin"  # type: ignore[attr-defined]


def test_no_broker_never_raises_and_still_merges_this_instances_tasks(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({"kafka": {"bootstrap_servers": "127.0.0.1:1"}, "sync": {"every_events": 1}})
    sync = TopicSync(config, "a", timeout_s=0.5)
    tasks = {0: [Lin()], 1: [Lin()]}
    learn(tasks[0][0], 0, 3)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="stream.sync_topic"):
        sync.tick(tasks, 3)
    assert sync.merges == 1 and tasks[1][0].seen == 3  # type: ignore[attr-defined]
    assert any("not reachable" in r.getMessage() for r in caplog.records)
    sync.close()


# -- a real broker -------------------------------------------------------------------------------


@pytest.fixture
def two_instances(kafka_bootstrap: str, topic_prefix: str) -> Iterator[tuple[TopicSync, TopicSync]]:
    config = parse_config({"kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": topic_prefix},
                           "sync": {"chunk_bytes": 16 * 1024, "every_events": 1}})  # fmt: skip
    a, b = TopicSync(config, "a", timeout_s=30), TopicSync(config, "b", timeout_s=30)
    yield a, b
    a.close()
    b.close()


def test_two_instances_converge_through_the_topic(two_instances: tuple[TopicSync, TopicSync]) -> None:
    a, b = two_instances
    tasks_a = {0: [Lin()], 1: [Lin()]}
    tasks_b = {2: [Lin()], 3: [Lin()]}
    for task, (learner,) in {**tasks_a, **tasks_b}.items():
        # 2,000 features: a contribution of ~40 KiB, written as chunks of 16 KiB.
        learn(learner, task, 400, features=2000)  # type: ignore[arg-type]
    # A merge takes what its consumer has fetched, never waiting in the loop; read() catches up to the
    # topic's end, so after A, B, A, B (each flushing, then the other reading up to its records) both
    # hold every task's contribution.
    for sync, tasks in ((a, tasks_a), (b, tasks_b), (a, tasks_a), (b, tasks_b)):
        sync.read()
        sync.tick(tasks, 1)
        assert sync.flush() == 0
    assert a.bytes_sent > 2 * 16 * 1024  # chunked
    learners = [learner for tasks in (tasks_a, tasks_b) for (learner,) in tasks.values()]
    assert {lr.seen for lr in learners} == {1600}  # type: ignore[attr-defined]
    first = learners[0].model  # type: ignore[attr-defined]
    assert len(first.weights) > 1500  # features learned by any task reach every task
    for other in learners[1:]:
        assert other.model.weights == pytest.approx(first.weights)  # type: ignore[attr-defined]
        assert other.model.intercept == pytest.approx(first.intercept)  # type: ignore[attr-defined]
    # A new instance with an empty disk reads the same parameters back from the topic alone.
    c = TopicSync(a.config, "c", timeout_s=30)
    try:
        c.read()
        merged = c.mergers["lin"].merged()
        assert merged.counts["c|seen"] == 1600
        assert merged.weights["l0|f7"] == pytest.approx(first.weights["f7"])
        assert c.peer_versions == {"a": 2, "b": 2}
    finally:
        c.close()


def test_a_task_taken_over_adopts_the_merged_model(two_instances: tuple[TopicSync, TopicSync]) -> None:
    a, b = two_instances
    tasks_a = {0: [Lin()], 1: [Lin()]}
    learn(tasks_a[0][0], 0, 50)  # type: ignore[arg-type]
    learn(tasks_a[1][0], 1, 30)  # type: ignore[arg-type]
    a.tick(tasks_a, 1)
    assert a.flush() == 0
    # Task 1 moves to B, restored there (here: a fresh copy holding what it learned) and learns on.
    moved = Lin()
    learn(moved, 1, 30)
    learn(moved, 11, 10)
    b.read()
    b.tick({1: [moved]}, 1)
    assert b.flush() == 0
    # Its 30 first events are counted once (in the contribution A published), its 10 new ones are not.
    assert moved.seen == 80
    a.read()
    a.tick({0: tasks_a[0]}, 1)
    assert tasks_a[0][0].seen == 80  # type: ignore[attr-defined]
    # Its learning since the take-over reaches the merge at B's next merge.
    learn(moved, 12, 5)
    b.tick({1: [moved]}, 1)
    assert moved.seen == 85
