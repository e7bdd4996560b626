"""Through a real broker: record/replay round trip, and backtest == live run.

The equality test replays the fixture recording to fresh single-partition
topics *in lockstep* with the running ``Application`` (before switching to
another topic, the replay waits until the application has consumed what was
sent): Kafka orders records only within a partition, so without it a live
consumer of several topics sees them in whatever interleaving its fetches
return, and learners that read several topics (labels joined to predictions,
prices to clicks) would legitimately differ. With it, the live run sees the
recorded order, and its predictions and final metrics must equal the
backtest's to the last digit.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from kafka_broker import create_topics

from stream.app import Application
from stream.backtest import backtest, quality_of
from stream.config import Config, load_config
from stream.demo import isolated_config
from stream.pipeline import BaseObserver
from stream.recording import RecordedMessage, Recording, RecordingWriter
from stream.replay import record, replay

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "recording"
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"


def _config(bootstrap: str, **overrides: Any) -> Config:
    return load_config(None, overrides={"kafka.bootstrap_servers": bootstrap, "metrics.port": 0, **overrides})


def _frames(rec: Recording, topic: str, partition: int) -> list[tuple[Any, ...]]:
    return [(m.offset(), m.timestamp(), m.key(), m.value(), m.headers()) for m in rec.read(topic, partition)]


def test_record_replay_round_trip(
    kafka_bootstrap: str, unique_topics: Callable[..., list[str]], tmp_path: Path
) -> None:
    """Replay the fixture plus awkward records (non-UTF-8 bytes, binary and
    repeated headers, null and empty keys, three partitions) to fresh topics,
    record them back: every partition comes back identical."""
    source = tmp_path / "source"
    fixture = Recording(FIXTURE)
    awkward = [
        RecordedMessage("awkward", p, n, (1, 1_700_000_000_000 + 10 * n + p), key, value, headers)
        for p in range(3)
        for n, (key, value, headers) in enumerate(
            [
                (b"\xff\xfe", b"\x80\x81 not utf-8", [("bin", b"\x00\xff"), ("dup", b"1"), ("dup", b"2")]),
                (None, b'{"no": "key"}', None),
                (b"k", None, [("none", None)]),
                (b"k2", b"x" * 100_000, None),
            ]
        )
    ]
    with RecordingWriter(source, source={"kind": "test"}) as writer:
        for m in fixture.messages():
            writer.write(m)
        for m in awkward:
            writer.write(m)
    src = Recording(source)
    names = {e.topic for e in src.partitions}
    dest = dict(zip(sorted(names), unique_topics(*sorted(names)), strict=True))
    config = _config(kafka_bootstrap)

    result = replay(src, config, topic_map=dest, create_topics=True, progress=False)
    assert result.records == len(src)

    record(config, sorted(dest.values()), tmp_path / "back", start="beginning", until_end=True, progress=False)
    back = Recording(tmp_path / "back")
    assert back.manifest.complete and len(back) == len(src)
    for e in src.partitions:
        assert _frames(back, dest[e.topic], e.partition) == _frames(src, e.topic, e.partition), e.topic

    # --from TIME starts each partition at the first record at or after TIME.
    clicks = list(src.read("clicks", 0))
    middle = clicks[len(clicks) // 2]
    record(config, [dest["clicks"]], tmp_path / "part", start=middle.timestamp()[1], until_end=True, progress=False)
    part = Recording(tmp_path / "part")
    first = next(part.read(dest["clicks"], 0))
    assert first.offset() == next(m.offset() for m in clicks if m.timestamp()[1] >= middle.timestamp()[1])
    assert len(part) == sum(1 for m in clicks if m.offset() >= first.offset())


class _Count(BaseObserver):
    """Application observer: how many records the pipeline has consumed."""

    def __init__(self) -> None:
        self.records = 0
        self.cond = threading.Condition()

    def processed(self, topic: str, record: Any, event: Any) -> None:
        with self.cond:
            self.records += 1
            self.cond.notify_all()

    def dead_lettered(self, topic: str, stage: str) -> None:
        self.processed(topic, None, None)

    def wait_for(self, n: int, timeout_s: float, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.records < n:
                if not alive():
                    raise AssertionError("the application stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the application consumed {self.records} of {n} records in {timeout_s}s")
                self.cond.wait(min(left, 0.5))


def _read(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                assert msg.error() is None, msg.error()
                out.append(msg)
    finally:
        consumer.close()
    return out


def _envelope(value: bytes) -> dict[str, Any]:
    doc = msgspec.json.decode(value)
    doc.pop("predicted_at")  # wall clock live, event time in a backtest
    return doc


def assert_same_outputs(
    expected: Mapping[str, list[tuple[bytes | None, bytes | None, Any]]], live: Mapping[str, list[Any]], dead: str
) -> None:
    """The live run published what the backtest did: every record of every output topic, in order."""
    for topic, rows in expected.items():
        got = live[topic]
        assert len(got) == len(rows), topic
        if topic == dead:
            assert [(m.key(), m.value()) for m in got] == [(k, v) for k, v, _ in rows]
            continue
        assert [m.key() for m in got] == [k for k, _, _ in rows]
        # Every prediction and model version, in order, to the last digit.
        assert [_envelope(m.value()) for m in got] == [_envelope(v) for _, v, _ in rows], topic


def test_backtest_equals_live_run(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    base = load_config(DEFAULT_CONFIG, overrides={"kafka.bootstrap_servers": kafka_bootstrap, "metrics.port": 0})
    config = isolated_config(
        base, prefix=f"{topic_prefix}-", group_id=f"{topic_prefix}-group", checkpoint_dir=tmp_path / "checkpoints"
    )
    # One record per consume(): the lockstep replay waits for each topic switch to be consumed.
    config = msgspec.structs.replace(
        config, processing=msgspec.structs.replace(config.processing, batch_size=1, poll_timeout_s=0.05)
    )
    fixture = Recording(FIXTURE)
    topic_map = {recorded: config.input_topics()[stream] for stream, recorded in fixture.manifest.streams.items()}
    outputs = sorted({spec.output_topic for spec in config.learners.values()} | {config.topics.dead_letters})
    # Every input topic the learners read, the fixture's and the ones it has none of (searches).
    inputs = {*topic_map.values(), *config.input_topics().values()}
    create_topics(kafka_bootstrap, sorted({*inputs, *outputs}), partitions=1)

    expected = backtest(fixture, config, topic_map=topic_map, keep_outputs=True, progress=False, chart=False)
    assert expected.outputs, "the configured learners published nothing"

    count = _Count()
    app = Application(config, observer=count)
    read = {t for learner in app.learners for t in learner.reads}

    def barrier(produced: Mapping[str, int]) -> None:
        count.wait_for(sum(n for t, n in produced.items() if t in read), 60.0, thread.is_alive)

    thread = threading.Thread(target=app.run, name="live", daemon=True)
    thread.start()
    try:
        replay(fixture, config, topic_map=topic_map, progress=False, barrier=barrier)
        live = {
            topic: _read(kafka_bootstrap, topic, len(expected.produced.get(topic, [])))
            for topic in outputs
            if expected.produced.get(topic)
        }
    finally:
        app.stop()
        thread.join(60)
    assert not thread.is_alive()

    assert_same_outputs(expected.produced, live, config.topics.dead_letters)

    by_name = {learner.name: learner for learner in app.learners}
    for name, info in expected.learners.items():
        learner = by_name[name]
        assert quality_of(learner) == info["quality"], name
        assert (learner.n_learned, learner.model_version) == (info["n_learned"], info["model_version"]), name


def test_cli_simulate_to_kafka_record_and_paced_replay(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream simulate --to-kafka` then `stream record` gives the same records,
    per topic in order, as `stream simulate --out` of the same seed."""
    from stream.cli import main

    conf = tmp_path / "conf.toml"
    names = {"clicks": "clicks", "purchases": "purchases", "prices": "prices", "fraud_labels": "fraud-labels"}
    conf.write_text(
        "[topics]\npartitions = 1\n"
        + "".join(f'{stream} = "{topic_prefix}-{topic}"\n' for stream, topic in names.items())
    )
    common = ["--config", str(conf), "--bootstrap-servers", kafka_bootstrap, "--no-progress"]
    sim = ["simulate", "--events", "3000", "--seed", "9", "--users", "300", "--items", "100", "--bad-records", "4"]
    assert main([*sim, "--to-kafka", "--create-topics", "--truth", str(tmp_path / "truth.json"), *common]) == 0
    assert main([*sim, "--out", str(tmp_path / "file"), "--config", str(conf), "--no-progress"]) == 0
    topics = [f"{topic_prefix}-{t}" for t in names.values()]
    rec = ["record", "--topics", ",".join(topics), "--from-beginning", "--until-end"]
    assert main([*rec, "--out", str(tmp_path / "kafka"), *common]) == 0
    capsys.readouterr()

    from_kafka, from_file = Recording(tmp_path / "kafka"), Recording(tmp_path / "file")
    assert len(from_kafka) == len(from_file) == 3000
    for topic in topics:
        got = [(m.key(), m.value(), m.timestamp(), m.headers()) for m in from_kafka.read(topic, 0)]
        assert got == [(m.key(), m.value(), m.timestamp(), m.headers()) for m in from_file.read(topic, 0)]
    assert json.loads((tmp_path / "truth.json").read_text())["events"] == 3000

    # Paced replay (a 30-minute recording at x2000) to other topics, then recorded back whole.
    copies = [f"{t}-copy" for t in topics]
    mapping = [f"--topic-map={t}={c}" for t, c in zip(topics, copies, strict=True)]
    assert main(["replay", str(tmp_path / "kafka"), "--to-kafka", "--speed", "x2000", "--create-topics", *mapping,
                 *common]) == 0  # fmt: skip
    assert "all delivered" in capsys.readouterr().out
    assert main(["record", "--topics", ",".join(copies), "--from-beginning", "--until-end", "--out",
                 str(tmp_path / "copy"), *common]) == 0  # fmt: skip
    copy = Recording(tmp_path / "copy")
    for topic, dup in zip(topics, copies, strict=True):
        assert [(m.key(), m.value(), m.timestamp()) for m in copy.read(dup, 0)] == [
            (m.key(), m.value(), m.timestamp()) for m in from_kafka.read(topic, 0)
        ]


def test_demo_through_kafka(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    from stream.cli import main

    args = ["demo", "--events", "4000", "--metrics-port", "0", "--bootstrap-servers", kafka_bootstrap, "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Kafka demo run of" in printed and "against the simulator's ground truth" in printed


def test_replay_warns_on_short_retention_and_rewrites_timestamps(
    kafka_bootstrap: str, unique_topics: Callable[..., list[str]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A 2023 recording replayed as it is into a topic with retention.ms = 1 h is warned
    about (stderr, naming the topic and the flag); with --rewrite-timestamps there is no
    warning and the records arrive with recent timestamps, in order, spacing kept."""
    from stream.cli import main

    old = 1_700_000_000_000
    src = tmp_path / "old"
    with RecordingWriter(src, source={"kind": "test"}) as writer:
        for n in range(20):
            writer.write(RecordedMessage("events", 0, n, (1, old + 500 * n), b"k", f'{{"n": {n}}}'.encode(), None))
    short, rewritten = unique_topics("short", "rewritten")
    create_topics(kafka_bootstrap, [short, rewritten], partitions=1, config={"retention.ms": "3600000"})
    common = ["--bootstrap-servers", kafka_bootstrap, "--no-progress"]

    assert main(["replay", str(src), "--to-kafka", f"--topic-map=events={short}", *common]) == 0
    err = capsys.readouterr().err
    assert f"warning: topic {short}:" in err and "retention.ms" in err and "--rewrite-timestamps" in err

    before = int(time.time() * 1000)
    assert main(["replay", str(src), "--to-kafka", f"--topic-map=events={rewritten}", "--rewrite-timestamps",
                 *common]) == 0  # fmt: skip
    after = int(time.time() * 1000)
    assert "warning" not in capsys.readouterr().err
    got = [(m.timestamp()[1], m.value()) for m in _read(kafka_bootstrap, rewritten, 20)]
    assert [v for _, v in got] == [f'{{"n": {n}}}'.encode() for n in range(20)]
    stamps = [t for t, _ in got]
    assert before <= stamps[-1] <= after
    assert [b - a for a, b in itertools.pairwise(stamps)] == [500] * 19
