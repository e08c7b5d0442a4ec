"""The stock Debian 12 cloud kernel boots enlightened under ``hvvmm run`` to a busybox /init.

Slow: on a host whose KVM emulates guest ring 0 the boot takes minutes. Not part of the default
run (``-m "not realguest"`` in setup.cfg); run it with::

    .venv/bin/python -m pytest -m realguest tests/realguest
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import debian

from hvvmm.host import host_virtualization
from hvvmm.kvm import Kvm
from hvvmm.x86.features import emulator_safe_linux_options

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

# Measured on the 2-core emulating host this was written on, with 6-7 other jobs running: the
# kernel reached its late initcalls after 10 minutes (load ~2) and 25 minutes (load ~7).
BOOT_TIMEOUT = float(os.environ.get("HVVMM_REALGUEST_TIMEOUT", "3600"))

# Options that only save time where ring 0 is emulated; none touches a Hyper-V path.
# cryptomgr.notests (crypto/testmgr.c): no self-tests of every built-in algorithm as it
# registers. Under emulation the RSA test vectors alone kept both vCPUs in mpihelp_* for
# minutes, and the compiled-in X.509 certificate failed to load ("Problem loading in-kernel
# X.509 certificate (-110)": its pkcs1pad(rsa,sha256) waited 60 s for the test and timed out).
APPEND = "console=ttyS0 cryptomgr.notests"

# The kernel's own lines (format strings of Linux 6.1: arch/x86/kernel/cpu/hypervisor.c and
# mshyperv.c, arch/x86/hyperv/mmu.c, hv_apic.c, hv_spinlock.c, kernel/time/clocksource.c,
# kernel/smp.c), as this kernel printed them under hvvmm, then /init's. The stimer0 clockevent
# prints no line of its own: /init reads its name ("Hyper-V clockevent", hyperv_timer.c) from
# sysfs, one per CPU.
EXPECTED_LINES = (
    "Hypervisor detected: Microsoft Hyper-V",
    "Hyper-V: privilege flags low 0x",          # the features/hints line: "..., hints 0x..."
    "Hyper-V: Host Build ",
    "Hyper-V: LAPIC Timer Frequency: ",         # HV_X64_MSR_APIC_FREQUENCY
    "Hyper-V: Using hypercall for remote TLB flush",
    "Booting paravirtualized kernel on Hyper-V",
    "Hyper-V: PV spinlocks enabled",
    "Hyper-V: Using IPI hypercalls",
    "smp: Brought up 1 node, 2 CPUs",           # the AP from the MADT
    "clocksource: Switched to clocksource hyperv_clocksource_tsc_page",
    "alg: self-tests disabled",                 # cryptomgr.notests took effect
    "Run /init as init process",
)
INIT_LINES = (
    "hvvmm-init: /init started",
    "hvvmm-init: online CPUs 0-1",
    "hvvmm-init: clocksource hyperv_clocksource_tsc_page",
    "hvvmm-init: clockevents Hyper-V clockevent Hyper-V clockevent",
)


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
         "--append", APPEND, "--smp", "2", "--timeout", str(BOOT_TIMEOUT),
         "--trace", str(trace), "-v"],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    elapsed = time.monotonic() - started
    log = done.stdout
    report = (f"exit {done.returncode} after {elapsed:.0f} s\n--- console ---\n{log[-20000:]}"
              f"\n--- stderr ---\n{done.stderr[-5000:]}")
    for line in EXPECTED_LINES:
        assert line in log, f"missing {line!r}\n{report}"
    if "init[1]: segfault at ffffffff81c00080" in log and "emulates guest ring 0" in done.stderr:
        # Seen on the PVM host this was written on: /init's first SYSCALL arrives at the
        # kernel's entry_SYSCALL_64 still in user mode (CS 0x33), faults on the supervisor page
        # and init dies. Delivering SYSCALL from native guest ring 3 is the host KVM's job.
        pytest.xfail("this host's KVM delivers user-mode SYSCALL to LSTAR without entering "
                     "ring 0; the kernel got as far as /init")
    for line in INIT_LINES:
        assert line in log, f"missing {line!r}\n{report}"
    if emulator_safe_linux_options(Kvm().supported_cpuid(),
                                   not host_virtualization().can_boot_stock_kernels):
        # This host's KVM emulates ring 0: hvvmm added noxsave/clearcpuid= and said so.
        assert "added to the kernel command line: noxsave" in done.stderr, report
        assert "Clearing CPUID bits:" in log, report
    assert done.returncode == 0, report  # ACPI power-off
    # --trace: whole JSON lines from both vCPUs, with the IPI hypercall and stimer0 in use.
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    names = {(event["kind"], event["name"], event["vp"]) for event in events}
    for vp in (0, 1):
        assert ("msr_write", "HV_X64_MSR_STIMER0_COUNT", vp) in names, report
    assert any(name == "HvCallSendSyntheticClusterIpi" for _, name, _ in names), report
    print(f"\nDebian boot to power-off: {elapsed:.0f} s\n{done.stderr[-3000:]}")
