"""Bounded waits on something observable (the kubelet's pod list, a log line, a file): every
wait in the suite goes through `wait_for`, which polls a predicate and fails with what it waited
for, never a bare sleep."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

POLL = 0.2  # seconds between looks; the kubelet's own loops are coarser than this


class WaitTimeout(AssertionError):
    """The awaited condition did not hold within its bound."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, poll: float = POLL) -> T:
    """Returns the first truthy value `predicate` gives within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)
