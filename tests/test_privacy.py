"""[privacy]: identifier fields pseudonymized at decode (stream.privacy).

Unit tests of the pseudonyms and the config, then the broker-less Pipeline on
a simulated shop whose identifiers are all marked ``RAWID``: with privacy on
no marked id reaches the outputs, the pickled learners or the Prometheus
exposition, and the fraud labels still join their purchases.
"""

from __future__ import annotations

import base64
import hmac
import json
import pickle
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest

from stream.checkpoint import StoredRecord
from stream.config import ConfigError, build_learners, parse_config
from stream.events import EVENT_TYPES, Decoder
from stream.metrics import PipelineMetrics, new_registry
from stream.pipeline import Pipeline
from stream.privacy import Pseudonymizer, load_key
from stream.recording import RecordedMessage
from stream.simulate import SimConfig, Simulation

KEY = b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"fedcba9876543210fedcba9876543210"
MASKED = ["user_id", "device_id", "order_id", "session_id"]
MARK = "RAWID"

EVENTS: dict[str, dict[str, Any]] = {
    "clicks": {"event_id": "e1", "ts": 1, "user_id": "u1", "item_id": "i1", "session_id": "s1", "category": "shoes"},
    "purchases": {
        "event_id": "e2",
        "ts": 2,
        "order_id": "o1",
        "user_id": "u1",
        "item_id": "i1",
        "quantity": 1,
        "unit_price": 9.5,
        "category": "shoes",
        "device_id": "d1",
    },
    "prices": {"event_id": "e3", "ts": 3, "item_id": "i1", "price": 9.5, "category": "shoes"},
    "fraud_labels": {"event_id": "e4", "ts": 4, "order_id": "o1", "is_fraud": True},
}


def config(privacy: dict[str, Any] | None = None, **extra: Any) -> Any:
    data: dict[str, Any] = {"metrics": {"port": 0}, **extra}
    if privacy is not None:
        data["privacy"] = privacy
    return parse_config(data)


def pseudonymizer(key: bytes = KEY, **privacy: Any) -> Pseudonymizer:
    privacy.setdefault("fields", MASKED)
    p = Pseudonymizer.from_config(config(privacy), environ={"STREAM_PRIVACY_KEY": key.decode()})
    assert p is not None
    return p


# -- pseudonyms -----------------------------------------------------------------------------


def test_pseudonym_is_hmac_sha256_truncated_and_stable() -> None:
    p = Pseudonymizer(KEY, fields=["user_id"])
    expected = base64.urlsafe_b64encode(hmac.digest(KEY, b"u1", "sha256")[:16]).rstrip(b"=").decode()
    assert p.pseudonym("u1") == expected == p.pseudonym("u1")
    assert len(expected) == 22
    assert Pseudonymizer(KEY * 3, fields=[]).pseudonym("u1") == (
        base64.urlsafe_b64encode(hmac.digest(KEY * 3, b"u1", "sha256")[:16]).rstrip(b"=").decode()
    ), "keys longer than the SHA-256 block are hashed first, as RFC 2104 says"
    assert Pseudonymizer(OTHER_KEY, fields=[]).pseudonym("u1") != expected
    assert p.pseudonym("u2") != expected


def test_listed_fields_are_masked_in_every_contract_and_others_untouched() -> None:
    p = pseudonymizer()
    topics = config().input_topics()
    for stream, raw in EVENTS.items():
        topic = topics[stream]
        event_type = EVENT_TYPES[stream]
        decode = p.wrap_decoder(topic, Decoder(event_type).decode, event_type)
        event = decode(json.dumps(raw).encode())
        assert type(event) is event_type
        for name, value in raw.items():
            expected = p.pseudonym(value) if name in MASKED else value
            assert getattr(event, name) == expected, (stream, name)
    # No listed field in a contract: its decoder is returned as it is (no cost).
    plain = Decoder(EVENT_TYPES["prices"]).decode
    assert p.wrap_decoder(topics["prices"], plain, EVENT_TYPES["prices"]) is plain


def test_joins_keep_working_the_same_id_gives_the_same_pseudonym() -> None:
    p = pseudonymizer()
    topics = config().input_topics()
    dec = {s: p.wrap_decoder(topics[s], Decoder(EVENT_TYPES[s]).decode, EVENT_TYPES[s]) for s in EVENTS}
    purchase = dec["purchases"](json.dumps(EVENTS["purchases"]).encode())
    label = dec["fraud_labels"](json.dumps(EVENTS["fraud_labels"]).encode())
    click = dec["clicks"](json.dumps(EVENTS["clicks"]).encode())
    assert purchase.order_id == label.order_id != "o1"
    assert purchase.user_id == click.user_id != "u1"


def test_dict_events_of_custom_topics_are_masked() -> None:
    p = Pseudonymizer(KEY, fields=MASKED, per_topic={"returns": ["rma_id"]})
    decode = p.wrap_decoder("returns", lambda v: msgspec.json.decode(v), None)  # type: ignore[arg-type, return-value]
    event = decode(b'{"order_id": "o1", "user_id": 42, "rma_id": "r7", "reason": "size", "device_id": null}')
    assert event == {
        "order_id": p.pseudonym("o1"),
        "user_id": p.pseudonym("42"),
        "rma_id": p.pseudonym("r7"),
        "reason": "size",
        "device_id": None,
    }


def test_output_and_dead_letter_keys() -> None:
    p = pseudonymizer(dead_letters="mask")
    topics = config().input_topics()
    purchase = p.wrap_decoder(topics["purchases"], Decoder(EVENT_TYPES["purchases"]).decode, EVENT_TYPES["purchases"])
    raw = json.dumps(EVENTS["purchases"]).encode()
    record = RecordedMessage(topics["purchases"], 0, 0, (1, 0), b"u1", raw)
    assert p.output_key(record, purchase(raw)) == p.pseudonym("u1").encode()
    # prices are keyed by item_id, which is not masked: the key stays.
    price = RecordedMessage(topics["prices"], 0, 0, (1, 0), b"i1", b"{}")
    assert p.output_key(price, None) == b"i1"
    # topics outside the contracts: the key itself is pseudonymized (its field is unknown).
    assert p.output_key(RecordedMessage("returns", 0, 0, (1, 0), b"o1", b"{}"), {}) == p.pseudonym("o1").encode()
    assert p.output_key(RecordedMessage("returns", 0, 0, (1, 0), None, b"{}"), {}) is None

    key, value = p.dead_letter(topics["purchases"], b"u1", b'{"user_id": "u1", "quantity": "x"}')
    assert key == p.pseudonym("u1").encode()
    assert json.loads(value) == {"user_id": p.pseudonym("u1"), "quantity": "x"}
    assert p.dead_letter(topics["purchases"], b"u1", b"not json u1") == (key, None)
    assert p.dead_letter(topics["purchases"], b"u1", b"[1]") == (key, None)
    assert p.dead_letter(topics["purchases"], b"u1", None) == (key, None)
    assert pseudonymizer(dead_letters="drop").dead_letter(topics["purchases"], b"u1", raw) == (key, None)
    assert pseudonymizer().dead_letter(topics["purchases"], b"u1", raw) == (b"u1", raw), "keep is the default"


def test_holdout_records_are_masked_and_unparseable_ones_left_out() -> None:
    p = pseudonymizer()
    t = config().input_topics()["clicks"]
    raw = json.dumps(EVENTS["clicks"]).encode()
    records = [
        StoredRecord(t, 0, 0, 5, b"u1", raw),
        StoredRecord(t, 0, 1, 6, b"u1", b"garbage u1"),
        StoredRecord(t, 0, 2, 7, b"u1", None),
    ]
    masked = p.mask_records(records)
    assert [r.offset() for r in masked] == [0, 2]
    assert masked[0].key() == p.pseudonym("u1").encode() and masked[0].timestamp() == (1, 5)
    assert b"u1" not in masked[0].value() and b"s1" not in masked[0].value()  # type: ignore[operator]
    assert json.loads(masked[0].value())["item_id"] == "i1"  # type: ignore[arg-type]


def test_the_key_never_travels() -> None:
    p = pseudonymizer()
    with pytest.raises(TypeError):
        pickle.dumps(p)
    assert KEY.decode() not in repr(p) and KEY.decode() not in json.dumps(p.describe())


# -- config ---------------------------------------------------------------------------------


def test_privacy_is_off_without_fields() -> None:
    assert Pseudonymizer.from_config(config(), environ={}) is None
    assert Pseudonymizer.from_config(config({"dead_letters": "mask"}), environ={}) is None


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"fields": ["ts"]}, "`ts` is not a string field of the clicks contract"),
        ({"fields": ["user_id", ""]}, "field names must be non-empty"),
        ({"per_topic": {"purchases": ["quantity"]}}, "`quantity` is not a string field"),
        ({"per_topic": {"clicks": ["order_id"]}}, "the clicks contract has no field `order_id`"),
        ({"fields": ["user_id"], "dead_letters": "hide"}, "Invalid enum value"),  # the value is scrubbed
        ({"fields": ["user_id"], "key": "x"}, "unknown field `key`"),
        ({"fields": ["user_id"], "key_env": ""}, "name the key"),
    ],
)
def test_invalid_config_is_refused_naming_the_key(privacy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        config(privacy)
    assert "$.privacy" in str(err.value)


def test_unknown_topic_and_bad_keys_are_refused_at_start_up(tmp_path: Path) -> None:
    env = {"STREAM_PRIVACY_KEY": KEY.decode()}
    with pytest.raises(ConfigError, match=r"per_topic\.returnz: neither a contract stream"):
        Pseudonymizer.from_config(config({"per_topic": {"returnz": ["order_id"]}}), environ=env)
    with pytest.raises(ConfigError, match="key variable STREAM_PRIVACY_KEY is not set"):
        Pseudonymizer.from_config(config({"fields": ["user_id"]}), environ={})
    with pytest.raises(ConfigError, match="STREAM_PRIVACY_KEY is 5 bytes, at least 32") as err:
        Pseudonymizer.from_config(config({"fields": ["user_id"]}), environ={"STREAM_PRIVACY_KEY": "hunt2"})
    assert "hunt2" not in str(err.value), "the key is never shown"
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=r"nope\.key: cannot read it"):
        Pseudonymizer.from_config(config({"fields": ["user_id"], "key_file": str(missing)}), environ=env)
    key_file = tmp_path / "privacy.key"
    key_file.write_bytes(OTHER_KEY + b"\n")
    cfg = config({"fields": ["user_id"], "key_file": str(key_file)})
    assert load_key(cfg.privacy, environ=env) == OTHER_KEY, "the file wins over the variable"
    # A per-topic entry for a custom learner's topic, by topic name.
    custom = {
        "learners": {
            "ret": {
                "kind": "custom",
                "input": "returns",
                "output_topic": "o",
                "label": "returned",
                "task": "binary",
                "model": {"class": "linear_model.LogisticRegression"},
            }
        }
    }
    p = Pseudonymizer.from_config(config({"per_topic": {"returns": ["rma_id"]}}, **custom), environ=env)
    assert p is not None and p.fields_for("returns") == ("rma_id",)


# -- through the broker-less Pipeline ------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, Any]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        self.records.append((topic, key, value, headers))


def marked_shop(events: int = 30_000) -> list[RecordedMessage]:
    """A simulated shop whose every identifier (and record key) is marked ``RAWID``, plus a few bad records."""
    sim = Simulation(SimConfig(seed=3, events=events, fraud_rate=0.2, legit_label_rate=0.5, label_delay_median_s=60.0))
    topics = config().input_topics()
    out = []
    offsets: dict[str, int] = {}
    for stream, key, value, ts in sim:
        doc = json.loads(value)
        for name in MASKED:
            if doc.get(name) is not None:
                doc[name] = f"{MARK}{doc[name]}"
        topic = topics[stream]
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        new_key = None if key is None else MARK.encode() + key if stream != "prices" else key
        out.append(RecordedMessage(topic, 0, offset, (1, ts), new_key, json.dumps(doc).encode()))
    # Invalid records: a purchase with a wrongly typed field, and one that is not JSON.
    bad = json.dumps({**EVENTS["purchases"], "user_id": f"{MARK}u1", "quantity": "many"}).encode()
    out.append(RecordedMessage(topics["purchases"], 0, offsets[topics["purchases"]] + 1, (1, 0), b"RAWIDu1", bad))
    out.append(RecordedMessage(topics["clicks"], 0, offsets[topics["clicks"]] + 1, (1, 0), b"RAWIDu1", b"RAWIDu1{"))
    return out


def shop_config() -> Any:
    """configs/default.toml (every built-in learner and a custom one), the risk model serving after 100 labels."""
    data = tomllib.loads((Path(__file__).parent.parent / "configs" / "default.toml").read_text())
    data["learners"]["risk"].update(min_labels=100, min_fraud_labels=10)
    data["metrics"]["port"] = 0
    return parse_config(data)


def run_shop(records: list[RecordedMessage], privacy: Pseudonymizer | None) -> dict[str, Any]:
    cfg = shop_config()
    learners = build_learners(cfg)
    registry = new_registry()
    metrics = PipelineMetrics(registry, cfg.metrics, clock=lambda: 1_700_000_000.0)
    sink = ListSink()
    pipeline = Pipeline(
        learners, sink, contract_topics=cfg.input_topics(), dead_letter_topic="dead", observer=metrics, privacy=privacy
    )
    for r in records:
        pipeline.process(r)
    risk = next(lr for lr in learners if lr.name == "risk")
    return {
        "sink": sink,
        "pickle": pickle.dumps(learners),
        "exposition": generate_latest(registry),
        "joined": risk.label_stats()["joined"],
        "n_labels": risk.n_labels,  # type: ignore[attr-defined]
        "source": risk.source,  # type: ignore[attr-defined]
    }


@pytest.fixture(scope="module")
def shop_runs() -> tuple[dict[str, Any], dict[str, Any]]:
    records = marked_shop()
    return run_shop(records, None), run_shop(records, pseudonymizer(dead_letters="mask"))


def test_the_marked_ids_reach_everything_without_privacy(shop_runs: Any) -> None:
    """The control: without privacy the checks below would see the raw ids."""
    plain, _ = shop_runs
    mark = MARK.encode()
    assert any(mark in (key or b"") for _, key, _, _ in plain["sink"].records)
    assert any(mark in (value or b"") for _, _, value, _ in plain["sink"].records)
    assert mark in plain["pickle"]


def test_no_raw_id_in_outputs_learners_or_metrics_with_privacy(shop_runs: Any) -> None:
    plain, masked = shop_runs
    mark = MARK.encode()
    records = masked["sink"].records
    assert len(records) == len(plain["sink"].records) > 10_000
    for topic, key, value, headers in records:
        assert mark not in (key or b""), (topic, key)
        assert mark not in (value or b""), (topic, value)
        for _, header in headers or ():
            assert mark not in header
    assert mark not in masked["pickle"]
    assert mark not in masked["exposition"]
    # Output keys are the pseudonyms of the ids the topics are keyed by.
    p = pseudonymizer()
    by_event = {json.loads(v)["event_id"]: k for t, k, v, _ in records if t == "risk-scores"}
    risk_plain = [(json.loads(v)["event_id"], k) for t, k, v, _ in plain["sink"].records if t == "risk-scores"]
    assert risk_plain and all(by_event[e] == p.pseudonym(k.decode()).encode() for e, k in risk_plain)
    # Dead letters in "mask" mode: both bad records, the parseable one with its ids masked.
    dead = [(k, v) for t, k, v, _ in records if t == "dead"]
    assert len(dead) == 2 and all(k == p.pseudonym("RAWIDu1").encode() for k, _ in dead)
    assert dead[0][1] is not None and json.loads(dead[0][1])["quantity"] == "many" and dead[1][1] is None


def test_fraud_labels_still_join_their_purchases(shop_runs: Any) -> None:
    plain, masked = shop_runs
    assert masked["joined"] == plain["joined"] > 100
    assert masked["n_labels"] == plain["n_labels"]
    assert masked["source"] == plain["source"] == "model", "the risk learner learned enough labelled orders"
