"""hv-vapic is declared but refused (hvvmm/enlightenments/vapic.py): its CPUID bits never appear,
its MSRs raise #GP, and HV_X64_MSR_VP_ASSIST_PAGE stays with hv-core's tolerant store."""

from __future__ import annotations

import pytest

from hvvmm.enlightenments import REGISTRY
from hvvmm.enlightenments.vapic import NAME, REFUSAL
from hvvmm.hv import hvdef
from hvvmm.hv.features import HyperVConfigError, parse_hyperv_spec
from hvvmm.hv.hvdef import HvEnlightenmentInformation, HvPartitionPrivilege
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FakePlatform
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform

M = hvdef


@pytest.mark.parametrize("spec", ["minimal,hv-vapic", "all,hv-vapic", "hv_vapic=on"])
def test_asking_for_it_gets_the_reason(spec):
    with pytest.raises(HyperVConfigError) as info:
        parse_hyperv_spec(spec)
    assert str(info.value) == REFUSAL
    assert REFUSAL.startswith("hv-vapic cannot be offered with KVM's in-kernel LAPIC")
    assert "x2APIC" in REFUSAL


def test_declared_not_offered():
    vapic = REGISTRY[NAME]
    assert not vapic.implemented and vapic.refusal == REFUSAL
    assert NAME not in REGISTRY.selectable_implemented()
    assert NAME not in parse_hyperv_spec("all").features
    assert NAME not in parse_hyperv_spec("hv-passthrough").features
    assert "refused: " in vapic.describe() and "not implemented yet" not in vapic.describe()
    assert parse_hyperv_spec("all,hv-vapic=off").enabled  # switching it off is harmless
    # Features that need it stay known, and unavailable.
    for name in ("hv-evmcs", "hv-tlbflush-direct"):
        assert NAME in REGISTRY[name].requires and not REGISTRY[name].implemented
    assert {M.HV_X64_MSR_EOI, M.HV_X64_MSR_ICR, M.HV_X64_MSR_TPR} == set(vapic.msrs)
    assert all(REGISTRY.msr_owner(index) == NAME for index in vapic.msrs)


@pytest.mark.parametrize("spec", ["minimal", "all", None])
def test_no_cpuid_bit_and_the_msrs_fault(spec):
    partition = Partition(parse_hyperv_spec(spec), FakePlatform())
    leaves = {e.function: e for e in partition.cpuid_leaves()}
    assert not leaves[0x40000003].eax & HvPartitionPrivilege.AccessIntrCtrlRegs
    assert not leaves[0x40000004].eax & HvEnlightenmentInformation.HV_X64_APIC_ACCESS_RECOMMENDED
    for index in (M.HV_X64_MSR_EOI, M.HV_X64_MSR_ICR, M.HV_X64_MSR_TPR):
        with pytest.raises(MsrAccessFault):
            partition.msr_write(1, index, 0)
        with pytest.raises(MsrAccessFault):
            partition.msr_read(1, index)
    # VP_ASSIST_PAGE: Linux 6.1 writes it on every CPU regardless; hv-core keeps it per VP.
    assert partition.msrs.get(M.HV_X64_MSR_VP_ASSIST_PAGE).owner == "hv-core"
    partition.msr_write(1, M.HV_X64_MSR_VP_ASSIST_PAGE, 0x7001)
    assert partition.msr_read(1, M.HV_X64_MSR_VP_ASSIST_PAGE) == 0x7001
    assert partition.msr_read(0, M.HV_X64_MSR_VP_ASSIST_PAGE) == 0
