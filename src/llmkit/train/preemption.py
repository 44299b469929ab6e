"""Preemption: a spot instance being reclaimed (SIGTERM) or Ctrl-C (SIGINT) must not lose the run.

The handler only records the signal; the training loop checks it after each step, agrees across ranks,
writes a checkpoint and returns normally, so the process exits 0 within a step of the signal.
"""

from __future__ import annotations

import contextlib
import signal


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoint and exit 0)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
