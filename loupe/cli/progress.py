"""Progress of long work: a tqdm bar on a terminal, log lines otherwise.

On a terminal (stderr is a tty) the user sees a live bar. Anywhere else — CI, ``make demo`` piped to a
file, a service manager's journal — carriage-return bars turn into unreadable noise, so the same
progress goes to the ``loupe.progress`` logger instead: one INFO line when the work starts, one at most
every ``interval`` seconds while it runs, one when it ends::

    2026-12-03 17:02:11 INFO loupe.progress: indexing: 0/417 img
    2026-12-03 17:02:21 INFO loupe.progress: indexing: 96/417 img (23 %), 9.6 img/s, about 33 s left
    2026-12-03 17:02:55 INFO loupe.progress: indexing: 417/417 img in 44.1 s (9.5 img/s)

The ``loupe.progress`` logger is set to INFO when a :class:`Progress` is made, so these lines show
under the ``loupe`` command's default WARNING level too (they go wherever the root handler writes:
stderr).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

log = logging.getLogger("loupe.progress")
DEFAULT_INTERVAL = 10.0   # seconds between log lines when stderr is not a terminal


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Progress:
    """``update(n)`` / ``set(done)`` as work advances, ``close()`` (or ``with``) at the end.

    ``total`` may be given later with :meth:`set_total`. ``stream`` (default ``sys.stderr``) decides
    between the bar (a tty) and log lines (anything else).
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", *,
                 interval: float = DEFAULT_INTERVAL, stream: IO[str] | None = None) -> None:
        self.desc, self.unit, self.interval = desc, unit, float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.done = 0
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self._closed = False
        self._bar = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
        elif total is not None:
            self._log_start()

    # -- advancing ---------------------------------------------------------------------------------
    def set_total(self, total: int) -> None:
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()
        else:
            self._log_start()

    def update(self, n: int = 1) -> None:
        self.set(self.done + int(n))

    def set(self, done: int) -> None:
        done = int(done)
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        if self._bar is None:
            now = time.perf_counter()
            if now - self._last_log >= self.interval:
                self._last_log = now
                log.info("%s", self.line(now))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self.total is None and not self.done:
            return                      # nothing started (e.g. a run that failed before it knew its size)
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s in %.1f s (%.1f %s/s)", self.desc, self.done, total, self.unit, elapsed, rate,
                 self.unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text ----------------------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The progress as one line of text (what the log gets)."""
        elapsed = (now if now is not None else time.perf_counter()) - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total} %)"
        else:
            text = f"{self.desc}: {self.done} {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        return text

    def _log_start(self) -> None:
        log.info("%s: %d/%s %s", self.desc, self.done, self.total, self.unit)
