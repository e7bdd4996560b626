"""A corpus of bad records generated from the event contracts, for the fuzz and property tests.

Field lists, types and bounds come from the msgspec structs of ``stream.events``
(``msgspec.inspect``), so a field added to a contract is covered without
touching this file. Every bad record has a ``kind`` naming what is wrong with it
(``purchases:wrong_type:quantity:str``); ``bad_records`` yields each kind once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from stream.events import EVENT_TYPES

TS = 1_700_000_000_000

#: One valid document per contract stream; ``good_doc`` varies it per index.
_BASE: dict[str, dict[str, Any]] = {
    "clicks": {"event_id": "c", "ts": TS, "user_id": "u1", "item_id": "i1", "category": "shoes", "price": 12.5},
    "purchases": dict(
        event_id="p",
        ts=TS,
        order_id="o1",
        user_id="u1",
        item_id="i1",
        quantity=2,
        unit_price=9.5,
        payment_method="card",
        account_age_days=30.0,
    ),
    "prices": {"event_id": "r", "ts": TS, "item_id": "i1", "price": 20.0, "cost": 12.0, "stock": 5},
    "fraud_labels": {"event_id": "l", "ts": TS, "order_id": "o1", "is_fraud": False},
    "searches": {
        "event_id": "q",
        "ts": TS,
        "user_id": "u1",
        "request_id": "r1",
        "kind": "search",
        "candidates": ["i1", "i2", "i3"],
        "query": "red shoes",
        "category": "shoes",
    },
}


@dataclass(frozen=True)
class FieldInfo:
    name: str
    required: bool
    kind: str  # str, int, float, bool, enum (a string literal), list
    constraints: Any  # the msgspec.inspect type (bounds, lengths)


def contract_fields(stream: str) -> list[FieldInfo]:
    """The fields of a contract, from its msgspec struct."""
    out = []
    for f in mi.type_info(EVENT_TYPES[stream]).fields:  # type: ignore[attr-defined]
        t = f.type
        if isinstance(t, mi.UnionType):
            t = next(x for x in t.types if not isinstance(x, mi.NoneType))
        kinds = {mi.StrType: "str", mi.IntType: "int", mi.FloatType: "float", mi.BoolType: "bool",
                 mi.LiteralType: "enum", mi.ListType: "list"}  # fmt: skip
        kind = kinds[type(t)]
        out.append(FieldInfo(f.name, f.required, kind, t))
    return out


def good_doc(stream: str, i: int) -> dict[str, Any]:
    doc = dict(_BASE[stream])
    doc["event_id"] = f"{stream}-good-{i}"
    doc["ts"] = TS + i
    if stream == "clicks":
        doc.update(user_id=f"u{i % 7}", item_id=f"i{i % 5}", category=f"cat{i % 3}", price=10.0 + i % 4)
    elif stream == "purchases":
        doc.update(order_id=f"o{i}", user_id=f"u{i % 7}", quantity=1 + i % 3, unit_price=5.0 + i % 2)
    elif stream == "prices":
        doc.update(item_id=f"i{i % 5}", price=20.0 + i % 6, stock=i % 9)
    elif stream == "searches":
        cands = [f"i{(i + k) % 7}" for k in range(1 + i % 5)]
        doc.update(user_id=f"u{i % 7}", request_id=f"r{i}", query=f"cat{i % 3} thing")
        if i % 3 == 0:
            doc.update(kind="ads", candidates=[{"item_id": c, "bid": 0.1 * (1 + k)} for k, c in enumerate(cands)])
        else:
            doc.update(kind="search", candidates=cands)
    else:
        doc.update(order_id=f"o{i}", is_fraud=i % 10 == 0)
    return doc


def good_key(stream: str, doc: dict[str, Any]) -> bytes:
    field = {"clicks": "user_id", "purchases": "user_id", "prices": "item_id", "fraud_labels": "order_id",
             "searches": "user_id"}[stream]  # fmt: skip
    return str(doc[field]).encode()


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _with_raw(doc: dict[str, Any], field: str, raw: str) -> bytes:
    """``doc`` as JSON with ``field``'s value replaced by the raw JSON text ``raw``."""
    marker = "__RAW_MARKER__"
    return _json({**doc, field: marker}).replace(f'"{marker}"'.encode(), raw.encode())


#: Wrong-typed JSON values, by the type the field expects.
_WRONG: dict[str, dict[str, str]] = {
    "str": {"int": "17", "float": "1.5", "bool": "true", "list": '["a"]', "object": '{"a": 1}'},
    "int": {"str": '"12"', "float": "1.5", "bool": "true", "list": "[1]", "object": '{"a": 1}'},
    "float": {"str": '"1.5"', "bool": "true", "list": "[1.5]", "object": '{"a": 1.5}'},
    "bool": {"str": '"yes"', "int": "1", "float": "0.0", "list": "[true]", "object": "{}"},
    "enum": {"int": "17", "float": "1.5", "bool": "true", "list": '["search"]', "object": '{"a": 1}'},
    "list": {"str": '"i1"', "int": "1", "float": "1.5", "bool": "true", "object": '{"a": 1}'},
}

HUGE_INT = "1" + "0" * 399  # 400 digits


@dataclass(frozen=True)
class Bad:
    kind: str
    stream: str
    key: bytes | None
    value: bytes | None


def bad_records(
    stream: str, rng: random.Random, *, max_value_bytes: int = 64 * 1024, big: bool = False
) -> Iterator[Bad]:
    """Every kind of bad record for ``stream`` once. ``big`` adds the values over the size limits
    (producer's 1,000,000 bytes, and about 10 MB and 11 MB: the test broker's 10 MiB limit)."""
    doc = good_doc(stream, 10**6 + rng.randrange(10**6))
    key = good_key(stream, doc)

    def bad(kind: str, value: bytes | None, k: bytes | None = key) -> Bad:
        return Bad(f"{stream}:{kind}", stream, k, value)

    for f in contract_fields(stream):
        # A wrong type for every field, and null for the required ones.
        for name, raw in _WRONG[f.kind].items():
            yield bad(f"wrong_type:{f.name}:{name}", _with_raw(doc, f.name, raw))
        if f.required:
            yield bad(f"null:{f.name}", _with_raw(doc, f.name, "null"))
            yield bad(f"missing:{f.name}", _json({k: v for k, v in doc.items() if k != f.name}))
        if f.kind in ("int", "float"):
            for name, raw in [
                ("nan", "NaN"), ("infinity", "Infinity"), ("neg_infinity", "-Infinity"), ("nan_str", '"NaN"'),
                ("1e400", "1e400"), ("neg_1e400", "-1e400"), ("huge_int", HUGE_INT), ("neg_huge_int", "-" + HUGE_INT),
                ("int64_overflow", str(2**63)), ("negative", "-1"),
            ]:  # fmt: skip
                yield bad(f"number:{f.name}:{name}", _with_raw(doc, f.name, raw))
            upper = getattr(f.constraints, "le", None)
            if upper is not None:
                over = upper + 1 if f.kind == "int" else upper * 10
                yield bad(f"number:{f.name}:over_upper_bound", _with_raw(doc, f.name, json.dumps(over)))
        if f.kind == "enum":
            yield bad(f"enum:{f.name}:unknown", _with_raw(doc, f.name, '"bogus"'))
            yield bad(f"enum:{f.name}:empty", _with_raw(doc, f.name, '""'))
        if f.kind == "list":
            yield from _bad_lists(stream, doc, f, bad)
        if f.kind == "str":
            yield bad(f"string:{f.name}:lone_surrogate", _with_raw(doc, f.name, '"a\\ud800b"'))
            yield bad(f"string:{f.name}:lone_low_surrogate", _with_raw(doc, f.name, '"\\udfff"'))
            yield bad(f"string:{f.name}:too_long", _with_raw(doc, f.name, json.dumps("x" * 257)))
            yield bad(f"string:{f.name}:invalid_utf8", _json({**doc, f.name: "MARK"}).replace(b"MARK", b"\xff\xfe"))
            if getattr(f.constraints, "min_length", None):
                yield bad(f"string:{f.name}:empty", _with_raw(doc, f.name, '""'))
    good = _json(doc)
    for n in range(4):
        yield bad(f"random_bytes:{n}", rng.randbytes(rng.randrange(1, 300)))
    for n in range(3):
        yield bad(f"truncated:{n}", good[: rng.randrange(1, len(good) - 1)])
    yield bad("trailing_garbage", good + b"}garbage")
    yield bad("trailing_second_object", good + good)
    yield bad("deep_nesting_extra_field", _with_raw(doc, "extra", "[" * 10_000 + "]" * 10_000))
    yield bad("deep_nesting_unclosed", _with_raw(doc, "extra", "[" * 10_000).rstrip(b"}"))
    yield bad("deep_nesting_objects", _with_raw(doc, "extra", '{"a":' * 10_000 + "1" + "}" * 10_000))
    yield bad("deep_nesting_whole_value", b"[" * 10_000 + b"]" * 10_000)
    yield bad("empty_value", b"")
    yield bad("tombstone", None)
    yield bad("tombstone_null_key", None, None)
    yield bad("null_key_invalid_json", b"{nope", None)
    yield bad("json_null", b"null")
    yield bad("json_array", _json([doc]))  # type: ignore[arg-type]
    yield bad("json_number", b"42")
    yield bad("json_string", b'"event"')
    yield bad("utf8_bom", b"\xef\xbb\xbf" + good)
    yield bad("utf16", json.dumps(doc).encode("utf-16"))
    yield bad("nul_bytes", b"\x00" * 64)
    yield bad("over_max_value_bytes", _json({**doc, "pad": "x" * max_value_bytes}))
    if big:
        yield bad("over_producer_limit_1040006", _pad(doc, 1_040_006))
        yield bad("over_topic_limit_500000", _pad(doc, 500_000))
        yield bad("huge_key_and_value", _pad(doc, 700_000), k=b"k" * 700_000)


def _bad_lists(stream: str, doc: dict[str, Any], f: FieldInfo, bad: Any) -> Iterator[Bad]:
    """A list field: too long, and elements of the wrong type or out of bounds (for the
    candidates of a request: item ids of a search, ``{item_id, bid}`` of an ads request)."""
    if stream == "searches":
        doc = {**doc, "kind": "search"}
    upper = getattr(f.constraints, "max_length", None)
    if upper is not None:
        yield bad(f"list:{f.name}:too_long", _with_raw(doc, f.name, json.dumps([f"i{k}" for k in range(upper + 1)])))
    for name, raw in [
        ("element_int", "[1]"), ("element_null", "[null]"), ("element_list", '[["i1"]]'),
        ("element_empty_id", '[""]'), ("element_long_id", json.dumps(["x" * 257])),
        ("element_lone_surrogate", '["a\\ud800b"]'), ("ad_in_search", '[{"item_id": "i1", "bid": 1.0}]'),
    ]:  # fmt: skip
        yield bad(f"list:{f.name}:{name}", _with_raw(doc, f.name, raw))
    if stream == "searches":
        ads = {**doc, "kind": "ads"}
        for name, raw in [
            ("ad_id_only", '["i1"]'), ("ad_bid_nan", '[{"item_id": "i1", "bid": NaN}]'),
            ("ad_bid_1e400", '[{"item_id": "i1", "bid": 1e400}]'),
            ("ad_bid_negative", '[{"item_id": "i1", "bid": -1}]'),
            ("ad_bid_over_upper_bound", '[{"item_id": "i1", "bid": 1e10}]'),
            ("ad_bid_str", '[{"item_id": "i1", "bid": "1"}]'), ("ad_missing_bid", '[{"item_id": "i1"}]'),
            ("ad_missing_item", '[{"bid": 1.0}]'), ("ad_empty_item", '[{"item_id": "", "bid": 1.0}]'),
        ]:  # fmt: skip
            yield bad(f"list:{f.name}:{name}", _with_raw(ads, f.name, raw))


def _pad(doc: dict[str, Any], size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes: ``doc`` with a padding field."""
    base = _json({**doc, "pad": ""})
    value = _json({**doc, "pad": "x" * (size - len(base))})
    assert len(value) == size
    return value


def huge(stream: str, size: int) -> Bad:
    return Bad(f"{stream}:huge_{size}", stream, b"k", _pad(good_doc(stream, 0), size))


def is_valid(stream: str, value: bytes | None) -> bool:
    """What a plain msgspec decode of the contract says (no size limit): a guard on the corpus."""
    if value is None:
        return False
    try:
        msgspec.json.decode(value, type=EVENT_TYPES[stream])
        return True
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return False
