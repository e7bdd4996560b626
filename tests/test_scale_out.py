"""Scale-out against a real broker: several instances share the tasks of one group.

A task is one partition number of the co-partitioned inputs, with its own copy of
the learners (``stream.tasks``, ``stream.task_state``). Instances run as real
subprocesses (``faults_harness``); they join, leave, are killed -9, and an
instance with an empty disk takes tasks over from the checkpoint topic. After
each scenario:

* nothing lost, nothing learned twice: each task's checkpoint a restart would
  restore (at the committed offsets) equals an oracle trained once, in-process,
  on that task's partitions in offset order (order-sensitive SGD models: equal
  to the last bit), and the tasks' ``n_learned`` add up to the good inputs;
* exactly-once: one committed prediction per good input, one dead letter per bad one.

Every wait is for an event in a log or in Kafka (a task assigned, an offset
committed), never for the machine to be quick.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_harness import Run, Scenario, make_events, parse_log, probes, tail
from kafka_broker import KafkaBroker

pytestmark = pytest.mark.kafka


@pytest.fixture()
def scenarios() -> Iterator[list[Scenario]]:
    made: list[Scenario] = []
    yield made
    for s in made:
        s.close()


#: Each task learns alone, so each task's model can be compared with an oracle trained on its partitions.
NO_SYNC = "\n[sync]\nenabled = false\n"


def new(made: list[Scenario], bootstrap: str, prefix: str, tmp_path: Path, **kw: Any) -> Scenario:
    kw.setdefault("extra", NO_SYNC)
    s = Scenario(bootstrap, prefix, tmp_path, **kw)
    made.append(s)
    return s


def running(run: Run) -> set[int]:
    """The tasks ``run`` runs now, from its log (assigned, minus dropped)."""
    tasks: set[int] = set()
    for ln in run.lines():
        if ln.get("msg") == "partitions assigned" and "task" in ln:
            tasks.add(int(ln["task"]))
        elif ln.get("msg") == "deactivated" and "task" in ln:
            tasks.discard(int(ln["task"]))
    return tasks


def wait(predicate: Any, timeout: float, what: str, *runs: Run) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {r.instance}:\n{tail(r.log, 2500)}" for r in runs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def task_checkpoints(s: Scenario, n_tasks: int) -> dict[int, Any]:
    """Per task, the checkpoint a restart would restore now (offsets <= the committed ones)."""
    from stream.checkpoint_topic import checkpoint_storage
    from stream.task_state import task_store

    cfg = s.config()
    storage = checkpoint_storage(cfg)
    committed = s.committed()
    out: dict[int, Any] = {}
    for task in range(n_tasks):
        mine = {k: (v if v >= 0 else None) for k, v in committed.items() if k[1] == task}
        sel = task_store(cfg, storage, "", task, n_tasks).select(mine, dict.fromkeys(mine, 0))
        assert sel.checkpoint is not None, f"task {task}: no restorable checkpoint: {sel.skipped}"
        out[task] = sel.checkpoint
    return out


def assert_tasks_equal_oracle(s: Scenario, n_tasks: int) -> None:
    """Each task's model, as a restart would make it (the checkpoint it restores, then the records
    from the checkpoint's offsets on relearned), equals one trained once on the task's partitions,
    in offset order. The checkpoint need not be at the end (an instance that loses a task in a
    broker outage hands it on without a final checkpoint); what it learned must be exactly the
    records before its offsets: none twice, none skipped."""
    from stream.config import build_learners
    from stream.pipeline import Pipeline

    class Null:
        def produce(self, *a: Any, **k: Any) -> None:
            pass

    cfg = s.config()
    inputs = s.inputs_in_order()
    good = {st: sum(1 for m in msgs if not m.value().startswith(b'{"event_id": "bad')) for st, msgs in inputs.items()}
    learned = {"reg": 0, "clf": 0}
    for task, ckpt in task_checkpoints(s, n_tasks).items():
        oracle = build_learners(cfg)
        pipe = Pipeline(oracle, Null(), contract_topics=cfg.input_topics(), dead_letter_topic="-")
        for msgs in inputs.values():
            for m in msgs:
                if m.partition() == task:
                    pipe.process(m)  # type: ignore[arg-type]
        at = ckpt.info.offsets
        restored = Pipeline(ckpt.learners, Null(), contract_topics=cfg.input_topics(), dead_letter_topic="-")
        for msgs in inputs.values():
            for m in msgs:
                if m.partition() == task and m.offset() >= at.get((m.topic(), task), 0):
                    restored.process(m)  # type: ignore[arg-type]
        want = {lr.name: lr for lr in oracle}
        for learner in ckpt.learners:
            ref = want[learner.name]
            assert learner.n_learned == ref.n_learned, (task, learner.name, learner.n_learned, ref.n_learned)
            for x in probes():
                assert learner.predict(dict(x)) == ref.predict(dict(x)), (task, learner.name, x)
            learned[learner.name] += learner.n_learned
    assert learned == {"reg": good["a"], "clf": good["b"]}, "every good input learned exactly once, in one task"


def assert_outputs_name_their_task(s: Scenario) -> None:
    """Every committed output carries the Kafka headers ``stream.task`` (the task of its
    source partition) and ``stream.model_version`` (0: no model sync configured)."""
    import json

    seen = 0
    for topic in s.outputs.values():
        for m in s.read(topic):
            headers = dict(m.headers() or [])
            src = json.loads(m.value())["source"]
            assert headers.get("stream.task") == str(src["partition"]).encode(), (headers, src)
            assert headers.get("stream.model_version") == b"0", headers
            seen += 1
    assert seen > 0


def test_instances_join_leave_crash_and_an_empty_disk_takes_over(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """Four tasks, exactly-once, checkpoints in the compacted topic (no shared disk): A runs
    all four; B and C join and take tasks over (A hands them over checkpointed and committed);
    B is killed -9 and its tasks move to the others, restored from Kafka; A leaves; D, a new
    instance with nothing on disk, joins and takes tasks over from the checkpoint topic."""
    n = 4
    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, guarantee="exactly_once", partitions=n)
    s.set_config("checkpoints.storage", '"kafka"')
    s.feed(make_events(8000, seed=21, bad_every=101), chunk=100, interval_s=0.15)
    a = s.start(instance="a")
    wait(lambda: running(a) == set(range(n)), 60, "A to run every task", a)
    b = s.start(instance="b")
    wait(lambda: bool(running(b)), 60, "B to take tasks over", a, b)
    c = s.start(instance="c")
    wait(lambda: bool(running(c)), 60, "C to take tasks over", a, b, c)
    wait(lambda: running(a) | running(b) | running(c) == set(range(n)), 60, "every task to run", a, b, c)
    # A handed its tasks over committed and checkpointed: the successors relearned nothing.
    handed = [ln for r in (b, c) for ln in r.lines() if ln.get("msg") == "restored from checkpoint"]
    assert handed and all(int(ln["relearn_without_publishing"]) == 0 for ln in handed), handed
    assert a.has("tasks revoked: checkpointing and handing over")

    orphans = running(b)
    b.proc.send_signal(signal.SIGKILL)
    assert b.wait(10) == -signal.SIGKILL
    wait(lambda: orphans <= running(a) | running(c), 90, f"B's tasks {sorted(orphans)} to move", a, c)

    assert a.stop() == 0
    wait(lambda: running(c) == set(range(n)), 60, "C to run every task after A left", c)
    d = s.start(instance="d")
    wait(lambda: bool(running(d)), 60, "D to take tasks over", c, d)
    restored = [ln for ln in d.lines() if ln.get("msg") == "restored from checkpoint"]
    assert restored, tail(d.log)
    starting = next(ln for ln in d.lines() if ln.get("msg") == "starting")
    assert str(starting["checkpoints"]).startswith("kafka topic"), starting
    assert not list(s.ckpt_dir.rglob("*.ckpt")), "no checkpoint on any disk: they live in the topic"

    s.fed()
    s.wait_all_committed(120, d)
    assert c.stop() == 0 and d.stop() == 0
    assert_tasks_equal_oracle(s, n)
    s.assert_exactly_once_outputs()
    assert_outputs_name_their_task(s)


def test_two_instances_survive_a_broker_restart(
    kafka_broker: KafkaBroker, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """Four tasks on two instances (at-least-once); the broker is killed mid-stream and
    restarted on the same data. Whatever each instance went through (tasks lost with the
    session, a fenced member replaced, an exit and a supervisor's restart), every input is
    learned exactly once per task and has a prediction."""
    n = 4
    s = new(scenarios, kafka_broker.bootstrap_servers, topic_prefix, tmp_path, partitions=n)
    s.feed(make_events(5000, seed=22, bad_every=97), chunk=100, interval_s=0.15)
    runs = {"a": s.start(instance="a"), "b": s.start(instance="b")}
    wait(lambda: bool(running(runs["a"])) and bool(running(runs["b"])), 60, "both to run tasks", *runs.values())
    wait(lambda: any(o > 0 for o in s.committed().values()), 60, "a first commit", *runs.values())
    kafka_broker.kill()
    assert not kafka_broker.is_running
    time.sleep(8)  # the outage itself: longer than the 6 s session timeout
    kafka_broker.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for name, run in list(runs.items()):
            code = run.proc.poll()
            if code is not None:  # as a supervisor would: restart what exited non-zero
                assert code != 0, f"{name} exited 0 without being asked to stop"
                runs[name] = s.start(instance=name)
        if not (s._feeder and s._feeder.is_alive()) and s.committed() == s.end_offsets():
            break
        time.sleep(0.5)
    s.fed()
    s.wait_all_committed(60)
    for run in runs.values():
        assert run.stop() == 0
    lines = [ln for r in s.runs for ln in r.lines()]
    assert any(ln.get("code") == "_ALL_BROKERS_DOWN" for ln in lines), "the instances saw the broker go away"
    assert_tasks_equal_oracle(s, n)
    s.assert_at_least_once_outputs()


def test_two_instances_with_model_sync_stamp_their_outputs_with_the_merged_version(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """With model sync on (``stream run`` wires ``stream.sync_topic.make_sync``), two instances
    over four tasks merge through the model-sync topic: the outputs' ``stream.model_version``
    header climbs above 0 for every task, and every good input still has a prediction."""
    import json

    n = 4
    sync = "\n[sync]\nevery_events = 200\nevery_s = 1.0\n"
    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, partitions=n, extra=sync)
    s.feed(make_events(4000, seed=23), chunk=100, interval_s=0.1)
    a, b = s.start(instance="a"), s.start(instance="b")
    wait(lambda: bool(running(a)) and bool(running(b)), 60, "both to run tasks", a, b)
    s.fed()
    s.wait_all_committed(120)
    assert a.stop() == 0 and b.stop() == 0
    s.assert_at_least_once_outputs()
    versions: dict[int, int] = {}
    for topic in s.outputs.values():
        for m in s.read(topic):
            headers = dict(m.headers() or [])
            task = int(headers["stream.task"])
            assert task == json.loads(m.value())["source"]["partition"]
            versions[task] = max(versions.get(task, 0), int(headers["stream.model_version"]))
    assert sorted(versions) == list(range(n)) and all(v > 0 for v in versions.values()), versions


def test_inputs_not_co_partitioned_are_refused(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """A learner reading clicks and purchases with different partition counts would see a
    user's events split across tasks: the start is refused (exit 3) with an error naming the
    learner, each topic and its count. Learners reading unrelated topics may differ."""
    from kafka_broker import create_topics
    from kafka_util import group_toml, stream_cli

    prefix = topic_prefix
    create_topics(kafka_bootstrap, [f"{prefix}-clicks", f"{prefix}-events"], partitions=2)
    create_topics(kafka_bootstrap, [f"{prefix}-purchases"], partitions=3)
    cfg = tmp_path / "stream.toml"
    cfg.write_text(group_toml(prefix, kafka_bootstrap, f"{prefix}-group", 2) + f"""
[metrics]
port = 0

[checkpoints]
dir = "{tmp_path / 'ckpt'}"

[learners.rec]
kind = "recommendation"
output_topic = "{prefix}-recommendations"
""")
    log = tmp_path / "run.log"
    proc = stream_cli("run", "--config", str(cfg), log=log)
    assert proc.wait(60) == 3, log.read_text()[-3000:]
    refusal = [ln for ln in parse_log(log) if ln.get("msg") == "refusing to run"]
    reason = str(refusal[0]["reason"]) if refusal else log.read_text()[-3000:]
    assert "learner `rec` reads topics that are not co-partitioned" in reason, reason
    assert f"{prefix}-clicks has 2 partitions" in reason and f"{prefix}-purchases has 3 partitions" in reason
