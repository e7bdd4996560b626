"""Checkpoints in a compacted Kafka topic (``[checkpoints] storage = "kafka"``), against a real broker.

The storage keeps the ``stream.state.Storage`` contract (whole or nothing, names, partial reads,
delete), a second client (another machine) sees what the first wrote, and the real ``stream run``
restores from the topic on a machine whose disk holds no checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from kafka_util import committed, end_offsets, produce, stop, stream_cli
from test_run_loop import config_text, good_events, topic_map, wait_for

from stream.checkpoint_topic import KafkaStorage, checkpoint_storage, checkpoint_topic
from stream.config import build_learners, parse_config
from stream.state import CheckpointStore, LocalStorage
from stream.task_state import ScopedStorage

pytestmark = pytest.mark.kafka

CHUNK = 16 * 1024


def storage(bootstrap: str, topic: str, chunk: int = CHUNK) -> KafkaStorage:
    config = parse_config({"kafka": {"bootstrap_servers": bootstrap, "group_id": f"{topic}-g"}})
    return KafkaStorage(config, topic, chunk_bytes=chunk, timeout_s=30)


def test_write_read_names_delete_and_a_second_machine(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-ckpt"
    rng = random.Random(7)
    files = {
        "ckpt-000000000001-aaaaaaaa.ckpt": b"",
        "ckpt-000000000002-aaaaaaaa.ckpt": rng.randbytes(100),
        "ckpt-000000000003-aaaaaaaa.ckpt": rng.randbytes(CHUNK * 3 + 123),  # four chunks
    }
    a = storage(kafka_bootstrap, topic)
    for name, data in files.items():
        a.write(name, data)
    b = storage(kafka_bootstrap, topic)  # a new machine: nothing cached
    for s in (a, b):
        assert s.names() == sorted(files)
        for name, data in files.items():
            assert s.read(name) == data
    big = files["ckpt-000000000003-aaaaaaaa.ckpt"]
    for start, length in [(0, 40), (CHUNK - 5, 10), (CHUNK, CHUNK), (CHUNK * 2 + 7, None), (len(big) - 3, 100)]:
        want = big[start:] if length is None else big[start : start + length]
        assert b.read("ckpt-000000000003-aaaaaaaa.ckpt", start, length) == want, (start, length)
    a.delete("ckpt-000000000002-aaaaaaaa.ckpt")
    assert b.names() == ["ckpt-000000000001-aaaaaaaa.ckpt", "ckpt-000000000003-aaaaaaaa.ckpt"]
    with pytest.raises(FileNotFoundError):
        b.read("ckpt-000000000002-aaaaaaaa.ckpt")
    # The topic is compacted, so deleted checkpoints go away for good.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    described = admin.describe_configs([resource])[resource].result(30)
    assert described["cleanup.policy"].value == "compact"


def test_a_manifest_without_its_chunks_is_passed_over(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-ckpt"
    s = storage(kafka_bootstrap, topic)
    s.write("ckpt-000000000001-aaaaaaaa.ckpt", b"whole")
    # What a torn write would leave if the manifest could come first (it cannot): chunks missing.
    manifest = {"length": 3 * CHUNK, "chunks": 3, "chunk_bytes": CHUNK, "sha256": "0" * 64}
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(topic, json.dumps(manifest).encode(), b"ckpt-000000000009-bbbbbbbb.ckpt", partition=0)
    p.produce(topic, b"x" * CHUNK, b"ckpt-000000000009-bbbbbbbb.ckpt/000000", partition=0)
    p.produce(topic, b"not json", b"ckpt-000000000010-bbbbbbbb.ckpt", partition=0)
    assert p.flush(30) == 0
    assert s.names() == ["ckpt-000000000001-aaaaaaaa.ckpt"]
    assert storage(kafka_bootstrap, topic).names() == ["ckpt-000000000001-aaaaaaaa.ckpt"]


def test_checkpoint_store_over_the_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    config = parse_config(
        {
            "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"{topic_prefix}-g"},
            "checkpoints": {"storage": "kafka", "chunk_bytes": CHUNK},
            "learners": {
                "reg": {"kind": "custom", "input": "clicks", "output_topic": "o", "label": "price",
                        "task": "regression", "model": {"class": "linear_model.LinearRegression"}},
            },
        }
    )  # fmt: skip
    storage_ = checkpoint_storage(config)
    assert isinstance(storage_, KafkaStorage) and storage_.topic == f"{topic_prefix}-g.checkpoints"
    assert checkpoint_topic(config) == storage_.topic
    store = CheckpointStore(storage_, group_id=config.kafka.group_id)
    info = store.write(build_learners(config), {("clicks", 0): 42}, reason="test")
    other = CheckpointStore(checkpoint_storage(config), group_id=config.kafka.group_id)
    assert other.names() == [info.name]
    loaded = other.latest()
    assert loaded is not None and loaded.info.offsets == {("clicks", 0): 42}
    assert [lr.name for lr in loaded.learners] == ["reg"]


def kafka_config(prefix: str, bootstrap: str, group: str, checkpoint_dir: Path, every_events: int) -> str:
    return config_text(prefix, bootstrap, group).replace(
        "[metrics]",
        f"""[checkpoints]
storage = "kafka"
dir = "{checkpoint_dir}"
every_events = {every_events}
every_seconds = 3600
chunk_bytes = {CHUNK}

[metrics]""",
    )


def test_run_restores_from_the_topic_on_an_empty_disk(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """Instance A learns and checkpoints into Kafka (periodic ones from the forked writer too);
    instance B, on a "new machine" whose checkpoint directory is empty, takes over from the
    committed offsets: it restores A's state from the topic (with no checkpoint it would refuse
    to start, ``on_missing = "fail"``), and no checkpoint file was ever written to a disk."""
    prefix, group = topic_prefix, f"{topic_prefix}-group"
    disk_a, disk_b = tmp_path / "machine-a", tmp_path / "machine-b"
    cfg_a, cfg_b = tmp_path / "a.toml", tmp_path / "b.toml"
    cfg_a.write_text(kafka_config(prefix, kafka_bootstrap, group, disk_a, every_events=30))
    cfg_b.write_text(kafka_config(prefix, kafka_bootstrap, group, disk_b, every_events=30))
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    assert stream_cli("topics", "create", "--config", str(cfg_a), log=log_a).wait(60) == 0
    topics = {t: n for t, n in topic_map(prefix).items() if not t.split(f"{prefix}-")[1].startswith(("out", "dead"))}

    for name, records in good_events(120).items():
        produce(kafka_bootstrap, f"{prefix}-{name}", records)
    a = stream_cli("run", "--config", str(cfg_a), log=log_a)
    try:
        wait_for(lambda: committed(kafka_bootstrap, group, topics) == end_offsets(kafka_bootstrap, topics),
                 timeout=90, what="A to commit everything")  # fmt: skip
        wait_for(lambda: '"background": true' in log_a.read_text(), timeout=60, what="a background checkpoint")
    finally:
        assert stop(a) == 0, log_a.read_text()[-3000:]
    # Two partitions per topic make two tasks, each with its own checkpoints in the one topic.
    storage = checkpoint_storage(parse_config(_toml(cfg_a)))
    written = [n for task in range(2) for n in CheckpointStore(ScopedStorage(storage, task)).names()]
    assert len(written) >= 4, written

    for name, records in good_events(40, start=120).items():
        produce(kafka_bootstrap, f"{prefix}-{name}", records)
    b = stream_cli("run", "--config", str(cfg_b), log=log_b)
    try:
        wait_for(lambda: committed(kafka_bootstrap, group, topics) == end_offsets(kafka_bootstrap, topics),
                 timeout=90, what="B to take over and commit the rest")  # fmt: skip
    finally:
        assert stop(b) == 0, log_b.read_text()[-3000:]
    restored = [json.loads(line) for line in log_b.read_text().splitlines() if '"restored from checkpoint"' in line]
    assert len(restored) == 2, log_b.read_text()[-3000:]  # both tasks, from the topic
    assert all(r.get("checkpoint") in written for r in restored), restored
    for disk in (disk_a, disk_b):
        assert not disk.exists() or not any(p for p in disk.rglob("*") if p.is_file()), list(disk.rglob("*"))
    assert LocalStorage(disk_b).names() == []
    assert os.path.isfile(cfg_b)


def _toml(path: Path) -> dict[str, object]:
    import tomllib

    return tomllib.loads(path.read_text())
