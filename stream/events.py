"""Event contracts and their decoding.

Every input topic carries one event type, JSON encoded as UTF-8. Required
fields must be present with the right type; unknown extra fields are ignored
so producers can add fields without breaking consumers. ``ts`` is the event
time in epoch milliseconds.

>>> decoder = Decoder(Click)
>>> click = decoder.decode(b'{"event_id": "e1", "ts": 1700000000000, "user_id": "u1", "item_id": "i9"}')
>>> click.item_id, click.category
('i9', None)
>>> decoder.decode(b'{"event_id": "e1", "ts": 1, "user_id": "u1"}')
Traceback (most recent call last):
...
stream.errors.InvalidEvent: validate: Object missing required field `item_id`
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Generic, Literal, TypeVar

import msgspec

from stream.errors import InvalidEvent

__all__ = [
    "EVENT_TYPES",
    "MAX_AMOUNT",
    "MAX_CANDIDATES",
    "MAX_TS_MS",
    "AdCandidate",
    "Click",
    "Decoder",
    "Event",
    "FraudLabel",
    "InvalidEvent",
    "Price",
    "Purchase",
    "Search",
    "contract_string_fields",
]

# Ids are bounded so one hostile record cannot blow up per-user state.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=256)]

#: Upper bounds, so that no decoded number can overflow downstream (``float(ts)``,
#: ``quantity * unit_price``, latencies, feature quantiles): every int fits in an
#: int64 and every float stays far from ``inf``.
#: 2200-01-01T00:00:00Z in epoch milliseconds: later event times are garbage, not events.
MAX_TS_MS = 7_258_118_400_000
#: Prices, costs and unit prices (any currency): 1e9 a unit.
MAX_AMOUNT = 1e9
#: Stock counts.
MAX_STOCK = 10**12
#: Account age in days (about 270 years).
MAX_AGE_DAYS = 100_000.0
#: What any integer of a record read without a contract must fit in (the generic decoder).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

EpochMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)]
Positive = Annotated[float, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
NonNegative = Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
AgeDays = Annotated[float, msgspec.Meta(ge=0, le=MAX_AGE_DAYS)]
#: Candidates of one search or ads request, at most.
MAX_CANDIDATES = 200
#: A 0-based position in a ranked list.
Position = Annotated[int, msgspec.Meta(ge=0, le=MAX_CANDIDATES - 1)]


class _Event(msgspec.Struct, frozen=True, gc=False):
    """Common base: msgspec rejects NaN tokens and out-of-range numbers, this
    adds the checks msgspec constraints cannot express."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if type(value) is float and not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite, got {value}")


class Click(_Event, frozen=True, gc=False, omit_defaults=True):
    """A product view. Topic ``clicks``, key ``user_id``. ``request_id`` and
    ``position`` (0-based) name the search or ads request it came from, when known
    (fields left at None are not encoded)."""

    event_id: Id
    ts: EpochMs
    user_id: Id
    item_id: Id
    session_id: Id | None = None
    category: Text | None = None
    price: Positive | None = None
    source: Text | None = None
    request_id: Id | None = None
    position: Position | None = None


class Purchase(_Event, frozen=True, gc=False, omit_defaults=True):
    """An order line. Topic ``purchases``, key ``user_id``. ``request_id`` and
    ``position``: the search or ads request it came from, when known."""

    event_id: Id
    ts: EpochMs
    order_id: Id
    user_id: Id
    item_id: Id
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    unit_price: Positive
    category: Text | None = None
    payment_method: Text | None = None
    country: Text | None = None
    shipping_country: Text | None = None
    account_age_days: AgeDays | None = None
    device_id: Id | None = None
    request_id: Id | None = None
    position: Position | None = None

    @property
    def amount(self) -> float:
        return self.quantity * self.unit_price


class Price(_Event, frozen=True, gc=False):
    """A price change or price snapshot of an item. Topic ``prices``, key ``item_id``."""

    event_id: Id
    ts: EpochMs
    item_id: Id
    price: Positive
    cost: NonNegative | None = None
    competitor_price: Positive | None = None
    stock: Annotated[int, msgspec.Meta(ge=0, le=MAX_STOCK)] | None = None
    category: Text | None = None


class FraudLabel(_Event, frozen=True, gc=False):
    """The outcome of an order, known late (chargebacks). Topic ``fraud-labels``, key ``order_id``."""

    event_id: Id
    ts: EpochMs
    order_id: Id
    is_fraud: bool


class AdCandidate(msgspec.Struct, frozen=True, gc=False):
    """One ad of an ads request: the item advertised and the advertiser's bid per click."""

    item_id: Id
    bid: NonNegative

    def __post_init__(self) -> None:
        if not math.isfinite(self.bid):
            raise ValueError(f"`bid` must be finite, got {self.bid}")


class Search(_Event, frozen=True, gc=False):
    """A search or ads request and the candidates the shop's engine returned, in its order.
    Topic ``searches``, key ``user_id``. ``kind = "search"``: ``candidates`` are item ids;
    ``kind = "ads"``: objects ``{item_id, bid}``. At most ``MAX_CANDIDATES``."""

    event_id: Id
    ts: EpochMs
    user_id: Id
    request_id: Id
    kind: Literal["search", "ads"]
    candidates: Annotated[list[Id | AdCandidate], msgspec.Meta(max_length=MAX_CANDIDATES)]
    query: Text | None = None
    session_id: Id | None = None
    category: Text | None = None

    def __post_init__(self) -> None:
        want = str if self.kind == "search" else AdCandidate
        for c in self.candidates:
            if type(c) is not want:
                raise ValueError(
                    "`candidates` of a search request are item ids, of an ads request `{item_id, bid}` objects"
                )


Event = Click | Purchase | Price | FraudLabel | Search
E = TypeVar("E", bound=Click | Purchase | Price | FraudLabel | Search)

#: Event type by its logical stream name (the ``[topics]`` keys in config).
EVENT_TYPES: dict[str, type[Event]] = {
    "clicks": Click,
    "purchases": Purchase,
    "prices": Price,
    "fraud_labels": FraudLabel,
    "searches": Search,
}


class Decoder(Generic[E]):
    """Decodes raw record values into one event type, typed and validated."""

    __slots__ = ("_decode", "event_type", "max_bytes")

    def __init__(self, event_type: type[E], max_bytes: int = 64 * 1024) -> None:
        self.event_type: type[E] = event_type
        self.max_bytes = max_bytes
        self._decode: Callable[[bytes], E] = msgspec.json.Decoder(event_type).decode

    def decode(self, value: bytes | None) -> E:
        if value is None:
            raise InvalidEvent("decode", "record has no value (tombstone)")
        if len(value) > self.max_bytes:
            raise InvalidEvent("decode", f"value is {len(value)} bytes, limit is {self.max_bytes}")
        try:
            return self._decode(value)
        except msgspec.ValidationError as exc:
            raise InvalidEvent("validate", str(exc)) from None
        except msgspec.DecodeError as exc:
            raise InvalidEvent("decode", str(exc)) from None
        except UnicodeDecodeError as exc:
            raise InvalidEvent("decode", f"value is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
        except RecursionError:
            raise InvalidEvent("decode", "JSON nested too deeply") from None
        except Exception as exc:  # never let one record's bytes escape as anything but InvalidEvent
            raise InvalidEvent("decode", f"{type(exc).__name__}: {exc}") from None


def contract_string_fields(event_type: type[msgspec.Struct]) -> dict[str, bool]:
    """Every field of a contract, True where it is a string (an identifier can be masked)."""
    info = msgspec.inspect.type_info(event_type)
    out: dict[str, bool] = {}
    for f in info.fields:  # type: ignore[attr-defined]
        t = f.type
        types = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
        out[f.name] = any(isinstance(x, msgspec.inspect.StrType) for x in types)
    return out
