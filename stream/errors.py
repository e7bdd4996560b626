"""Every error ``stream`` raises on purpose, in one tree, so callers catch what they mean.

::

    StreamError                       anything stream raises on purpose
    ├── ConfigError (ValueError)      a configuration that cannot be used; names the key
    ├── ModelSpecError (ValueError)   a model spec that does not resolve to River classes
    ├── InvalidEvent (ValueError)     a record that is not a valid event (dead-lettered, never raised out of the loop)
    ├── RecordingError (ValueError)   a directory that is not a usable recording
    ├── TopicError (ValueError)       topics missing, or with fewer partitions than needed
    ├── DeliveryFailed (RuntimeError) a record could not be delivered and retrying cannot help
    ├── RecordTooLarge                a record larger than the producer accepts (the pipeline cuts dead letters)
    ├── CheckpointError               a checkpoint that cannot be used
    │   ├── CorruptCheckpoint         torn, truncated or altered
    │   ├── IncompatibleCheckpoint    written by another River version or checkpoint format
    │   └── UnauthenticatedCheckpoint a key is configured and the file is not signed by it
    ├── StateError (RuntimeError)     the application refuses the state it finds (exit code 3)
    └── FatalError (RuntimeError)     Kafka says this instance cannot go on (exit code 1)

The second bases keep ``except ValueError`` and ``except RuntimeError`` at
call sites that predate the tree working. The modules that raise them
re-export them (``stream.state.CheckpointError`` is this one). Control flow
inside the Kafka loop (abort a transaction, fenced, stopped) uses private
exceptions of ``stream.app`` that never leave it.

>>> issubclass(CorruptCheckpoint, StreamError), issubclass(InvalidEvent, ValueError)
(True, True)
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpoint",
    "DeliveryFailed",
    "FatalError",
    "IncompatibleCheckpoint",
    "InvalidEvent",
    "ModelSpecError",
    "RecordTooLarge",
    "RecordingError",
    "StateError",
    "StreamError",
    "TopicError",
    "UnauthenticatedCheckpoint",
]


class StreamError(Exception):
    """The root: anything ``stream`` raises on purpose."""


class ConfigError(StreamError, ValueError):
    """A configuration that cannot be used; the message names the key."""


class ModelSpecError(StreamError, ValueError):
    """A model spec that does not resolve to River classes and parameters."""


class InvalidEvent(StreamError, ValueError):
    """A record that is not a valid event. ``stage`` is ``decode`` (not UTF-8
    JSON, too large) or ``validate`` (a field missing, of the wrong type or
    out of range); the message names the field."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.reason = message


class RecordingError(StreamError, ValueError):
    """A directory that is not a usable recording (missing, corrupt, wrong version)."""


class TopicError(StreamError, ValueError):
    """Topics a command needs are missing, or have fewer partitions than it needs."""


class DeliveryFailed(StreamError, RuntimeError):
    """A record could not be delivered and retrying cannot help."""


class RecordTooLarge(StreamError):
    """Raised by ``Sink.produce`` for a record larger than the producer accepts (``size`` bytes)."""

    def __init__(self, topic: str, size: int, reason: str = "") -> None:
        super().__init__(f"record of {size} bytes to `{topic}` is too large{': ' + reason if reason else ''}")
        self.topic = topic
        self.size = size


class CheckpointError(StreamError):
    """A checkpoint that cannot be used."""


class CorruptCheckpoint(CheckpointError):
    """Torn, truncated or altered: the length or a checksum does not match."""


class IncompatibleCheckpoint(CheckpointError):
    """Written by another River version (or checkpoint format): its pickles cannot be trusted to load."""


class UnauthenticatedCheckpoint(CheckpointError):
    """A key is configured and the file is not signed by it (unsigned, another key, or altered): never unpickled."""


class StateError(StreamError, RuntimeError):
    """The application refuses to start or continue with the state it finds (the message says why and what to do)."""


class FatalError(StreamError, RuntimeError):
    """Kafka says this instance cannot go on (fenced, fatal producer error): exit
    non-zero and let the supervisor restart it."""
