"""Progress of long steps of the ``attnmerge`` command (``build``, ``demo``): a line
rewritten in place on a terminal, plain lines in logs."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of a long step, written to ``stream`` (default: stderr).

    On a terminal: one line rewritten in place (``\\r``) with the count, the percentage,
    the elapsed time and what is being done, at most every ``redraw_s`` seconds (and at
    the end). In a log or a pipe: a plain line each time another tenth is done, or
    ``log_every_s`` seconds after the last line if something changed, so a log shows
    progress without filling up. :meth:`clear` takes the line off a terminal before other
    output; :meth:`close` (or leaving the ``with`` block) ends it: on a terminal the line is
    erased, for the caller's summary; in a log the final count is written if not yet.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        log_every_s: float = 10.0,
        redraw_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, max(total, 0), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_terminal(self.stream)
        self.done, self.detail = 0, ""
        self._clock, self._log_every_s, self._redraw_s = clock, log_every_s, redraw_s
        self._start, self._last_write = clock(), -math.inf  # a log gets a first line at once
        self._drawn_at = -math.inf
        self._width = 0  # characters of the line now on the terminal
        self._logged: tuple[int, str] | None = None  # (done, detail) of the last log line
        self._logged_tenth = 0

    def line(self) -> str:
        """The progress line without control characters."""
        unit = f" {self.unit}" if self.unit else ""
        pct = f" ({100 * self.done // self.total}%)" if self.total else ""
        text = f"{self.label}: {self.done}/{self.total}{unit}{pct}, "
        text += f"{self._clock() - self._start:.1f} s"
        return f"{text}: {self.detail}" if self.detail else text

    def update(self, done: int | None = None, detail: str | None = None) -> None:
        """Set the count and/or what is being done; write if it is time to."""
        if done is not None:
            self.done = min(max(done, 0), self.total)
        if detail is not None:
            self.detail = detail
        now = self._clock()
        if self.tty:
            if now - self._drawn_at >= self._redraw_s or self.done == self.total:
                self._draw(now)
            return
        tenth = 10 * self.done // self.total if self.total else 0
        changed = self._logged != (self.done, self.detail)
        if tenth > self._logged_tenth or (changed and now - self._last_write >= self._log_every_s):
            self._log(now)
            self._logged_tenth = max(self._logged_tenth, tenth)

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        """Count ``n`` more done."""
        self.update(self.done + n, detail)

    def clear(self) -> None:
        """Take the line off the terminal (before other output); the next update redraws."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
            self._drawn_at = -math.inf

    def close(self) -> None:
        """End: erase the line on a terminal, write the final count in a log."""
        if self.tty:
            self.clear()
        elif self._logged is None or self._logged[0] != self.done:
            self._log(self._clock())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self, now: float) -> None:
        # A line longer than the terminal would wrap, and "\r" goes back one row only.
        text = self.line()[: max(shutil.get_terminal_size().columns - 1, 20)]
        pad = " " * max(self._width - len(text), 0)
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()
        self._width, self._drawn_at = len(text), now

    def _log(self, now: float) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._logged, self._last_write = (self.done, self.detail), now


# ---------------------------------------------------------------------------
# attnmerge info
