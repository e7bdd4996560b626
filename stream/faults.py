"""Fault injection for crash tests: ``STREAM_FAULT_AT=<point>[:n][,<point>[:n]...]``.

The process SIGKILLs itself the ``n``-th time (default 1) it reaches a named
code point, so a test can crash it exactly between two steps of the commit
protocol (a real ``kill -9``: no ``finally`` blocks, no flush, no atexit).

Zero cost when unset: call sites test the module-level ``ARMED`` flag before
calling :func:`hit`, and the per-event point is only checked by a separate
loop that the application selects once at start-up when ``ARMED`` is true.

Points: ``mid_batch`` (after the n-th event processed), ``after_produce_before_commit``,
``mid_checkpoint_write``, ``after_checkpoint_before_commit``,
``after_send_offsets_before_commit`` (exactly-once), ``after_commit``, ``in_revoke``.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ARMED", "POINTS", "hit", "parse"]

POINTS = frozenset({
    "mid_batch",
    "after_produce_before_commit",
    "mid_checkpoint_write",
    "after_checkpoint_before_commit",
    "after_send_offsets_before_commit",
    "after_commit",
    "in_revoke",
})


def parse(spec: str | None) -> dict[str, int]:
    """``"mid_batch:300,after_commit"`` -> ``{"mid_batch": 300, "after_commit": 1}``."""
    out: dict[str, int] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"STREAM_FAULT_AT: unknown point `{name}` (known: {', '.join(sorted(POINTS))})")
        out[name] = int(count) if count else 1
        if out[name] < 1:
            raise ValueError(f"STREAM_FAULT_AT: `{part}`: the count must be >= 1")
    return out


_REMAINING = parse(os.environ.get("STREAM_FAULT_AT"))
ARMED = bool(_REMAINING)


def hit(point: str) -> None:
    """Count one pass through ``point``; SIGKILL this process on the armed pass."""
    left = _REMAINING.get(point)
    if left is None:
        return
    if left > 1:
        _REMAINING[point] = left - 1
        return
    # One line on stderr so a test log shows where the process died; then a real kill -9.
    sys.stderr.write(f'{{"level": "critical", "msg": "fault injected", "point": "{point}"}}\n')
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
