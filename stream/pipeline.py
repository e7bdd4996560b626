"""One step of the stream: decode -> learners (predict, then learn) -> outputs.

The same ``Pipeline`` runs behind the Kafka loop (``stream.app``) and the
backtest (``stream.replay``), so a recording replayed without a broker gives
the same predictions as a live run. It never talks to Kafka itself: it writes
to a ``Sink``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from stream.errors import RecordTooLarge
from stream.events import EVENT_TYPES, INT64_MAX, INT64_MIN, Decoder, InvalidEvent
from stream.learners import Learner

__all__ = [
    "BaseObserver",
    "DeadLetterBudget",
    "Observer",
    "Output",
    "Pipeline",
    "Record",
    "RecordTooLarge",
    "Sink",
    "SourceRef",
    "Tally",
    "dead_letter_headers",
    "fit_dead_letter",
]

log = logging.getLogger(__name__)

#: Dead-letter header carrying the error, bounded so a huge message cannot bloat it.
MAX_ERROR_CHARS = 1000

#: Headers of a dead letter whose value (or key) was cut to fit the producer's and the topic's size
#: limits: which parts were cut (``value``, ``key`` or ``key,value``), and each cut part's original
#: size in bytes and sha256 (hex), so the original can still be identified upstream.
H_TRUNCATED = "stream.truncated"
H_VALUE_SIZE = "stream.value.original_size"
H_VALUE_SHA256 = "stream.value.original_sha256"
H_KEY_SIZE = "stream.key.original_size"
H_KEY_SHA256 = "stream.key.original_sha256"
#: Bytes a record needs beyond its key, value and headers' own bytes (record and batch framing,
#: per-header varints), with room to spare.
RECORD_OVERHEAD = 512
#: What the truncation headers themselves take, reserved before cutting.
_TRUNCATION_HEADERS_BYTES = 2 * (len(H_VALUE_SIZE) + len(H_VALUE_SHA256) + 20 + 64 + 2 * 8) + len(H_TRUNCATED) + 17
#: The smallest budget a dead letter is ever cut to (its headers alone must fit).
MIN_DEAD_LETTER_BYTES = 8 * 1024


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


@runtime_checkable
class TimedSink(Sink, Protocol):
    """A sink that times the loop's batches from consumed to acknowledged (the pipeline's own
    latency share): ``consumed`` after a batch is produced, ``on_acknowledged(seconds, records)``
    once all its outputs are acknowledged. ``stream.metrics`` sets ``on_acknowledged``."""

    on_acknowledged: Callable[[float, int], None] | None

    def consumed(self, consumed_at: float, records: int) -> None: ...


class DeadLetterBudget:
    """The most bytes one dead letter may take (key + value + headers + framing).

    Shared by the pipeline, which cuts each dead letter to it before producing
    (``fit_dead_letter``), and the Kafka sink, which lowers it when a delivery
    still fails as too large. ``None``: no limit known (no broker, a test sink).
    """

    __slots__ = ("max_bytes",)

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes

    def lower(self, refused_size: int) -> int:
        """A record of ``refused_size`` bytes was refused: aim at half of that from now on."""
        current = self.max_bytes if self.max_bytes is not None else refused_size
        self.max_bytes = max(MIN_DEAD_LETTER_BYTES, min(current, refused_size) // 2)
        return self.max_bytes


def headers_size(headers: Headers | None) -> int:
    """Bytes the headers take in a record, framing excluded (``RECORD_OVERHEAD`` covers it)."""
    if not headers:
        return 0
    return sum(len(k) + (len(v) if v is not None else 0) + 4 for k, v in headers)


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    return (len(key) if key else 0) + (len(value) if value else 0) + headers_size(headers) + RECORD_OVERHEAD


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: Headers, max_bytes: int
) -> tuple[bytes | None, bytes | None, Headers]:
    """Cut ``key`` and ``value`` so the dead letter takes at most ``max_bytes``.

    Unchanged when it fits. Otherwise the value is cut first (the key is kept
    whole when the value can make room), both are cut when both are large, and
    each cut part gets headers with its original size and sha256; a part that
    was cut before (a re-produce after a refused delivery) keeps the headers
    of its original and is cut further.

    >>> k, v, h = fit_dead_letter(b"user-1", b"x" * 10_000, [("stream.stage", b"decode")], 4096)
    >>> k, len(v) + len(k) + sum(len(a) + len(b) + 4 for a, b in h) + RECORD_OVERHEAD <= 4096
    (b'user-1', True)
    >>> dict(h)["stream.truncated"], dict(h)["stream.value.original_size"]
    (b'value', b'10000')
    """
    if record_size(key, value, headers) <= max_bytes:
        return key, value, headers
    have = {name for name, _ in headers}
    kept = [(n, v) for n, v in headers if n != H_TRUNCATED]
    room = max(0, max_bytes - RECORD_OVERHEAD - headers_size(kept) - _TRUNCATION_HEADERS_BYTES)
    k, v = key or b"", value or b""
    key_room = min(len(k), max(room - len(v), room // 2))
    value_room = max(0, room - key_room)
    cut: list[str] = []
    new_key, new_value = key, value
    if key is not None and len(k) > key_room:
        if H_KEY_SHA256 not in have:
            kept += [(H_KEY_SIZE, str(len(k)).encode()), (H_KEY_SHA256, hashlib.sha256(k).hexdigest().encode())]
        new_key = k[:key_room]
    if key is not None and H_KEY_SHA256 in {n for n, _ in kept}:
        cut.append("key")
    if value is not None and len(v) > value_room:
        if H_VALUE_SHA256 not in have:
            kept += [(H_VALUE_SIZE, str(len(v)).encode()), (H_VALUE_SHA256, hashlib.sha256(v).hexdigest().encode())]
        new_value = v[:value_room]
    if value is not None and H_VALUE_SHA256 in {n for n, _ in kept}:
        cut.append("value")
    if cut:
        kept.append((H_TRUNCATED, ",".join(cut).encode()))
    return new_key, new_value, kept


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


class SourceRef(msgspec.Struct, array_like=False, gc=False):
    topic: str
    partition: int
    offset: int


class Output(msgspec.Struct, gc=False):
    """The envelope of every prediction record (``gc=False``: one per output, never in a
    reference cycle, so the garbage collector need not track it; the bytes are the same)."""

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
    """Topics outside the contracts (read by learners defined in config): any JSON object
    whose top-level numbers fit an int64 or are finite floats (they become features)."""
    decode = msgspec.json.Decoder(dict[str, Any]).decode

    def _decode(value: bytes | None) -> dict[str, Any]:
        if value is None:
            raise InvalidEvent("decode", "record has no value (tombstone)")
        if len(value) > max_bytes:
            raise InvalidEvent("decode", f"value is {len(value)} bytes, limit is {max_bytes}")
        try:
            doc = decode(value)
        except msgspec.ValidationError as exc:
            raise InvalidEvent("validate", str(exc)) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidEvent("decode", str(exc)) from None
        except RecursionError:
            raise InvalidEvent("decode", "JSON nested too deeply") from None
        except Exception as exc:
            raise InvalidEvent("decode", f"{type(exc).__name__}: {exc}") from None
        for name, v in doc.items():
            if v.__class__ is int and not INT64_MIN <= v <= INT64_MAX:
                raise InvalidEvent("validate", f"Integer out of range (int64) - at `$.{name[:100]}`")
            if v.__class__ is float and not math.isfinite(v):  # msgspec rejects these already; kept as a guard
                raise InvalidEvent("validate", f"Number must be finite - at `$.{name[:100]}`")
        return doc

    return _decode


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # an exception whose __str__ raises
        return type(exc).__name__


class Pipeline:
    """Routes each record to the learners that read its topic, test-then-train.

    Nothing one record does can stop the pipeline: an exception from any stage
    of it (decode, validate, a learner's ``predict`` or ``learn`` with its label
    join, encoding or producing an output, the observer's metrics) is contained
    to that record, which goes once to the dead-letter topic with its provenance
    and the first stage that failed; the pipeline moves on. A dead letter too
    large for the producer or the topic is cut to fit (``fit_dead_letter``), with
    headers giving the original's size and sha256. Only ``service_errors`` (the
    sink's client failing, say a fatal Kafka error) and ``MemoryError`` propagate.

    ``publish = False`` relearns without producing outputs (recovery after a
    crash: the outputs were already published).
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
        privacy: Any = None,
        dead_letter_budget: DeadLetterBudget | None = None,
        service_errors: tuple[type[BaseException], ...] = (),
        task: int | None = None,
    ) -> None:
        self.learners = list(learners)
        #: The task this pipeline runs (``stream.tasks``), for its observers; ``None``: not a task's.
        self.task = task
        self.sink = sink
        self.dead_letter_topic = dead_letter_topic
        self.clock = clock
        self.publish = True
        self.observer = observer
        self.privacy = privacy
        self._output_key = privacy.output_key if privacy is not None else None
        self.dead_letter_budget = dead_letter_budget if dead_letter_budget is not None else DeadLetterBudget()
        #: Failures of the service, not of a record: never contained.
        self._service: tuple[type[BaseException], ...] = (MemoryError, *service_errors)
        self._warned: dict[str, float] = {}
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
            if privacy is not None:  # a stream.privacy.Pseudonymizer: identifiers masked at decode
                decode = privacy.wrap_decoder(topic, decode, event_type)
            self.routes[topic] = _Route(decode, readers)
        if observer is not None:
            # Metrics read the learners at scrape time and pre-create per-topic series.
            observer.attach(self)

    @property
    def topics(self) -> list[str]:
        return list(self.routes)

    def process(self, record: Record) -> None:
        # Containment is try/except around each stage: free on the good path (Python 3.11
        # zero-cost exceptions), no allocation or logging unless something raised.
        topic: str = record.topic()  # type: ignore[assignment]  # a consumed record always has one
        route = self.routes.get(topic)
        if route is None:
            return  # no learner reads this topic (a recording may hold more topics than are configured)
        try:
            event = route.decode(record.value())  # type: ignore[arg-type]
        except InvalidEvent as exc:
            self.dead_letter(record, exc.stage, exc.reason)
            return
        except self._service:
            raise
        except Exception as exc:
            self._contained(record, "decode", exc)
            return
        failure: tuple[str, str, BaseException] | None = None
        observer = self.observer
        for learner in route.learners:
            try:
                prediction = learner.predict(event)
            except self._service:
                raise
            except Exception as exc:
                # No prediction was made, so there is nothing to evaluate or learn against.
                failure = failure or ("predict", learner.name, exc)
                continue
            if prediction is not None and self.publish:
                try:
                    self._publish(record, event, learner, prediction)
                except self._service:
                    raise
                except Exception as exc:
                    failure = failure or ("publish", learner.name, exc)
                else:
                    if observer is not None:
                        try:
                            observer.published(learner, event, record)
                        except self._service:
                            raise
                        except Exception as exc:
                            failure = failure or ("observe", learner.name, exc)
            try:
                learner.learn(event)
            except self._service:
                raise
            except Exception as exc:
                failure = failure or ("learn", learner.name, exc)
        if failure is not None:
            stage, name, error = failure
            self._contained(record, stage, error, name)
        elif observer is not None:
            try:
                observer.processed(topic, record, event)
            except self._service:
                raise
            except Exception as exc:
                self._contained(record, "observe", exc)

    def _publish(self, record: Record, event: Any, learner: Learner, prediction: Any) -> None:
        # Topics outside the contracts need no event_id: the envelope then carries "".
        event_id = event.get("event_id", "") if isinstance(event, dict) else event.event_id
        out = Output(
            event_id=str(event_id),
            source=SourceRef(record.topic(), record.partition(), record.offset()),  # type: ignore[arg-type]
            learner=learner.name,
            model_version=learner.model_version,
            prediction=prediction,
            predicted_at=int(self.clock() * 1000),
        )
        key = record.key() if self._output_key is None else self._output_key(record, event)
        self.sink.produce(learner.output_topic, key if not isinstance(key, str) else key.encode(), self._encode(out))

    def _contained(self, record: Record, stage: str, exc: BaseException, learner: str | None = None) -> None:
        """A stage raised on this record (not an invalid event: a learner, an observer, the
        sink refusing an output): dead-letter it, and say what and where, rate-limited."""
        error = _describe(exc)
        now = time.monotonic()
        if now - self._warned.get(stage, -1e9) >= 10.0:
            self._warned[stage] = now
            log.warning(
                "record failed; dead-lettered",
                extra={"stage": stage, "learner": learner, "topic": record.topic(), "partition": record.partition(),
                       "offset": record.offset(), "error": error[:MAX_ERROR_CHARS]},
            )  # fmt: skip
        self.dead_letter(record, stage, error, learner)

    def dead_letter(self, record: Record, stage: str, error: str, learner: str | None = None) -> None:
        """Produce the record, key and value untouched (or cut to fit), to the dead-letter topic."""
        if self.observer is not None:
            try:
                self.observer.dead_lettered(record.topic(), stage)
            except self._service:
                raise
            except Exception:
                pass  # the dead letter matters more than counting it
        if not self.publish:
            return
        key = record.key()
        value = record.value()
        if self.privacy is not None:
            key, value = self.privacy.dead_letter(record.topic(), key, value)
        key = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
        value = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        headers = dead_letter_headers(record, stage, error, learner)
        budget = self.dead_letter_budget
        while True:
            if budget.max_bytes is not None:
                key, value, headers = fit_dead_letter(key, value, headers, budget.max_bytes)
            try:
                self.sink.produce(self.dead_letter_topic, key, value, headers)
                return
            except RecordTooLarge as exc:
                # The producer's limit is lower than we knew: aim lower, never below the headers.
                before = budget.max_bytes
                budget.lower(exc.size)
                if before == budget.max_bytes == MIN_DEAD_LETTER_BYTES:
                    raise
