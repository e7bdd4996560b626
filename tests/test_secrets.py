"""Client secrets stay in: the real ``stream run`` (a subprocess, against the real broker)
with secret-looking values in ``[kafka.common]``, ``[kafka.consumer]`` and
``[kafka.producer]`` prints none of them (stdout, stderr, ``/metrics``), nor does a run
with a misspelled key that librdkafka rejects (exit 2, the key named, its value not), nor
a configuration error.

The PLAINTEXT broker accepts ``sasl.*`` and ``ssl.*`` properties it does not use, so the
first run is a real, working run: it is stopped once it has consumed from its topics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream.cli import kafka_error_text
from stream.config import ConfigError, parse_config, redact, scrub
from stream.kafka import consumer_config, producer_config

ROOT = Path(__file__).resolve().parents[1]

#: Secret values, each unique enough to be searched for in every output.
SECRETS = {
    "common.sasl.password": "PW-common-7f3a9c21",
    "common.sasl.oauthbearer.config": "principal=stream clientSecret=OAUTH-secret-91b2e7",
    "consumer.ssl.key.password": "SSLKEY-consumer-55d1a0",
    "producer.sasl.oauthbearer.client.secret": "CLIENTSECRET-producer-e0c4",
    "producer.ssl.key.password": "SSLKEY-producer-4b9f",
}
TYPO_SECRETS = {"common.sasl.passwd": "TYPO-secret-3e8d11", "consumer.x.y": "UNKNOWN-secret-a1b2c3"}
LEARNER = """
[learners.basket]
kind = "custom"
input = "purchases"
output_topic = "{prefix}-basket"
label = "quantity"
task = "regression"
features = ["unit_price"]
model = [{{ class = "linear_model.LinearRegression" }}]
"""


def toml_for(secrets: dict[str, str], prefix: str, tmp: Path, port: int) -> str:
    sections: dict[str, list[str]] = {"common": [], "consumer": [], "producer": []}
    for dotted, value in secrets.items():
        section, key = dotted.split(".", 1)
        sections[section].append(f'"{key}" = "{value}"')
    text = f'[kafka]\ngroup_id = "{prefix}-g"\nclient_id = "{prefix}"\n'
    text += '[kafka.common]\n"sasl.username" = "stream-user"\n' + "\n".join(sections["common"]) + "\n"
    text += "[kafka.consumer]\n" + "\n".join(sections["consumer"]) + "\n"
    text += "[kafka.producer]\n" + "\n".join(sections["producer"]) + "\n"
    text += "[topics]\n" + "".join(
        f'{name} = "{prefix}-{name}"\n' for name in ("clicks", "purchases", "prices", "fraud_labels", "dead_letters")
    )
    text += "partitions = 1\n"
    text += f'[metrics]\nport = {port}\nhost = "127.0.0.1"\nstats_interval_s = 1.0\n'
    text += f'[checkpoints]\ndir = "{tmp / "ckpt"}"\n'
    text += "[processing]\ncommit_interval_s = 0.5\nshutdown_timeout_s = 5.0\n"
    return text + LEARNER.format(prefix=prefix)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream(*args: str, cwd: Path, bootstrap: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAM_BOOTSTRAP_SERVERS"}
    env["STREAM_INSTANCE_ID"] = "secrets-test"
    return subprocess.Popen(
        [sys.executable, "-m", "stream", *args, "--bootstrap-servers", bootstrap],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def assert_no_secret(text: str, secrets: dict[str, str], where: str) -> None:
    for name, value in secrets.items():
        assert value not in text, f"{name} in {where}"
        # Nor a recognisable part of it (librdkafka may quote part of a value).
        for part in value.replace("=", " ").split():
            if len(part) >= 8 and part not in ("principal",):
                assert part not in text, f"part of {name} ({part}) in {where}"


# -- units -------------------------------------------------------------------------------------


def test_only_allowlisted_properties_are_logged_in_clear() -> None:
    config = parse_config({"kafka": {"common": {"sasl.username": "u", "sasl.password": "p", "security.protocol":
                                                "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512"},
                                     "consumer": {"sasl.passwd": "typo", "ssl.key.pem": "-----BEGIN"},
                                     "producer": {"sasl.oauthbearer.config": "clientSecret=s"}}})  # fmt: skip
    consumer, producer = redact(consumer_config(config)), redact(producer_config(config))
    assert consumer["sasl.username"] == "u" and consumer["security.protocol"] == "SASL_SSL"
    assert consumer["sasl.mechanisms"] == "SCRAM-SHA-512" and consumer["group.id"] == "stream"
    assert consumer["bootstrap.servers"] == "localhost:9092" and producer["acks"] == "all"
    assert producer["linger.ms"] == 5 and consumer["isolation.level"] == "read_committed"
    for props, key in ((consumer, "sasl.password"), (consumer, "sasl.passwd"), (consumer, "ssl.key.pem"),
                       (producer, "sasl.oauthbearer.config"), (producer, "sasl.password")):  # fmt: skip
        assert props[key] == "***", key


def test_scrub_whole_values_parts_and_json_escaped() -> None:
    secrets = {"clientSecret=abcdefgh12345", 'pw"quote\\d'}
    assert scrub("Unrecognized config beginning at: clientSecret=abcdefgh12345 x", secrets).endswith("at: *** x")
    assert scrub("...beginning at: abcdefgh12345", secrets) == "...beginning at: ***"
    assert scrub('{"reason": "pw\\"quote\\\\d"}', secrets) == '{"reason": "***"}'
    assert scrub("nothing here", secrets) == "nothing here"
    assert scrub("a pw b", {"pw"}) == "a pw b"  # too short to search for


def test_config_errors_do_not_echo_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"kafka": {"common": {"sasl.password": "s3cret-enum-value"}},
                      "processing": {"guarantee": "s3cret-enum-value"}})  # fmt: skip
    assert "$.processing.guarantee" in str(info.value) and "s3cret-enum-value" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"kafka": {"producer": {"sasl.password": ["s3cret-in-a-list"]}}})
    assert "$.kafka.producer" in str(info.value) and "s3cret-in-a-list" not in str(info.value)


def test_librdkafka_errors_name_the_property_not_the_value() -> None:
    parse_config({"kafka": {"common": {"sasl.passwd": "TYPO-unit-9f8e7d"}}})  # remembered as a secret
    for message, expected in (
        ('No such configuration property: "sasl.passwd"',
         '_INVALID_ARG: No such configuration property: "sasl.passwd"'),
        ('Invalid value "TYPO-unit-9f8e7d" for configuration property "security.protocol"',
         '_INVALID_ARG: Invalid value "***" for configuration property "security.protocol"'),
        ("Unrecognized sasl.oauthbearer.config beginning at: unit-9f8e7d", "beginning at: ***"),
    ):  # fmt: skip
        text = kafka_error_text(KafkaException(KafkaError(KafkaError._INVALID_ARG, message)))
        assert text.endswith(expected) or text == expected, text
        assert "9f8e7d" not in text


# -- the real command --------------------------------------------------------------------------


@pytest.mark.kafka
def test_stream_run_prints_no_secret(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "c.toml").write_text(toml_for(SECRETS, topic_prefix, tmp_path, port))
    created = subprocess.run(
        [sys.executable, "-m", "stream", "topics", "create", "--config", "c.toml",
         "--bootstrap-servers", kafka_bootstrap],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert_no_secret(created.stdout + created.stderr, SECRETS, "`stream topics create`")

    proc = stream("run", "--config", "c.toml", cwd=tmp_path, bootstrap=kafka_bootstrap)
    metrics = ""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = r.read().decode()
            except OSError:
                time.sleep(0.5)
                continue
            # Lag per partition shows once the consumer has its partitions and reported statistics.
            if "stream_consumer_lag_records{" in metrics:
                break
            time.sleep(0.5)
        assert "stream_consumer_lag_records{" in metrics, "the run did not get its partitions"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert '"msg": "starting"' in err and '"sasl.username": "stream-user"' in err, err[-3000:]
    assert '"sasl.password": "***"' in err and '"sasl.oauthbearer.config": "***"' in err
    assert '"ssl.key.password": "***"' in err and '"sasl.oauthbearer.client.secret": "***"' in err
    assert_no_secret(out, SECRETS, "stdout")
    assert_no_secret(err, SECRETS, "stderr")
    assert_no_secret(metrics, SECRETS, "/metrics")


@pytest.mark.kafka
def test_a_rejected_property_exits_2_naming_it_without_its_value(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "c.toml").write_text(toml_for({**SECRETS, **TYPO_SECRETS}, topic_prefix, tmp_path, 0))
    proc = stream("run", "--config", "c.toml", cwd=tmp_path, bootstrap=kafka_bootstrap)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err[-3000:])
    assert 'kafka client configuration error: _INVALID_ARG: No such configuration property: "sasl.passwd"' in err
    assert '"sasl.passwd": "***"' in err  # the start-up log shows the key, not its value
    assert_no_secret(out + err, {**SECRETS, **TYPO_SECRETS}, "the output of the rejected run")


def test_a_config_error_names_the_key_not_the_secret(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[kafka.common]\n"sasl.password" = "PW-enum-0a1b2c3d"\n[processing]\nguarantee = "PW-enum-0a1b2c3d"\n'
    )
    result = subprocess.run([sys.executable, "-m", "stream", "run", "--config", "c.toml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "$.processing.guarantee" in result.stderr, result.stderr
    assert_no_secret(result.stdout + result.stderr, {"x": "PW-enum-0a1b2c3d"}, "the configuration error")
