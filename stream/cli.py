"""The ``stream`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import river

from stream import __version__
from stream.config import Config, ConfigError, load_config
from stream.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("stream.cli")

Handler = Callable[[argparse.Namespace], int]


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "kafka.bootstrap_servers": getattr(args, "bootstrap_servers", None),
        "kafka.group_id": getattr(args, "group_id", None),
        "metrics.port": getattr(args, "metrics_port", None),
    }
    return load_config(args.config, overrides=overrides)


def _add_kafka_args(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, metavar="FILE", help="TOML configuration (see configs/)")
    p.add_argument(
        "--bootstrap-servers", metavar="H:P", help="Kafka brokers (overrides config and STREAM_BOOTSTRAP_SERVERS)"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from stream.app import Application
    from stream.metrics import serve_metrics

    config = _config(args)
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
    run.add_argument("--group-id", metavar="G", help="consumer group id (overrides config)")
    run.set_defaults(handler=cmd_run)

    topics = sub.add_parser("topics", help="manage the configured topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser(
        "create", help="create every configured input, output and dead-letter topic (idempotent)"
    )
    _add_kafka_args(create)
    create.set_defaults(handler=cmd_topics_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"stream: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
