"""Decoding and validation of the event contracts (no broker)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import EVENT_TYPES, MAX_AMOUNT, MAX_TS_MS, Click, Decoder, FraudLabel, InvalidEvent, Price, Purchase
from stream.pipeline import _generic_decoder

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


# -- bounds and hostile input (the issue "Never down on one record") -------------------------

HUGE = int("1" + "0" * 399)


@pytest.mark.parametrize(
    "doc",
    [
        {**PURCHASE, "ts": HUGE},
        {**PURCHASE, "ts": MAX_TS_MS + 1},
        {**PURCHASE, "ts": 2**63},
        {**PURCHASE, "unit_price": MAX_AMOUNT * 2},
        {**PURCHASE, "quantity": HUGE},
        {**PURCHASE, "account_age_days": 1e300},
    ],
    ids=["400-digit ts", "ts after 2200", "ts over int64", "unit_price", "quantity", "account_age_days"],
)
def test_numbers_out_of_range_are_rejected_at_decode(doc: dict[str, object]) -> None:
    with pytest.raises(InvalidEvent) as info:
        Decoder(Purchase).decode(enc(doc))
    assert info.value.stage == "validate"


def test_amount_cannot_overflow() -> None:
    p = Decoder(Purchase).decode(enc({**PURCHASE, "quantity": 1_000_000, "unit_price": MAX_AMOUNT}))
    assert p.amount == 1e15


def test_small_timestamps_stay_valid() -> None:
    assert Decoder(Click).decode(enc({**CLICK, "ts": 0})).ts == 0
    assert Decoder(Click).decode(enc({**CLICK, "ts": MAX_TS_MS})).ts == MAX_TS_MS


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_is_a_decode_error_not_a_recursion_error(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    inner = "" if opener == "[" else "1"
    body = opener * 10_000 + inner + closer * 10_000
    raw = f'{{"event_id": "e", "ts": 1, "user_id": "u", "item_id": "i", "x": {body}}}'
    for decode in (Decoder(Click).decode, _generic_decoder(64 * 1024)):
        with pytest.raises(InvalidEvent, match="nested too deeply") as info:
            decode(raw.encode())
        assert info.value.stage == "decode"


def test_generic_decoder_rejects_integers_beyond_int64() -> None:
    decode = _generic_decoder(1 << 20)
    assert decode(b'{"a": 9223372036854775807}') == {"a": 2**63 - 1}
    with pytest.raises(InvalidEvent, match=r"\$\.a"):
        decode(f'{{"a": {HUGE}}}'.encode())
    with pytest.raises(InvalidEvent):
        decode(b'{"a": 1e400}')


DECODERS = {**{name: Decoder(t).decode for name, t in EVENT_TYPES.items()}, "generic": _generic_decoder(64 * 1024)}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10), st.sampled_from(["\ud800", "\udfff x"]),
)  # fmt: skip
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)  # fmt: skip
FIELDS = sorted({f for t in EVENT_TYPES.values() for f in t.__struct_fields__})
#: Objects made of the contracts' field names with arbitrary values, to get past "missing field".
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=14)
nested = st.integers(1, 30_000).map(lambda d: b'{"event_id": "e", "x": ' + b"[" * d + b"]" * d + b"}")


def check(name: str, raw: bytes | None) -> None:
    """Either a valid event with bounded numbers, or InvalidEvent: nothing else ever."""
    try:
        event = DECODERS[name](raw)
    except InvalidEvent as exc:
        assert exc.stage in ("decode", "validate")
        return
    values = event.values() if isinstance(event, dict) else [getattr(event, f) for f in event.__struct_fields__]
    for v in values:
        if type(v) is int:
            assert -(2**63) <= v < 2**63
        if type(v) is float:
            assert abs(v) <= MAX_AMOUNT * 1e9 or isinstance(event, dict)
    if not isinstance(event, dict):
        assert 0 <= event.ts <= MAX_TS_MS
        if isinstance(event, Purchase):
            assert event.amount < float("inf")


HYPO = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPO
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=400) | st.none())
def test_decoders_on_arbitrary_bytes(name: str, raw: bytes | None) -> None:
    check(name, raw)


@HYPO
@given(st.sampled_from(sorted(DECODERS)), json_values | objects | nested)
def test_decoders_on_arbitrary_json(name: str, doc: object) -> None:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc, allow_nan=True).encode()
    check(name, raw)
