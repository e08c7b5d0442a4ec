import threading
import time

from hvvmm.timers import TimerService


class HeldClock:
    """``time.monotonic_ns`` held at its first value until :meth:`release`: timers armed while
    it is held cannot come due before the test has armed them all, however long this thread is
    delayed in between."""

    def __init__(self):
        self._held: int | None = time.monotonic_ns()

    def __call__(self) -> int:
        held = self._held
        return time.monotonic_ns() if held is None else held

    def release(self) -> None:
        self._held = None


def test_timers_fire_in_deadline_order_and_never_early():
    clock = HeldClock()
    service = TimerService(clock=clock)
    fired = []
    done = threading.Event()
    try:
        start = service.now_ns()
        for delay_ms in (30, 10, 20):
            deadline = start + delay_ms * 1_000_000
            service.start_timer(deadline, lambda d=deadline: (fired.append((d, service.now_ns())),
                                                               len(fired) == 3 and done.set()))
        clock.release()
        assert done.wait(5)
    finally:
        service.close()
    assert [d for d, _ in fired] == sorted(d for d, _ in fired)
    assert all(now >= deadline for deadline, now in fired)


def test_cancelled_timer_does_not_fire_and_a_failing_callback_does_not_stop_others():
    clock = HeldClock()
    service = TimerService(clock=clock)
    fired = []
    done = threading.Event()
    try:
        now = service.now_ns()
        service.start_timer(now + 1_000_000, lambda: 1 / 0)
        timer = service.start_timer(now + 2_000_000, lambda: fired.append("cancelled"))
        timer.cancel()
        service.start_timer(now + 5_000_000, lambda: (fired.append("ok"), done.set()))
        clock.release()
        assert done.wait(5)
    finally:
        service.close()
    assert fired == ["ok"]


def test_close_joins_the_thread():
    before = threading.active_count()
    service = TimerService()
    service.start_timer(time.monotonic_ns() + 10**12, lambda: None)
    service.close()
    assert threading.active_count() == before


def test_cancelled_timers_do_not_pile_up():
    # A guest rewriting a synthetic timer cancels and re-arms it on every write; the cancelled
    # entries must not stay in the heap until their (far) deadlines.
    service = TimerService()
    try:
        far = service.now_ns() + 3600 * 10**9
        live = service.start_timer(far, lambda: None)
        for _ in range(10_000):
            service.start_timer(far, lambda: None).cancel()
        assert len(service._heap) < 200
        assert not live.cancelled and any(entry[2] is live for entry in service._heap)
    finally:
        service.close()
