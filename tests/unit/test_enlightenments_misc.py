"""The small enlightenments: hv-vpindex, hv-runtime, hv-frequencies, hv-relaxed, hv-reset,
hv-idle, hv-spinlocks, hv-ext-hypercalls and hv-xmm-input. Hypercalls go through the real
dispatcher with FakeRegisters and FakePlatform memory."""

from __future__ import annotations

import struct

import pytest

from hvvmm.enlightenments.ext_hypercalls import (
    CAPABILITIES,
    encode_boot_zeroed_memory,
    zeroed_page_ranges,
)
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.hvdef import HvStatus, HypercallCode
from hvvmm.hv.hypercall import HypercallSpec
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FAKE_APIC_HZ, FAKE_TSC_HZ, FakePlatform, FakeRegisters
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FAKE_APIC_HZ, FAKE_TSC_HZ, FakePlatform, FakeRegisters

FAST = hvdef.HV_HYPERCALL_FAST_BIT
OUT_GPA = 0x3000
S = HvStatus


def make(spec: str, **platform_args):
    platform = FakePlatform(vp_count=4, **platform_args)
    return Partition(parse_hyperv_spec(spec), platform), platform


# -- MSR-only features ---------------------------------------------------------------------------


def test_vp_index_is_each_vps_own_and_read_only():
    partition, _ = make("minimal")
    assert [partition.msr_read(vp, hvdef.HV_X64_MSR_VP_INDEX) for vp in range(4)] == [0, 1, 2, 3]
    with pytest.raises(MsrAccessFault, match="read-only"):
        partition.msr_write(2, hvdef.HV_X64_MSR_VP_INDEX, 2)


def test_vp_runtime_comes_from_the_platform():
    partition, platform = make("minimal,hv-runtime")
    platform.runtime.update({0: 10, 3: 12_345_678})
    assert partition.msr_read(0, hvdef.HV_X64_MSR_VP_RUNTIME) == 10
    assert partition.msr_read(3, hvdef.HV_X64_MSR_VP_RUNTIME) == 12_345_678


def test_frequencies():
    partition, _ = make("minimal,hv-frequencies")
    assert partition.msr_read(1, hvdef.HV_X64_MSR_TSC_FREQUENCY) == FAKE_TSC_HZ
    assert partition.msr_read(1, hvdef.HV_X64_MSR_APIC_FREQUENCY) == FAKE_APIC_HZ == 10**9
    for index in (hvdef.HV_X64_MSR_TSC_FREQUENCY, hvdef.HV_X64_MSR_APIC_FREQUENCY):
        with pytest.raises(MsrAccessFault, match="read-only"):
            partition.msr_write(0, index, 1)


def test_relaxed_is_cpuid_only():
    partition, _ = make("minimal,hv-relaxed")
    assert partition.state["hv-relaxed"] is None
    hints = [e for e in partition.cpuid_leaves() if e.function == 0x40000004][0]
    assert hints.eax == hvdef.HvEnlightenmentInformation.HV_X64_RELAXED_TIMING_RECOMMENDED


def test_reset_msr():
    partition, platform = make("minimal,hv-reset")
    partition.msr_write(0, hvdef.HV_X64_MSR_RESET, 0)
    partition.msr_write(0, hvdef.HV_X64_MSR_RESET, 0xFFFF_FFFF_FFFF_FFFE)  # bit 0 clear
    assert platform.resets == 0
    partition.msr_write(2, hvdef.HV_X64_MSR_RESET, 1)
    assert platform.resets == 1
    assert partition.msr_read(0, hvdef.HV_X64_MSR_RESET) == 0


def test_guest_idle_read_idles_the_vp():
    partition, platform = make("minimal,hv-idle")
    assert partition.msr_read(3, hvdef.HV_X64_MSR_GUEST_IDLE) == 0
    assert partition.msr_read(1, hvdef.HV_X64_MSR_GUEST_IDLE) == 0
    assert platform.idles == [3, 1]
    with pytest.raises(MsrAccessFault, match="read-only"):
        partition.msr_write(3, hvdef.HV_X64_MSR_GUEST_IDLE, 0)
    assert platform.idles == [3, 1]


# -- hv-spinlocks (HvCallNotifyLongSpinWait; always available) --------------------------------


@pytest.mark.parametrize("spec", ["minimal", "minimal,hv-spinlocks=0xfff"])
def test_notify_long_spin_wait_always_succeeds(spec):
    partition, platform = make(spec)
    io = FakeRegisters()
    io.set_call(HypercallCode.HvCallNotifyLongSpinWait | FAST, 0xFFFF_FFFF_FFFF_FFFF, 0)
    before = io.snapshot()
    outcome = partition.hypercall(2, io)
    assert outcome.status == S.HV_STATUS_SUCCESS and platform.yields == [2]
    assert io.gpr_writes == ["rax"]  # nothing but the result changes (TLFS volatile registers)
    assert io.snapshot()[0]["rdx"] == before[0]["rdx"]


def test_notify_long_spin_wait_shape_errors_come_from_the_dispatcher():
    partition, platform = make("minimal")
    io = FakeRegisters()
    io.set_call(HypercallCode.HvCallNotifyLongSpinWait | FAST | (1 << 32), 0, 0)  # rep count
    assert partition.hypercall(0, io).status == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert platform.yields == []


# -- hv-ext-hypercalls -------------------------------------------------------------------------


def call(partition, vp, code, output_gpa=OUT_GPA, *, fast=False, input_gpa=0):
    io = FakeRegisters()
    io.set_call(code | (FAST if fast else 0), input_gpa, output_gpa)
    return partition.hypercall(vp, io), io


def test_query_capabilities():
    partition, platform = make("minimal,hv-ext-hypercalls")
    platform.memory.write(OUT_GPA, b"\xAA" * 16)
    outcome, io = call(partition, 1, HypercallCode.HvExtCallQueryCapabilities)
    assert outcome.status == S.HV_STATUS_SUCCESS and io.result() == 0
    assert platform.memory.read_u64(OUT_GPA) == CAPABILITIES == \
        hvdef.HV_EXT_CAPABILITY_GET_BOOT_ZEROED_MEMORY
    assert not CAPABILITIES & hvdef.HV_EXT_CAPABILITY_MEMORY_COLD_DISCARD_HINT
    assert platform.memory.read(OUT_GPA + 8, 8) == b"\xAA" * 8  # nothing written beyond


def test_boot_zeroed_memory_reports_none_by_default():
    partition, platform = make("minimal,hv-ext-hypercalls")
    platform.memory.write(OUT_GPA, b"\xAA" * 0x1000)
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallGetBootZeroedMemory)
    assert outcome.status == S.HV_STATUS_SUCCESS
    assert platform.memory.read_u64(OUT_GPA) == 0
    assert platform.memory.read(OUT_GPA + 0xFF8, 8) == b"\xAA" * 8  # output is 0xFF8 bytes


def test_boot_zeroed_memory_reports_platform_ranges_biggest_first():
    zeroed = [(0x10_0000, 0x10_0000), (0x1800, 0x2000), (0x40_0000, 0x80_0000), (0, 0x800)]
    partition, platform = make("minimal,hv-ext-hypercalls", zeroed_ranges=zeroed)
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallGetBootZeroedMemory)
    assert outcome.status == S.HV_STATUS_SUCCESS
    count = platform.memory.read_u64(OUT_GPA)
    ranges = [struct.unpack_from("<QQ", platform.memory.read(OUT_GPA + 8 + 16 * i, 16))
              for i in range(count)]
    # Page numbers and counts; partial pages trimmed (0x1800+0x2000 -> page 2 only; the sub-page
    # range at 0 disappears).
    assert ranges == [(0x400, 0x800), (0x100, 0x100), (2, 1)]


def test_zeroed_range_helpers():
    assert zeroed_page_ranges([(0, 0x1000)] * 300) == [(0, 1)] * 255  # TLFS: at most 255
    assert zeroed_page_ranges([(-4096, 8192), (0x1000, 0), (0x1001, 0x1000)]) == []
    assert len(encode_boot_zeroed_memory([])) == 0xFF8


@pytest.mark.parametrize("code", [HypercallCode.HvExtCallQueryCapabilities,
                                  HypercallCode.HvExtCallGetBootZeroedMemory])
def test_ext_calls_without_the_privilege_are_access_denied(code):
    partition, platform = make("minimal")
    platform.memory.write(OUT_GPA, b"\xAA" * 8)
    outcome, _ = call(partition, 0, code)
    assert outcome.status == S.HV_STATUS_ACCESS_DENIED
    assert platform.memory.read(OUT_GPA, 8) == b"\xAA" * 8


def test_ext_calls_have_no_fast_form_and_check_alignment():
    partition, _ = make("minimal,hv-ext-hypercalls")
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallQueryCapabilities, fast=True)
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallQueryCapabilities, OUT_GPA + 4)
    assert outcome.status == S.HV_STATUS_INVALID_ALIGNMENT
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallGetBootZeroedMemory, OUT_GPA + 16)
    assert outcome.status == S.HV_STATUS_INVALID_ALIGNMENT  # 0xFF8 bytes would cross a page
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallQueryCapabilities, 1 << 40)
    assert outcome.status == S.HV_STATUS_INVALID_ALIGNMENT  # not in guest RAM


def test_unimplemented_ext_call_is_invalid_code():
    partition, _ = make("minimal,hv-ext-hypercalls")
    outcome, _ = call(partition, 0, HypercallCode.HvExtCallMemoryHeatHint)
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_CODE


# -- hv-xmm-input ------------------------------------------------------------------------------


def test_xmm_input_switches_the_dispatcher():
    assert not make("minimal")[0].dispatcher.xmm_fast_input
    partition, _ = make("minimal,hv-xmm-input")
    assert partition.dispatcher.xmm_fast_input
    assert not partition.dispatcher.xmm_fast_output
    features = [e for e in partition.cpuid_leaves() if e.function == 0x40000003][0]
    assert features.edx & hvdef.HvFeatures.HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE


def test_xmm_fast_call_without_the_feature_is_ud():
    # A 32-byte fast input needs XMM0: #UD without CPUID 0x40000003 EDX bit 4 (TLFS).
    partition, _ = make("minimal")
    partition.hypercalls.register(HypercallSpec(code=0x0F00, handler=lambda r: None,
                                                input_size=32, fast_allowed=True))
    io = FakeRegisters()
    io.set_call(0x0F00 | FAST, 1, 2)
    assert partition.hypercall(0, io).inject_ud
