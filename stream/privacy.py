"""Pseudonymized identifiers: ``[privacy]`` (README "Privacy").

The identifier fields listed in ``[privacy]`` (``user_id``, ``device_id``,
``order_id`` ...) are replaced at decode by a keyed pseudonym, HMAC-SHA256 of
the value's UTF-8 bytes under a secret key, truncated to 16 bytes and
base64url encoded (22 characters). Everything after decoding (learners, their
checkpointed state, outputs, metrics, logs) sees only pseudonyms. The same
value gives the same pseudonym wherever it occurs, so joins keep working (a
fraud label's ``order_id`` meets its purchase's), and another key gives other
pseudonyms.

>>> p = Pseudonymizer(b"k" * 32, fields=("user_id", "order_id"))
>>> p.pseudonym("u1")
'SzzBWDxtBhes3hCMMbILxw'
>>> p.pseudonym("u1") == p.pseudonym_bytes(b"u1") and p.pseudonym("u1") != p.pseudonym("u2")
True
>>> Pseudonymizer(b"x" * 32, fields=("user_id",)).pseudonym("u1") != p.pseudonym("u1")
True
>>> p.mask_dict({"user_id": "u1", "item_id": "i9", "n": 2})
{'user_id': 'SzzBWDxtBhes3hCMMbILxw', 'item_id': 'i9', 'n': 2}

Pseudonyms are not anonymization: the same id always maps to the same
pseudonym (events stay linkable), and whoever holds the key can test a guess.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from stream.errors import ConfigError
from stream.events import EVENT_TYPES, contract_string_fields

if TYPE_CHECKING:
    from stream.config import Config, PrivacyConfig

__all__ = [
    "KEY_FIELDS",
    "MIN_KEY_BYTES",
    "Pseudonymizer",
    "load_key",
]

#: The field each contract topic is keyed by (README "Event contracts").
KEY_FIELDS = {"clicks": "user_id", "purchases": "user_id", "prices": "item_id", "fraud_labels": "order_id"}
#: A shorter key is refused at start-up (e.g. ``openssl rand -base64 32`` gives 44).
MIN_KEY_BYTES = 32
#: Bytes of the HMAC kept: 128 bits, collision-free in practice for any shop's ids.
PSEUDONYM_BYTES = 16

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


def load_key(cfg: PrivacyConfig, environ: Mapping[str, str] | None = None) -> bytes:
    """The HMAC key, from ``key_file`` if set, else the ``key_env`` variable; the key itself
    never appears in an error (only where it was looked for and how long it is)."""
    env = os.environ if environ is None else environ
    if cfg.key_file:
        try:
            key = Path(cfg.key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"[privacy] key_file {cfg.key_file}: cannot read it: {exc.strerror or exc}") from None
        where = f"key_file {cfg.key_file}"
    else:
        value = env.get(cfg.key_env)
        if value is None:
            raise ConfigError(
                f"[privacy] lists identifier fields but the key variable {cfg.key_env} is not set "
                "(set it, or name a `key_file`)"
            )
        key = value.strip().encode()
        where = f"environment variable {cfg.key_env}"
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"[privacy] the key in {where} is {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
            "(e.g. `openssl rand -base64 32`)"
        )
    return key


class Pseudonymizer:
    """Masks identifier fields of decoded events, output keys, dead letters and holdout records.

    ``fields`` apply in every topic; ``per_topic`` adds fields for one topic (by
    topic name); ``contract_topics`` maps the contract streams to topic names
    (their events are msgspec structs, other topics' events are dicts).
    """

    __slots__ = (
        "_by_topic",
        "_inner",
        "_key_field",
        "_last",
        "_outer",
        "contract_topics",
        "dead_letters",
        "fields",
        "per_topic",
    )

    def __init__(
        self,
        key: bytes,
        *,
        fields: Iterable[str] = (),
        per_topic: Mapping[str, Iterable[str]] | None = None,
        contract_topics: Mapping[str, str] | None = None,
        dead_letters: str = "keep",
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the key must have at least {MIN_KEY_BYTES} bytes")
        # HMAC (RFC 2104) with the padded key's inner and outer SHA-256 states computed
        # once: a pseudonym costs two state copies and two updates (about 0.6 us).
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self.fields = tuple(dict.fromkeys(fields))
        self.per_topic = {t: tuple(dict.fromkeys(v)) for t, v in (per_topic or {}).items()}
        self.contract_topics = dict(contract_topics or {})
        self.dead_letters = dead_letters
        self._by_topic: dict[str, tuple[str, ...]] = {}
        #: Contract topics by topic name -> the masked field their records are keyed by (None: key not masked).
        self._key_field: dict[str, str | None] = {}
        for stream, topic in self.contract_topics.items():
            masked = self.fields_for(topic)
            key_field = KEY_FIELDS.get(stream)
            self._key_field[topic] = key_field if key_field in masked else None
        self._last: tuple[bytes, bytes] | None = None

    # The key must never travel: not into a checkpoint, a copy or a log line.
    def __reduce__(self) -> Any:
        raise TypeError("a Pseudonymizer holds the privacy key and is never pickled or copied")

    def __repr__(self) -> str:
        return (
            f"Pseudonymizer(fields={list(self.fields)}, per_topic={self.per_topic}, dead_letters={self.dead_letters!r})"
        )

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> Pseudonymizer | None:
        """The pseudonymizer ``[privacy]`` asks for, or None when no field is listed (privacy off).
        Raises ``ConfigError`` for a missing or short key or an unknown topic."""
        cfg = config.privacy
        if not cfg.fields and not any(cfg.per_topic.values()):
            return None
        contracts = config.input_topics()
        known = set(contracts.values())
        for spec in config.learners.values():
            for attr in ("input", "label_topic"):
                topic = getattr(spec, attr, None)
                if topic:
                    known.add(contracts.get(topic, topic))
        per_topic: dict[str, list[str]] = {}
        for name, names in cfg.per_topic.items():
            topic = contracts.get(name, name)
            if topic not in known:
                raise ConfigError(
                    f"[privacy] per_topic.{name}: neither a contract stream ({', '.join(contracts)}) "
                    "nor a topic a configured learner reads"
                )
            stream = next((s for s, t in contracts.items() if t == topic), None)
            if stream is not None:
                fields = contract_string_fields(EVENT_TYPES[stream])
                for field in names:
                    if not fields.get(field, False):
                        raise ConfigError(
                            f"[privacy] per_topic.{name}: `{field}` is not a string field of the {stream} contract"
                        )
            per_topic.setdefault(topic, []).extend(names)
        return cls(
            load_key(cfg, environ),
            fields=cfg.fields,
            per_topic=per_topic,
            contract_topics=contracts,
            dead_letters=cfg.dead_letters,
        )

    def describe(self) -> dict[str, Any]:
        """For the start-up log: what is masked, never the key."""
        return {"fields": list(self.fields), "per_topic": self.per_topic, "dead_letters": self.dead_letters}

    # -- pseudonyms ----------------------------------------------------------------

    def pseudonym_bytes(self, value: bytes) -> str:
        inner = self._inner.copy()
        inner.update(value)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return base64.urlsafe_b64encode(outer.digest()[:PSEUDONYM_BYTES])[:22].decode()

    def pseudonym(self, value: str) -> str:
        return self.pseudonym_bytes(value.encode("utf-8", "surrogatepass"))

    def _scalar(self, value: Any) -> str:
        # Numbers (and anything else) by their JSON text: 123 and "123" get the same pseudonym.
        return self.pseudonym(value if isinstance(value, str) else _json_encode(value).decode())

    def fields_for(self, topic: str) -> tuple[str, ...]:
        fields = self._by_topic.get(topic)
        if fields is None:
            fields = self._by_topic[topic] = tuple(dict.fromkeys((*self.fields, *self.per_topic.get(topic, ()))))
        return fields

    # -- events --------------------------------------------------------------------

    def mask_dict(self, event: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``event`` with the listed top-level fields pseudonymized (in place; nulls stay null)."""
        for name in self.fields if fields is None else fields:
            value = event.get(name)
            if value is not None:
                event[name] = self._scalar(value)
        return event

    def wrap_decoder(
        self, topic: str, decode: Callable[[bytes | None], Any], event_type: type[Any] | None
    ) -> Callable[[bytes | None], Any]:
        """``decode`` followed by masking the fields listed for ``topic``; ``decode`` itself when none apply."""
        fields = self.fields_for(topic)
        if event_type is None:
            if not fields:
                return decode
            mask_dict = self.mask_dict

            def decode_dict(value: bytes | None) -> Any:
                return mask_dict(decode(value), fields)

            return decode_dict
        present = contract_string_fields(event_type)
        masked = tuple(f for f in fields if present.get(f))
        if not masked:
            return decode
        pseudonym = self.pseudonym
        # The event was just decoded and nobody else holds it: its fields are set in place
        # (a frozen struct's copy via ``replace`` costs more and validates it again).
        force_setattr = msgspec.structs.force_setattr

        def decode_struct(value: bytes | None) -> Any:
            event = decode(value)
            for name in masked:
                v = getattr(event, name)
                if v is not None:
                    force_setattr(event, name, pseudonym(v))
            return event

        return decode_struct

    def output_key(self, record: Any, event: Any) -> bytes | None:
        """The key of an output record: the pseudonym of the field the topic is keyed by
        when it is masked (already computed at decode), the original key when that field is
        not masked; for topics outside the contracts (key field unknown) the key's pseudonym."""
        key = record.key()
        if key is None:
            return None
        topic = record.topic()
        if topic in self._key_field:
            field = self._key_field[topic]
            if field is None:
                return key if not isinstance(key, str) else key.encode()
            return getattr(event, field).encode()  # type: ignore[no-any-return]
        return self._key_pseudonym(key)

    def _key_pseudonym(self, key: bytes | str) -> bytes:
        raw = key.encode() if isinstance(key, str) else key
        last = self._last
        if last is not None and last[0] == raw:
            return last[1]  # one record, several learners' outputs
        masked = self.pseudonym_bytes(raw).encode()
        self._last = (raw, masked)
        return masked

    def mask_key(self, topic: str | None, key: bytes | str | None) -> bytes | None:
        """A raw record key, masked by the output rule (the key field's pseudonym)."""
        if key is None:
            return None
        if topic in self._key_field and self._key_field[topic] is None:
            return key if not isinstance(key, str) else key.encode()
        return self._key_pseudonym(key)

    def mask_value(self, topic: str | None, value: bytes | str | None) -> bytes | None:
        """A raw record value re-encoded with the topic's fields pseudonymized;
        None when it is not a JSON object (it cannot be told free of identifiers)."""
        if value is None:
            return None
        fields = self.fields_for(topic or "")
        if not fields:
            return value.encode() if isinstance(value, str) else value
        try:
            doc = _json_decode(value)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict):
            return None
        return _json_encode(self.mask_dict(doc, fields))

    def dead_letter(self, topic: str | None, key: Any, value: Any) -> tuple[Any, Any]:
        """Key and value of a dead letter by ``dead_letters``: ``keep`` the original bytes,
        ``mask`` the identifiers (values that do not parse are dropped), ``drop`` the value."""
        mode = self.dead_letters
        if mode == "keep":
            return key, value
        if mode == "drop":
            return self.mask_key(topic, key), None
        return self.mask_key(topic, key), self.mask_value(topic, value)

    def mask_records(self, records: Iterable[Any]) -> list[Any]:
        """Holdout records as checkpoints keep them: key and value masked; records whose
        value is not a JSON object are left out (they cannot be told free of identifiers)."""
        from stream.checkpoint import StoredRecord

        out = []
        for r in records:
            topic, value = r.topic(), r.value()
            masked = self.mask_value(topic, value)
            if masked is None and value is not None:
                continue
            out.append(
                StoredRecord(topic, r.partition(), r.offset(), r.timestamp()[1], self.mask_key(topic, r.key()), masked)
            )
        return out
