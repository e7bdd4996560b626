"""The hybrid warm start: history learned at backtest speed, written as a checkpoint, served live.

``stream backtest RECORDING --checkpoint-out FILE`` writes the learners as the recording left them (the
normal checkpoint format, at the offsets after the last recorded record); ``stream model import FILE
--whole --at-source`` makes that the checkpoint the service restores. The round trip loses nothing: the
restored learners go on exactly as the learners that learned the history would have (every prediction of
the events after it equal, but for the bumped model version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from stream.backtest import run_backtest, write_checkpoint
from stream.cli import main
from stream.config import default_config_text, load_config
from stream.demo import simulated_records
from stream.recording import RecordedMessage, RecordingWriter
from stream.simulate import SimConfig, Simulation
from stream.state import CheckpointStore

HISTORY = 3_000
LIVE = 1_500


def _config_file(tmp_path: Path) -> Path:
    text = default_config_text().replace('dir = "var/checkpoints"', f'dir = "{tmp_path / "checkpoints"}"')
    assert str(tmp_path) in text
    path = tmp_path / "stream.toml"
    path.write_text(text)
    return path


def _predictions(produced: dict[str, list[tuple[bytes | None, bytes | None, Any]]], dead: str) -> dict[str, list]:
    """Per output topic, (key, learner, prediction) of every output: the model version left out."""
    out: dict[str, list[Any]] = {}
    for topic, rows in produced.items():
        if topic == dead:
            continue
        decoded = [(k, msgspec.json.decode(v)) for k, v, _ in rows if v is not None]
        out[topic] = [(k, e["learner"], e["prediction"], e["predicted_at"]) for k, e in decoded]
    return out


@pytest.fixture(scope="module")
def stream_records() -> list[RecordedMessage]:
    config = load_config(None)
    sim = Simulation(SimConfig(seed=3, events=HISTORY + LIVE, n_users=500, n_items=200, fraud_rate=0.05))
    return list(simulated_records(sim, config.input_topics()))


def test_backtest_checkpoint_is_served_and_goes_on_learning(
    tmp_path: Path, stream_records: list[RecordedMessage]
) -> None:
    cfg = _config_file(tmp_path)
    config = load_config(cfg)
    history, live = stream_records[:HISTORY], stream_records[HISTORY:]
    recording = tmp_path / "history"
    with RecordingWriter(recording, source={"kind": "test"}) as writer:
        for m in history:
            writer.write(m)
    ckpt = tmp_path / "warm.ckpt"
    assert main(["backtest", str(recording), "--config", str(cfg), "--checkpoint-out", str(ckpt),
                 "--no-progress", "--no-chart"]) == 0  # fmt: skip
    assert ckpt.stat().st_size > 0
    assert main(["model", "import", str(ckpt), "--config", str(cfg), "--offline", "--whole", "--at-source"]) == 0

    store = CheckpointStore.for_config(config, instance_id="test", keys=None)
    served = store.latest()
    assert served is not None and served.info.origin is not None and served.info.origin["whole"] is True
    assert served.info.offsets == {(m.topic(), m.partition()): m.offset() + 1 for m in history}

    # The learners that learned the history, going on over the live events ...
    dead = config.topics.dead_letters
    result, run = run_backtest(stream_records, config, keep_outputs=True, progress=False)
    expected = _predictions(result.produced, dead)
    # ... and the served ones, restored from the checkpoint.
    restored = served.learners
    assert [lr.name for lr in restored] == [lr.name for lr in run.learners]
    for lr in restored:
        assert lr.model_version >= 1
    cont, _ = run_backtest(live, config, learners=restored, keep_outputs=True, progress=False)
    got = _predictions(cont.produced, dead)
    assert sum(len(v) for v in got.values()) > 0
    for topic, rows in got.items():
        assert rows == expected[topic][-len(rows) :], topic
    assert {lr.name: lr.n_learned for lr in restored} == {lr.name: lr.n_learned for lr in run.learners}


def test_whole_import_refuses_a_bare_model_and_a_learner_of_another_kind(
    tmp_path: Path, stream_records: list[RecordedMessage]
) -> None:
    cfg = _config_file(tmp_path)
    config = load_config(cfg)
    _, run = run_backtest(stream_records[:500], config, progress=False)
    ckpt = write_checkpoint(tmp_path / "warm.ckpt", run.learners, {}, config)
    # A learner named `risk` that is a pricing learner: refused, nothing written.
    swapped = next(lr for lr in run.learners if lr.name == "pricing")
    swapped.name = "risk"
    other = write_checkpoint(tmp_path / "other.ckpt", [swapped], {}, config)
    assert main(["model", "import", str(other), "--config", str(cfg), "--offline", "--whole"]) == 4
    assert not CheckpointStore.for_config(config, keys=None).names()
    assert main(["model", "import", str(ckpt), "--config", str(cfg), "--offline", "--whole"]) == 0


def test_a_signed_backtest_checkpoint_is_served_only_by_its_own_deployment(
    tmp_path: Path, stream_records: list[RecordedMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a checkpoint key, the backtest's checkpoint is signed with it: the deployment holding the
    key imports it, another one (another key) refuses it before unpickling anything."""
    cfg = _config_file(tmp_path)
    recording = tmp_path / "history"
    with RecordingWriter(recording, source={"kind": "test"}) as writer:
        for m in stream_records[:500]:
            writer.write(m)
    ckpt = tmp_path / "warm.ckpt"
    monkeypatch.setenv("STREAM_CHECKPOINT_KEY", "k" * 40)
    assert main(["backtest", str(recording), "--config", str(cfg), "--checkpoint-out", str(ckpt),
                 "--no-progress", "--no-chart"]) == 0  # fmt: skip
    monkeypatch.setenv("STREAM_CHECKPOINT_KEY", "o" * 40)
    assert main(["model", "import", str(ckpt), "--config", str(cfg), "--offline", "--whole"]) == 4
    monkeypatch.setenv("STREAM_CHECKPOINT_KEY", "k" * 40)
    assert main(["model", "import", str(ckpt), "--config", str(cfg), "--offline", "--whole"]) == 0
    served = CheckpointStore.for_config(load_config(cfg)).latest()
    assert served is not None and served.info.key_id
