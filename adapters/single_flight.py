"""Calls for the same key at the same time run once: the others wait and share its result or error."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class SingleFlight:
    def __init__(self):
        self._calls: dict[str, Future] = {}
        self._lock = threading.Lock()

    def run(self, key: str, fn: Callable[[], T]) -> T:
        """fn() run by this call, or the result of the call for `key` already under way."""
        with self._lock:
            future = self._calls.get(key)
            leader = future is None
            if leader:
                future = self._calls[key] = Future()
        if not leader:
            return future.result()
        try:
            value = fn()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._calls[key]
        future.set_result(value)
        return value
