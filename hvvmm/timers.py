"""Host timers for the VMM: one thread, a heap of deadlines, one condition variable.

Synthetic timers (four per VP) and anything else that must fire at a host time share this
service: no thread per timer, nothing that polls. The thread sleeps on the condition variable
until the earliest deadline (``Condition.wait`` with a timeout, a monotonic-clock wait in
CPython 3.11+) or until a new earlier deadline is added. Callbacks run on the timer thread and
must be short and thread-safe; one that raises is logged and does not stop the service.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Timer:
    """A scheduled callback; :meth:`cancel` it to stop it firing (idempotent)."""

    __slots__ = ("deadline_ns", "callback", "cancelled", "_service")

    def __init__(self, service: "TimerService", deadline_ns: int, callback: Callable[[], None]):
        self._service = service
        self.deadline_ns = deadline_ns
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True  # the heap entry is skipped when it comes up...
            self.callback = None  # ...and what the callback holds is freed now
            self._service._cancelled()


class TimerService:
    """Runs callbacks at monotonic-clock deadlines (``time.monotonic_ns``)."""

    def __init__(self, name: str = "hvvmm-timers", clock: Callable[[], int] = time.monotonic_ns):
        self._clock = clock
        self._heap: list[tuple[int, int, Timer]] = []
        self._sequence = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._cancelled_in_heap = 0
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def now_ns(self) -> int:
        return self._clock()

    def start_timer(self, deadline_ns: int, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` on the timer thread at (never before) ``deadline_ns``."""
        timer = Timer(self, deadline_ns, callback)
        with self._cond:
            if self._closed:
                raise RuntimeError("the timer service is closed")
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline_ns, next(self._sequence), timer))
            if earliest is None or deadline_ns < earliest:
                self._cond.notify()
        return timer

    def _cancelled(self) -> None:
        """A timer in the heap was cancelled. Cancelled entries leave the heap when their
        deadline comes up, which can be an hour away; a guest rewriting a timer in a loop would
        pile them up, so once they are most of the heap it is rebuilt without them (as asyncio
        does)."""
        with self._cond:
            self._cancelled_in_heap += 1
            if self._cancelled_in_heap > 64 and self._cancelled_in_heap * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled_in_heap = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _main(self) -> None:
        _reduce_timer_slack()
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        self._cancelled_in_heap = max(self._cancelled_in_heap - 1, 0)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    deadline = self._heap[0][0]
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        timer = heapq.heappop(self._heap)[2]
                        callback = timer.callback  # cancel() may clear it once the lock is free
                        break
                    self._cond.wait(remaining / 1e9)
            if timer.cancelled or callback is None:
                continue
            try:
                callback()
            except Exception:  # a callback bug must not stop every other timer
                log.exception("timer callback failed")


PR_SET_TIMERSLACK = 29  # <linux/prctl.h>


def _reduce_timer_slack() -> None:
    """Ask Linux for 1 ns of timer slack on the calling thread instead of the default 50 us, so
    the timer thread's waits end when they were asked to (synthetic timers are measured against
    their deadlines: ``bench/stimer_accuracy.py``). Best effort: elsewhere it does nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError, TypeError):
        pass
