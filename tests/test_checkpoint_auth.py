"""Checkpoint authentication through the real ``stream run`` against a real broker.

A checkpoint planted in the group's checkpoint directory with a higher sequence
number and the right offsets, whose pickle would create a marker file when
loaded, is passed over by a service with a checkpoint key (logged as an error
naming it) and the genuine, signed checkpoint is restored; periodic
checkpoints written by the forked child are signed; a wrong key is refused;
without a key the same planted file runs (the test can fail).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_harness import Run, Scenario, make_events, tail
from test_state import KEY, OTHER_KEY, _forge, _keys

from stream.state import CheckpointStore

pytestmark = pytest.mark.kafka


@pytest.fixture()
def scenario(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Scenario]:
    s = Scenario(kafka_bootstrap, topic_prefix, tmp_path, guarantee="at_least_once", every_events=200)
    yield s
    s.close()


def _use_key_file(s: Scenario, key_file: Path | None) -> None:
    lines = [ln for ln in s.config_path.read_text().splitlines() if not ln.startswith("key_file =")]
    if key_file is not None:
        lines.insert(lines.index("[checkpoints]") + 1, f'key_file = "{key_file}"')
    s.config_path.write_text("\n".join(lines) + "\n")


def _wait_exit(run: Run, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return run.wait(1.0)


def test_a_planted_checkpoint_is_refused_by_stream_run_and_never_runs(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    keys = _keys(KEY)
    key_file = tmp_path / "checkpoint.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    _use_key_file(s, key_file)

    # 1. A keyed service: every checkpoint it writes is signed, the forked background ones too.
    s.produce(make_events(1500, seed=21, bad_every=101))
    first = s.run_to_end()
    lines = first.lines()
    assert [ln["checkpoint_key_id"] for ln in lines if ln.get("msg") == "starting"] == [keys.signing_id]
    background = [ln["checkpoint"] for ln in lines if ln.get("msg") == "checkpoint written" and ln.get("background")]
    assert background, tail(first.log)
    store = CheckpointStore.for_config(s.config(), keys=keys)
    names = store.names()
    assert names and all(store.verify(n).key_id == keys.signing_id for n in names)
    for name in set(background) & set(names):
        assert store.verify(name).key_id == keys.signing_id
    assert not any("checkpoints are unauthenticated" in str(ln.get("msg")) for ln in lines)

    # 2. Planted: the newest genuine header (the committed offsets) with higher sequence numbers and a
    # pickle that creates a marker file; one unsigned, one signed with another key.
    genuine = store.info(names[0])
    top = store.seq_of(names[0]) or 0
    marker = tmp_path / "pwned"
    planted = {
        f"ckpt-{top + 10:012d}-0badf00d.ckpt": _forge(genuine, marker, top + 10),
        f"ckpt-{top + 11:012d}-0badf00d.ckpt": _forge(genuine, marker, top + 11, _keys(OTHER_KEY)),
    }
    for name, data in planted.items():
        store.storage.write(name, data)
    assert store.names()[:2] == sorted(planted, reverse=True)

    s.produce(make_events(500, seed=22))
    run = s.run_to_end()
    assert not marker.exists(), tail(run.log)
    refused = [ln for ln in run.lines() if ln.get("refused")]
    assert {ln["checkpoint"] for ln in refused} == set(planted), tail(run.log)
    assert all(ln["level"] == "error" and ln["checkpoint"] in str(ln["reason"]) for ln in refused)
    restored = [ln for ln in run.lines() if ln.get("msg") == "restored from checkpoint"]
    assert restored and restored[0]["checkpoint"] == genuine.name, tail(run.log)
    s.assert_model_equals_oracle(s.restored_checkpoint().learners)
    s.assert_at_least_once_outputs()
    for r in s.runs:
        assert KEY not in r.log.read_text(), f"the key leaked into {r.log}"

    # 3. A wrong key (a third one): nothing authenticates, so the start is refused (committed offsets, no usable
    # checkpoint), naming the files; nothing is unpickled.
    wrong = tmp_path / "wrong.key"
    wrong.write_text("0011223344556677" * 4 + "\n")  # neither ours nor the planter's
    wrong.chmod(0o600)
    _use_key_file(s, wrong)
    present = set(store.names())  # the genuine ones the second run kept (it prunes older ones), and the planted
    assert set(planted) <= present
    run = s.start()
    assert _wait_exit(run, 60) == 3, tail(run.log)
    assert {ln["checkpoint"] for ln in run.lines() if ln.get("refused")} == present
    assert not marker.exists()

    # 4. Anti-vacuity: without a key the service warns once, then restores the planted checkpoint and runs it.
    _use_key_file(s, None)
    newest = store.names()[0]  # planted again over the newest genuine checkpoint (offsets = the committed ones)
    seq = (store.seq_of(newest) or 0) + 1
    store.storage.write(f"ckpt-{seq:012d}-0badf00d.ckpt", _forge(store.info(newest), marker, seq))
    run = s.start()
    deadline = time.monotonic() + 60
    while not marker.exists() and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if run.proc.poll() is None:
        run.stop()
    assert marker.exists(), tail(run.log)
    warned = [ln for ln in run.lines() if "checkpoints are unauthenticated" in str(ln.get("msg"))]
    assert len(warned) == 1 and warned[0]["level"] == "warning"
