"""Calls started together on threads, for tests of races."""

from __future__ import annotations

import threading
from typing import Callable


def at_once(call: Callable[[int], object], n: int, timeout: float = 60) -> list:
    """Run call(0) .. call(n - 1) on n threads released together by a barrier; returns what each
    returned, or the exception it raised, in index order."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as exc:  # noqa: BLE001 - the caller checks them
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results
