"""One step of the stream: decode -> learners (predict, then learn) -> outputs.

The same ``Pipeline`` runs behind the Kafka loop (``stream.app``) and the
backtest (``stream.replay``), so a recording replayed without a broker gives
the same predictions as a live run. It never talks to Kafka itself: it writes
to a ``Sink``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from stream.events import EVENT_TYPES, Decoder, InvalidEvent
from stream.learners import Learner

__all__ = [
    "BaseObserver",
    "Observer",
    "Output",
    "Pipeline",
    "Record",
    "Sink",
    "SourceRef",
    "Tally",
    "dead_letter_headers",
]

#: Dead-letter header carrying the error, bounded so a huge message cannot bloat it.
MAX_ERROR_CHARS = 1000


class Record(Protocol):
    """What the pipeline reads: a confluent-kafka ``Message`` or a recorded one."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def key(self) -> bytes | str | None: ...
    def value(self) -> bytes | str | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...


#: Kafka record headers as confluent-kafka's ``produce`` takes them.
Headers = list[tuple[str, str | bytes | None]]


class Sink(Protocol):
    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None: ...


class Observer(Protocol):
    """What the pipeline reports about each record: metrics, counters, scorers.

    ``attach`` is called once, when the pipeline is built; the other three on
    the hot path, once per record (``processed`` or ``dead_lettered``) and
    once per prediction published: keep them O(1) and allocation-free."""

    def attach(self, pipeline: Pipeline) -> None: ...
    def processed(self, topic: str, record: Record, event: Any) -> None: ...
    def published(self, learner: Learner, event: Any, record: Record) -> None: ...
    def dead_lettered(self, topic: str | None, stage: str) -> None: ...


class BaseObserver:
    """An ``Observer`` that ignores everything: subclass it and override what you need."""

    def attach(self, pipeline: Pipeline) -> None:
        pass

    def processed(self, topic: str, record: Record, event: Any) -> None:
        pass

    def published(self, learner: Learner, event: Any, record: Record) -> None:
        pass

    def dead_lettered(self, topic: str | None, stage: str) -> None:
        pass


class Tally(BaseObserver):
    """Counts what the pipeline reports (records processed per topic, dead
    letters per stage, predictions per learner) and passes every report on to
    ``observers``, in order (the Prometheus metrics, a ground-truth scorer).

    >>> t = Tally()
    >>> t.dead_lettered("clicks", "decode"); t.records, dict(t.dead)
    (1, {'decode': 1})
    """

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers
        #: Records processed or dead-lettered.
        self.records = 0
        self.processed_by_topic: Counter[str] = Counter()
        self.dead: Counter[str] = Counter()
        self.published_by_learner: Counter[str] = Counter()

    def attach(self, pipeline: Pipeline) -> None:
        for o in self.observers:
            o.attach(pipeline)

    def processed(self, topic: str, record: Record, event: Any) -> None:
        self.records += 1
        self.processed_by_topic[topic] += 1
        for o in self.observers:
            o.processed(topic, record, event)

    def published(self, learner: Learner, event: Any, record: Record) -> None:
        self.published_by_learner[learner.name] += 1
        for o in self.observers:
            o.published(learner, event, record)

    def dead_lettered(self, topic: str | None, stage: str) -> None:
        self.records += 1
        self.dead[stage] += 1
        for o in self.observers:
            o.dead_lettered(topic, stage)


class SourceRef(msgspec.Struct, array_like=False):
    topic: str
    partition: int
    offset: int


class Output(msgspec.Struct):
    """The envelope of every prediction record."""

    event_id: str
    source: SourceRef
    learner: str
    model_version: int
    prediction: Any
    predicted_at: int


def dead_letter_headers(record: Record, stage: str, error: str, learner: str | None = None) -> Headers:
    _, ts = record.timestamp()
    headers: Headers = [
        ("stream.source.topic", str(record.topic()).encode()),
        ("stream.source.partition", str(record.partition()).encode()),
        ("stream.source.offset", str(record.offset()).encode()),
        ("stream.source.timestamp", str(ts).encode()),
        ("stream.stage", stage.encode()),
        ("stream.error", error[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
    ]
    if learner is not None:
        headers.append(("stream.learner", learner.encode()))
    return headers


class _Route:
    """Everything needed for one input topic, resolved once at start-up."""

    __slots__ = ("decode", "learners")

    def __init__(self, decode: Callable[[bytes | None], Any], learners: Sequence[Learner]) -> None:
        self.decode = decode
        self.learners = tuple(learners)


def _generic_decoder(max_bytes: int) -> Callable[[bytes | None], dict[str, Any]]:
    """Topics outside the contracts (read by learners defined in config): any JSON object."""
    decode = msgspec.json.Decoder(dict[str, Any]).decode

    def _decode(value: bytes | None) -> dict[str, Any]:
        if value is None:
            raise InvalidEvent("decode", "record has no value (tombstone)")
        if len(value) > max_bytes:
            raise InvalidEvent("decode", f"value is {len(value)} bytes, limit is {max_bytes}")
        try:
            return decode(value)
        except msgspec.ValidationError as exc:
            raise InvalidEvent("validate", str(exc)) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidEvent("decode", str(exc)) from None

    return _decode


class Pipeline:
    """Routes each record to the learners that read its topic, test-then-train.

    A record that fails to decode, or makes a learner raise, goes once to the
    dead-letter topic with its provenance, key and value untouched; the
    pipeline moves on. ``publish = False`` relearns without producing outputs
    (recovery after a crash: the outputs were already published).
    """

    def __init__(
        self,
        learners: Iterable[Learner],
        sink: Sink,
        *,
        contract_topics: dict[str, str],
        dead_letter_topic: str,
        max_value_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.learners = list(learners)
        self.sink = sink
        self.dead_letter_topic = dead_letter_topic
        self.clock = clock
        self.publish = True
        self.observer = observer
        self._encode = msgspec.json.Encoder().encode
        self.routes: dict[str, _Route] = {}
        by_topic = {topic: EVENT_TYPES[stream] for stream, topic in contract_topics.items()}
        for topic in sorted({t for learner in self.learners for t in learner.reads}):
            readers = [learner for learner in self.learners if topic in learner.reads]
            event_type = by_topic.get(topic)
            decode = (
                Decoder(event_type, max_value_bytes).decode
                if event_type is not None
                else _generic_decoder(max_value_bytes)
            )
            self.routes[topic] = _Route(decode, readers)
        if observer is not None:
            # Metrics read the learners at scrape time and pre-create per-topic series.
            observer.attach(self)

    @property
    def topics(self) -> list[str]:
        return list(self.routes)

    def process(self, record: Record) -> None:
        topic: str = record.topic()  # type: ignore[assignment]  # a consumed record always has one
        route = self.routes.get(topic)
        if route is None:
            return  # no learner reads this topic (a recording may hold more topics than are configured)
        value = record.value()
        try:
            event = route.decode(value)  # type: ignore[arg-type]
        except InvalidEvent as exc:
            self.dead_letter(record, exc.stage, exc.reason)
            return
        failure: tuple[str, str, BaseException] | None = None
        for learner in route.learners:
            try:
                prediction = learner.predict(event)
            except Exception as exc:
                # No prediction was made, so there is nothing to evaluate or learn against.
                failure = failure or ("predict", learner.name, exc)
                continue
            if prediction is not None and self.publish:
                self._publish(record, event, learner, prediction)
            try:
                learner.learn(event)
            except Exception as exc:
                failure = failure or ("learn", learner.name, exc)
        if failure is not None:
            stage, name, error = failure
            self.dead_letter(record, stage, f"{type(error).__name__}: {error}", name)
        elif self.observer is not None:
            self.observer.processed(topic, record, event)

    def _publish(self, record: Record, event: Any, learner: Learner, prediction: Any) -> None:
        event_id = event["event_id"] if isinstance(event, dict) else event.event_id
        out = Output(
            event_id=str(event_id),
            source=SourceRef(record.topic(), record.partition(), record.offset()),  # type: ignore[arg-type]
            learner=learner.name,
            model_version=learner.model_version,
            prediction=prediction,
            predicted_at=int(self.clock() * 1000),
        )
        key = record.key()
        self.sink.produce(learner.output_topic, key if not isinstance(key, str) else key.encode(), self._encode(out))
        if self.observer is not None:
            self.observer.published(learner, event, record)

    def dead_letter(self, record: Record, stage: str, error: str, learner: str | None = None) -> None:
        if self.observer is not None:
            self.observer.dead_lettered(record.topic(), stage)
        if not self.publish:
            return
        key = record.key()
        value = record.value()
        self.sink.produce(
            self.dead_letter_topic,
            key.encode() if isinstance(key, str) else key,
            value.encode() if isinstance(value, str) else value,
            dead_letter_headers(record, stage, error, learner),
        )
