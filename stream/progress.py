"""Progress of long work: a bar with rate and ETA on a terminal, periodic lines elsewhere.

On a terminal the bar redraws in place a few times a second; when output goes
to a file or a CI log (not a TTY) a plain line is written every
``interval_s`` seconds and once at the end, so logs stay readable. No
dependency: the few lines needed are cheaper than tqdm's import, and
``update`` stays cheap enough for the hot loop (a counter and, every few
hundred calls, a clock read).

>>> import io
>>> out = io.StringIO()
>>> with Progress(total=1000, desc="replay", stream=out, interval_s=3600) as bar:
...     for _ in range(1000):
...         bar.update()
>>> print(out.getvalue().strip().split(" in ")[0])
replay: 1,000/1,000 events (100%)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "format_duration"]

_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1:15``, ``3725`` -> ``1:02:05``.

    >>> format_duration(75.2), format_duration(3725), format_duration(float("inf"))
    ('1:15', '1:02:05', '?')
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts work done and shows it. ``total`` None: no bar or ETA, just the count and rate.

    ``status`` is called only when a line is drawn (a few times a second at
    most), so it may do real work such as reading learners' quality.
    ``enabled=False`` makes every call a no-op but still counts.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "events",
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval_s: float = 10.0,
        tty: bool | None = None,
        status: Callable[[], str] | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.tty else interval_s
        self.status = status
        self.n = 0
        self.started = time.monotonic()
        self._next_draw = self.started + self.interval_s
        self._check_at = 1
        self._calls = 0
        self._last_len = 0
        self._closed = False

    # -- counting ----------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        self.n += n
        self._calls += 1
        # Read the clock only every few hundred calls: update() sits in per-event loops.
        if self._calls >= self._check_at:
            self._calls = 0
            self._check_at = 256
            now = time.monotonic()
            if now >= self._next_draw:
                self._next_draw = now + self.interval_s
                self._draw(now)

    def refresh(self) -> None:
        """Draw now (e.g. after a long step that did not call ``update``)."""
        now = time.monotonic()
        self._next_draw = now + self.interval_s
        self._draw(now)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Units per second so far."""
        elapsed = self.elapsed
        return self.n / elapsed if elapsed > 0 else 0.0

    # -- drawing -----------------------------------------------------------------

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The text of one progress line."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            frac = min(self.n / self.total, 1.0)
            count = f"{self.n:,}/{self.total:,} {self.unit} ({frac:.0%})"
            if self.tty and not final:
                filled = int(frac * _BAR_WIDTH)
                count = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {count}"
        else:
            frac = None
            count = f"{self.n:,} {self.unit}"
        if final:
            text = f"{head}{count} in {format_duration(elapsed)} ({rate:,.0f} {self.unit}/s)"
        else:
            text = f"{head}{count}, {rate:,.0f} {self.unit}/s"
            if frac is not None and rate > 0 and self.total:
                text += f", ETA {format_duration((self.total - self.n) / rate)}"
        if self.status is not None:
            extra = self.status()
            if extra:
                text += f" | {extra}"
        return text

    def _draw(self, now: float, final: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line(now, final)
        if self.tty:
            # Pad over the previous, possibly longer, line; a newline only at the end.
            pad = max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._last_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final line (count, elapsed, average rate) once."""
        if self._closed:
            return
        self._closed = True
        self._draw(time.monotonic(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
