"""A real Prometheus scrapes a running pipeline fed through a real broker, and
every PromQL expression of the dashboard and the alert rules returns data.

The expressions are not copied here: the dashboard's are read from its JSON
(panel targets, variable queries, annotations), the rules' from Prometheus's
own ``/api/v1/rules`` after it loaded ``configs/prometheus/alerts.yml``.
An alert expression is empty while its condition is false, so what must
return data is each *operand* of its comparisons and set operations
(``a > 1000 and b > 0`` -> ``a``, ``b``): that proves every series and label
the rule relies on exists with the right name. The drift alert's full
expression must return data too, since the test injects a concept change.

The pipeline is ``stream.app.Application`` in a thread (metrics on a free
loopback port) with a config-defined binary learner (``reaction = "switch"``);
the Prometheus binary is the Debian one, on a free port, with temp storage
and a 1 s scrape interval.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from kafka_broker import create_topics

from stream.app import Application
from stream.config import parse_config
from stream.learners.configured import ConfiguredLearner
from stream.metrics import PipelineMetrics, new_registry

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana" / "dashboards" / "stream.json"
RULES = ROOT / "configs" / "prometheus" / "alerts.yml"
#: Grafana's variables and macros, as the test's Prometheus (1 s scrapes) needs them.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "10s",
    "$__interval": "2s",
    "$__range": "5m",
    "$job": ".*",
    "$topic": ".*",
    "$learner": ".*",
}
DEADLINE_S = 60.0


def required_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian package `prometheus`; tests/run.sh installs it)"
        if os.environ.get("STREAM_REQUIRE_KAFKA") == "1":
            pytest.fail(f"{message} (STREAM_REQUIRE_KAFKA=1)", pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- expressions ------------------------------------------------------------------------------


def dashboard_expressions(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression in the dashboard, Grafana variables substituted."""
    exprs: list[str] = []

    def panels(items: list[Any]) -> Iterator[Any]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)  # Grafana's function, not PromQL
        exprs.append(match.group(1) if match else query)
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if a.get("expr")]
    return [substitute(e) for e in exprs]


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


_SPLIT = ("==", "!=", ">=", "<=", ">", "<", " and ", " or ", " unless ")
_MODIFIER = re.compile(r"^\s*(?:bool\b|(?:on|ignoring|group_left|group_right)\s*\([^)]*\))\s*")


def operands(expr: str) -> list[str]:
    """The value-producing parts of ``expr``: split on comparison and set operators
    outside brackets, braces and strings; numbers and modifiers dropped."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    flat = " ".join(expr.split())
    while i < len(flat):
        c = flat[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((op for op in _SPLIT if flat.startswith(op, i)), None)
            if op is not None:
                parts.append(flat[start:i])
                i += len(op)
                start = i
                continue
        i += 1
    parts.append(flat[start:])
    out = []
    for part in parts:
        while (m := _MODIFIER.match(part)) and m.end():
            part = part[m.end() :]
        part = part.strip()
        if part and not re.fullmatch(r"[-+]?[0-9.e]+", part):
            out.append(part)
    return out


def test_operands() -> None:
    assert operands('up{job="stream"} == 0') == ['up{job="stream"}']
    assert operands('sum by (t) (x{o=~"a.+"}) > 1000 and sum by (t) (delta(x[10m])) > 0') == [
        'sum by (t) (x{o=~"a.+"})',
        "sum by (t) (delta(x[10m]))",
    ]
    assert operands("abs(a - ignoring (m) b) > 0.1") == ["abs(a - ignoring (m) b)"]
    assert operands("time() - c > 900") == ["time() - c"]
    assert operands("rate(x[5m]) > bool on(a) y") == ["rate(x[5m])", "y"]


# -- the running system ----------------------------------------------------------------------------


class LabelledLearner(ConfiguredLearner):
    """A config-defined learner that also reports label counters (the label-join
    learners of ``stream.labels`` do; the test needs the series to exist)."""

    def label_stats(self) -> Mapping[str, int]:
        return {"received": self.n_learned, "expired": self.n_learned // 50}


def producer_thread(bootstrap: str, topic: str, stop: threading.Event) -> threading.Thread:
    """1500 events of a first concept at once, then a changed concept at ~150
    events/s until stopped; one record in 50 is not JSON (dead letter)."""

    def run() -> None:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        rng = random.Random(3)
        i = 0
        while not stop.is_set():
            a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
            y = (a + b > 0) if i < 1500 else (a - b > 0)
            doc = {"event_id": f"e{i}", "ts": int(time.time() * 1000), "a": a, "b": b, "y": y}
            value = b"{not json" if i % 50 == 49 else json.dumps(doc).encode()
            producer.produce(topic, value=value, key=f"k{i % 13}".encode())
            i += 1
            if i >= 1500:
                producer.poll(0)
                time.sleep(1 / 150)
        producer.flush(10)

    thread = threading.Thread(target=run, name="producer", daemon=True)
    thread.start()
    return thread


def prometheus_server(tmp: Path, target_port: int) -> tuple[subprocess.Popen[bytes], str]:
    binary = required_binary("prometheus")
    port = free_port()
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: stream\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("prometheus did not become ready in 30 s")


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=10) as response:
        doc = json.loads(response.read())
    assert doc["status"] == "success", doc
    return doc["data"]


def has_data(url: str, expr: str) -> bool:
    return bool(api(url, "/api/v1/query", query=expr)["result"])


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1.0)
    return predicate()


@pytest.fixture()
def running(
    kafka_bootstrap: str, unique_topics: Callable[..., list[str]], tmp_path: Path
) -> Iterator[tuple[str, PipelineMetrics, int]]:
    events, out, dead = unique_topics("events", "out", "dead")
    create_topics(kafka_bootstrap, [events, out, dead], partitions=2)
    # The ranking learner's topics: its quality series (the ranking panels) exist from the start.
    ranking_topics = unique_topics("searches", "clicks", "purchases", "rankings")
    ranking_inputs = dict(zip(("searches", "clicks", "purchases"), ranking_topics[:3], strict=True))
    create_topics(kafka_bootstrap, ranking_topics, partitions=1)
    # The demand learner's (it shares purchases): its quality series (the inventory panels, the stock-out alert).
    prices, forecasts = unique_topics("prices", "demand-forecasts")
    create_topics(kafka_bootstrap, [prices, forecasts], partitions=1)
    config = parse_config(
        {
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "group_id": f"g-{events}",
                "consumer": {"session.timeout.ms": 6000},
            },
            "topics": {"dead_letters": dead, "prices": prices, **ranking_inputs},
            "processing": {"batch_size": 200, "poll_timeout_s": 0.1, "commit_interval_s": 0.5},
            "metrics": {"port": 0, "stats_interval_s": 1.0, "feature_sample_every": 1, "feature_window": 100},
            "learners": {
                "clf": {
                    "kind": "custom",
                    "input": events,
                    "output_topic": out,
                    "label": "y",
                    "task": "binary",
                    "features": ["a", "b"],
                    "model": {"class": "naive_bayes.GaussianNB"},
                    "drift": {"detector": "adwin", "reaction": "switch", "min_samples": 100},
                },
                "ranking": {"kind": "ranking", "output_topic": ranking_topics[3]},
                "demand": {"kind": "demand", "output_topic": forecasts},
            },
        }
    )
    learner = LabelledLearner("clf", config.learners["clf"], config.input_topics())  # type: ignore[arg-type]
    registry = new_registry()
    metrics = PipelineMetrics(registry, config.metrics)
    metrics_port = metrics.serve(0, addr="127.0.0.1", registry=registry)
    metrics.checkpoint_saved()  # stands for the checkpoint writer's call
    ranking = config.learners["ranking"].build("ranking", config.input_topics())
    demand = config.learners["demand"].build("demand", config.input_topics())
    app = Application(config, learners=[learner, ranking, demand], observer=metrics)
    app_thread = threading.Thread(target=app.run, name="app", daemon=True)
    stop = threading.Event()
    prometheus: subprocess.Popen[bytes] | None = None
    feeder: threading.Thread | None = None
    try:
        app_thread.start()
        prometheus, url = prometheus_server(tmp_path, metrics_port)
        # Events only once Prometheus has scraped the idle pipeline: the drift
        # counter's rise must happen under its eyes for increase() to see it.
        assert wait_for(lambda: has_data(url, 'up{job="stream"} == 1'), 20), "Prometheus never scraped the pipeline"
        feeder = producer_thread(kafka_bootstrap, events, stop)
        yield url, metrics, metrics_port
    finally:
        stop.set()
        app.stop()
        app_thread.join(30)
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(15)
        metrics.close()
        if feeder is not None:
            feeder.join(15)
    assert not app_thread.is_alive()


def test_every_dashboard_and_alert_expression_returns_data(running: tuple[str, PipelineMetrics, int]) -> None:
    url, metrics, metrics_port = running
    started = time.monotonic()

    rules = [rule for group in api(url, "/api/v1/rules")["groups"] for rule in group["rules"]]
    declared = re.findall(r"^\s*- (?:alert|record):", RULES.read_text(), flags=re.M)
    assert len(rules) == len(declared) >= 5, "Prometheus did not load every rule of alerts.yml"
    expressions = {f"rule {r['name']}: {op}": op for r in rules for op in operands(r["query"])}
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in dashboard_expressions(dashboard):
        for op in operands(expr):
            expressions[f"dashboard: {op}"] = op
    assert len(expressions) >= 30

    pending = dict(expressions)

    def all_have_data() -> bool:
        for name, expr in list(pending.items()):
            if has_data(url, expr):
                del pending[name]
        return not pending

    assert wait_for(all_have_data, DEADLINE_S), "no data for:\n" + "\n".join(sorted(pending))

    # The concept change was detected and shown: the drift alert's full expression
    # has data, the alert fires (no `for`), and the model switched to a candidate.
    drift_rule = next(r for r in rules if r["name"] == "StreamConceptDriftDetected")
    monitor = metrics.learners[0].evaluation.drift
    assert wait_for(lambda: has_data(url, drift_rule["query"]), 20), (
        f"worse={monitor.worse} better={monitor.better} switches={monitor.switches}"
    )
    assert wait_for(
        lambda: any(
            a["labels"]["alertname"] == "StreamConceptDriftDetected" and a["state"] == "firing"
            for a in api(url, "/api/v1/alerts")["alerts"]
        ),
        10,
    )
    assert wait_for(lambda: has_data(url, 'stream_model_switches_total{reason="drift"} > 0'), 20)
    assert time.monotonic() - started < 80

    # The live endpoint (with the process, platform and GC collectors) passes promtool's lint.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "stream_consumer_lag_records{" in body
    check = subprocess.run(
        [required_binary("promtool"), "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert (check.returncode, check.stdout, check.stderr) == (0, "", "")
