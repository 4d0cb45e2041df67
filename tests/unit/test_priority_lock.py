"""PriorityLock lets an urgent caller go before waiting normal ones."""

from __future__ import annotations

import threading
import time

from services.embedder.backends import PriorityLock


def test_priority_lock_urgent_goes_first() -> None:
    lock = PriorityLock()
    order: list[str] = []
    first_holds = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with lock.hold():
            first_holds.set()
            release_first.wait(5)

    def worker(name: str, urgent: bool) -> None:
        with lock.hold(urgent=urgent):
            order.append(name)

    holder = threading.Thread(target=first)
    holder.start()
    first_holds.wait(5)
    batch = threading.Thread(target=worker, args=("batch", False))
    batch.start()
    # Give the batch thread time to start waiting before the query arrives,
    # so the query overtakes a caller that waited longer.
    time.sleep(0.2)
    query = threading.Thread(target=worker, args=("query", True))
    query.start()
    time.sleep(0.2)
    release_first.set()
    for thread in (holder, batch, query):
        thread.join(5)

    assert order == ["query", "batch"]


def test_priority_lock_is_exclusive() -> None:
    lock = PriorityLock()
    inside = 0
    peak = 0
    guard = threading.Lock()

    def enter(urgent: bool) -> None:
        nonlocal inside, peak
        with lock.hold(urgent=urgent):
            with guard:
                inside += 1
                peak = max(peak, inside)
            time.sleep(0.01)
            with guard:
                inside -= 1

    threads = [threading.Thread(target=enter, args=(n % 3 == 0,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)

    assert peak == 1
