"""A plain-text progress line on stderr that stays quiet in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: A run shorter than this prints nothing when stderr is not a terminal.
QUIET_SECS = 2.0

_BAR_WIDTH = 24


def progress_line(done: int, total: int, label: str) -> str:
    """``[#####.....]  5/10 label``: the text of one progress update."""
    filled = _BAR_WIDTH * done // total if total else _BAR_WIDTH
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    width = len(str(total))
    return f"[{bar}] {done:>{width}}/{total} {label}"


class Progress:
    """Counts finished blocks out of ``total`` and shows it on ``stream``.

    On a terminal the line is redrawn in place. Elsewhere (CI logs, files)
    nothing is shown for the first :data:`QUIET_SECS` and then at most one
    line per block.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        is_tty: bool | None = None,
        clock=time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._is_tty = self._stream.isatty() if is_tty is None else is_tty
        self._clock = clock
        self._started = clock()
        self._drawn = False

    def advance(self, label: str) -> None:
        """Count one finished block, described by ``label``."""
        self.done = min(self.done + 1, self.total)
        line = progress_line(self.done, self.total, label)
        if self._is_tty:
            self._redraw(line)
        elif self._clock() - self._started >= QUIET_SECS:
            self._stream.write(line + "\n")
            self._stream.flush()

    def show(self, label: str) -> None:
        """On a terminal only: show ``label`` without counting a block."""
        if self._is_tty:
            self._redraw(progress_line(self.done, self.total, label))

    def _redraw(self, line: str) -> None:
        self._stream.write("\r\x1b[2K" + line)
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Clear the terminal line so that the table starts clean."""
        if self._drawn:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
            self._drawn = False
