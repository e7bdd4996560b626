"""No record can make the pipeline raise (property-based, no broker), and the
cut-to-fit logic of dead letters.

``Pipeline.process`` with a fake sink, for arbitrary values on every topic:
never raises, dead-letters exactly the records the decoders reject (once),
publishes one output for every other one. Stages that raise (a learner, an
observer, the sink refusing an output) dead-letter the record once, with the
first failing stage.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from corpus import bad_records, good_doc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import EVENT_TYPES, MAX_TS_MS, Decoder, InvalidEvent
from stream.learners.base import Learner
from stream.pipeline import (
    H_KEY_SHA256,
    H_KEY_SIZE,
    H_TRUNCATED,
    H_VALUE_SHA256,
    H_VALUE_SIZE,
    MIN_DEAD_LETTER_BYTES,
    BaseObserver,
    DeadLetterBudget,
    Pipeline,
    RecordTooLarge,
    _generic_decoder,
    dead_letter_headers,
    fit_dead_letter,
    record_size,
)
from stream.recording import RecordedMessage

CONTRACTS = {"clicks": "clicks", "purchases": "purchases", "prices": "prices", "fraud_labels": "fraud-labels",
             "searches": "searches"}  # fmt: skip
TOPIC_OF = {stream: topic for stream, topic in CONTRACTS.items()}
GENERIC = "generic-json"
TOPICS = [*CONTRACTS.values(), GENERIC]
STREAM_OF = {topic: stream for stream, topic in CONTRACTS.items()}
DL = "dead-letters"


class Echo(Learner):
    """Predicts a constant, learns by counting; ``fail`` makes a stage raise."""

    kind = "echo"

    def __init__(self, topic: str, fail: str | None = None) -> None:
        super().__init__(f"echo-{topic}", f"out-{topic}", frozenset({topic}))
        self.fail = fail

    def predict(self, event: Any) -> Any:
        if self.fail == "predict":
            raise OverflowError("predict blew up")
        if self.fail == "unencodable":
            return {"x": object()}
        return {"n": self.n_learned}

    def learn(self, event: Any) -> None:
        if self.fail == "learn":
            raise RecursionError("learn blew up")
        self.n_learned += 1


class ListSink:
    def __init__(self, max_bytes: int | None = None) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, Any]] = []
        self.max_bytes = max_bytes

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        size = record_size(key, value, headers)
        if self.max_bytes is not None and size > self.max_bytes:
            raise RecordTooLarge(topic, size, "Broker: Message size too large")
        self.records.append((topic, key, value, headers))

    def dead(self) -> list[tuple[str, bytes | None, bytes | None, Any]]:
        return [r for r in self.records if r[0] == DL]


class Observer(BaseObserver):
    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.dead = 0

    def processed(self, topic: Any, record: Any, event: Any) -> None:
        if self.fail == "processed":
            raise OverflowError("int too large to convert to float")

    def published(self, learner: Any, event: Any, record: Any) -> None:
        if self.fail == "published":
            raise ValueError("metrics broke")

    def dead_lettered(self, topic: Any, stage: str) -> None:
        self.dead += 1
        if self.fail == "dead_lettered":
            raise RuntimeError("counting broke")


def pipeline(sink: ListSink, *, fail: str | None = None, observer: Any = None, budget: int | None = None) -> Pipeline:
    learners = [Echo(t, fail if t == "clicks" else None) for t in TOPICS]
    return Pipeline(
        learners, sink, contract_topics=CONTRACTS, dead_letter_topic=DL, max_value_bytes=4096,
        observer=observer, dead_letter_budget=DeadLetterBudget(budget),
    )  # fmt: skip


def record(topic: str, value: bytes | None, offset: int = 0, key: bytes | None = b"k") -> RecordedMessage:
    return RecordedMessage(topic, 0, offset, (1, 1_700_000_000_000), key, value, None)


def rejected(topic: str, value: bytes | None) -> bool:
    decode = Decoder(EVENT_TYPES[STREAM_OF[topic]], 4096).decode if topic in STREAM_OF else _generic_decoder(4096)
    try:
        decode(value)  # type: ignore[arg-type]
        return False
    except InvalidEvent:
        return True


# -- strategies ------------------------------------------------------------------

#: JSON scalars including the nasty ones: huge ints, floats at the edges, NaN/inf, surrogates.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["\ud800", "", "x" * 300]),
)  # fmt: skip
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def dumps(doc: Any) -> bytes:
    # allow_nan writes NaN/Infinity tokens; ensure_ascii writes lone surrogates as \ud800 escapes.
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def contract_like(draw: st.DrawFn, stream: str) -> bytes:
    """A valid document of ``stream`` with some fields replaced by arbitrary JSON, dropped, or extra."""
    doc = good_doc(stream, draw(st.integers(0, 1000)))
    for name in draw(st.lists(st.sampled_from(sorted(doc)), max_size=3, unique=True)):
        if draw(st.booleans()):
            doc[name] = draw(json_values)
        else:
            del doc[name]
    if draw(st.booleans()):
        doc["extra"] = draw(json_values)
    return dumps(doc)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 20_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = "1" if opener != "[" else ""
    body = opener * depth + inner + closer * depth * draw(st.integers(0, 1))
    return f'{{"event_id": "e", "x": {body}}}'.encode()


def values_for(topic: str) -> st.SearchStrategy[bytes | None]:
    stream = STREAM_OF.get(topic, "clicks")
    return st.one_of(
        st.none(), st.binary(max_size=300), json_values.map(dumps), contract_like(stream), deep(),
        st.integers(0, 5000).map(lambda n: dumps({**good_doc(stream, 0), "pad": "x" * n})),
    )  # fmt: skip


topic_and_value = st.sampled_from(TOPICS).flatmap(lambda t: st.tuples(st.just(t), values_for(t)))

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the properties --------------------------------------------------------------


@SETTINGS
@given(st.lists(topic_and_value, min_size=1, max_size=20))
def test_process_never_raises_and_dead_letters_exactly_the_invalid(items: list[tuple[str, bytes | None]]) -> None:
    sink = ListSink()
    pipe = pipeline(sink, observer=Observer())
    for offset, (topic, value) in enumerate(items):
        before = len(sink.records)
        pipe.process(record(topic, value, offset))
        produced = sink.records[before:]
        dead = [r for r in produced if r[0] == DL]
        if rejected(topic, value):
            assert len(dead) == 1 and len(produced) == 1, (topic, value)
            headers = dict(dead[0][3])
            assert headers["stream.source.offset"] == str(offset).encode()
            assert headers["stream.stage"] in (b"decode", b"validate")
            assert dead[0][2] == value
        else:
            # Outside the contracts any JSON object (of int64-sized numbers) is an event.
            assert not dead, (topic, value, dead)
            assert [r[0] for r in produced] == [f"out-{topic}"]


@SETTINGS
@given(topic_and_value, st.sampled_from([None, "predict", "learn", "unencodable"]),
       st.sampled_from([None, "processed", "published", "dead_lettered"]))  # fmt: skip
def test_raising_stages_dead_letter_once(item: tuple[str, bytes | None], fail: str | None, observe: str | None) -> None:
    topic, value = item
    sink = ListSink()
    pipe = pipeline(sink, fail=fail, observer=Observer(observe))
    pipe.process(record(topic, value, 3))
    dead = sink.dead()
    if rejected(topic, value):
        assert len(dead) == 1
        return
    learner_fails = topic == "clicks" and fail is not None
    observer_fails = observe in ("processed", "published")
    assert len(dead) == (1 if learner_fails or observer_fails else 0), (fail, observe, dead)
    if dead:
        stage = dict(dead[0][3])["stream.stage"].decode()
        if learner_fails and not (fail == "learn" and observe == "published"):
            assert stage == {"predict": "predict", "learn": "learn", "unencodable": "publish"}[fail]  # type: ignore[index]
        else:  # the first stage that failed: observing a published prediction comes before learning
            assert stage == "observe"
        assert dict(dead[0][3])["stream.source.offset"] == b"3"


def test_service_errors_are_not_contained() -> None:
    class Broken(Exception):
        pass

    class FailingSink(ListSink):
        def produce(self, *args: Any, **kwargs: Any) -> None:
            raise Broken("the producer is gone")

    pipe = Pipeline([Echo("clicks")], FailingSink(), contract_topics=CONTRACTS, dead_letter_topic=DL,
                    service_errors=(Broken,))  # fmt: skip
    with pytest.raises(Broken):
        pipe.process(record("clicks", json.dumps(good_doc("clicks", 1)).encode()))
    with pytest.raises(Broken):
        pipe.process(record("clicks", b"not json"))


def test_every_corpus_kind_is_dead_lettered_once() -> None:
    rng = random.Random(7)
    sink = ListSink()
    pipe = pipeline(sink, observer=Observer())
    n = 0
    for stream, topic in TOPIC_OF.items():
        for bad in bad_records(stream, rng, max_value_bytes=4096):
            pipe.process(record(topic, bad.value, n, bad.key))
            n += 1
    dead = sink.dead()
    assert len(dead) == n == len(sink.records)
    assert [int(dict(h)["stream.source.offset"]) for *_, h in dead] == list(range(n))


# -- contract bounds ---------------------------------------------------------------


@given(st.sampled_from(sorted(EVENT_TYPES)), st.integers(min_value=-(10**30), max_value=10**30))
def test_decoded_timestamps_are_bounded(stream: str, ts: int) -> None:
    doc = {**good_doc(stream, 1), "ts": ts}
    try:
        event = Decoder(EVENT_TYPES[stream]).decode(dumps(doc))
    except InvalidEvent as exc:
        assert not 0 <= ts <= MAX_TS_MS and "$.ts" in str(exc)
    else:
        assert 0 <= event.ts <= MAX_TS_MS


# -- cut to fit --------------------------------------------------------------------


def headers_for(stage: str = "decode") -> list[tuple[str, str | bytes | None]]:
    return dead_letter_headers(record("clicks", b"v", 5), stage, "value is too large")


def test_a_dead_letter_that_fits_is_untouched() -> None:
    h = headers_for()
    assert fit_dead_letter(b"k", b"v" * 100, h, 10_000) == (b"k", b"v" * 100, h)
    assert fit_dead_letter(None, None, h, 10_000) == (None, None, h)


def test_value_is_cut_with_original_size_and_sha256() -> None:
    value = bytes(range(256)) * 4000  # 1,024,000 bytes
    key, cut, h = fit_dead_letter(b"user-1", value, headers_for(), 500_000)
    d = dict(h)
    assert key == b"user-1" and value.startswith(cut) and 0 < len(cut) < 500_000
    assert record_size(key, cut, h) <= 500_000
    assert d[H_TRUNCATED] == b"value"
    assert d[H_VALUE_SIZE] == b"1024000"
    assert d[H_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert H_KEY_SIZE not in d
    # The provenance headers are kept.
    assert d["stream.source.offset"] == b"5" and d["stream.stage"] == b"decode"


def test_huge_key_with_small_value_cuts_the_key_only() -> None:
    key = b"k" * 300_000
    k, v, h = fit_dead_letter(key, b"{}", headers_for(), 100_000)
    d = dict(h)
    assert v == b"{}" and key.startswith(k) and record_size(k, v, h) <= 100_000
    assert d[H_TRUNCATED] == b"key" and d[H_KEY_SIZE] == b"300000"
    assert d[H_KEY_SHA256] == hashlib.sha256(key).hexdigest().encode()


def test_huge_key_and_value_are_both_cut() -> None:
    k, v, h = fit_dead_letter(b"k" * 300_000, b"v" * 300_000, headers_for(), 100_000)
    assert record_size(k, v, h) <= 100_000 and len(k) > 40_000 and len(v) > 40_000
    assert dict(h)[H_TRUNCATED] == b"key,value"


def test_huge_key_of_a_tombstone() -> None:
    k, v, h = fit_dead_letter(b"k" * 300_000, None, headers_for(), 100_000)
    assert v is None and record_size(k, v, h) <= 100_000 and dict(h)[H_TRUNCATED] == b"key"


def test_cutting_again_keeps_the_original_size_and_hash() -> None:
    value = b"x" * 1_000_000
    k, v, h = fit_dead_letter(None, value, headers_for(), 600_000)
    k2, v2, h2 = fit_dead_letter(k, v, h, 200_000)
    assert record_size(k2, v2, h2) <= 200_000 and len(v2) < len(v)
    assert dict(h2)[H_VALUE_SIZE] == b"1000000"
    assert dict(h2)[H_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert [n for n, _ in h2].count(H_VALUE_SHA256) == 1 and [n for n, _ in h2].count(H_TRUNCATED) == 1


@given(st.binary(max_size=5000) | st.none(), st.binary(max_size=5000) | st.none(), st.integers(2048, 12_000))
def test_fit_always_fits(key: bytes | None, value: bytes | None, limit: int) -> None:
    k, v, h = fit_dead_letter(key, value, headers_for(), limit)
    assert record_size(k, v, h) <= limit
    assert (k is None) == (key is None) and (v is None) == (value is None)


def test_budget_lowers_to_half_of_what_was_refused_never_below_the_minimum() -> None:
    budget = DeadLetterBudget(980_000)
    assert budget.lower(400_000) == 200_000
    assert budget.lower(1_000_000) == 100_000
    for _ in range(20):
        budget.lower(budget.max_bytes or 0)
    assert budget.max_bytes == MIN_DEAD_LETTER_BYTES
    assert DeadLetterBudget().lower(50_000) == 25_000


def test_pipeline_cuts_to_the_budget_and_again_when_the_producer_refuses() -> None:
    big = json.dumps({**good_doc("clicks", 1), "pad": "x" * 1_040_000}).encode()
    # Known budget: cut before producing.
    sink = ListSink(max_bytes=1_000_000)
    pipeline(sink, budget=980_000).process(record("clicks", big, 9))
    ((_, _, value, h),) = sink.dead()
    assert value is not None and big.startswith(value) and dict(h)[H_VALUE_SIZE] == str(len(big)).encode()
    # Unknown (or too high) budget: the producer's refusal lowers it and the dead letter is cut.
    sink = ListSink(max_bytes=300_000)
    pipe = pipeline(sink, budget=None)
    pipe.process(record("clicks", big, 10))
    ((_, _, value, h),) = sink.dead()
    assert value is not None and len(value) < 300_000
    assert dict(h)[H_VALUE_SHA256] == hashlib.sha256(big).hexdigest().encode()
    assert pipe.dead_letter_budget.max_bytes is not None and pipe.dead_letter_budget.max_bytes <= 300_000
