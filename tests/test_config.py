"""Configuration: typed, validated once, errors name the key (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import ConfigError, load_config, redact

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_default_config_is_valid() -> None:
    config = load_config(ROOT / "configs" / "default.toml")
    assert config.topics.dead_letters == "dead-letters"
    assert config.learners, "the default config defines learners"


def test_no_file_gives_defaults() -> None:
    config = load_config(None)
    assert config.kafka.bootstrap_servers == "localhost:9092"
    assert config.processing.guarantee == "at_least_once"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown field `bootstrap_server`.*\$\.kafka"):
        load_config(write(tmp_path, '[kafka]\nbootstrap_server = "x:1"\n'))


def test_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.processing\.batch_size"):
        load_config(write(tmp_path, '[processing]\nbatch_size = "many"\n'))


def test_out_of_range_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.topics\.partitions"):
        load_config(write(tmp_path, "[topics]\npartitions = 0\n"))


def test_bad_guarantee_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.processing\.guarantee"):
        load_config(write(tmp_path, '[processing]\nguarantee = "maybe_once"\n'))


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[kafka\n"))


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_environment_overrides_brokers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_BOOTSTRAP_SERVERS", "broker-1:9092,broker-2:9092")
    config = load_config(write(tmp_path, '[kafka]\nbootstrap_servers = "x:1"\n'))
    assert config.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"


def test_command_line_overrides_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_BOOTSTRAP_SERVERS", "env:1")
    config = load_config(None, overrides={"kafka.bootstrap_servers": "cli:2", "kafka.group_id": "g2"})
    assert (config.kafka.bootstrap_servers, config.kafka.group_id) == ("cli:2", "g2")


def test_client_overrides_pass_through(tmp_path: Path) -> None:
    from stream.kafka import consumer_config, producer_config

    config = load_config(
        write(
            tmp_path,
            """
[kafka.common]
"security.protocol" = "SASL_SSL"
"sasl.password" = "hunter2"
[kafka.producer]
"linger.ms" = 50
""",
        )
    )
    assert producer_config(config)["linger.ms"] == 50
    assert consumer_config(config)["security.protocol"] == "SASL_SSL"
    assert consumer_config(config)["enable.auto.commit"] is False


def test_secrets_are_redacted() -> None:
    safe = redact(
        {
            "sasl.password": "hunter2",
            "sasl.username": "me",
            "ssl.key.password": "k",
            "sasl.oauthbearer.client.secret": "s",
            "linger.ms": 5,
        }
    )
    assert "hunter2" not in str(safe) and "'k'" not in str(safe) and "'s'" not in str(safe)
    assert safe["sasl.username"] == "me" and safe["linger.ms"] == 5


def test_unknown_learner_kind_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.learners\.x"):
        load_config(write(tmp_path, '[learners.x]\nkind = "telepathy"\n'))


def test_unknown_river_class_is_named(tmp_path: Path) -> None:
    text = """
[learners.x]
kind = "custom"
input = "purchases"
output_topic = "out"
label = "quantity"
task = "regression"
model = { class = "linear_model.LinearRegresion" }
"""
    with pytest.raises(ConfigError, match=r"learners\.x.*LinearRegresion"):
        load_config(write(tmp_path, text))


def test_unknown_river_parameter_is_named(tmp_path: Path) -> None:
    text = """
[learners.x]
kind = "custom"
input = "purchases"
output_topic = "out"
label = "quantity"
task = "regression"
model = { class = "linear_model.LinearRegression", params = { learning_rate = 0.1 } }
"""
    with pytest.raises(ConfigError, match=r"learning_rate"):
        load_config(write(tmp_path, text))


def test_model_task_mismatch_is_named(tmp_path: Path) -> None:
    text = """
[learners.x]
kind = "custom"
input = "purchases"
output_topic = "out"
label = "quantity"
task = "binary"
model = { class = "linear_model.LinearRegression" }
"""
    with pytest.raises(ConfigError, match=r"binary task needs a River Classifier"):
        load_config(write(tmp_path, text))
