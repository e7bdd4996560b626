"""The Prometheus configuration and alert rules, checked and unit-tested by the real promtool.

``promtool test rules`` runs ``configs/prometheus/alerts_test.yml``: each alert
fires on a synthetic history and stays quiet on a healthy one. Skipped (with
the reason) only when promtool is not installed, and then failed under
``STREAM_REQUIRE_KAFKA=1`` like the other tests needing outside tools.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "configs" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package `prometheus`; tests/run.sh installs it)"
        if os.environ.get("STREAM_REQUIRE_KAFKA") == "1":
            pytest.fail(f"{message} (STREAM_REQUIRE_KAFKA=1)", pytrace=False)
        pytest.skip(message)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=PROM, capture_output=True, text=True, timeout=120)


def test_rule_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_and_config_are_valid(promtool: str) -> None:
    rules = run(promtool, "check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = run(promtool, "check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", (PROM / "alerts.yml").read_text(), flags=re.M)


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    names = alert_names()
    assert len(names) == len(set(names)) >= 5
    tests = (PROM / "alerts_test.yml").read_text()
    for name in names:
        # An expectation with at least one alert (exp_labels), not only "stays quiet".
        firing = re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests)
        assert firing, f"alerts_test.yml never makes {name} fire"


def test_the_required_conditions_are_covered() -> None:
    text = (PROM / "alerts.yml").read_text()
    for metric in (
        "stream_concept_drift_detections_total",  # drift detected
        "stream_model_quality",  # quality below a threshold
        "stream_consumer_lag_records",  # lag growing
        'outcome=~"dead_letter_.+"',  # dead letters spiking
        "rate(stream_events_consumed_total[5m])) == 0",  # no events
    ):
        assert metric in text


def test_every_alert_has_a_severity_and_a_summary() -> None:
    text = (PROM / "alerts.yml").read_text()
    blocks = re.split(r"^\s*- alert:", text, flags=re.M)[1:]
    assert len(blocks) == len(alert_names())
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"severity: (critical|warning|info)\b", block), name
        assert "summary:" in block, name
