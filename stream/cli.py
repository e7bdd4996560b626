"""The ``stream`` command line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import river
from confluent_kafka import KafkaException

from stream import __version__
from stream.config import Config, ConfigError, load_config, scrub
from stream.logs import setup_logging

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
    from stream.app import Application
    from stream.metrics import serve_metrics

    config = _config(args, learners=True)
    observer = serve_metrics(config)
    app = Application(config, observer=observer)
    app.install_signal_handlers()
    return app.run()


def cmd_topics_create(args: argparse.Namespace) -> int:
    from stream.kafka import create_topics

    config = _config(args)
    for topic, status in sorted(create_topics(config).items()):
        print(f"{topic}\t{status}")
    return 0


# -- record, replay, backtest, simulate, demo: the work is in stream.replay, stream.simulate, stream.demo --


def cmd_record(args: argparse.Namespace) -> int:
    from stream.replay import record_command

    return record_command(args, _config(args))


def cmd_replay(args: argparse.Namespace) -> int:
    from stream.replay import replay_command

    return replay_command(args, _config(args))


def cmd_backtest(args: argparse.Namespace) -> int:
    from stream.replay import backtest_command

    return backtest_command(args, _config(args, learners=True))


def cmd_simulate(args: argparse.Namespace) -> int:
    from stream.simulate import simulate_command

    return simulate_command(args, _config(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import demo_command

    return demo_command(args)


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
                         "producer, every delivery checked).")  # fmt: skip
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
    no_progress(demo)
    demo.set_defaults(handler=cmd_demo)


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
    run.set_defaults(handler=cmd_run)

    topics = sub.add_parser("topics", help="manage the configured topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser(
        "create", help="create every configured input, output and dead-letter topic (idempotent)"
    )
    _add_kafka_args(create)
    create.set_defaults(handler=cmd_topics_create)
    _add_replay_commands(sub)
    # `stream model list|export|import|rollback`: checkpointed models (stream.model_admin).
    from stream.model_admin import add_model_commands

    add_model_commands(sub, _add_kafka_args, _config)
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


if __name__ == "__main__":
    raise SystemExit(main())
