"""[privacy] through a real broker and a real ``stream run``.

Three runs at once, one per ``dead_letters`` mode (keep, mask, drop), each on
topics of its own, read events whose identifiers are all marked ``RAWID``. No
marked id may reach the outputs (keys and values), the checkpoint file or the
logs; dead letters follow their mode; the fraud labels still join their
purchases, and the masked holdout still validates a model.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from kafka_util import committed, end_offsets, group_toml, produce, read_all, stop, stream_cli
from test_run_loop import wait_for

from stream.config import load_config
from stream.privacy import Pseudonymizer
from stream.state import read_any
from stream.validation import holdout_error

pytestmark = pytest.mark.kafka

TS = 1_700_000_000_000
MARK = b"RAWID"
KEY = "privacy-test-key-0123456789abcdef-not-for-production"
N = 60


def config_text(prefix: str, bootstrap: str, group: str, ckpt_dir: Path, mode: str, key_file: Path | None) -> str:
    key = f'key_file = "{key_file}"' if key_file is not None else 'key_env = "TEST_PRIVACY_KEY"'
    return group_toml(prefix, bootstrap, group, 1) + f"""
[processing]
batch_size = 50
commit_interval_s = 0.5
shutdown_timeout_s = 5.0

[metrics]
port = 0

[checkpoints]
dir = "{ckpt_dir}"
background = false

[privacy]
fields = ["user_id", "device_id", "order_id", "session_id"]
per_topic = {{ "{prefix}-returns" = ["rma_id"] }}
dead_letters = "{mode}"
{key}

[learners.risk]
kind = "risk"
output_topic = "{prefix}-risk-scores"
min_labels = 20
min_fraud_labels = 2
label_window_s = 3600

[learners.click_price]
kind = "custom"
input = "clicks"
output_topic = "{prefix}-out-clicks"
label = "price"
task = "regression"
features = ["category", "user_id"]
model = {{ class = "linear_model.LinearRegression" }}

[learners.returned]
kind = "custom"
input = "{prefix}-returns"
output_topic = "{prefix}-out-returns"
label = "returned"
task = "binary"
features = ["amount", "rma_id"]
model = {{ class = "linear_model.LogisticRegression" }}
"""


def marked_events(n: int) -> dict[str, list[tuple[bytes | None, bytes]]]:
    """Valid events of every contract and of a custom topic, every identifier marked ``RAWID``."""
    events: dict[str, list[tuple[bytes | None, bytes]]] = {
        "clicks": [],
        "purchases": [],
        "fraud-labels": [],
        "returns": [],
    }
    for i in range(n):
        user, item, order = f"RAWIDu{i % 7}", f"i{i % 5}", f"RAWIDo{i}"

        def add(topic: str, key: str, doc: dict[str, Any], i: int = i) -> None:
            doc = {"event_id": f"{topic[0]}{i}", "ts": TS + i, **doc}
            events[topic].append((key.encode(), json.dumps(doc).encode()))

        add(
            "clicks",
            user,
            {
                "user_id": user,
                "item_id": item,
                "session_id": f"RAWIDs{i}",
                "category": f"c{i % 3}",
                "price": 10.0 + i % 4,
            },
        )
        add(
            "purchases",
            user,
            {
                "order_id": order,
                "user_id": user,
                "item_id": item,
                "quantity": 1 + i % 3,
                "unit_price": 5.0 + i % 2,
                "device_id": f"RAWIDd{i % 3}",
                "payment_method": "card",
            },
        )
        # Chargebacks a second after their orders (produced once the orders are read: a label before
        # its order would find nothing to join).
        add("fraud-labels", order, {"order_id": order, "is_fraud": i % 5 == 0, "ts": TS + 1000 + i})
        add(
            "returns",
            order,
            {"order_id": order, "user_id": user, "rma_id": f"RAWIDr{i}", "amount": 3.0 + i % 4, "returned": i % 2 == 0},
        )
    return events


BAD_PURCHASES: list[tuple[bytes | None, bytes | None]] = [
    (b"RAWIDu1", b'{"event_id": "b1", "ts": 1, "order_id": "RAWIDo-bad", "user_id": "RAWIDu1", "quantity": "x"}'),
    (b"RAWIDu1", b"RAWIDu1 is not json"),
]


def start(mode: str, prefix: str, bootstrap: str, tmp_path: Path) -> dict[str, Any]:
    run_dir = tmp_path / mode
    run_dir.mkdir()
    key_file = None
    if mode == "drop":  # one run takes the key from a file, the others from the environment
        key_file = run_dir / "privacy.key"
        key_file.write_text(KEY + "\n")
    cfg = run_dir / "stream.toml"
    group = f"{prefix}-group"
    cfg.write_text(config_text(prefix, bootstrap, group, run_dir / "ckpt", mode, key_file))
    log = run_dir / "stream.log"
    env = {"TEST_PRIVACY_KEY": KEY}
    assert stream_cli("topics", "create", "--config", str(cfg), env=env, log=log).wait(60) == 0
    events = marked_events(N)
    for name, records in events.items():
        if name != "fraud-labels":
            produce(bootstrap, f"{prefix}-{name}", records)
    produce(bootstrap, f"{prefix}-purchases", BAD_PURCHASES)
    proc = stream_cli("run", "--config", str(cfg), env=env, log=log)
    return {
        "mode": mode,
        "prefix": prefix,
        "cfg": cfg,
        "group": group,
        "log": log,
        "proc": proc,
        "events": events,
        "ckpt": run_dir / "ckpt" / group,
    }


def test_no_raw_id_leaves_a_real_run_and_dead_letters_follow_their_mode(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    # The three runs go at once: the machine waits for one broker start-up, not three.
    runs = [start(mode, f"{topic_prefix}-{mode}", kafka_bootstrap, tmp_path) for mode in ("keep", "mask", "drop")]
    try:
        for run in runs:
            p = run["prefix"]
            run["dead"] = read_all(kafka_bootstrap, f"{p}-dead-letters", expected=len(BAD_PURCHASES))
            run["outs"] = {
                name: read_all(kafka_bootstrap, f"{p}-{name}", expected=expected)
                for name, expected in (("risk-scores", N), ("out-clicks", N), ("out-returns", N))
            }
            assert run["proc"].poll() is None, run["log"].read_text()[-3000:]
            produce(kafka_bootstrap, f"{p}-fraud-labels", run["events"]["fraud-labels"])
        for run in runs:
            topics = {f"{run['prefix']}-{t}": 1 for t in run["events"]}
            group = run["group"]
            wait_for(
                lambda g=group, t=topics: committed(kafka_bootstrap, g, t) == end_offsets(kafka_bootstrap, t),
                what="every record committed",
            )
    finally:
        codes = [stop(run["proc"], signal.SIGTERM, timeout=30) for run in runs]
    assert codes == [0, 0, 0], [run["log"].read_text()[-3000:] for run in runs]

    for run in runs:
        mode = run["mode"]
        config = load_config(run["cfg"])
        p = Pseudonymizer.from_config(config, environ={"TEST_PRIVACY_KEY": KEY})
        assert p is not None
        # Outputs: one per event, no raw id in keys or values, keys are the pseudonyms of the input keys.
        for name, msgs in run["outs"].items():
            assert len(msgs) == N, (mode, name)
            for m in msgs:
                assert MARK not in m.key() and MARK not in m.value(), (mode, name, m.key(), m.value())
            sent = {json.loads(v)["event_id"]: k for topic in run["events"].values() for k, v in topic}
            for m in msgs:
                assert m.key() == p.pseudonym(sent[json.loads(m.value())["event_id"]].decode()).encode(), (mode, name)

        # The checkpoint written at shutdown: no raw id anywhere in the file, yet joins learned and the
        # masked holdout still scores a model (what `stream model import/rollback` validates with).
        files = sorted(run["ckpt"].glob("*.ckpt"))
        assert files, list(run["ckpt"].parent.rglob("*"))
        for f in files:
            assert MARK not in f.read_bytes(), (mode, f.name)
        ckpt = read_any(files[-1])
        learners = {lr.name: lr for lr in ckpt.learners}
        assert learners["risk"].label_stats()["joined"] == N, "every fraud label joined its purchase"
        assert learners["risk"].source == "model", "and the risk model learned from them"
        assert len(ckpt.holdout) == N * 4 + 1, "every record kept (masked) but the one that is not JSON"
        score = holdout_error(learners["risk"], ckpt.holdout, config)
        # The invalid purchase kept (masked) in the holdout fails there as it failed live.
        assert score is not None and score.n == N and score.failed == 1
        assert MARK not in run["log"].read_bytes(), mode

        # Dead letters: keep the original bytes; mask the ids (unparseable value dropped); drop the value.
        dead = sorted(run["dead"], key=lambda m: int(dict(m.headers())["stream.source.offset"]))
        assert len(dead) == len(BAD_PURCHASES)
        for msg, (key, value) in zip(dead, BAD_PURCHASES, strict=True):
            assert dict(msg.headers())["stream.stage"] in (b"decode", b"validate")
            if mode == "keep":
                assert (msg.key(), msg.value()) == (key, value)
                continue
            assert msg.key() == p.pseudonym(key.decode()).encode()  # type: ignore[union-attr]
            for _, header in msg.headers():
                assert MARK not in header
            if mode == "drop" or value == BAD_PURCHASES[1][1]:
                assert msg.value() is None, (mode, msg.value())
            else:
                doc = json.loads(msg.value())
                assert doc["user_id"] == p.pseudonym("RAWIDu1") and doc["quantity"] == "x"
                assert MARK not in msg.value()
