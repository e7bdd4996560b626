"""Shared pytest fixtures: a real Kafka broker for tests marked ``kafka``.

Where the broker comes from, in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` (an already running cluster);
2. ``apache/kafka:4.1.1`` through testcontainers, when a Docker engine answers;
3. the jar-based KRaft broker of ``tests/kafka_broker.py`` (Java 17 + Maven);
4. otherwise the tests are skipped, or fail when ``STREAM_REQUIRE_KAFKA=1``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator

import pytest
from kafka_broker import (
    KafkaBroker,
    KafkaUnavailableError,
    create_topics,
    docker_available,
    docker_kafka,
)

__all__ = ["create_topics"]

KAFKA_FIXTURES = frozenset({"kafka_bootstrap", "kafka_broker", "_jar_kafka_broker"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kafka: needs a real Kafka broker (see tests/conftest.py for where it comes from)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Kafka fixture with ``kafka`` so ``-m 'not kafka'`` works."""
    for item in items:
        if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


def kafka_required() -> bool:
    return os.environ.get("STREAM_REQUIRE_KAFKA") == "1"


def _unavailable(reason: str) -> None:
    message = f"no Kafka broker available: {reason}"
    if kafka_required():
        pytest.fail(f"{message} (STREAM_REQUIRE_KAFKA=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def _jar_kafka_broker() -> Iterator[KafkaBroker]:
    """The session's jar-based broker, started on first use and closed at the end."""
    broker = KafkaBroker()
    try:
        broker.start()
    except KafkaUnavailableError as error:
        broker.close()
        _unavailable(str(error))
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker for the whole session."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        yield env
    elif docker_available():
        with docker_kafka() as bootstrap:
            yield bootstrap
    else:
        broker: KafkaBroker = request.getfixturevalue("_jar_kafka_broker")
        yield broker.bootstrap_servers


@pytest.fixture()
def kafka_broker(_jar_kafka_broker: KafkaBroker) -> Iterator[KafkaBroker]:
    """The jar-based broker itself, for tests that stop, kill, restart or pause it.

    After the test, the broker is resumed / started again so later tests find it running.
    """
    yield _jar_kafka_broker
    _jar_kafka_broker.resume()
    if not _jar_kafka_broker.is_running:
        _jar_kafka_broker.start()


@pytest.fixture()
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A Kafka-legal prefix unique to this test, e.g. ``test_roundtrip-1a2b3c4d``."""
    name = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name).strip("-")[:100]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(name="unique_topics")
def unique_topics_fixture(topic_prefix: str) -> Callable[..., list[str]]:
    """``unique_topics("in", "out")`` -> topic names unique to this test (not created)."""

    def make(*names: str) -> list[str]:
        return [f"{topic_prefix}-{name}" for name in names]

    return make
