"""Synthetic timers in a real guest (tests/guests/hv_stimer.c): direct mode (periodic, one-shot,
auto-enable, past COUNT, disable, two vCPUs at once) and message mode through the SynIC
(periodic, one-shot, busy slot retried after EOM, SINTx = 0), each wait bounded in the guest.

hv-stimer requires hv-synic (QEMU's dependency, ``target/i386/kvm/kvm.c``
``kvm_hyperv_properties[]``), so these run only once the SynIC is
implemented and hv-stimer is in the default registry."""

import pytest
from procutil import assert_guest_passed

from hvvmm import Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 120
FULL = "hv-vpindex,hv-time,hv-synic,hv-stimer,hv-stimer-direct"
NO_DIRECT = "hv-vpindex,hv-time,hv-synic,hv-stimer"

DIRECT_CHECKS = (
    "direct periodic: 20 of 20 interrupts",
    "direct periodic: no interrupt before its grid point (0 early)",
    "direct one-shot: exactly one interrupt (1)",
    "direct one-shot: not before COUNT",
    "direct one-shot: Enable clear after expiry",
    "auto-enable: Linux's CONFIG reads back 0x1ed9",
    "auto-enable: three COUNT writes, three interrupts (3)",
    "auto-enable: COUNT 0 clears Enable",
    "auto-enable: nothing fires after COUNT 0 (3)",
    "past one-shot: fires at once",
    "disable: CONFIG 0 stops a periodic timer",
    "smp: the AP's own 1 ms timer: 30 interrupts, none early (3)",
    "smp: the BSP's 3 ms timer ran meanwhile",
)
MESSAGE_CHECKS = (
    "message periodic: 10 of 10 messages",
    "message periodic: type 0x80000010, size 24, timer 0 (0 bad)",
    "message periodic: first ExpirationTime one period after the enabling write",
    "message periodic: ExpirationTimes on the grid (0 off)",
    "message periodic: ExpirationTime <= DeliveryTime <= handler stamp (0, 0)",
    "message one-shot: one message",
    "message one-shot: timer 1, ExpirationTime == COUNT, not early",
    "busy slot: no message and no interrupt while the slot is occupied",
    "busy slot: MessagePending set in the occupying message",
    "busy slot: the timer message arrives after EOM",
    "busy slot: original ExpirationTime, DeliveryTime after the release",
    "SINTx 0: the timer is marked disabled",
)


def run(guest_image, spec: str, smp: int = 2, append: str = ""):
    with Machine(MachineConfig(kernel=guest_image("hv_stimer"), smp=smp, hyperv=spec,
                               append=append)) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.partition.state["hv-stimer"].counters()
    console = machine.console_text
    assert_guest_passed(result, console)
    return console, counters


def test_direct_and_message_mode(guest_image):
    console, counters = run(guest_image, FULL)
    assert "PASS: AccessSyntheticTimerRegs advertised" in console
    assert "PASS: reserved CONFIG bits raise #GP" in console
    for check in (*DIRECT_CHECKS, *MESSAGE_CHECKS):
        assert f"PASS: {check}" in console, check
    # The AP's timer ran on VP 1, the BSP's on VP 0 (per-VP timers).
    assert counters["vp1"]["stimer0"]["delivered"] >= 30
    vp0 = counters["vp0"]
    assert vp0["stimer2"]["deferred"] >= 1 and vp0["stimer2"]["retried"] == 1  # busy slot


def test_direct_mode_needs_its_cpuid_bit(guest_image):
    console, _counters = run(guest_image, NO_DIRECT, smp=1)
    assert "INFO: direct mode not advertised" in console
    assert "PASS: DirectMode without CPUID EDX bit 19 raises #GP" in console
    for check in MESSAGE_CHECKS:
        assert f"PASS: {check}" in console, check
