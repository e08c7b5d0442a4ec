"""The stock Debian 12 cloud kernel boots enlightened under ``hvvmm run`` to a busybox /init.

Slow: on a host whose KVM emulates guest ring 0 the boot takes minutes. Not part of the default
run (``-m "not realguest"`` in setup.cfg); run it with::

    .venv/bin/python -m pytest -m realguest tests/realguest
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import debian

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

BOOT_TIMEOUT = float(os.environ.get("HVVMM_REALGUEST_TIMEOUT", "2400"))


@pytest.fixture(scope="module")
def debian_guest():
    try:
        return debian.debian_kernel(), debian.busybox_initrd()
    except debian.GuestUnavailable as exc:
        pytest.fail(f"the Debian packages could not be fetched: {exc}")


def test_debian_cloud_kernel_boots_enlightened(debian_guest, tmp_path):
    kernel, initrd = debian_guest
    trace = tmp_path / "trace.jsonl"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hvvmm", "run", "--kernel", str(kernel), "--initrd", str(initrd),
         "--append", "console=ttyS0", "--smp", "2", "--timeout", str(BOOT_TIMEOUT),
         "--trace", str(trace), "-v"],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    elapsed = time.monotonic() - started
    log = done.stdout
    report = (f"exit {done.returncode} after {elapsed:.0f} s\n--- console ---\n{log[-20000:]}"
              f"\n--- stderr ---\n{done.stderr[-5000:]}")
    for line in ("Hypervisor detected: Microsoft Hyper-V",
                 "Hyper-V: privilege flags low",
                 "Switched to clocksource hyperv_clocksource_tsc_page",
                 "Hyper-V: Using IPI hypercalls",
                 "Hyper-V: Using hypercall for remote TLB flush",
                 "smp: Brought up 1 node, 2 CPUs",
                 "hvvmm-init: /init started",
                 "hvvmm-init: online CPUs 0-1",
                 "hvvmm-init: clocksource hyperv_clocksource_tsc_page",
                 "hvvmm-init: clockevents Hyper-V clockevent"):
        assert line in log, f"missing {line!r}\n{report}"
    assert done.returncode == 0, report  # ACPI power-off
    print(f"\nDebian boot to power-off: {elapsed:.0f} s\n{done.stderr[-3000:]}")
