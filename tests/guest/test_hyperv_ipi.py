"""PV IPIs end to end (tests/guests/hv_ipi.c): HvCallSendSyntheticClusterIpi(Ex) to one VP, to
the caller, to every AP, to a sparse HV_VP_SET and to HV_GENERIC_SET_ALL, each target's handler
counting; then the refused forms. With 2 and 4 vCPUs, in xAPIC and x2APIC mode."""

import pytest
from procutil import assert_guest_passed

from hvvmm import ExitKind, Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 20
IPI = "HvCallSendSyntheticClusterIpi"
IPI_EX = "HvCallSendSyntheticClusterIpiEx"


@pytest.mark.parametrize("smp, append", [(2, ""), (4, ""), (4, "x2apic")])
def test_pv_ipis_reach_exactly_their_targets(guest_image, smp, append):
    with Machine(MachineConfig(kernel=guest_image("hv_ipi"), smp=smp, append=append,
                               hyperv="minimal,hv-ipi")) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
        state = machine.hyperv.partition.state["hv-ipi"]
    console = machine.console_text
    assert_guest_passed(result, console)
    assert f"PASS: {smp} CPUs online, APs waiting" in console
    assert "PASS: every CPU's VP_INDEX is its APIC ID (what the masks name)" in console
    for what in ("fast 0x000B to the last VP", "fast 0x000B to itself",
                 "0x000B from memory to every AP", "0x0015 to a sparse set (the odd VPs)",
                 "0x0015 to HV_GENERIC_SET_ALL", "the refused calls"):
        assert f"PASS: {what}: exactly the targets took one IPI each" in console, what
    if append == "x2apic":
        assert "PASS: BSP in x2APIC mode" in console

    # Everything went through the BSP's hypercalls; each accepted IPI reached a LAPIC.
    calls = counters["vp0"]["hypercalls"]
    assert calls[f"{IPI}/HV_STATUS_SUCCESS"] == 3
    assert calls[f"{IPI}/HV_STATUS_INVALID_PARAMETER"] == 2
    assert calls[f"{IPI_EX}/HV_STATUS_SUCCESS"] == 2
    assert calls[f"{IPI_EX}/HV_STATUS_INVALID_PARAMETER"] == 1
    assert calls[f"{IPI_EX}/HV_STATUS_INVALID_HYPERCALL_INPUT"] == 2
    odd = len(range(1, smp, 2))
    assert state.sent == 1 + 1 + (smp - 1) + odd + smp and state.refused == 0


def test_without_hv_ipi_the_calls_are_denied_and_nothing_arrives(guest_image):
    with Machine(MachineConfig(kernel=guest_image("hv_ipi"), smp=2,
                               hyperv="minimal")) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
    console = machine.console_text
    assert result.kind is ExitKind.DEBUG_EXIT, (result, console)
    assert "FAIL: CPUID: cluster IPI recommended (hint 10)" in console
    assert "FAIL: CPUID: ExProcessorMasks recommended (hint 11)" in console
    for line in ("hv-ipi off: fast 0x000B -> status 0x6 (expected 0x6)",
                 "hv-ipi off: 0x0015 -> status 0x6 (expected 0x6)",
                 "hv-ipi off: exactly the targets took one IPI each"):
        assert f"PASS: {line}" in console, line
    assert console.count("FAIL") == 2, console
