"""Fault tests: the pipeline as a real subprocess against a real broker, crashed,
restarted, starved and rebalanced; after each, what Kafka committed and the final
model are checked against an oracle trained once, in-process, on the same inputs.

Invariants (docs/guarantees.md):
* no input left unlearned, none learned twice: the final model (the checkpoint a
  restart would restore) equals the oracle, and ``n_learned`` equals the number
  of good inputs;
* at-least-once: every good input has a prediction (duplicates allowed);
* exactly-once: every good input has exactly one committed prediction, every bad
  one exactly one dead letter (read_committed, keyed by source topic/partition/offset).

Every test first asserts that its fault really happened (exit code -9 and the
"fault injected" line, the restore in the log, aborted records in the output log).
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_harness import Run, Scenario, make_events, tail
from kafka_broker import KafkaBroker

from stream.app import DROPPED, STANDBY

pytestmark = pytest.mark.kafka


@pytest.fixture()
def scenarios(tmp_path: Path) -> Iterator[list[Scenario]]:
    made: list[Scenario] = []
    yield made
    for s in made:
        s.close()


def new(made: list[Scenario], bootstrap: str, prefix: str, tmp_path: Path, **kw: object) -> Scenario:
    s = Scenario(bootstrap, prefix, tmp_path, **kw)  # type: ignore[arg-type]
    made.append(s)
    return s


def restores(run: Run) -> list[dict[str, object]]:
    return [ln for ln in run.lines() if ln.get("msg") == "restored from checkpoint"]


# --------------------------------------------------------------------------- kill -9 at named points


AT_LEAST_ONCE_POINTS = [
    "mid_batch:700",
    "after_produce_before_commit:4",
    "mid_checkpoint_write:2",
    "after_checkpoint_before_commit:2",
    "after_commit:5",
]
EXACTLY_ONCE_POINTS = [
    "mid_batch:700",
    "after_produce_before_commit:4",
    "mid_checkpoint_write:2",
    "after_checkpoint_before_commit:2",
    "after_send_offsets_before_commit:3",
    "after_commit:5",
]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_kill_at_every_point_of_the_commit_protocol(
    guarantee: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """kill -9 mid-batch, between produce and commit, during a checkpoint write, between
    the checkpoint and the commit, (EOS) between send_offsets and commit, and just after
    the commit; restarted each time; then run to the end."""
    # At-least-once commits outside checkpoints only when fewer events than a checkpoint's
    # worth arrive per commit: with the backlog each restart meets, a larger interval keeps
    # commits between checkpoints, so some restart has something to relearn.
    every = 300 if guarantee == "exactly_once" else 1000
    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, guarantee=guarantee, every_events=every)
    points = EXACTLY_ONCE_POINTS if guarantee == "exactly_once" else AT_LEAST_ONCE_POINTS
    s.feed(make_events(6000, seed=1, bad_every=97), chunk=100, interval_s=0.3)
    crashed = [s.crash_at(point) for point in points]

    # Anti-vacuity: every restart after the first crash restored a checkpoint, and the
    # crash between the checkpoint write and the commit left a checkpoint that was passed over.
    for run in [*crashed[1:]]:
        assert restores(run), f"{run.fault}: no restore logged"
    after_ckpt = crashed[points.index("after_checkpoint_before_commit:2") + 1]
    assert any(ln.get("msg") == "checkpoint passed over" and "ahead of the committed" in str(ln.get("reason"))
               for ln in after_ckpt.lines()), tail(after_ckpt.log)
    assert any(int(r.get("relearn_without_publishing", 0)) > 0 for run in crashed for r in restores(run)), \
        "some restart relearned events without publishing"

    final = s.run_to_end()
    assert restores(final)
    s.assert_model_equals_oracle(s.restored_checkpoint().learners, exact=True)
    if guarantee == "exactly_once":
        s.assert_exactly_once_outputs()
        assert s.aborted_records() > 0, "killed transactions left aborted records in the output log"
    else:
        outs = s.assert_at_least_once_outputs()
        assert sum(outs.values()) > len(outs), "a crash after publishing, before committing, repeats predictions"


# --------------------------------------------------------------------------- repeated random kills


def test_repeated_random_kills_exactly_once(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """Five seeded random crashes: fault points at random counts, or an outside kill -9
    after a random delay; the invariants hold and old checkpoints are pruned."""
    rng = random.Random(20261129)
    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, guarantee="exactly_once", every_events=200)
    s.feed(make_events(6000, seed=2, bad_every=113), chunk=100, interval_s=0.3)
    points = ["mid_batch", "after_produce_before_commit", "mid_checkpoint_write", "after_checkpoint_before_commit",
              "after_send_offsets_before_commit", "after_commit"]
    for _ in range(5):
        if rng.random() < 0.3:
            run = s.start()
            _wait(lambda run=run: run.has("partitions assigned"), 30, "the run to start consuming")  # type: ignore[misc]
            time.sleep(rng.uniform(0.2, 1.5))
            assert run.proc.poll() is None, tail(run.log)
            run.proc.send_signal(signal.SIGKILL)
            assert run.wait(10) == -signal.SIGKILL
        else:
            point = rng.choice(points)
            s.crash_at(f"{point}:{rng.randint(300, 900) if point == 'mid_batch' else rng.randint(1, 4)}")
    final = s.run_to_end()
    assert restores(final)
    s.assert_model_equals_oracle(s.restored_checkpoint().learners, exact=True)
    s.assert_exactly_once_outputs()
    assert s.aborted_records() > 0
    assert len(list(s.ckpt_dir.glob("*/ckpt-*.ckpt"))) <= 4 + 1, "old checkpoints are pruned"


# --------------------------------------------------------------------------- corrupt, foreign or missing state


def test_truncated_foreign_and_missing_checkpoints(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """(i) a truncated newest checkpoint is rejected by checksum and the previous one is
    restored; (ii) one stamped with another River version is refused with a clear error;
    (iii) with all checkpoints gone but committed offsets, the start is refused, and with
    on_missing = "rewind" everything is relearned from the beginning without publishing."""
    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, guarantee="exactly_once")
    s.produce(make_events(2000, seed=3, bad_every=101))
    s.run_to_end()
    ckpts = sorted(s.ckpt_dir.glob("*/ckpt-*.ckpt"))
    assert len(ckpts) >= 2
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:-50])

    s.produce(make_events(1000, seed=4))
    run = s.run_to_end()
    passed = [ln for ln in run.lines() if ln.get("msg") == "checkpoint passed over"]
    assert passed and passed[0]["checkpoint"] == newest.name and "payload" in str(passed[0]["reason"])
    restored = restores(run)[0]
    assert restored["checkpoint"] != newest.name and int(restored["relearn_without_publishing"]) > 0
    s.assert_model_equals_oracle(s.restored_checkpoint().learners)
    s.assert_exactly_once_outputs()

    # (ii) Another River version wrote the newest checkpoint: refuse, exit 3, say why.
    from test_state import _restamp

    newest = sorted(s.ckpt_dir.glob("*/ckpt-*.ckpt"))[-1]
    original = newest.read_bytes()
    newest.write_bytes(_restamp(original, river="0.21.0"))
    run = s.start()
    assert run.wait(60) == 3
    refusal = [ln for ln in run.lines() if ln.get("msg") == "refusing to run"]
    assert refusal and "written with river 0.21.0" in str(refusal[0]["reason"])
    newest.write_bytes(original)

    # (iii) No checkpoint at all, committed offsets present: never a fresh model at those offsets.
    for p in s.ckpt_dir.glob("*/ckpt-*.ckpt"):
        p.unlink()
    run = s.start()
    assert run.wait(60) == 3
    refusal = [ln for ln in run.lines() if ln.get("msg") == "refusing to run"]
    assert refusal and "no checkpoint" in str(refusal[0]["reason"]) and "rewind" in str(refusal[0]["reason"])
    s.set_config("checkpoints.on_missing", '"rewind"')
    s.produce(make_events(500, seed=5))
    run = s.run_to_end()
    assert any(ln.get("msg") == "no checkpoint: starting untrained learners"
               and int(ln["relearn_without_publishing"]) == 3000 for ln in run.lines()), tail(run.log)
    s.assert_model_equals_oracle(s.restored_checkpoint().learners)
    s.assert_exactly_once_outputs()  # relearning from the beginning published nothing twice


# --------------------------------------------------------------------------- broker faults


def test_broker_hard_restart_mid_stream(
    kafka_broker: KafkaBroker, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """The broker is SIGKILLed mid-stream and stays down longer than the transaction timeout
    (10 s), then restarts on the same data: the open transaction cannot commit; the pipeline
    aborts and restores, or exits non-zero and is restarted (as by a supervisor), and
    finishes with exactly-once outputs and the oracle's model."""
    s = new(scenarios, kafka_broker.bootstrap_servers, topic_prefix, tmp_path, guarantee="exactly_once")
    s.produce(make_events(1500, seed=6, bad_every=89))
    run = s.start()
    s.wait_all_committed(60, run)
    s.feed(make_events(3000, seed=7), chunk=100, interval_s=0.1)
    time.sleep(1.5)
    assert run.proc.poll() is None
    kafka_broker.kill()
    assert not kafka_broker.is_running  # the fault happened
    time.sleep(12)
    kafka_broker.start()
    supervised = _supervise(s, run, 120)
    s.fed()
    s.wait_caught_up(supervised[-1], 90)
    s.wait_all_committed(90, supervised[-1])
    assert supervised[-1].stop() == 0
    lines = [ln for r in supervised for ln in r.lines()]
    assert any(ln.get("code") == "_ALL_BROKERS_DOWN" for ln in lines), "the pipeline saw the broker go away"
    # The open transaction could not survive the outage. Whichever way it ended (aborted; the
    # task lost with the session; the producer fenced when the broker timed the transaction
    # out, exit 1 and a restart), the state was restored from a checkpoint afterwards.
    assert any(ln.get("msg") == "restored from checkpoint" for ln in lines), "recovered from a checkpoint"
    s.assert_model_equals_oracle(s.restored_checkpoint().learners)
    s.assert_exactly_once_outputs()


def test_broker_paused_longer_than_the_session_timeout(
    kafka_broker: KafkaBroker, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """SIGSTOP the broker for longer than session.timeout.ms (6 s): the group member's
    session expires; the pipeline gets its task back, restores and goes on (at-least-once).
    Often the broker then fences the old static member (the client's own rejoin under the
    same group.instance.id), a fatal error for that client: the pipeline replaces it."""
    s = new(scenarios, kafka_broker.bootstrap_servers, topic_prefix, tmp_path)
    s.feed(make_events(4000, seed=8, bad_every=103), chunk=100, interval_s=0.3)  # still feeding after the pause
    run = s.start()
    _wait(lambda: run.has("partitions assigned"), 30, "the pipeline to become active")
    time.sleep(1.0)
    kafka_broker.pause()
    assert kafka_broker.is_paused
    time.sleep(9.0)
    kafka_broker.resume()
    supervised = _supervise(s, run, 120)
    s.fed()
    s.wait_caught_up(supervised[-1], 90)
    s.wait_all_committed(90, supervised[-1])
    assert supervised[-1].stop() == 0
    lines = [ln for r in supervised for ln in r.lines()]
    # The group member's session expired during the pause: its commit was rejected (or the
    # task reported lost), the in-memory state dropped, the task taken again and the state restored.
    dropped = DROPPED
    lost = [i for i, ln in enumerate(lines) if ln.get("msg") == dropped]
    assert lost, "the expired session was noticed"
    assert any(ln.get("msg") == "restored from checkpoint" for ln in lines[lost[0] :]), "restored after it"
    # Unarmed at-least-once runs write periodic checkpoints from a forked child.
    assert any(ln.get("msg") == "checkpoint written" and ln.get("background") for ln in lines)
    s.assert_model_equals_oracle(s.restored_checkpoint().learners)
    s.assert_at_least_once_outputs()


def _supervise(s: Scenario, run: Run, timeout: float) -> list[Run]:
    """Like a supervisor: if the pipeline exits non-zero, start it again. Returns the runs."""
    runs = [run]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s.committed() == s.end_offsets() and runs[-1].proc.poll() is None:
            return runs
        code = runs[-1].proc.poll()
        if code is not None:
            assert code != 0, "exited 0 without being asked to stop"
            runs.append(s.start())
        time.sleep(0.5)
    return runs


# --------------------------------------------------------------------------- rebalance


def test_rebalance_second_instance_joins_and_one_leaves(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """Three partitions per topic make three tasks; two instances: A runs all three; B joins
    and takes tasks over (A checkpoints and commits them on the way out, so B relearns
    nothing); A stops cleanly and B runs everything; A comes back and takes tasks again;
    B is killed -9 and A takes everything back from the shared checkpoint directory."""
    from test_scale_out import NO_SYNC, assert_tasks_equal_oracle, running

    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, guarantee="exactly_once", partitions=3,
            extra=NO_SYNC)
    s.feed(make_events(6000, seed=9, bad_every=107), chunk=100, interval_s=0.15)
    a = s.start(instance="a")
    _wait(lambda: running(a) == {0, 1, 2}, 30, "A to run every task")
    b = s.start(instance="b")
    _wait(lambda: bool(running(b)) and running(a) | running(b) == {0, 1, 2}, 30, "B to take tasks over")
    assert a.has("tasks revoked: checkpointing and handing over") and not running(a) & running(b)
    handed = restores(b)
    assert handed and all(int(r["relearn_without_publishing"]) == 0 for r in handed), handed
    assert a.stop() == 0
    _wait(lambda: running(b) == {0, 1, 2}, 30, "B to run every task after A left")
    a2 = s.start(instance="a")
    _wait(lambda: bool(running(a2)), 30, "A to come back and take tasks")
    b.proc.send_signal(signal.SIGKILL)
    assert b.wait(10) == -signal.SIGKILL
    _wait(lambda: running(a2) == {0, 1, 2}, 60, "A to take every task back after B's crash")
    s.fed()
    s.wait_all_committed(90, a2)
    assert a2.stop() == 0
    assert_tasks_equal_oracle(s, 3)
    s.assert_exactly_once_outputs()


def test_zombie_active_instance_paused_past_its_session_is_fenced(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, scenarios: list[Scenario]
) -> None:
    """SIGSTOP the active instance A (mid-stream, mid-transaction) past session.timeout.ms:
    B is assigned the task, restores and opens its own transactional producer (one per
    instance). A, resumed, is a zombie with learned-but-uncommitted events and an open
    transaction: whichever it notices first (its expired session, or its offsets refused
    for a stale group generation, KIP-447), nothing it did after the pause may commit. A
    drops its state and waits as a standby; exactly one committed prediction per input."""
    s = new(scenarios, kafka_bootstrap, topic_prefix, tmp_path, guarantee="exactly_once")
    s.feed(make_events(8000, seed=11, bad_every=101), chunk=100, interval_s=0.15)  # still feeding after
    a = s.start(instance="a")
    _wait(lambda: a.has("partitions assigned"), 30, "A to become active")
    b = s.start(instance="b")
    _wait(lambda: b.has(STANDBY), 30, "B to wait as a standby")
    dropped, standby = DROPPED, STANDBY
    _wait(lambda: any(o > 0 for o in s.committed().values()), 30, "A to commit while B waits")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        _wait(lambda: Path(f"/proc/{a.proc.pid}/stat").read_text().split(") ")[1][0] == "T", 5, "A to stop")
        # What A logged before the pause is final now. On a loaded machine A may already have
        # lost its task before the pause; the zombie case is then the one where it had not.
        held = a.last_of("partitions assigned", dropped) == "partitions assigned"
        n_dropped, n_standby = a.count(dropped), a.count(standby)
        _wait(lambda: bool(restores(b)), 40, "B to take over while A is stopped")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    if held:
        _wait(lambda: a.count(dropped) > n_dropped, 40, "the zombie A to notice it lost its task")
        _wait(lambda: a.count(standby) > n_standby, 30, "A to wait as a standby again")
    s.fed()
    s.wait_caught_up(b, 60)
    s.wait_all_committed(60, b)
    assert b.stop() == 0
    assert a.stop() == 0
    s.assert_model_equals_oracle(s.restored_checkpoint().learners)
    s.assert_exactly_once_outputs()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
