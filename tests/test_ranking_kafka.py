"""The ranking learner through a real broker: a `stream run` application (``Application``) fed a
simulated stream with search and ads requests publishes exactly the rankings the backtest of the
same recording does, and ends with the same model quality (lockstep replay, as in
tests/test_backtest_kafka.py)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import msgspec
import pytest
from kafka_broker import create_topics
from test_backtest_kafka import _Count, _read, assert_same_outputs

from stream.app import Application
from stream.backtest import backtest, quality_of
from stream.config import load_config, parse_config
from stream.demo import isolated_config
from stream.recording import Recording
from stream.replay import replay
from stream.simulate import SimConfig, Simulation, write_recording

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"
SIM = SimConfig(seed=4, events=4_000, n_users=300, n_items=150, n_categories=6, searches_per_session=1.0,
                search_candidates=50, bad_records=3)  # fmt: skip


def test_rankings_through_kafka_equal_the_backtest(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    base = load_config(DEFAULT_CONFIG, overrides={"kafka.bootstrap_servers": kafka_bootstrap, "metrics.port": 0})
    spec = parse_config({"learners": {"ranking": {"kind": "ranking", "min_requests": 50, "label_window_s": 600,
                                                  "shown_order": "original"}}}).learners  # fmt: skip
    config = isolated_config(
        msgspec.structs.replace(base, learners=spec),
        prefix=f"{topic_prefix}-",
        group_id=f"{topic_prefix}-group",
        checkpoint_dir=tmp_path / "checkpoints",
    )
    config = msgspec.structs.replace(
        config, processing=msgspec.structs.replace(config.processing, batch_size=1, poll_timeout_s=0.05)
    )
    write_recording(Simulation(SIM), tmp_path / "rec", parse_config({}).input_topics(), progress=False)
    rec = Recording(tmp_path / "rec")
    assert "searches" in rec.manifest.streams
    topic_map = {recorded: config.input_topics()[stream] for stream, recorded in rec.manifest.streams.items()}
    outputs = [config.learners["ranking"].output_topic, config.topics.dead_letters]
    # The recording's timestamps are from 2023: without a retention of its own, a slow run can
    # see the broker delete records the application has not read yet (offset out of range).
    create_topics(kafka_bootstrap, [*topic_map.values(), *outputs], partitions=1, config={"retention.ms": "-1"})

    expected = backtest(rec, config, topic_map=topic_map, keep_outputs=True, progress=False, chart=False)
    rankings = expected.produced[config.learners["ranking"].output_topic]
    assert len(rankings) == rec.truth().counts["searches"] > 300
    assert {msgspec.json.decode(v)["prediction"]["source"] for _, v, _ in rankings} == {"original", "model"}

    count = _Count()
    app = Application(config, observer=count)
    read = {t for learner in app.learners for t in learner.reads}

    def barrier(produced: Mapping[str, int]) -> None:
        count.wait_for(sum(n for t, n in produced.items() if t in read), 60.0, thread.is_alive)

    thread = threading.Thread(target=app.run, name="live", daemon=True)
    thread.start()
    try:
        replay(rec, config, topic_map=topic_map, progress=False, barrier=barrier)
        live = {t: _read(kafka_bootstrap, t, len(expected.produced.get(t, []))) for t in outputs}
    finally:
        app.stop()
        thread.join(60)
    assert not thread.is_alive()

    assert_same_outputs(expected.produced, live, config.topics.dead_letters)

    (learner,) = app.learners
    info = expected.learners["ranking"]
    assert quality_of(learner) == info["quality"]
    assert (learner.n_learned, learner.model_version) == (info["n_learned"], info["model_version"])
    assert learner.label_stats()["joined"] > 100
