"""hv-stimer with real threads: the real TimerService (one timer thread) firing while "vCPU"
threads rewrite CONFIG/COUNT and consume messages. Checks that nothing raises, nothing deadlocks,
no signal is early, and a steady 1 kHz periodic timer keeps its rate."""

from __future__ import annotations

import random
import threading
import time

from hvvmm.timers import TimerService

try:
    from hvfakes import FakePlatform
    from test_stimer import (ENABLE, MS, PERIODIC, Rig, config_msr, count_msr, direct_config,
                             sint_config, true_reference_time)
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform
    from tests.unit.test_stimer import (ENABLE, MS, PERIODIC, Rig, config_msr, count_msr,
                                        direct_config, sint_config, true_reference_time)

from hvvmm.hv.msr import MsrAccessFault


class RealtimePlatform(FakePlatform):
    """FakePlatform whose guest TSC runs with the host's monotonic clock, with real timers."""

    def __init__(self, **kwargs):
        self._origin = time.monotonic_ns()
        super().__init__(**kwargs)
        self.service = TimerService(name="stimer-test-timers", clock=self.host_time_ns)

    @property
    def tsc(self) -> int:
        elapsed = time.monotonic_ns() - self._origin
        return self.guest_tsc_at_reference_zero + elapsed * self.tsc_frequency_hz // 10**9

    @tsc.setter
    def tsc(self, value: int) -> None:
        pass  # real time cannot be moved

    def start_timer(self, deadline_ns: int, callback):
        return self.service.start_timer(deadline_ns, callback)


def test_steady_periodic_timer_keeps_rate_and_is_never_early():
    platform = RealtimePlatform(vp_count=1)
    try:
        rig = Rig(platform=platform, vp_count=1)
        rig.wr(count_msr(0), MS)
        started = rig.now  # at or before the timer's start
        rig.wr(config_msr(0), direct_config(0xED, ENABLE, PERIODIC))
        time.sleep(0.3)
        rig.wr(count_msr(0), 0)
        stopped = rig.now  # at or after its stop
        signals = list(rig.signals)
        rig.assert_never_early()
        # One expiry per period that fitted between start and stop, at most, each on the
        # period grid and in order; catch-up after a stall (a loaded machine) skips grid points,
        # so the count only has a weak lower bound.
        periods = (stopped - started) // MS
        assert periods // 4 <= len(signals) <= periods + 1, (len(signals), periods)
        expirations = [expiration for _vp, _i, expiration, _ref in signals]
        assert expirations == sorted(set(expirations))
        assert all((e - expirations[0]) % MS == 0 for e in expirations)
        lateness = sorted(ref - expiration for _vp, _i, expiration, ref in signals)
        assert lateness[0] >= 0
    finally:
        platform.service.close()


def test_concurrent_writes_expiries_and_eoms():
    platform = RealtimePlatform(vp_count=2)
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        rig = Rig(platform=platform, vp_count=2)

        def vcpu(vp: int) -> None:
            rng = random.Random(vp)
            synic = rig.synics[vp]
            try:
                while not stop.is_set():
                    n = rng.randrange(4)
                    choice = rng.random()
                    if choice < 0.3:
                        config = (sint_config(rng.randrange(1, 3), ENABLE, PERIODIC)
                                  if rng.random() < 0.5
                                  else direct_config(0x40 + n, ENABLE, PERIODIC))
                        rig.wr(config_msr(n), config, vp=vp)
                    elif choice < 0.6:
                        rig.wr(count_msr(n), rng.choice((0, 2000, 5000, MS)), vp=vp)
                    elif choice < 0.7:
                        rig.wr(count_msr(n), true_reference_time(platform)
                               + rng.randrange(-MS, 3 * MS), vp=vp)
                        rig.wr(config_msr(n), sint_config(1, ENABLE), vp=vp)
                    else:
                        for sint in (1, 2):
                            if synic.slots[sint] is not None:
                                _message, pending = synic.consume(sint)
                                if pending:
                                    synic.eom()
                    time.sleep(rng.random() * 0.0005)
            except MsrAccessFault as fault:  # none of these writes may fault
                errors.append(fault)
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        threads = [threading.Thread(target=vcpu, args=(vp,)) for vp in (0, 1)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive(), "a vCPU thread hung"
        assert errors == []
        assert rig.partition.handler_failures == 0
        rig.partition.reset()
        count = len(rig.signals)
        time.sleep(0.02)
        assert len(rig.signals) == count  # reset stopped everything
        assert count > 100
        rig.assert_never_early()
        assert platform.service._thread.is_alive()
    finally:
        stop.set()
        platform.service.close()
