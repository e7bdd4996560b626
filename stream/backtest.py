"""Backtests: the configured learners run over records without a broker.

``backtest`` feeds a recording (``stream.recording``) through the very
``stream.pipeline.Pipeline`` that ``stream run`` uses, in recorded
per-partition order, partitions merged by timestamp, so a single-partition
recording gives the predictions of a live run. It tracks drift detections and
samples each learner's quality over the run, scores against the simulator's
ground truth when the recording has one (``stream.scoring``), and writes the
outputs, a report and a chart. ``run_backtest`` is the loop, shared with the
demo. With ``checkpoint_out`` the learners as the recording left them are
written as a checkpoint (the normal format, ``stream.checkpoint``) holding the
offsets after the last record read: ``stream model import`` serves it live (the
hybrid warm start: history at backtest speed, then incremental).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from stream.checkpoint import Offsets, build, load_keys
from stream.config import Config, build_learners
from stream.pipeline import Observer, Pipeline, Record, Tally
from stream.privacy import Pseudonymizer
from stream.progress import Progress
from stream.recording import RecordedMessage, Recording
from stream.scoring import TruthScorer, score_against_truth
from stream.state import LocalStorage

Headers = list[tuple[str, bytes | None]]

__all__ = [
    "BacktestResult",
    "DriftTracker",
    "backtest",
    "drift_monitors",
    "plot_quality",
    "quality_of",
    "run_backtest",
    "truth_lines",
    "write_checkpoint",
]

log = logging.getLogger(__name__)


def _key_text(key: bytes | None) -> Any:
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        import base64

        return {"base64": base64.b64encode(key).decode()}


class _OutputSink:
    """The pipeline's sink in a backtest: outputs to JSON-lines files (and/or memory).

    Each line is ``{"key": ..., "value": <the output JSON>}``; dead letters
    keep their original bytes as ``value_base64`` and their headers."""

    def __init__(self, out_dir: Path | None, dead_letter_topic: str, keep: bool) -> None:
        self.out_dir = out_dir
        self.dead_letter_topic = dead_letter_topic
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.produced: dict[str, list[tuple[bytes | None, bytes | None, Headers | None]]] = defaultdict(list)
        self._files: dict[str, IO[bytes]] = {}
        self._encode = msgspec.json.Encoder().encode
        if out_dir is not None:
            (out_dir / "outputs").mkdir(parents=True, exist_ok=True)

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        self.counts[topic] += 1
        if self.keep:
            self.produced[topic].append((key, value, headers))
        if self.out_dir is None:
            return
        f = self._files.get(topic)
        if f is None:
            f = self._files[topic] = open(self.out_dir / "outputs" / f"{topic}.jsonl", "wb")  # noqa: SIM115
        if topic == self.dead_letter_topic or value is None:
            import base64

            line: dict[str, Any] = {
                "key": _key_text(key),
                "value_base64": base64.b64encode(value).decode() if value is not None else None,
                "headers": {k: (v or b"").decode("utf-8", "replace") for k, v in headers or ()},
            }
            f.write(self._encode(line) + b"\n")
        else:
            # The output envelope is already JSON: embed it as it is.
            f.write(self._encode({"key": _key_text(key), "value": msgspec.Raw(value)}) + b"\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def drift_monitors(learner: Any) -> list[tuple[str, Any]]:
    """``(name, monitor)`` of a learner's concept-drift monitors: objects with
    a ``detections`` count (``stream.drift.DriftMonitor``), found on the
    learner's ``evaluation`` (or ``evaluations``) and on the learner itself."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def add(name: str, obj: Any) -> None:
        if obj is not None and isinstance(getattr(obj, "detections", None), int) and id(obj) not in seen:
            seen.add(id(obj))
            found.append((name, obj))

    evaluation = getattr(learner, "evaluation", None)
    if evaluation is not None:
        add(learner.name, getattr(evaluation, "drift", None))
    evaluations = getattr(learner, "evaluations", None)
    if isinstance(evaluations, Mapping):
        for key, ev in evaluations.items():
            add(f"{learner.name}.{key}", getattr(ev, "drift", None))
    for attr in ("drift", "drift_monitor", "monitor"):
        add(learner.name if not found else f"{learner.name}.{attr}", getattr(learner, attr, None))
    return found


def quality_of(learner: Any) -> dict[str, dict[str, float]]:
    """``{metric: {window: value}}`` from ``learner.quality()``."""
    out: dict[str, dict[str, float]] = {}
    try:
        for metric, window, value in learner.quality():
            out.setdefault(metric, {})[window] = float(value)
    except Exception as exc:  # a half-written learner must not kill the report
        log.warning("quality() failed", extra={"learner": learner.name, "error": repr(exc)})
    return out


@dataclass
class BacktestResult:
    """What a backtest did and how well the learners did (``to_dict`` is report.json)."""

    source: str
    records: int
    by_topic: dict[str, int]
    #: Records of topics no learner reads (not processed).
    skipped: dict[str, int]
    outputs: dict[str, int]
    dead_letters: dict[str, int]
    learners: dict[str, dict[str, Any]]
    #: Sampled quality over the run: ``{"index", "ts", "quality": {learner: {metric: {window: value}}}}``,
    #: ``index`` = records read so far (the position in the recording, like drift indexes).
    timeline: list[dict[str, Any]]
    elapsed_s: float
    #: Scores against a simulator's ground truth, when the recording has one.
    truth: dict[str, Any] | None = None
    #: Output records in memory (``keep_outputs=True``): topic -> [(key, value, headers)].
    produced: dict[str, list[tuple[bytes | None, bytes | None, Headers | None]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    #: First word of the readable report.
    title: str = "Backtest"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "records": self.records,
            "by_topic": self.by_topic,
            "skipped": self.skipped,
            "outputs": self.outputs,
            "dead_letters": self.dead_letters,
            "learners": self.learners,
            "truth": self.truth,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.records / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
            "timeline": self.timeline,
            "files": self.files,
        }

    def text(self) -> str:
        """The readable report."""
        lines = [f"{self.title} of {self.source}"]
        rate = self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0
        topics = ", ".join(f"{t} {n:,}" for t, n in sorted(self.by_topic.items()))
        lines.append(f"  records    {self.records:,} ({topics}) in {self.elapsed_s:.1f}s, {rate:,.0f} records/s")
        if self.skipped:
            lines.append(
                "  skipped    "
                + ", ".join(f"{t} {n:,}" for t, n in sorted(self.skipped.items()))
                + " (no learner reads them)"
            )
        outs = ", ".join(f"{t} {n:,}" for t, n in sorted(self.outputs.items())) or "none"
        lines.append(f"  outputs    {outs}")
        dead = sum(self.dead_letters.values())
        stages = ", ".join(f"{s} {n}" for s, n in sorted(self.dead_letters.items()))
        lines.append(f"  dead letters {dead:,}" + (f" ({stages})" if stages else ""))
        for name, info in self.learners.items():
            lines.append("")
            lines.append(
                f"  {name} ({info['kind']}, reads {', '.join(info['reads'])} -> {info['output_topic']}): "
                f"{info['n_learned']:,} learned, model v{info['model_version']}"
            )
            for metric, windows in info["quality"].items():
                vals = "  ".join(f"{w} {_fmt(v)}" for w, v in windows.items())
                lines.append(f"    {metric:<22} {vals}")
            for mon in info["drift"]:
                dets = mon["detections"]
                when = ", ".join(
                    f"{_iso(d['ts'])} (#{d['index']:,}{', ' + d['direction'] if d.get('direction') else ''})"
                    for d in dets[:8]
                )
                more = f" (+{len(dets) - 8} more)" if len(dets) > 8 else ""
                lines.append(f"    drift {mon['monitor']}: {len(dets)} detection(s){': ' + when if dets else ''}{more}")
        if self.truth:
            lines.append("")
            lines.append("  against the simulator's ground truth:")
            lines.extend("    " + line for line in truth_lines(self.truth))
        return "\n".join(lines)


def _fmt(v: float) -> str:
    if v != v:  # NaN: undefined (ROC AUC before both classes were seen)
        return "n/a"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def _iso(ts: int | None) -> str:
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truth_lines(truth: dict[str, Any]) -> list[str]:
    """Readable lines for the ``truth`` section of a report."""
    lines = []
    points = truth.get("drift_points", [])
    if points:
        where = ", ".join(
            f"{d['kind']} at #{d['index']:,}" if d.get("index") is not None else f"{d['kind']} (not reached)"
            for d in points
        )
        lines.append(f"true drifts: {where}")
    for name, scores in truth.get("learners", {}).items():
        vals = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in scores.items())
        lines.append(f"{name}: {vals}")
    at = {(d["kind"], d["ts"]): d.get("index") for d in points}
    for mon, score in truth.get("drift", {}).items():
        parts = []
        for d in score["drifts"]:
            index = at.get((d["kind"], d["ts"]))
            where = f" at #{index:,}" if index is not None else ""
            if d["delay_ms"] is None:
                parts.append(f"{d['kind']}{where} missed")
            else:
                ev = f"#{index + d['delay_events']:,}, +{d['delay_events']:,} events, " if (
                    index is not None and d.get("delay_events") is not None) else ""  # fmt: skip
                parts.append(f"{d['kind']}{where} caught at {ev}{d['delay_ms'] / 60000:.1f} min later")
        found = "; ".join(parts) or "no relevant drift"
        alarms = f"false alarms {score['false_alarms']} of {score['detections']} detections"
        worse = score.get("worse_only")
        if worse is not None:
            # Detections of the error going down are a model still learning, not a concept drift.
            alarms += f" ({worse['false_alarms']} of {worse['detections']} counting only error increases)"
        lines.append(f"drift {mon}: {found}; {alarms}")
    if not truth.get("learners") and not truth.get("drift"):
        lines.append("(no learner here has predictions or drift monitors to score)")
    return lines


class DriftTracker:
    """Watches learners' drift monitors and keeps every detection with the
    event time and the index (records processed) at which it was seen."""

    def __init__(self, learners: Sequence[Any]) -> None:
        self.learners = list(learners)
        self.monitors = [(learner, name, mon) for learner in self.learners for name, mon in drift_monitors(learner)]
        self._seen = [mon.detections for _, _, mon in self.monitors]
        #: monitor name -> [{"ts", "index", "direction"}]
        self.detections: dict[str, list[dict[str, Any]]] = {name: [] for _, name, _ in self.monitors}

    def check(self, index: int, ts: int) -> None:
        """Record detections made since the last check (cheap: one int compare per monitor)."""
        for k, (_, name, mon) in enumerate(self.monitors):
            count = mon.detections
            if count != self._seen[k]:
                new = count - self._seen[k]
                self._seen[k] = count
                at = mon.last_detection_ts if mon.last_detection_ts is not None else ts
                direction = getattr(mon, "last_direction", None)
                # Several detections between two checks (only when polled) share the last one's time.
                for _ in range(new):
                    self.detections[name].append({"ts": at, "index": index, "direction": direction})

    def learner_report(self) -> dict[str, dict[str, Any]]:
        out = {}
        for learner in self.learners:
            out[learner.name] = {
                "kind": getattr(learner, "kind", type(learner).__name__),
                "reads": sorted(learner.reads),
                "output_topic": learner.output_topic,
                "n_learned": learner.n_learned,
                "model_version": learner.model_version,
                "quality": quality_of(learner),
                "drift": [
                    {"monitor": name, "detections": self.detections[name]}
                    for owner, name, _ in self.monitors
                    if owner is learner
                ],
            }
        return out

    def status(self) -> str:
        """One short line: each learner's rolling quality (first metric) and drifts so far."""
        parts = []
        for learner in self.learners:
            q = quality_of(learner)
            if q:
                metric, windows = next(iter(q.items()))
                value = windows.get("rolling", next(iter(windows.values())))
                parts.append(f"{learner.name} {metric} {_fmt(value)}")
        parts.append(f"drifts {sum(len(v) for v in self.detections.values())}")
        return ", ".join(parts)


class _BacktestRun(DriftTracker):
    """The loop shared by ``backtest`` and the demo: records -> pipeline, with
    drift detections tracked per record and quality sampled over time."""

    def __init__(
        self,
        config: Config,
        *,
        learners: Sequence[Any] | None = None,
        sink: Any,
        observers: Sequence[Observer] = (),
        sample_every: int = 1000,
    ) -> None:
        super().__init__(list(learners) if learners is not None else build_learners(config))
        self.config = config
        self.counter = Tally(*observers)
        self.current_ts = 0
        # Outputs carry the input's event time as ``predicted_at``: two backtests
        # of one recording give byte-identical outputs.
        self.pipeline = Pipeline(
            self.learners,
            sink,
            contract_topics=config.input_topics(),
            dead_letter_topic=config.topics.dead_letters,
            max_value_bytes=config.processing.max_value_bytes,
            clock=lambda: self.current_ts / 1000.0,
            observer=self.counter,
            privacy=Pseudonymizer.from_config(config),
        )
        self.sample_every = max(int(sample_every), 1)
        self.timeline: list[dict[str, Any]] = []
        self.records = 0
        #: Records read, processed or skipped.
        self.position = 0
        self.by_topic: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    def feed(
        self,
        records: Iterable[Record] | Iterable[RecordedMessage],
        bar: Progress | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Process ``records`` in order. Detections and quality samples are
        indexed by position in ``records`` (skipped topics included), the
        index a simulator's drift points use."""
        routes = self.pipeline.routes
        process = self.pipeline.process
        check = self.check
        sample_every = self.sample_every
        update = bar.update if bar is not None else None
        n, pos = self.records, self.position
        try:
            for rec in records:
                pos += 1
                if update is not None:
                    update()
                topic = rec.topic()
                if topic in routes:
                    ts = self.current_ts = rec.timestamp()[1]
                    process(rec)
                    n += 1
                    self.by_topic[topic] += 1  # type: ignore[index]
                    check(pos - 1, ts)
                else:
                    self.skipped[topic] += 1  # type: ignore[index]
                if pos % sample_every == 0:
                    self.records, self.position = n, pos
                    self.sample()
                    if stop is not None and stop():
                        break
        finally:
            self.records, self.position = n, pos

    def sample(self) -> None:
        quality = {lr.name: quality_of(lr) for lr in self.learners}
        self.timeline.append({"index": self.position, "ts": self.current_ts, "quality": quality})


def run_backtest(
    records: Iterable[Record] | Iterable[RecordedMessage],
    config: Config,
    *,
    source: str = "<records>",
    total: int | None = None,
    learners: Sequence[Any] | None = None,
    out_dir: str | Path | None = None,
    keep_outputs: bool = False,
    observer: Observer | None = None,
    progress: bool = True,
    status: bool = False,
    stop: Callable[[], bool] | None = None,
    truth: Any = None,
    desc: str = "backtest",
    title: str = "Backtest",
    scorer: TruthScorer | None = None,
) -> tuple[BacktestResult, _BacktestRun]:
    """Run ``records`` through the configured learners and the pipeline, no broker.

    ``truth`` (a simulator's ``GroundTruth``) adds scores against it, by
    ``scorer`` if given (a ``TruthScorer`` of that truth), else a new one.
    Returns the result and the run (its learners, for further inspection)."""
    out = Path(out_dir) if out_dir is not None else None
    files = _OutputSink(out, config.topics.dead_letters, keep_outputs)
    sink: Any = files
    if truth is None:
        scorer = None
    else:
        scorer = scorer if scorer is not None else TruthScorer(truth)
        sink = scorer.wrap_sink(files)
    sample_every = max((total or 100_000) // 200, 100)
    observers = [o for o in (scorer, observer) if o is not None]
    run = _BacktestRun(config, learners=learners, sink=sink, observers=observers, sample_every=sample_every)
    bar = Progress(total, desc=desc, enabled=progress, status=run.status if status else None)
    started = time.monotonic()
    try:
        run.feed(records, bar, stop)
    finally:
        files.close()
    elapsed = time.monotonic() - started
    run.sample()
    bar.close()
    result = BacktestResult(
        source=source,
        records=run.records,
        by_topic=dict(run.by_topic),
        skipped=dict(run.skipped),
        outputs={t: n for t, n in files.counts.items() if t != config.topics.dead_letters},
        dead_letters=dict(run.counter.dead),
        learners=run.learner_report(),
        timeline=run.timeline,
        elapsed_s=elapsed,
        produced=dict(files.produced),
        title=title,
    )
    if truth is not None:
        result.truth = score_against_truth(truth, run, config, scorer)
    return result, run


def backtest(
    recording: Recording | str | Path,
    config: Config,
    *,
    out_dir: str | Path | None = None,
    topic_map: Mapping[str, str] | None = None,
    keep_outputs: bool = False,
    progress: bool = True,
    chart: bool = True,
    checkpoint_out: str | Path | None = None,
) -> BacktestResult:
    """Backtest the configured learners on a recording, without a broker.

    Records are processed in recorded order per partition, partitions merged
    by timestamp; for a single-partition recording that is the file order,
    and the predictions equal those of a live ``stream run`` of the same
    records. With ``out_dir``: ``outputs/<topic>.jsonl`` per output topic,
    ``report.txt``, ``report.json`` and (with matplotlib) ``quality.png``.
    With ``checkpoint_out``: the learners at the end, as a checkpoint file.
    """
    rec = recording if isinstance(recording, Recording) else Recording(recording)
    tmap = dict(topic_map or {})
    truth = rec.truth()
    offsets: dict[tuple[str, int], int] = {}
    messages: Iterable[RecordedMessage] = rec.messages(topic_map=tmap)
    if checkpoint_out is not None:
        messages = _tracking(messages, offsets)
    result, run = run_backtest(
        messages,
        config,
        source=str(rec.path),
        total=len(rec),
        out_dir=out_dir,
        keep_outputs=keep_outputs,
        progress=progress,
        truth=truth,
    )
    if checkpoint_out is not None:
        path = write_checkpoint(checkpoint_out, run.learners, offsets, config, source=str(rec.path))
        result.files["checkpoint"] = str(path)
    if out_dir is not None:
        out = Path(out_dir)
        result.files["outputs"] = str(out / "outputs")
        if chart:
            png = out / "quality.png"
            message = plot_quality(result, png, truth)
            if message is None:
                result.files["chart"] = str(png)
            else:
                result.files["chart_skipped"] = message
        (out / "report.txt").write_text(result.text() + "\n")
        result.files["report"] = str(out / "report.txt")
        result.files["report_json"] = str(out / "report.json")
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def _mark_drifts(ax: Any, info: dict[str, Any], truth: Any) -> None:
    """The true drifts meant for this learner (green; the others faint grey) and its
    detections against them: red when it caught one (its delay in events written
    by it), orange dotted when false (``GroundTruth.score_detections``: the first
    detection after a drift, within a fifth of the stream, catches it)."""
    detections = sorted((d["ts"], d["index"]) for mon in info["drift"] for d in mon["detections"])
    caught: dict[int, int | None] = {}  # position in ``detections`` -> delay in events
    if truth is not None:
        kind = info.get("kind")
        mine = truth.drift_points(learner=kind)
        labelled = False
        for d in truth.drifts:
            if d.index is None:
                continue
            relevant = d in mine
            label = "true drift" if relevant and not labelled else None
            labelled = labelled or relevant
            color = "green" if relevant else "grey"
            ax.axvline(d.index, color=color, linewidth=1.5 if relevant else 0.8, alpha=0.6 if relevant else 0.3,
                       label=label)  # fmt: skip
            ax.annotate(d.kind, (d.index, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color=color,
                        ha="left", va="top")  # fmt: skip
        for row in truth.score_detections(detections, learner=kind).drifts:
            if row["delay_ms"] is not None:
                at = row["ts"] + row["delay_ms"]
                caught[next(k for k, (ts, _) in enumerate(detections) if ts == at)] = row["delay_events"]
    first_caught = first_false = True
    for k, (_, index) in enumerate(detections):
        if index is None or index < 0:
            continue
        if k in caught:
            ax.axvline(index, color="red", linewidth=1.2, label="drift caught" if first_caught else None)
            if caught[k] is not None:
                ax.annotate(f"+{caught[k]:,} events", (index, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                            color="red", ha="left", va="bottom")  # fmt: skip
            first_caught = False
        else:
            label = "false alarm" if truth is not None else "drift detected"
            ax.axvline(index, color="darkorange", linestyle=":", linewidth=1.0, label=label if first_false else None)
            first_false = False


def _tracking(records: Iterable[RecordedMessage], offsets: dict[tuple[str, int], int]) -> Iterator[RecordedMessage]:
    """``records``, noting in ``offsets`` the offset after the last one read per partition."""
    for rec in records:
        offsets[(rec.topic(), rec.partition())] = rec.offset() + 1
        yield rec


def write_checkpoint(
    path: str | Path, learners: Sequence[Any], offsets: Offsets, config: Config, *, source: str = "<records>"
) -> Path:
    """Write ``learners`` as a checkpoint file (signed with the configured checkpoint key, if
    any) at ``offsets``: the state of the learners after everything before them."""
    out = Path(path)
    _, data = build(
        out.name,
        0,
        learners,
        offsets,
        reason="backtest",
        origin={"action": "backtest", "source": source},
        group_id=config.kafka.group_id,
        keys=load_keys(config),
    )
    LocalStorage(out.parent).write(out.name, data)
    return out


def plot_quality(result: BacktestResult, path: Path, truth: Any = None) -> str | None:
    """A PNG of each learner's quality over the run, drift detections and true
    drift points marked. Returns None, or why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'stream[chart]'); no chart"
    names = [n for n in result.learners if any(p["quality"].get(n) for p in result.timeline)]
    if not names or len(result.timeline) < 2:
        return "not enough quality samples to chart"
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        metrics = sorted({m for p in result.timeline for m in p["quality"].get(name, {})})
        for metric in metrics[:4]:
            xs, ys = [], []
            for p in result.timeline:
                windows = p["quality"].get(name, {}).get(metric)
                if windows:
                    xs.append(p["index"])
                    ys.append(windows.get("rolling", next(iter(windows.values()))))
            ax.plot(xs, ys, label=f"{metric} (rolling)", linewidth=1.2)
        _mark_drifts(ax, result.learners[name], truth)
        ax.set_title(name, fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("records read")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
