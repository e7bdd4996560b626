"""Drift detection: concept drift on a learner's error stream.

>>> monitor = ConceptDrift("adwin")
>>> for i in range(3000):
...     _ = monitor.update(0.1 if i < 1500 else 0.9, ts=i)
>>> monitor.detections >= 1 and 1500 <= monitor.last_detection_ts < 1700
True
"""

from __future__ import annotations

from typing import Any, Literal

from river import drift

__all__ = ["ConceptDrift"]

Detector = Literal["adwin", "page_hinkley"]


def _detector(kind: Detector, params: dict[str, Any]) -> Any:
    if kind == "adwin":
        return drift.ADWIN(**params)
    if kind == "page_hinkley":
        return drift.PageHinkley(**params)
    raise ValueError(f"unknown drift detector `{kind}` (adwin, page_hinkley)")


class ConceptDrift:
    """Counts concept drifts detected on an error stream, with the event time of the last."""

    def __init__(self, kind: Detector = "adwin", **params: Any) -> None:
        self.kind = kind
        self.params = params
        self.detector = _detector(kind, params)
        self.detections = 0
        self.last_detection_ts: int | None = None
        self.n_seen = 0

    def update(self, error: float, ts: int) -> bool:
        self.n_seen += 1
        self.detector.update(error)
        if self.detector.drift_detected:
            self.detections += 1
            self.last_detection_ts = ts
            return True
        return False
