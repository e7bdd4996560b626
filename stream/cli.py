"""The ``stream`` command line."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import river
from confluent_kafka import KafkaException

from stream import __version__
from stream.backtest import backtest
from stream.config import Config, ConfigError, load_config, scrub
from stream.demo import run_demo
from stream.errors import StreamError
from stream.logs import setup_logging
from stream.model_admin import (
    EXIT_REFUSED,
    CheckpointError,
    GroupAccess,
    StateError,
    export_model,
    import_model,
    list_models,
    rollback,
    sign,
)
from stream.replay import record, replay
from stream.simulate import SimConfig, Simulation, produce_to_kafka, write_recording

__all__ = ["main"]

log = logging.getLogger("stream.cli")

Handler = Callable[[argparse.Namespace], int]


CONFIG_HELP = "TOML configuration (default: the packaged default.toml, as configs/default.toml)"


def _config(args: argparse.Namespace, *, learners: bool = False) -> Config:
    """The configuration of ``args`` (``--config``, else the packaged default); with
    ``learners``, one without any learner is an error: the command would do nothing."""
    overrides = {
        "kafka.bootstrap_servers": getattr(args, "bootstrap_servers", None),
        "kafka.group_id": getattr(args, "group_id", None),
        "metrics.port": getattr(args, "metrics_port", None),
        "metrics.host": getattr(args, "metrics_host", None),
        "checkpoints.storage": getattr(args, "checkpoint_storage", None),
    }
    config = load_config(args.config, overrides=overrides)
    if learners and not config.learners:
        where = args.config if args.config is not None else "the packaged default.toml"
        raise ConfigError(f"{where}: no learners configured (no [learners.NAME] table): nothing to run")
    return config


def _add_kafka_args(p: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, metavar="FILE", help=CONFIG_HELP)
    p.add_argument(
        "--bootstrap-servers", metavar="H:P", help="Kafka brokers (overrides config and STREAM_BOOTSTRAP_SERVERS)"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from stream.app import Application, instance_id
    from stream.metrics import serve_metrics
    from stream.sync_topic import make_sync

    config = _config(args, learners=True)
    observer = serve_metrics(config)
    me = instance_id(config)
    # Model sync across tasks: made once the task count (the inputs' partitions) is known.
    app = Application(config, observer=observer, sync_for=lambda n_tasks: make_sync(config, me, n_tasks))
    app.install_signal_handlers()
    return app.run()


def cmd_topics_create(args: argparse.Namespace) -> int:
    from stream.kafka import create_topics

    config = _config(args)
    for topic, status in sorted(create_topics(config).items()):
        print(f"{topic}\t{status}")
    return 0


# -- record, replay, backtest, simulate, demo ------------------------------------------------


def _fail(message: str) -> int:
    print(f"stream: {message}", file=sys.stderr)
    return 1


def cmd_record(args: argparse.Namespace) -> int:
    """``stream record``: see ``stream record --help``."""
    config = _config(args)
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    if not topics:
        return _fail("--topics names no topic")
    try:
        start: str | int = "beginning" if args.from_beginning else "end"
        if args.from_time:
            start = parse_time(args.from_time)
        with stop_on_signals() as stop:
            manifest = record(
                config, topics, args.out, start=start, until_end=args.until_end, progress=args.progress, stop=stop
            )
    except (StreamError, ValueError) as exc:
        return _fail(str(exc))
    state = "complete" if manifest.complete else "stopped early"
    parts = ", ".join(f"{e.topic}[{e.partition}] {e.records:,}" for e in manifest.partitions) or "nothing"
    print(f"recorded {manifest.records:,} records to {args.out} ({state}): {parts}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``stream replay``: see ``stream replay --help``."""
    config = _config(args)
    try:
        speed = parse_speed(args.speed)
        topic_map = parse_topic_map(args.topic_map)
        with stop_on_signals() as stop:
            result = replay(
                args.recording,
                config,
                speed=speed,
                topic_map=topic_map,
                create_topics=args.create_topics,
                progress=args.progress,
                stop=stop,
                rewrite_timestamps=args.rewrite_timestamps,
            )
    except (StreamError, ValueError) as exc:
        return _fail(str(exc))
    for warning in result.warnings:
        print(f"stream: warning: {warning}", file=sys.stderr)
    parts = ", ".join(f"{t} {n:,}" for t, n in sorted(result.by_topic.items()))
    print(
        f"replayed {result.records:,} records to {config.kafka.bootstrap_servers} in {result.elapsed_s:.1f}s "
        f"({result.rate:,.0f}/s), all delivered: {parts}"
    )
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    """``stream backtest``: see ``stream backtest --help``."""
    config = _config(args, learners=True)
    try:
        result = backtest(
            args.recording,
            config,
            out_dir=args.out,
            topic_map=parse_topic_map(args.topic_map),
            progress=args.progress,
            chart=args.chart,
            checkpoint_out=args.checkpoint_out,
        )
    except (StreamError, ValueError, OSError) as exc:
        return _fail(str(exc))
    print(result.text())
    if args.out:
        print("")
        for what, where in result.files.items():
            print(f"  {what:<14} {where}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """``stream simulate``: see ``stream simulate --help``."""
    config = _config(args)
    try:
        duration = parse_duration(args.duration) if args.duration else None
        sim_config = SimConfig(
            seed=args.seed,
            events=None if duration is not None else args.events,
            duration_s=duration,
            n_users=args.users,
            n_items=args.items,
            n_categories=args.categories,
            fraud_rate=args.fraud_rate,
            bad_records=args.bad_records,
            drifts=args.drifts,
            searches_per_session=args.searches_per_session,
        )
        sim = Simulation(sim_config)
        if args.out:
            manifest = write_recording(
                sim, args.out, config.input_topics(), partitions=args.partitions, progress=args.progress
            )
            truth_path = Path(args.out) / "truth.json"
            where = f"recording {args.out} ({manifest.records:,} records)"
        else:
            with stop_on_signals() as stop:
                n = produce_to_kafka(sim, config, create_topics=args.create_topics, progress=args.progress, stop=stop)
            truth_path = Path(args.truth)
            sim.truth.save(truth_path)
            where = f"{config.kafka.bootstrap_servers} ({n:,} records, all delivered)"
    except (StreamError, ValueError) as exc:
        return _fail(str(exc))
    t = sim.truth
    counts = ", ".join(f"{s} {n:,}" for s, n in t.counts.items())
    print(f"simulated {t.events:,} events (seed {args.seed}) to {where}: {counts}")
    print(f"  frauds {len(t.frauds):,} of {t.orders:,} orders; invalid records {len(t.bad_records)}")
    for d in t.drifts:
        print(f"  drift {d.kind} at event {d.index if d.index is not None else '-'}: {d.description}")
    print(f"  ground truth: {truth_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``stream demo``: see ``stream demo --help``."""
    if args.events < 1000:
        print("stream: demo needs --events >= 1000", file=sys.stderr)
        return 2
    try:
        run_demo(
            events=args.events,
            seed=args.seed,
            config_path=args.config,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            bootstrap_servers=args.bootstrap_servers,
            progress=args.progress,
            keep_topics=args.keep_topics,
            searches_per_session=args.searches_per_session,
        )
    except ConfigError:
        raise
    except (StreamError, RuntimeError) as exc:
        return _fail(str(exc))
    return 0


def _add_replay_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def no_progress(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar (a terminal) or periodic progress lines (otherwise)")  # fmt: skip

    rec = sub.add_parser("record", help="record topics from Kafka into a recording directory",
                         description="Consume topics into a recording (exact bytes, keys, headers, timestamps, "
                         "offsets). Partitions are assigned explicitly and nothing is committed. Without "
                         "--until-end it records until Ctrl-C.")  # fmt: skip
    rec.add_argument("--topics", required=True, metavar="T1,T2", help="comma-separated topics to record")
    rec.add_argument("--out", required=True, metavar="DIR", help="recording directory to create")
    start = rec.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="start at the earliest offsets")
    start.add_argument("--from", dest="from_time", metavar="TIME",
                       help="start at the first records at or after TIME (epoch ms, ISO-8601, or -2h)")  # fmt: skip
    rec.add_argument("--until-end", action="store_true", help="stop at the end offsets taken when recording starts")
    _add_kafka_args(rec, config_required=False)
    no_progress(rec)
    rec.set_defaults(handler=cmd_record)

    rep = sub.add_parser("replay", help="produce a recording back to Kafka",
                         description="Produce a recording to Kafka with the same keys, values, timestamps, "
                         "headers and partition numbers, each partition in recorded order (idempotent "
                         "producer, every delivery checked). The recorded timestamps become the records' Kafka "
                         "timestamps (CreateTime): a broker deletes records older than the destination topic's "
                         "retention.ms (7 days by default) soon after they are written, so an old recording "
                         "replayed as it is can leave nothing to read. The replay warns when a destination "
                         "topic's retention.ms is shorter than the age of the records; --rewrite-timestamps "
                         "shifts them to now. The event time in the payloads is never changed.")  # fmt: skip
    rep.add_argument("recording", metavar="DIR", help="recording directory")
    rep.add_argument("--to-kafka", action="store_true", required=True, help="produce to Kafka (the destination)")
    rep.add_argument(
        "--speed",
        default="max",
        metavar="x10|max",
        help="max (default): as fast as possible; xN: paced by recorded timestamps, N x faster",
    )
    rep.add_argument("--topic-map", action="append", metavar="REC=DEST", help="produce a recorded topic to another")
    rep.add_argument("--create-topics", action="store_true", help="create missing topics with the recorded partitions")
    rep.add_argument("--rewrite-timestamps", action="store_true",
                     help="produce with Kafka timestamps shifted by one amount so the latest recorded one is now "
                     "(order and spacing kept; payloads untouched): needed when the recording is older than the "
                     "topic's retention.ms, or the broker deletes the records")  # fmt: skip
    _add_kafka_args(rep, config_required=False)
    no_progress(rep)
    rep.set_defaults(handler=cmd_replay)

    bt = sub.add_parser("backtest", help="run the configured learners on a recording, no broker",
                        description="Run the learners of --config through the same pipeline as `stream run` on a "
                        "recording (per-partition order, partitions merged by timestamp) and report.")  # fmt: skip
    bt.add_argument("recording", metavar="DIR", help="recording directory")
    bt.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    bt.add_argument("--out", metavar="OUTDIR", help="write outputs/<topic>.jsonl, report.txt, report.json, quality.png")
    bt.add_argument("--topic-map", action="append", metavar="REC=CONF", help="read a recorded topic as another")
    bt.add_argument("--no-chart", dest="chart", action="store_false", help="no quality chart (PNG)")
    bt.add_argument("--checkpoint-out", metavar="FILE",
                    help="write the learners as the recording left them as a checkpoint (warm start: serve it "
                         "with `stream model import FILE --whole`)")  # fmt: skip
    no_progress(bt)
    bt.set_defaults(handler=cmd_backtest)

    sim = sub.add_parser("simulate", help="generate a realistic e-commerce event stream with known ground truth",
                         description="Simulate clicks, purchases, prices and fraud labels (deterministic for a "
                         "seed) into Kafka or a recording, with the ground truth (tastes, elasticities, "
                         "frauds, drift points) in truth.json.")  # fmt: skip
    sim.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    size = sim.add_mutually_exclusive_group()
    size.add_argument("--events", type=int, default=100_000, metavar="N", help="number of events (default 100000)")
    size.add_argument("--duration", metavar="D", help="event time to simulate instead (30m, 6h, 2d)")
    dest = sim.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to-kafka", action="store_true", help="produce to the configured input topics")
    dest.add_argument("--out", metavar="DIR", help="write a recording directory (with truth.json)")
    sim.add_argument("--truth", default="truth.json", metavar="FILE", help="ground truth file with --to-kafka")
    sim.add_argument("--users", type=int, default=5000, metavar="N", help="users (default 5000)")
    sim.add_argument("--items", type=int, default=1000, metavar="N", help="items (default 1000)")
    sim.add_argument("--categories", type=int, default=12, metavar="N", help="categories (default 12)")
    sim.add_argument("--fraud-rate", type=float, default=0.01, metavar="F", help="share of fraudulent orders")
    sim.add_argument("--bad-records", type=int, default=0, metavar="N", help="invalid records to mix in")
    sim.add_argument("--partitions", type=int, default=1, metavar="N", help="partitions per topic with --out")
    sim.add_argument("--no-drifts", dest="drifts", action="store_false", help="no scheduled drifts")
    sim.add_argument("--searches-per-session", type=float, default=0.0, metavar="F",
                     help="search and ads requests per session, topic `searches` (default 0: none)")  # fmt: skip
    sim.add_argument("--create-topics", action="store_true", help="create missing input topics with --to-kafka")
    _add_kafka_args(sim, config_required=False)
    no_progress(sim)
    sim.set_defaults(handler=cmd_simulate)

    demo = sub.add_parser("demo", help="simulator -> learners -> metrics in one process, scored against the truth",
                          description="Simulate events, run the learners of the default config on them (no broker, "
                          "or through Kafka with --bootstrap-servers), serve /metrics meanwhile and report "
                          "quality and drift detection against the simulator's ground truth.")  # fmt: skip
    demo.add_argument("--events", type=int, default=100_000, metavar="N", help="events to simulate (default 100000)")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    demo.add_argument("--metrics-port", type=int, metavar="N", help="Prometheus /metrics port (default from config)")
    demo.add_argument("--metrics-host", metavar="ADDR", help="address /metrics listens on (default from config)")
    demo.add_argument("--bootstrap-servers", metavar="H:P", help="go through this Kafka cluster (fresh topics)")
    demo.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    demo.add_argument("--keep-topics", action="store_true", help="with --bootstrap-servers: keep the demo topics")
    demo.add_argument("--searches-per-session", type=float, default=0.0, metavar="F",
                      help="add search and ads requests for the ranking learner (default 0: none)")  # fmt: skip
    no_progress(demo)
    demo.set_defaults(handler=cmd_demo)


# -- model list, export, import, rollback, sign ----------------------------------------------


def _model_handler(fn: Callable[[argparse.Namespace, Config], int]) -> Handler:
    """``fn`` with the configuration of its arguments; a refused or unreadable checkpoint exits 4."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args, _config(args))
        except (StateError, CheckpointError, OSError) as exc:
            print(f"stream: {exc}", file=sys.stderr)
            return EXIT_REFUSED

    return handler


def cmd_model_list(args: argparse.Namespace, config: Config) -> int:
    """``stream model list``: see ``stream model list --help``."""
    listing = list_models(config, offline=args.offline)
    print(listing.json() if args.json else listing.text())
    return 0


def cmd_model_export(args: argparse.Namespace, config: Config) -> int:
    """``stream model export``: see ``stream model export --help``."""
    return export_model(config, Path(args.out), version=args.version, learner=args.learner, fmt=args.format)


def cmd_model_import(args: argparse.Namespace, config: Config) -> int:
    """``stream model import``: see ``stream model import --help``."""
    return import_model(
        config,
        args.path,
        learner=args.learner,
        at_committed=args.at_committed,
        at_source=args.at_source,
        whole=args.whole,
        trust_pickle=args.trust_pickle,
        access=GroupAccess(offline=args.offline, force=args.force),
    )


def cmd_model_rollback(args: argparse.Namespace, config: Config) -> int:
    """``stream model rollback``: see ``stream model rollback --help``."""
    access = GroupAccess(offline=args.offline, force=args.force)
    return rollback(config, to=args.to, learner=args.learner, access=access)


def cmd_model_sign(args: argparse.Namespace, config: Config) -> int:
    """``stream model sign``: see ``stream model sign --help``."""
    return sign(config, version=args.version)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    model = sub.add_parser("model", help="list, export, import or roll back the checkpointed models")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, *, offline: bool = True) -> None:
        _add_kafka_args(p)
        if offline:
            p.add_argument("--offline", action="store_true", help="do not contact the broker")

    force_help = "install even if holdout validation refuses it, or the group is live"
    p = actions.add_parser("list", help="checkpoints (versions) with time, offsets, model versions and rolling quality")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (the verified headers)")
    p.set_defaults(handler=_model_handler(cmd_model_list))

    p = actions.add_parser("export", help="write a checkpoint (or one learner's River model) to a file")
    common(p, offline=False)
    p.add_argument("--out", required=True, metavar="PATH")
    p.add_argument("--learner", metavar="NAME", help="only this learner")
    p.add_argument("--version", type=int, metavar="N", help="checkpoint version (default: the newest valid)")
    p.add_argument(
        "--format",
        choices=("checkpoint", "pickle"),
        default="checkpoint",
        help="a verified checkpoint file (default), or the bare pickled River model of --learner",
    )
    p.set_defaults(handler=_model_handler(cmd_model_export))

    p = actions.add_parser("import", help="serve a model trained elsewhere (checkpoint file or pickled River model)")
    common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--learner", metavar="NAME", help="the learner whose model is replaced")
    p.add_argument("--force", action="store_true", help=force_help)
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--at-committed",
        action="store_true",
        help="with no checkpoint yet: serve from the committed offsets (default: learn from the beginning)",
    )
    start.add_argument(
        "--at-source",
        action="store_true",
        help="with no checkpoint yet: serve from the offsets of the imported checkpoint (a backtest's: just after "
        "the recorded records, when the recording is of these topics)",
    )
    p.add_argument(
        "--whole",
        action="store_true",
        help="import the whole learners of a checkpoint (model, per-user and per-item state, predictions "
        "waiting for labels), not only their River models: the warm start from `stream backtest --checkpoint-out`",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="the file is trusted: load a bare pickle (unpickling runs its code), or a checkpoint not "
        "signed by this deployment's key; without it both are refused",
    )
    p.set_defaults(handler=_model_handler(cmd_model_import))

    p = actions.add_parser("rollback", help="serve the model of an earlier checkpoint version again")
    common(p)
    p.add_argument("--to", type=int, required=True, metavar="VERSION", help="checkpoint version (see `model list`)")
    p.add_argument("--learner", metavar="NAME", help="only this learner (default: all)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(handler=_model_handler(cmd_model_rollback))

    p = actions.add_parser(
        "sign",
        help="sign checkpoints in the directory with the current checkpoint key (you vouch for them)",
        description="Sign the group's checkpoints with the first configured key: to enable a key on an existing "
        "deployment, or to re-sign after a rotation. Lengths and checksums are verified, nothing is unpickled. "
        "Only sign files you know the service wrote.",
    )
    common(p, offline=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every checkpoint of the group")
    which.add_argument("--version", type=int, metavar="N", help="only this checkpoint version")
    p.set_defaults(handler=_model_handler(cmd_model_sign))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream", description="River online learners fed by Kafka event streams.")
    parser.add_argument("--version", action="version", version=f"stream {__version__} (river {river.__version__})")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="consume the input topics, predict, learn and publish until stopped",
        description="Consume the input topics, predict then learn on every event, publish "
        "predictions; SIGTERM/SIGINT drain, commit and exit 0.",
    )
    _add_kafka_args(run)
    run.add_argument("--metrics-port", type=int, metavar="N", help="Prometheus /metrics port (0 disables)")
    run.add_argument("--metrics-host", metavar="ADDR", help="address /metrics listens on (default 0.0.0.0: all)")
    run.add_argument("--group-id", metavar="G", help="consumer group id (overrides config)")
    run.add_argument("--checkpoint-storage", choices=("directory", "kafka"),
                     help="where checkpoints live (overrides [checkpoints] storage)")  # fmt: skip
    run.set_defaults(handler=cmd_run)

    topics = sub.add_parser("topics", help="manage the configured topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser(
        "create", help="create every configured input, output and dead-letter topic (idempotent)"
    )
    _add_kafka_args(create)
    create.set_defaults(handler=cmd_topics_create)
    _add_replay_commands(sub)
    _add_model_commands(sub)
    return parser


def kafka_error_text(exc: BaseException) -> str:
    """A librdkafka error (typically a configuration librdkafka rejects) safe to print: quoted
    text that is not a property name (``Invalid value "..." for configuration property "x.y"``)
    and every secret of the loaded configurations are replaced by ``***``."""
    err: Any = exc.args[0] if exc.args else None
    text = f"{err.name()}: {err.str()}" if hasattr(err, "str") and hasattr(err, "name") else str(exc)

    def quoted(m: re.Match[str]) -> str:
        return m[0] if re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+", m[1]) else '"***"'

    return scrub(re.sub(r'"([^"]*)"', quoted, text))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"stream: configuration error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except KafkaException as exc:
        # Raised where a client is created with properties librdkafka rejects (unknown, invalid).
        print(f"stream: kafka client configuration error: {kafka_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- argument types and signals ------------------------------------------------------------


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, None: 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``6h``, ``2d``.

    >>> parse_duration("90"), parse_duration("30m"), parse_duration("1.5h")
    (90.0, 1800.0, 5400.0)
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"`{text}` is not a duration (examples: 90s, 30m, 6h, 2d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Epoch milliseconds from an epoch-ms number, an ISO-8601 time (UTC
    unless it says otherwise) or a duration ago (``-2h``, ``2h ago``).

    >>> parse_time("1700000000000"), parse_time("2023-11-14T22:13:20Z")
    (1700000000000, 1700000000000)
    >>> parse_time("-1h", now_ms=1700003600000)
    1700000000000
    """
    text = text.strip()
    if re.fullmatch(r"\d{10,}", text):
        return int(text)
    ago = re.fullmatch(r"-\s*(.+)|(.+?)\s+ago", text)
    if ago:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        return now - int(parse_duration(ago.group(1) or ago.group(2)) * 1000)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"`{text}` is not a time (epoch ms, ISO-8601 like 2024-05-01T12:00:00Z, or -2h)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def parse_speed(text: str) -> float | None:
    """Replay speed: ``max`` (None: as fast as possible) or a factor (``x10``, ``10x``, ``0.5``).

    >>> parse_speed("max"), parse_speed("x10"), parse_speed("2.5x"), parse_speed("1")
    (None, 10.0, 2.5, 1.0)
    """
    t = text.strip().lower()
    if t in ("max", "inf", "unlimited"):
        return None
    m = re.fullmatch(r"x?(\d+(?:\.\d+)?)x?", t)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"`{text}` is not a speed (max, x10, 0.5)")
    return float(m.group(1))


def parse_topic_map(items: Sequence[str] | None) -> dict[str, str]:
    """``["a=b", "c=d,e=f"]`` -> ``{"a": "b", "c": "d", "e": "f"}``.

    >>> parse_topic_map(["clicks=clicks-copy", "prices=p2,purchases=p3"])
    {'clicks': 'clicks-copy', 'prices': 'p2', 'purchases': 'p3'}
    """
    out: dict[str, str] = {}
    for item in items or ():
        for pair in item.split(","):
            if not pair.strip():
                continue
            src, sep, dst = pair.partition("=")
            if not sep or not src.strip() or not dst.strip():
                raise ValueError(f"`{pair}` is not a topic mapping (recorded=destination)")
            out[src.strip()] = dst.strip()
    return out


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """``stop()`` turns True on SIGINT/SIGTERM (restored afterwards), so a CLI
    loop ends cleanly and still writes its manifest or report."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event.is_set
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: event.set())
    try:
        yield event.is_set
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    raise SystemExit(main())
