"""The clock of `--minutes`: wall time this process ran, with pauses excluded.

On a shared machine a measurement may SIGSTOP other jobs for minutes; counting those pauses would spend the budget on
nothing. A daemon thread ticks every TICK seconds; a gap much longer than a tick is a pause, and is subtracted.
"""
from __future__ import annotations

import threading
import time

TICK = 0.25
SLACK = 1.0   # a tick late by more than this was a pause (GIL holders release within milliseconds)

_paused = 0.0
_thread: threading.Thread | None = None


def _watch() -> None:
    global _paused
    last = time.monotonic()
    while True:
        time.sleep(TICK)
        now = time.monotonic()
        if now - last > TICK + SLACK:
            _paused += now - last - TICK
        last = now


def now() -> float:
    """Like time.monotonic(), minus the pauses seen since the first call."""
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_watch, name="edge-rt-active-clock", daemon=True)
        _thread.start()
    return time.monotonic() - _paused
