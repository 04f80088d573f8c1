"""Progress by bytes on stderr: a tqdm bar on a terminal, occasional plain lines anywhere else.

A bar redraws itself with carriage returns, which a log file or a CI console keeps as one long line of
frames. So when the stream is not a terminal, `progress_bar` returns a `PlainProgress` that prints
`merging: 1.23 GB / 8.04 GB (15%)` each time another 10% is done or 10 s have passed since the last
line (whichever comes first), and a final line when it closes. Both have `update(n)`, `close()` and the
context-manager interface.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

from .units import human_bytes

LINE_EVERY_S = 10.0
LINE_EVERY_FRACTION = 0.1


def progress_bar(total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None,
                 position: int = 0) -> tqdm | PlainProgress:
    """A byte counter for `total` bytes labelled `desc`; silent when not `enabled`. `position` is the
    terminal line of a bar shown beside others (downloading under merging)."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=stream, position=position)
    return PlainProgress(total, desc, stream)


class PlainProgress:
    """Plain progress lines, no `\\r`. `update` may be called from a writer thread and the main thread."""

    def __init__(self, total: int, desc: str, stream: TextIO, clock=time.monotonic) -> None:
        self.total, self.desc, self.stream, self.clock = total, desc, stream, clock
        self.done = self.shown = 0
        self.shown_at = clock()
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.done += n
            step = self.total * LINE_EVERY_FRACTION
            if self.done - self.shown >= step or self.clock() - self.shown_at >= LINE_EVERY_S:
                self._line()

    def close(self) -> None:
        with self.lock:
            if self.done != self.shown:
                self._line()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind: type | None, *rest: object) -> None:
        if kind is None:  # after an error, the error line is the last word, not a progress line
            self.close()

    def _line(self) -> None:
        percent = f" ({100 * self.done // self.total}%)" if self.total else ""
        print(f"{self.desc}: {human_bytes(self.done)} / {human_bytes(self.total)}{percent}", file=self.stream,
              flush=True)
        self.shown, self.shown_at = self.done, self.clock()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
