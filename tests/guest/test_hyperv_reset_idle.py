"""HV_X64_MSR_RESET (tests/guests/hv_reset.c) through the library and ``hvvmm run --on-reset``,
and HV_X64_MSR_GUEST_IDLE with IF=0 (tests/guests/hv_idle.c)."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from hvvmm import ExitKind, Machine, MachineConfig
from procutil import assert_guest_passed, describe

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30
STATUS_RESET = 10
BANNER = "hv_reset: booted"
MARK_PORT = 0x5E8  # HV_TEST_MARK_PORT in tests/guests/hyperv.h
IDLE_READS = 20  # hv_idle.c


def test_reset_msr_ends_the_run_with_reset(guest_image):
    events = []
    with Machine(MachineConfig(kernel=guest_image("hv_reset"))) as machine:
        machine.hyperv.add_listener(events.append)
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
    console = machine.console_text
    assert console.count(BANNER) == 1
    for line in ("RESET MSR advertised", "RESET reads 0", "RESET = 0x6 (bit 0 clear): no reset"):
        assert f"PASS: {line}" in console, line
    assert "still running" not in console and "FAIL" not in console, console
    assert result.kind is ExitKind.RESET and result.status == STATUS_RESET, result
    assert "reset MSR" in result.message
    writes = [e.inputs["value"] for e in events
              if e.kind == "msr_write" and e.name == "HV_X64_MSR_RESET"]
    assert writes == ["0x6", "0x1"]
    assert counters["vp0"]["msr_writes"] == {"HV_X64_MSR_RESET": 2}


def hvvmm(*args):
    return [sys.executable, "-m", "hvvmm", "run", *args]


def test_cli_reset_exits_with_status_10(guest_image):
    proc = subprocess.run(hvvmm("--kernel", str(guest_image("hv_reset")), "--timeout",
                                str(RUN_TIMEOUT)),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT + 30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == STATUS_RESET, describe(proc)
    assert proc.stdout.count(BANNER) == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("hvvmm: reset:"), proc.stderr


def test_cli_on_reset_restart_boots_again(guest_image):
    """The guest resets on every boot, so ``--on-reset restart`` would go on forever: read the
    console until the banner came twice, then stop the process."""
    proc = subprocess.Popen(hvvmm("--kernel", str(guest_image("hv_reset")), "--on-reset",
                                  "restart", "--timeout", str(RUN_TIMEOUT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    out = b""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while out.count(BANNER.encode()) < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    text = out.decode(errors="replace")
    assert text.count(BANNER) >= 2, (text, err)
    assert b"booting again (boot 2)" in err, err
    assert "FAIL" not in text.split(BANNER)[1], text


class Marks:
    def __init__(self):
        self.arrived = {}

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.arrived[value] = time.monotonic()


def test_guest_idle_with_interrupts_off_returns(guest_image):
    marks = Marks()
    with Machine(MachineConfig(kernel=guest_image("hv_idle"))) as machine:
        machine.add_pio_device(MARK_PORT, 4, marks, "phase-marks")
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
    console = machine.console_text
    assert_guest_passed(result, console)
    for line in ("guest idle advertised",
                 f"{IDLE_READS} GUEST_IDLE reads with IF=0 and nothing pending returned 0",
                 "self-IPI pending in the IRR while IF=0",
                 "GUEST_IDLE with IF=0 and an interrupt pending returned, nothing delivered",
                 "the pending interrupt arrives once IF=1 (1)"):
        assert f"PASS: {line}" in console, line
    assert counters["vp0"]["msr_reads"] == {"HV_X64_MSR_GUEST_IDLE": IDLE_READS + 1}
    # Bounded: hvvmm idles at most about a millisecond per read when nothing is pending.
    assert marks.arrived[2] - marks.arrived[1] < 1.0
    assert marks.arrived[4] - marks.arrived[3] < 0.5
