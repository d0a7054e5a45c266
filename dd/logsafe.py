"""Logging what a client sent, and logging errors a client can repeat, without letting a client write the log.

Two rules, for every process of the server:

- Text from a request (request_id, a model name) goes into a log line or a
  status message only through `clip`: quoted, so that a newline cannot forge a
  line (`... CRITICAL [supervisor] ...`), and cut to a few dozen characters,
  so that a 32 MiB request_id does not write 32 MiB of log.
- `RepeatFilter` (installed on every handler by dd.procutil.setup_logging)
  lets the first records of each kind through in each window, with its
  traceback only once, then counts the rest and says how many it dropped. A
  client that makes every request fail the same way costs a few lines a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

CLIP_CHARS = 64


def clip(text: str | bytes, limit: int = CLIP_CHARS) -> str:
    """`text` quoted as a Python literal (control characters escaped), at most `limit` characters of it;
    a cut one says how long it was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} {'bytes' if isinstance(text, bytes) else 'characters'})"


class RepeatFilter(logging.Filter):
    """Per (logger, level, message template) and per `window_s`: the first record with its traceback, the
    next `burst - 1` without, the rest dropped; the first record of the next window says how many were.

    The template is the record's unformatted message, so "engine failed on request %s" counts as one
    kind whatever the request. Thread-safe (the worker logs from two threads).
    """

    MAX_KINDS = 1024  # kinds remembered; past it, kinds whose window has passed are forgotten

    def __init__(self, burst: int = 5, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple, list] = {}  # kind: [window start, records seen in the window]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = self._clock()
        with self._lock:
            entry = self._kinds.get(key)
            if entry is None or now - entry[0] >= self.window_s:
                dropped = entry[1] - self.burst if entry is not None and entry[1] > self.burst else 0
                if entry is None and len(self._kinds) >= self.MAX_KINDS:
                    self._forget(now)
                self._kinds[key] = [now, 1]
                if dropped:
                    _append(record, f" [and {dropped} more like this in the previous {self.window_s:.0f} s, "
                                    "not logged]")
                return True
            entry[1] += 1
            if entry[1] > self.burst:
                return False
        # A repeat within the window: one line, no traceback.
        if record.exc_info or record.exc_text:
            exc = record.exc_info[1] if record.exc_info else None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            if exc is not None:
                _append(record, f" ({type(exc).__name__}: {clip(str(exc), 200)}; traceback logged once a window)")
        return True

    def _forget(self, now: float) -> None:
        for key in [k for k, (start, _) in self._kinds.items() if now - start >= self.window_s]:
            del self._kinds[key]
        if len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()


def _append(record: logging.LogRecord, text: str) -> None:
    """Adds `text` to the record's message; a '%' in it must not be taken for a formatting directive."""
    record.msg = f"{record.msg}{text.replace('%', '%%') if record.args else text}"
