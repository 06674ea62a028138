"""Polling helpers for tests that wait on real services and threads (no fixed sleeps)."""

from __future__ import annotations

import time
from typing import Callable


def poll(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """True as soon as ``predicate()`` is truthy; False once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Like :func:`poll`, but a time-out fails the test and says what it waited for."""
    if not poll(predicate, timeout):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
