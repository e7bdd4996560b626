"""docker-compose.yml, the Dockerfile and the Grafana/Prometheus files they mount,
checked without a Docker engine.

What can be checked here: the files parse (PyYAML when installed, else a
line-level reading of the subset we use), every file or directory they
reference exists, the services, commands and ports are the documented ones
and agree with each other (scrape target, datasource URL, mount paths,
dashboard datasource uid), the ``stream`` command lines parse with the real
CLI, and ``docker compose config`` / ``docker-compose config`` validates the
file when such a client is installed (no engine needed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stream.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
GRAFANA = ROOT / "configs" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stream.json"
DOCS = ROOT / "docs" / "observability.md"

try:
    import yaml  # type: ignore[import-untyped]
except ImportError:  # not a dependency: the line-level checks below still run
    yaml = None


def compose_text() -> str:
    return COMPOSE.read_text()


def services() -> dict[str, str]:
    """Service name -> its block of text (two-space indented keys under ``services:``)."""
    text = compose_text()
    body = text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    names = re.findall(r"^  ([a-z][\w-]*):\s*$", body, flags=re.M)
    blocks = re.split(r"^  [a-z][\w-]*:\s*$", body, flags=re.M)[1:]
    return dict(zip(names, blocks, strict=True))


def command(block: str) -> list[str]:
    """A service's command, written as a flow list or a block list of strings."""
    flow = re.search(r"^    command: \[(.*)\]\s*$", block, flags=re.M)
    if flow:
        return [item.strip().strip('"') for item in flow.group(1).split(",")]
    listed = re.search(r"^    command:\s*\n((?:      - .*\n)+)", block, flags=re.M)
    assert listed, block
    return [line.strip()[2:].strip('"') for line in listed.group(1).splitlines()]


def test_no_tabs_and_the_expected_services() -> None:
    assert "\t" not in compose_text()
    assert set(services()) == {"kafka", "topics", "stream", "stream-2", "simulator", "prometheus", "grafana"}
    assert re.search(r"^    image: apache/kafka:[\d.]+$", services()["kafka"], flags=re.M)
    assert "KAFKA_PROCESS_ROLES: broker,controller" in services()["kafka"]  # KRaft, no ZooKeeper


def test_stream_commands_are_the_documented_ones_and_parse() -> None:
    s = services()
    assert command(s["topics"]) == [
        "topics",
        "create",
        "--config",
        "configs/default.toml",
        "--bootstrap-servers",
        "kafka:9092",
    ]
    assert command(s["stream"])[:1] == ["run"] and "--metrics-port" in command(s["stream"])
    simulate = command(s["simulator"])
    assert simulate[:7] == [
        "simulate",
        "--to-kafka",
        "--bootstrap-servers",
        "kafka:9092",
        "--config",
        "configs/default.toml",
        "--events",
    ]
    parser = build_parser()
    for name in ("topics", "stream", "stream-2"):
        parser.parse_args(command(s[name]))  # SystemExit on a wrong flag
    # Two instances of one group, checkpoints in Kafka: nothing shared but the cluster.
    for name in ("stream", "stream-2"):
        assert command(s[name])[-2:] == ["--checkpoint-storage", "kafka"] and "volumes:" not in s[name], name
    assert "STREAM_INSTANCE_ID: stream-1" in s["stream"] and "STREAM_INSTANCE_ID: stream-2" in s["stream-2"]
    # Both learn: one group (the same configuration), and at least as many tasks as instances.
    assert command(s["stream"])[:4] == command(s["stream-2"])[:4] and "--group-id" not in command(s["stream-2"])
    from stream.config import load_config

    config = load_config(ROOT / command(s["stream"])[command(s["stream"]).index("--config") + 1])
    assert config.topics.partitions >= 2, "one partition makes one task: the second instance would only wait"
    subcommands: Any = next(a for a in parser._actions if a.dest == "command").choices
    if "simulate" in subcommands:
        parser.parse_args([arg.replace("${SIM_EVENTS:-500000}", "500000") for arg in simulate])
    for args in (command(s["topics"]), command(s["stream"]), simulate):
        config = args[args.index("--config") + 1]
        assert (ROOT / config).is_file(), config


def test_ordering_between_services() -> None:
    s = services()
    assert re.search(r"kafka:\n\s+condition: service_healthy", s["topics"])
    for name in ("stream", "stream-2", "simulator"):
        assert re.search(r"topics:\n\s+condition: service_completed_successfully", s[name]), name
    assert "healthcheck:" in s["kafka"]


def test_every_mounted_or_built_path_exists() -> None:
    text = compose_text()
    mounts = re.findall(r"^\s+- \./([^:\s]+):(/[^:\s]+)(?::ro)?\s*$", text, flags=re.M)
    assert len(mounts) >= 4
    for host, _ in mounts:
        assert (ROOT / host).exists(), host
    assert "build: ." in text and DOCKERFILE.is_file()
    targets = dict(mounts)
    # Prometheus reads the rules next to its config; Grafana finds provisioning and dashboards.
    assert targets["configs/prometheus"] == "/etc/prometheus"
    assert targets["configs/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = (GRAFANA / "provisioning" / "dashboards" / "stream.yml").read_text()
    assert f"path: {targets['configs/grafana/dashboards']}" in provider


def test_host_ports_are_unique_and_documented() -> None:
    published = re.findall(r'^\s+- "(\d+):(\d+)"\s*$', compose_text(), flags=re.M)
    hosts = [h for h, _ in published]
    assert len(hosts) == len(set(hosts))
    assert set(hosts) == {"29092", "9100", "9101", "9090", "3000"}
    docs = DOCS.read_text()
    for url in ("http://localhost:3000", "http://localhost:9090", "http://localhost:9100/metrics"):
        assert url in docs and url in compose_text(), url


def test_the_pieces_point_at_each_other() -> None:
    s = services()
    prometheus = (ROOT / "configs" / "prometheus" / "prometheus.yml").read_text()
    assert 'targets: ["stream:9100", "stream-2:9100"]' in prometheus
    assert "--metrics-port 9100" in " ".join(command(s["stream"])) and '"9100:9100"' in s["stream"]
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in datasource and '"9090:9090"' in s["prometheus"]
    uid = re.search(r"^\s+uid: (\S+)$", datasource, flags=re.M)
    assert uid is not None
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == uid.group(1) for p in panels)
    assert all(t["datasource"]["uid"] == uid.group(1) for p in panels for t in p["targets"])


def test_dashboard_layout_and_coverage() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "stream_events_consumed_total",
        "stream_consumer_lag_records",
        "stream_event_to_prediction_seconds",
        "stream_record_processing_seconds",
        'outcome=~"dead_letter_.+"',
        "stream_model_quality",
        "stream_concept_drift_detections_total",
        "stream_data_drift_score",
        "stream_model_switches_total",
        "stream_labels_total",
        "stream_checkpoint_last_success_timestamp_seconds",
    ):
        assert metric in exprs, metric


def test_dockerfile_copies_what_exists_and_runs_stream() -> None:
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.11", text, flags=re.M)
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["stream"]' in text and "USER stream" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".kafka-jars" in ignored and "stream" not in ignored and "configs" not in ignored


@pytest.mark.skipif(yaml is None, reason="PyYAML not installed: the line-level checks above stand in for parsing")
def test_yaml_files_parse() -> None:
    doc: Any = yaml.safe_load(compose_text())
    assert set(doc["services"]) == set(services())
    for name in ("stream", "topics", "simulator"):
        assert doc["services"][name]["build"] == "."
    for path in [*(ROOT / "configs" / "prometheus").glob("*.yml"), *(GRAFANA / "provisioning").rglob("*.yml")]:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def compose_clients() -> list[list[str]]:
    clients = []
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            clients.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        clients.append(["docker-compose"])
    return clients


def test_compose_client_validates_the_file() -> None:
    clients = compose_clients()
    if not clients:
        pytest.skip("no `docker compose` plugin or docker-compose client installed")
    for client in clients:
        result = subprocess.run(
            [*client, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{' '.join(client)} config: {result.stderr}"
