"""Recordings without a broker: exact round trip, the Record protocol, merge order,
integrity checks, backtests (deterministic, reported) and the CLI commands."""

from __future__ import annotations

import gzip
import io
import itertools
import json
from pathlib import Path

import pytest

from stream.backtest import backtest, run_backtest
from stream.cli import main
from stream.config import Config, load_config
from stream.pipeline import Pipeline, Record
from stream.progress import Progress
from stream.recording import RecordedMessage, Recording, RecordingError, RecordingWriter

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "recording"
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"

#: Every awkward case a recording must keep: bytes that are not UTF-8 in keys,
#: values and headers, missing keys/values/headers, header values that are
#: None, repeated header names, every timestamp type.
AWKWARD = [
    RecordedMessage("in-a", 0, 0, (1, 1_700_000_000_000), b"user-1", b'{"ok": true}', None),
    RecordedMessage("in-a", 0, 1, (1, 1_700_000_000_005), b"\xff\xfe\x00key", b"\x80\x81 not utf-8 \xc3\x28", None),
    RecordedMessage("in-a", 0, 2, (2, 1_700_000_000_010), None, None, [("trace", b"\x00\x01\xff"), ("empty", b"")]),
    RecordedMessage("in-a", 0, 7, (0, -1), b"", b"", [("dup", b"1"), ("dup", b"2"), ("none", None)]),
    RecordedMessage("in-a", 2, 100, (1, 1_700_000_000_001), b"k", b"partition two", [("h", b"text")]),
    RecordedMessage("in.b_c-d", 0, 0, (1, 1_699_999_999_999), b"k", b"x" * 70_000, None),
]


def _write(path: Path, messages: list[RecordedMessage]) -> Recording:
    with RecordingWriter(path, source={"kind": "test"}) as writer:
        for m in messages:
            writer.write(m)
    return Recording(path)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rec = _write(tmp_path / "r", AWKWARD)
    rec.verify()
    assert len(rec) == len(AWKWARD)
    for topic, partition in {(m.topic(), m.partition()) for m in AWKWARD}:
        expected = [m for m in AWKWARD if (m.topic(), m.partition()) == (topic, partition)]
        assert list(rec.read(topic, partition)) == expected
    entries = {(e.topic, e.partition): e for e in rec.partitions}
    assert entries["in-a", 0].records == 4
    assert (entries["in-a", 0].first_offset, entries["in-a", 0].last_offset) == (0, 7)
    assert rec.topics == ["in-a", "in.b_c-d"]


def test_recorded_message_is_a_record() -> None:
    m: Record = AWKWARD[1]
    assert m.topic() == "in-a" and m.partition() == 0 and m.offset() == 1
    assert m.timestamp() == (1, 1_700_000_000_005)
    assert m.key() == b"\xff\xfe\x00key" and m.value() == b"\x80\x81 not utf-8 \xc3\x28"
    assert m.headers() is None and AWKWARD[1].error() is None


def test_copy_of_any_record_encodes_text() -> None:
    class Text:
        def topic(self) -> str:
            return "t"

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 3

        def timestamp(self) -> tuple[int, int]:
            return (1, 5)

        def key(self) -> str:
            return "clé"

        def value(self) -> str:
            return "välue"

        def headers(self) -> list[tuple[str, str]]:
            return [("h", "é")]

    m = RecordedMessage.of(Text())  # type: ignore[arg-type]
    assert (m.key(), m.value(), m.headers()) == ("clé".encode(), "välue".encode(), [("h", "é".encode())])


def test_merge_is_by_timestamp_and_keeps_partition_order(tmp_path: Path) -> None:
    # Partition 0's timestamps go backwards once: its order must still be kept.
    msgs = [
        RecordedMessage("a", 0, 0, (1, 10), None, b"a0", None),
        RecordedMessage("a", 0, 1, (1, 30), None, b"a1", None),
        RecordedMessage("a", 0, 2, (1, 20), None, b"a2", None),
        RecordedMessage("a", 1, 0, (1, 15), None, b"b0", None),
        RecordedMessage("a", 1, 1, (1, 30), None, b"b1", None),
        RecordedMessage("c", 0, 0, (1, 10), None, b"c0", None),
    ]
    rec = _write(tmp_path / "r", msgs)
    order = [m.value() for m in rec.messages()]
    assert order == [b"a0", b"c0", b"b0", b"a1", b"a2", b"b1"]
    assert order == [m.value() for m in Recording(tmp_path / "r").messages()]
    for p in (0, 1):
        part = [v for v in order if v.startswith(b"ab"[p : p + 1])]
        assert part == [m.value() for m in msgs if m.topic() == "a" and m.partition() == p]
    mapped = list(rec.messages(topic_map={"a": "x"}, topics=["a"]))
    assert {m.topic() for m in mapped} == {"x"} and len(mapped) == 5


def test_corruption_is_detected(tmp_path: Path) -> None:
    rec = _write(tmp_path / "r", AWKWARD)
    path = rec.path / rec.partitions[0].file
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-3]))  # drop the end of the last frame
    with pytest.raises(RecordingError, match="checksum"):
        rec.verify()
    with pytest.raises(RecordingError, match="truncated"):
        list(rec.read(rec.partitions[0].topic, rec.partitions[0].partition))


def test_writer_refuses_to_overwrite_and_names(tmp_path: Path) -> None:
    _write(tmp_path / "r", AWKWARD[:1])
    with pytest.raises(RecordingError, match="already holds"):
        RecordingWriter(tmp_path / "r")
    with pytest.raises(RecordingError, match="not a recording"):
        Recording(tmp_path / "nothing")
    with RecordingWriter(tmp_path / "s") as w, pytest.raises(RecordingError, match="legal"):
        w.add("../evil", 0, 0, (1, 1), None, b"", None)


def test_fixture_recording_is_intact() -> None:
    rec = Recording(FIXTURE)
    rec.verify()
    truth = rec.truth()
    assert len(rec) == truth.events == 4000
    # A simulation without search requests records the four other streams only.
    assert rec.manifest.streams == {s: t for s, t in Config().input_topics().items() if s != "searches"}
    assert {b["kind"] for b in truth.bad_records} == {"invalid_json", "non_utf8", "missing_field", "negative_price"}
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 1_000_000


# -- backtest -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(DEFAULT_CONFIG, overrides={"metrics.port": 0})


def _read_topic_lines(out: Path) -> dict[str, list[dict]]:
    return {
        p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((out / "outputs").glob("*"))
    }


def test_backtest_outputs_report_and_is_deterministic(tmp_path: Path, config: Config) -> None:
    first = backtest(FIXTURE, config, out_dir=tmp_path / "a", progress=False, chart=False)
    second = backtest(FIXTURE, config, out_dir=tmp_path / "b", progress=False, chart=False)
    outputs = _read_topic_lines(tmp_path / "a")
    assert outputs == _read_topic_lines(tmp_path / "b")
    for topic in outputs:
        assert (tmp_path / "a" / "outputs" / f"{topic}.jsonl").read_bytes() == (
            tmp_path / "b" / "outputs" / f"{topic}.jsonl"
        ).read_bytes()
    assert first.learners == second.learners

    # Every learner published (but ranking: the fixture has no search requests), and every output
    # is an envelope of this learner.
    publishing = {name: spec for name, spec in config.learners.items() if spec.output_topic != "rankings"}
    assert set(first.outputs) == {spec.output_topic for spec in publishing.values()}
    for name, spec in publishing.items():
        lines = outputs[spec.output_topic]
        assert len(lines) == first.outputs[spec.output_topic]
        assert {line["value"]["learner"] for line in lines} == {name}
        assert all("prediction" in line["value"] and "model_version" in line["value"] for line in lines)

    # The invalid records of the topics the learners read, and only they, are dead letters.
    truth = Recording(FIXTURE).truth()
    topics = config.input_topics()
    read = {t for lrn in first.learners.values() for t in lrn["reads"]}
    expected = [b for b in truth.bad_records if topics[b["stream"]] in read]
    dead = outputs.get(config.topics.dead_letters, [])
    assert len(dead) == len(expected) == sum(first.dead_letters.values())
    assert all(line["headers"]["stream.stage"] in ("decode", "validate") for line in dead)

    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["records"] + sum(report["skipped"].values()) == 4000
    for name in config.learners:
        assert report["learners"][name]["quality"], name
    assert report["truth"]["drift_points"] and report["truth"]["frauds"] == len(truth.frauds)
    text = (tmp_path / "a" / "report.txt").read_text()
    assert "Backtest of" in text and "dead letters" in text and "ground truth" in text


def test_backtest_equals_the_pipeline_fed_directly(config: Config) -> None:
    """The backtest is the pipeline in recorded order, nothing more."""
    result = backtest(FIXTURE, config, keep_outputs=True, progress=False, chart=False)

    from stream.config import build_learners

    produced: list[tuple[str, bytes | None, bytes | None]] = []

    class Sink:
        def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: object = None) -> None:
            produced.append((topic, key, value))

    current = [0]
    pipeline = Pipeline(
        build_learners(config),
        Sink(),
        contract_topics=config.input_topics(),
        dead_letter_topic=config.topics.dead_letters,
        clock=lambda: current[0] / 1000,
    )
    for m in Recording(FIXTURE).messages():
        if m.topic() in pipeline.routes:
            current[0] = m.timestamp()[1]
            pipeline.process(m)
    direct: dict[str, list[tuple[bytes | None, bytes | None]]] = {}
    for topic, key, value in produced:
        direct.setdefault(topic, []).append((key, value))
    assert {t: [(k, v) for k, v, _ in rows] for t, rows in result.produced.items()} == direct


def test_chart_is_drawn_or_skipped_with_a_reason(tmp_path: Path, config: Config) -> None:
    result = backtest(FIXTURE, config, out_dir=tmp_path, progress=False)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in result.files["chart_skipped"]
    else:
        assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_backtest_scores_against_truth(config: Config) -> None:
    rec = Recording(FIXTURE)
    result, run = run_backtest(rec.messages(), config, truth=rec.truth(), progress=False)
    assert result.truth is not None
    assert set(result.truth["drift"]) == {name for _, name, _ in run.monitors}
    for score in result.truth["drift"].values():
        assert score["false_alarms"] <= score["detections"]


# -- progress -------------------------------------------------------------------------


def test_progress_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(total=10, desc="work", stream=out, interval_s=0.0, tty=False, status=lambda: "q 0.5")
    for _ in range(10):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines and "\r" not in out.getvalue()
    assert lines[-1].startswith("work: 10/10 events (100%) in ") and lines[-1].endswith("| q 0.5")


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(total=4, desc="work", stream=out, tty=True)
    bar.update(2)
    bar.refresh()
    bar.update(2)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r") and "[" in text and "ETA" in text and text.endswith("\n")
    assert text.count("\n") == 1


def test_progress_disabled_still_counts() -> None:
    out = io.StringIO()
    with Progress(total=3, stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == "" and bar.n == 3


# -- CLI -------------------------------------------------------------------------------


def test_cli_simulate_then_backtest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = tmp_path / "rec"
    assert main(["simulate", "--events", "3000", "--seed", "4", "--users", "200", "--items", "80",
                 "--bad-records", "4", "--out", str(rec), "--no-progress"]) == 0  # fmt: skip
    assert "simulated 3,000 events" in capsys.readouterr().out
    assert len(Recording(rec)) == 3000 and (rec / "truth.json").exists()
    out = tmp_path / "bt"
    assert main(["backtest", str(rec), "--config", str(DEFAULT_CONFIG), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Backtest of" in printed and (out / "report.json").exists()
    assert main(["backtest", str(tmp_path / "missing"), "--config", str(DEFAULT_CONFIG), "--no-progress"]) == 1


def test_cli_demo_runs_without_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--events", "5000", "--metrics-port", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "stream demo: 5,000 simulated events" in printed
    assert "against the simulator's ground truth" in printed


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--events", "10"])  # no destination
    assert main(["replay", str(FIXTURE), "--to-kafka", "--speed", "fast", "--no-progress"]) == 1
    assert "not a speed" in capsys.readouterr().err


# --------------------------------------------------------------------------- replay timestamps


def test_timestamp_rewrite_keeps_order_and_spacing() -> None:
    from stream.replay import TimestampRewrite

    recorded = [1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_020, 1_700_000_003_000, 1_700_000_010_000]
    now = 1_900_000_000_000
    rewrite = TimestampRewrite.to_now(latest_ms=max(recorded), now_ms=now)
    out = [rewrite(t) for t in recorded]
    assert out[-1] == now
    assert out == sorted(out)
    assert [b - a for a, b in itertools.pairwise(out)] == [b - a for a, b in itertools.pairwise(recorded)]
    # Nothing lands in the future, even a timestamp past the manifest's latest.
    assert rewrite(max(recorded) + 5_000) == now
    # Nothing recorded with a timestamp: no shift.
    assert TimestampRewrite.to_now(None, now)(123) == 123


def test_retention_warnings_name_only_topics_too_short() -> None:
    from stream.replay import retention_warnings

    day = 86_400_000
    now = 100 * day
    oldest = {"old": now - 30 * day, "fresh": now - day, "forever": now - 300 * day, "unknown": 0}
    retention = {"old": 7 * day, "fresh": 7 * day, "forever": -1}
    warnings = retention_warnings(oldest, retention, now, rewritten=False)
    assert len(warnings) == 1 and warnings[0].startswith("topic old:") and "--rewrite-timestamps" in warnings[0]
    again = retention_warnings({"old": now - 8 * day}, retention, now, rewritten=True)
    assert len(again) == 1 and "even with timestamps rewritten" in again[0]


class _FakeWriter:
    produced_records: list[tuple[str, int, int]] = []

    def __init__(self, config: Config, **extra: object) -> None:
        self.produced = 0
        _FakeWriter.produced_records = []

    def produce(self, topic: str, key: object, value: object, *, partition: int = 0, timestamp: int = 0,
                headers: object = None) -> None:  # fmt: skip
        _FakeWriter.produced_records.append((topic, partition, timestamp))
        self.produced += 1

    def poll(self, timeout_s: float = 0) -> None:
        pass

    def flush(self, timeout_s: float = 600.0) -> None:
        pass


def test_replay_rewrites_timestamps_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a broker: the replay's produced timestamps are the recorded ones shifted to
    now (per-partition order, spacing and the untimestamped record kept), and a topic whose
    retention.ms is shorter than the records' age is warned about, unless rewritten."""
    import time

    import stream.replay as replay_mod

    old = 1_600_000_000_000
    messages = [
        RecordedMessage("a", 0, 0, (1, old), b"k", b"1", None),
        RecordedMessage("a", 0, 1, (1, old + 50), b"k", b"2", None),
        RecordedMessage("a", 1, 0, (1, old + 20), b"k", b"3", None),
        RecordedMessage("a", 1, 1, (0, -1), b"k", b"4", None),
        RecordedMessage("b", 0, 0, (1, old + 1_000), b"k", b"5", None),
    ]
    rec = _write(tmp_path / "r", messages)
    monkeypatch.setattr(replay_mod, "KafkaWriter", _FakeWriter)
    monkeypatch.setattr(replay_mod, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(replay_mod, "topic_retention_ms", lambda config, topics: dict.fromkeys(topics, 3_600_000))
    config = load_config(None)

    plain = replay_mod.replay(rec, config, progress=False)
    assert [w.split(":")[0] for w in plain.warnings] == ["topic a", "topic b"]
    assert sorted(t for *_, t in _FakeWriter.produced_records) == [0, old, old + 20, old + 50, old + 1_000]

    before = int(time.time() * 1000)
    result = replay_mod.replay(rec, config, progress=False, rewrite_timestamps=True)
    after = int(time.time() * 1000)
    assert result.warnings == []
    got = {(topic, p): [] for topic, p, _ in _FakeWriter.produced_records}
    for topic, p, ts in _FakeWriter.produced_records:
        got[topic, p].append(ts)
    latest = got["b", 0][0]
    assert before <= latest <= after
    shift = latest - (old + 1_000)
    assert got["a", 0] == [old + shift, old + 50 + shift]
    assert got["a", 1] == [old + 20 + shift, 0]  # no recorded timestamp: the broker stamps it
