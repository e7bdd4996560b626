"""Decoding and validation of the event contracts (no broker)."""

from __future__ import annotations

import json

import pytest

from stream.events import Click, Decoder, FraudLabel, InvalidEvent, Price, Purchase

CLICK = {"event_id": "e1", "ts": 1_700_000_000_000, "user_id": "u1", "item_id": "i1"}
PURCHASE = {
    "event_id": "e2",
    "ts": 1_700_000_000_000,
    "order_id": "o1",
    "user_id": "u1",
    "item_id": "i1",
    "quantity": 2,
    "unit_price": 9.99,
}
PRICE = {"event_id": "e3", "ts": 1_700_000_000_000, "item_id": "i1", "price": 19.5}
LABEL = {"event_id": "e4", "ts": 1_700_000_000_000, "order_id": "o1", "is_fraud": False}


def enc(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("event_type", "doc"), [(Click, CLICK), (Purchase, PURCHASE), (Price, PRICE), (FraudLabel, LABEL)]
)
def test_valid_events_decode_to_their_type(event_type: type, doc: dict[str, object]) -> None:
    event = Decoder(event_type).decode(enc(doc))
    assert isinstance(event, event_type)
    for key, value in doc.items():
        assert getattr(event, key) == value


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    click = Decoder(Click).decode(enc({**CLICK, "brand_new_field": [1, 2], "category": "shoes"}))
    assert click.category == "shoes"


def test_optional_fields_default_to_none() -> None:
    p = Decoder(Purchase).decode(enc(PURCHASE))
    assert (p.category, p.device_id, p.account_age_days) == (None, None, None)
    assert p.amount == pytest.approx(19.98)


@pytest.mark.parametrize(
    ("raw", "stage", "fragment"),
    [
        (b"{not json", "decode", "malformed"),
        (b'{"event_id": "e", "ts": 1, "user_id": "\xff\xfe", "item_id": "i"}', "decode", "UTF-8"),
        (b"\xff\xfe\x00", "decode", "malformed"),
        (enc({k: v for k, v in CLICK.items() if k != "item_id"}), "validate", "`item_id`"),
        (enc({**CLICK, "ts": "yesterday"}), "validate", "$.ts"),
        (enc({**CLICK, "ts": -5}), "validate", "$.ts"),
        (enc({**CLICK, "user_id": ""}), "validate", "$.user_id"),
        (enc({**CLICK, "user_id": 17}), "validate", "$.user_id"),
        (b'{"event_id": "e", "ts": 1, "user_id": "u", "item_id": "i", "price": NaN}', "decode", "malformed"),
        (b'{"event_id": "e", "ts": 1, "user_id": "u", "item_id": "i", "price": 1e999}', "validate", "$.price"),
        (enc({**CLICK, "price": -1.0}), "validate", "$.price"),
        (b"[1, 2]", "validate", "object"),
        (None, "decode", "tombstone"),
    ],
)
def test_bad_click_is_rejected_with_stage_and_field(raw: bytes | None, stage: str, fragment: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        Decoder(Click).decode(raw)
    assert info.value.stage == stage
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("quantity", 0), ("quantity", 1.5), ("unit_price", 0), ("unit_price", -3.0), ("account_age_days", -1)],
)
def test_purchase_ranges(field: str, value: object) -> None:
    with pytest.raises(InvalidEvent, match=rf"\$\.{field}"):
        Decoder(Purchase).decode(enc({**PURCHASE, field: value}))


def test_fraud_label_must_be_boolean() -> None:
    with pytest.raises(InvalidEvent, match=r"\$\.is_fraud"):
        Decoder(FraudLabel).decode(enc({**LABEL, "is_fraud": "yes"}))


def test_oversized_value_is_rejected_before_decoding() -> None:
    big = enc({**CLICK, "padding": "x" * 5000})
    with pytest.raises(InvalidEvent, match="limit is 1024") as info:
        Decoder(Click, max_bytes=1024).decode(big)
    assert info.value.stage == "decode"


def test_overlong_ids_are_rejected() -> None:
    with pytest.raises(InvalidEvent, match=r"\$\.item_id"):
        Decoder(Click).decode(enc({**CLICK, "item_id": "i" * 300}))
