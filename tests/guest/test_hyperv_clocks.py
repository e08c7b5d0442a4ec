"""Partition reference time on every vCPU: TIME_REF_COUNT vs the reference TSC page
(tests/guests/hv_clocks.c), the rate against the host's clock, and no exits for page reads."""

import re
import threading
import time

import pytest
from procutil import assert_guest_passed

from hvvmm import Machine, MachineConfig
from hvvmm.hv.hvdef import HV_X64_MSR_TIME_REF_COUNT

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30
MARK_PORT = 0x5E8  # HV_TEST_MARK_PORT in tests/guests/hyperv.h
HOST_DELAY_S = 0.25
PAGE_READS, MSR_READS = 1000, 200  # hv_clocks.c


class PhaseMarks:
    """The guest's phase marks: when each arrived (host clock), every exit of vCPU 0 by the
    phase it happened in, and vCPU 0's TIME_REF_COUNT reads (host time, value) by phase. Sleeps
    ``HOST_DELAY_S`` while handling mark 1."""

    def __init__(self):
        self.arrived = {}
        self.exits = {}
        self.clock_reads = {}
        self._phase = 0
        self._msr_seen = 0.0
        self._lock = threading.Lock()

    # the PIO device
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.arrived[value] = time.monotonic()
        if value == 1:
            time.sleep(HOST_DELAY_S)

    # the exit observer (runs before the exit is handled)
    def observe(self, vcpu, exit):
        if vcpu != 0:
            return
        if exit.reason_name == "io" and exit.port == MARK_PORT and exit.is_write:
            self._phase = int.from_bytes(exit.data[:exit.size], "little")
            return
        if exit.reason_name == "msr":
            self._msr_seen = time.monotonic()
        with self._lock:
            per_phase = self.exits.setdefault(self._phase, {})
            per_phase[exit.reason_name] = per_phase.get(exit.reason_name, 0) + 1

    # the Hyper-V listener (on the vCPU thread right after the MSR value was computed): the
    # value with the host times before (the exit observed) and after it was computed
    def on_event(self, event):
        if event.vp == 0 and event.kind == "msr_read" and event.number == HV_X64_MSR_TIME_REF_COUNT:
            self.clock_reads.setdefault(self._phase, []).append(
                (self._msr_seen, time.monotonic(), int(event.result["value"], 16)))


def test_reference_clocks_agree_and_tick_at_the_right_rate(guest_image):
    marks = PhaseMarks()
    with Machine(MachineConfig(kernel=guest_image("hv_clocks"), smp=2)) as machine:
        machine.add_pio_device(MARK_PORT, 4, marks, "phase-marks")
        machine.add_exit_observer(marks.observe)
        machine.hyperv.add_listener(marks.on_event)
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
    console = machine.console_text
    assert_guest_passed(result, console)
    for cpu in (0, 1):
        for check in ("alternating page/MSR reads never go backwards (0 did, of 4500)",
                      "page <= TIME_REF_COUNT <= page on every round (0 not)",
                      "TIME_REF_COUNT and the TSC page agree within 100 us",
                      "no value older than one another CPU already saw (0)",
                      "TIME_REF_COUNT advanced"):
            assert f"PASS: cpu {cpu}: {check}" in console, (cpu, check)
    assert "PASS: 2 of 2 vCPUs checked the clocks" in console

    # Both vCPUs really used the MSR (an exit per read), so both paths were compared.
    for vp in ("vp0", "vp1"):
        assert counters[vp]["msr_reads"]["HV_X64_MSR_TIME_REF_COUNT"] >= 1500

    # Rate: the guest's reference time across the host's sleep vs the host's own clock, both
    # taken when the host answered the two TIME_REF_COUNT reads around the sleep (the guest's
    # own instructions between a read and its mark are not in the interval, so a loaded host
    # that delays the vCPU there cannot skew it).
    guest_units = int(re.search(r"host-timed interval: (\d+) units", console).group(1))
    assert marks.arrived[2] - marks.arrived[1] >= HOST_DELAY_S
    (seen_a, answered_a, value_a) = marks.clock_reads[0][-1]
    (seen_b, answered_b, value_b) = marks.clock_reads[2][0]
    assert value_b - value_a == guest_units  # the reads the guest reported
    shortest, longest = seen_b - answered_a, answered_b - seen_a
    assert shortest >= HOST_DELAY_S
    guest_seconds = guest_units * 100e-9
    assert shortest * 0.99 - 0.001 <= guest_seconds <= longest * 1.01 + 0.001, \
        (guest_seconds, shortest, longest)

    # Reading the TSC page causes no exit at all; each TIME_REF_COUNT read is one MSR exit.
    assert marks.exits.get(3, {}) == {}, marks.exits.get(3)
    assert marks.exits.get(5, {}).get("msr") == MSR_READS, marks.exits.get(5)
