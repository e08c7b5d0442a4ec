"""hvvmm.hv.hvdef: TLFS constants, bit classes, open enums and GuestOsId decoding."""

from __future__ import annotations

import enum
import os
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvvmm.hv import hvdef
from hvvmm.hv.hvdef import (
    HvEnlightenmentInformation,
    HvFeatures,
    HvHardwareFeatures,
    HvPartitionPrivilege,
    HvStatus,
    HypercallCode,
    decode_guest_os_id,
    hypercall_code,
    hypercall_name,
    linux_guest_os_id,
    msr_name,
    status_name,
)


def test_package_imports_nothing_kvm_related():
    # In a fresh interpreter: other test files may have imported the KVM layer already.
    code = ("import sys, hvvmm.hv.hvdef, hvvmm.hv.hypercall; "
            "bad = [m for m in sys.modules if m.startswith(('hvvmm.kvm', 'hvvmm._kvm', 'cffi', "
            "'fcntl', 'hvvmm.vcpu', 'hvvmm.vm'))]; "
            "sys.exit(repr(bad) if bad else 0)")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- MSRs -----------------------------------------------------------------------------------

# The synthetic MSRs of the TLFS and Linux include/hyperv/hvgdk_mini.h, one row per MSR (ranges
# expanded).
MSR_TABLE = {
    "GUEST_OS_ID": 0x40000000, "HYPERCALL": 0x40000001, "VP_INDEX": 0x40000002,
    "RESET": 0x40000003, "VP_RUNTIME": 0x40000010, "TIME_REF_COUNT": 0x40000020,
    "REFERENCE_TSC": 0x40000021, "TSC_FREQUENCY": 0x40000022, "APIC_FREQUENCY": 0x40000023,
    "EOI": 0x40000070, "ICR": 0x40000071, "TPR": 0x40000072, "VP_ASSIST_PAGE": 0x40000073,
    "SCONTROL": 0x40000080, "SVERSION": 0x40000081, "SIEFP": 0x40000082, "SIMP": 0x40000083,
    "EOM": 0x40000084, "SIRBP": 0x40000085,
    **{f"SINT{n}": 0x40000090 + n for n in range(16)},
    **{f"STIMER{n}_CONFIG": 0x400000B0 + 2 * n for n in range(4)},
    **{f"STIMER{n}_COUNT": 0x400000B1 + 2 * n for n in range(4)},
    "GUEST_IDLE": 0x400000F0, "SYNDBG_CONTROL": 0x400000F1, "SYNDBG_STATUS": 0x400000F2,
    "SYNDBG_SEND_BUFFER": 0x400000F3, "SYNDBG_RECV_BUFFER": 0x400000F4,
    "SYNDBG_PENDING_BUFFER": 0x400000F5, "SYNDBG_OPTIONS": 0x400000FF,
    **{f"CRASH_P{n}": 0x40000100 + n for n in range(5)},
    "CRASH_CTL": 0x40000105, "REENLIGHTENMENT_CONTROL": 0x40000106,
    "TSC_EMULATION_CONTROL": 0x40000107, "TSC_EMULATION_STATUS": 0x40000108,
    "STIME_UNHALTED_TIMER_CONFIG": 0x40000114, "STIME_UNHALTED_TIMER_COUNT": 0x40000115,
    "TSC_INVARIANT_CONTROL": 0x40000118,
    "NESTED_SCONTROL": 0x40001080, "NESTED_SVERSION": 0x40001081, "NESTED_SIEFP": 0x40001082,
    "NESTED_SIMP": 0x40001083, "NESTED_EOM": 0x40001084, "NESTED_SINT0": 0x40001090,
}


@pytest.mark.parametrize("name, index", sorted(MSR_TABLE.items()))
def test_every_synthetic_msr_of_the_reference_table(name, index):
    assert getattr(hvdef, f"HV_X64_MSR_{name}") == index
    assert msr_name(index) == f"HV_X64_MSR_{name}"


def test_msr_names_cover_nested_sints_and_unknown_indices():
    assert msr_name(0x4000109F) == "HV_X64_MSR_NESTED_SINT15"
    assert msr_name(0x400000FE) == "MSR 0x400000fe"
    assert msr_name(0x10) == "MSR 0x10"
    # Layout constants are not MSR indices.
    assert 1 not in hvdef.SYNTHETIC_MSR_NAMES
    assert all(0x40000000 <= i <= 0x400010FF for i in hvdef.SYNTHETIC_MSR_NAMES)
    for lo, hi in hvdef.HV_X64_SYNTHETIC_MSR_RANGES:
        assert lo <= hi


def test_hypercall_msr_layout():
    assert hvdef.HV_X64_MSR_HYPERCALL_ENABLE == 1
    assert hvdef.HV_X64_MSR_HYPERCALL_LOCKED == 2
    assert hvdef.HV_X64_MSR_HYPERCALL_RSVDP_MASK == 0xFFC
    assert hvdef.HV_X64_MSR_HYPERCALL_PAGE_ADDRESS_MASK == 0xFFFF_FFFF_FFFF_F000


# -- CPUID ----------------------------------------------------------------------------------

def test_cpuid_leaves_and_signatures():
    assert hvdef.HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS == 0x40000000
    assert hvdef.HYPERV_CPUID_FEATURES == 0x40000003
    assert hvdef.HYPERV_CPUID_ENLIGHTMENT_INFO == 0x40000004
    assert hvdef.HYPERV_CPUID_HARDWARE_FEATURES == 0x40000006
    assert hvdef.HYPERV_CPUID_NESTED_FEATURES == 0x4000000A
    assert hvdef.HYPERV_CPUID_SIGNATURE_EAX.to_bytes(4, "little") == b"Hv#1"
    assert hvdef.HYPERV_VS_INTERFACE_EAX_SIGNATURE.to_bytes(4, "little") == b"VS#1"
    vendor = b"".join(r.to_bytes(4, "little") for r in (
        hvdef.HV_CPUID_VENDOR_EBX, hvdef.HV_CPUID_VENDOR_ECX, hvdef.HV_CPUID_VENDOR_EDX))
    assert vendor == hvdef.HV_CPUID_VENDOR_MICROSOFT == b"Microsoft Hv"


@pytest.mark.parametrize("flag_class, width", [
    (HvPartitionPrivilege, 64), (HvFeatures, 32), (HvEnlightenmentInformation, 32),
    (HvHardwareFeatures, 32)])
def test_bit_classes_have_one_distinct_bit_per_member(flag_class, width):
    values = [member.value for member in flag_class.__members__.values()]
    assert len(values) == len(set(values)), "aliases"
    for value in values:
        assert value & (value - 1) == 0 and 0 < value < 1 << width


@pytest.mark.parametrize("member, bit", [
    (HvPartitionPrivilege.AccessVpRunTimeReg, 0),
    (HvPartitionPrivilege.AccessHypercallMsrs, 5),
    (HvPartitionPrivilege.AccessVpIndex, 6),
    (HvPartitionPrivilege.AccessFrequencyRegs, 11),
    (HvPartitionPrivilege.AccessReenlightenmentControls, 13),
    (HvPartitionPrivilege.AccessTscInvariantControls, 15),
    (HvPartitionPrivilege.PostMessages, 32 + 4),
    (HvPartitionPrivilege.SignalEvents, 32 + 5),
    (HvPartitionPrivilege.CpuManagement, 32 + 12),
    (HvPartitionPrivilege.EnableExtendedHypercalls, 32 + 20),
    (HvPartitionPrivilege.Isolation, 32 + 22),
    (HvFeatures.HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE, 4),
    (HvFeatures.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE, 10),
    (HvFeatures.HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE, 15),
    (HvFeatures.HV_STIMER_DIRECT_MODE_AVAILABLE, 19),
    (HvEnlightenmentInformation.HV_X64_RELAXED_TIMING_RECOMMENDED, 5),
    (HvEnlightenmentInformation.HV_DEPRECATING_AEOI_RECOMMENDED, 9),
    (HvEnlightenmentInformation.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED, 11),
    (HvEnlightenmentInformation.HV_X64_NO_NONARCH_CORESHARING, 18),
    (HvHardwareFeatures.HV_X64_SLAT_IN_USE, 3),
    (HvHardwareFeatures.HV_X64_SYNTHETIC_TIMERS_VOLATILE, 9),
])
def test_bit_positions_match_the_tlfs(member, bit):
    assert member.value == 1 << bit


def test_privilege_mask_splits_into_eax_and_ebx():
    mask = (HvPartitionPrivilege.AccessHypercallMsrs | HvPartitionPrivilege.AccessVpIndex
            | HvPartitionPrivilege.PostMessages | HvPartitionPrivilege.EnableExtendedHypercalls)
    assert mask.eax == (1 << 5) | (1 << 6)
    assert mask.ebx == (1 << 4) | (1 << 20)
    assert HvPartitionPrivilege.from_cpuid(mask.eax, mask.ebx) == mask
    # Unnamed bits are kept (guest/host values are open).
    odd = HvPartitionPrivilege.from_cpuid(1 << 31, 1 << 31)
    assert odd.eax == 1 << 31 and odd.ebx == 1 << 31


def test_multibit_fields_stay_out_of_the_flags():
    assert hvdef.HV_HARDWARE_NESTING_LEVEL_MASK == 0xF << 10
    assert not any(m.value & hvdef.HV_HARDWARE_NESTING_LEVEL_MASK
                   for m in HvHardwareFeatures.__members__.values())


# -- hypercall codes and statuses -----------------------------------------------------------

@pytest.mark.parametrize("code, name", [
    (0x0002, "HvCallFlushVirtualAddressSpace"), (0x0003, "HvCallFlushVirtualAddressList"),
    (0x0008, "HvCallNotifyLongSpinWait"), (0x000B, "HvCallSendSyntheticClusterIpi"),
    (0x0013, "HvCallFlushVirtualAddressSpaceEx"), (0x0014, "HvCallFlushVirtualAddressListEx"),
    (0x0015, "HvCallSendSyntheticClusterIpiEx"), (0x005C, "HvCallPostMessage"),
    (0x005D, "HvCallSignalEvent"), (0x0069, "HvCallPostDebugData"),
    (0x007E, "HvCallRetargetDeviceInterrupt"), (0x00AF, "HvCallFlushGuestPhysicalAddressSpace"),
    (0x8001, "HvExtCallQueryCapabilities"), (0x8003, "HvExtCallMemoryHeatHint"),
])
def test_hypercall_codes(code, name):
    assert HypercallCode[name] == code
    assert hypercall_name(code) == name
    assert hypercall_code(code) is HypercallCode[name]


def test_unknown_hypercall_codes_are_values_not_errors():
    assert hypercall_name(0x1234) == "HvCall(0x1234)"
    assert hypercall_code(0x1234) == 0x1234 and not isinstance(hypercall_code(0x1234), enum.Enum)
    assert hypercall_name(None) == "HvCall(None)"  # type: ignore[arg-type]


@given(st.integers())
def test_hypercall_name_never_raises(value):
    assert isinstance(hypercall_name(value), str)
    assert isinstance(status_name(value), str)


@pytest.mark.parametrize("value, name", [
    (0, "HV_STATUS_SUCCESS"), (2, "HV_STATUS_INVALID_HYPERCALL_CODE"),
    (3, "HV_STATUS_INVALID_HYPERCALL_INPUT"), (4, "HV_STATUS_INVALID_ALIGNMENT"),
    (5, "HV_STATUS_INVALID_PARAMETER"), (6, "HV_STATUS_ACCESS_DENIED"),
    (0x11, "HV_STATUS_INVALID_PORT_ID"), (0x12, "HV_STATUS_INVALID_CONNECTION_ID"),
    (0x13, "HV_STATUS_INSUFFICIENT_BUFFERS"), (0x18, "HV_STATUS_INVALID_SYNIC_STATE"),
    (0x78, "HV_STATUS_TIME_OUT"), (0x87, "HV_STATUS_UNKNOWN_REGISTER_NAME"),
])
def test_status_codes(value, name):
    assert HvStatus[name] == value
    assert status_name(value) == name


def test_unknown_status():
    assert status_name(1) == "HV_STATUS(0x0001)"
    assert status_name(0xFFFF) == "HV_STATUS(0xffff)"


# -- hypercall input/result value fields ----------------------------------------------------

def test_input_value_fields_partition_the_64_bits():
    fields = [hvdef.HV_HYPERCALL_CODE_MASK, hvdef.HV_HYPERCALL_FAST_BIT,
              hvdef.HV_HYPERCALL_VARHEAD_MASK, hvdef.HV_HYPERCALL_RSVD0_MASK,
              hvdef.HV_HYPERCALL_REP_COMP_MASK, hvdef.HV_HYPERCALL_RSVD1_MASK,
              hvdef.HV_HYPERCALL_REP_START_MASK, hvdef.HV_HYPERCALL_RSVD2_MASK]
    total = 0
    for mask in fields:
        assert total & mask == 0
        total |= mask
    assert total == (1 << 64) - 1
    assert hvdef.HV_HYPERCALL_VARHEAD_MASK == 0x3FF << 17
    assert hvdef.HV_HYPERCALL_REP_COMP_MASK == 0xFFF << 32
    assert hvdef.HV_HYPERCALL_REP_START_MASK == 0xFFF << 48
    # Linux HV_HYPERCALL_RSVD_MASK = GENMASK(31,27) | GENMASK(47,44) | GENMASK(63,60)
    assert hvdef.HV_HYPERCALL_RSVD_MASK == 0xF000_F000_F800_0000
    assert hvdef.HV_HYPERCALL_NESTED & hvdef.HV_HYPERCALL_RSVD_MASK
    assert hvdef.HV_HYPERCALL_MAX_XMM_INPUT_BYTES == 112


def test_page_constants():
    assert hvdef.HV_PAGE_SIZE == 4096 == 1 << hvdef.HV_PAGE_SHIFT
    assert hvdef.HV_PAGE_MASK == 0xFFFF_FFFF_FFFF_F000


# -- GuestOsId ------------------------------------------------------------------------------

def test_linux_guest_os_id():
    gid = decode_guest_os_id(0x8100000601C00000)  # Debian 6.1.192 (include/asm-generic/mshyperv.h)
    assert gid.open_source and gid.is_linux and not gid.is_windows
    assert gid.linux_version == (6, 1, 192)
    assert gid.os_type == 1 and gid.os_id == 0 and gid.build == 0
    assert str(gid) == "Linux 6.1.192 (open source, distro 0x00, build 0x0000)"
    assert linux_guest_os_id(6, 1, 192) == 0x8100000601C00000
    assert linux_guest_os_id(6, 1, 300) == linux_guest_os_id(6, 1, 255)  # sublevel capped
    text = str(decode_guest_os_id(linux_guest_os_id(6, 1, 0)))
    assert text.startswith("Linux 6.1.0 (open source")


def test_old_linux_distro_fields():
    # Old hv_generate_guest_id(d_info1, kernel_version, d_info2): distro id in 55:48, build 15:0.
    gid = decode_guest_os_id((0x8100 << 48) | (0x12 << 48) | (0x040400 << 16) | 0x0034)
    assert str(gid) == "Linux 4.4.0 (open source, distro 0x12, build 0x0034)"


@pytest.mark.parametrize("value, text", [
    (0x0001040A00003839, "Windows NT 10.0 build 14393 (Microsoft)"),  # WS2016 (KVM hyperv.c)
    (0x0001040A00004A65, "Windows NT 10.0 build 19045 (Microsoft)"),  # Windows 10 22H2
    (0x0001040601011DB1, "Windows NT 6.1 SP1 build 7601 (Microsoft)"),
    (0x0002050102000001, "OS 0x05 1.2 build 1 (HPE)"),
    (0x7777000000000000, "OS 0x00 0.0 build 0 (vendor 0x7777)"),
])
def test_proprietary_guest_os_ids(value, text):
    assert str(decode_guest_os_id(value)) == text


def test_windows_fields():
    gid = decode_guest_os_id(0x0001040A00004A65)
    assert gid.is_windows and not gid.open_source and not gid.is_linux
    assert (gid.vendor_id, gid.os_id, gid.major_version, gid.minor_version,
            gid.service_version, gid.build) == (1, 4, 10, 0, 0, 19045)
    assert gid.version == 0 and gid.os_type == 0 and gid.linux_version is None


def test_other_open_source_guest_os_ids():
    assert str(decode_guest_os_id(0x8F00 << 48)).startswith("open-source OS type 0xf version 0x0")
    assert str(decode_guest_os_id((0x82 << 56) | (1300000 << 16))).startswith(
        "FreeBSD version 0x13d620 (open source")


def test_unset_guest_os_id():
    assert str(decode_guest_os_id(0)) == "not set"
    assert not decode_guest_os_id(1 << 64).is_set  # masked to 64 bits


@given(st.integers(min_value=-(1 << 70), max_value=1 << 70))
def test_guest_os_id_decoding_never_raises(value):
    gid = decode_guest_os_id(value)
    assert 0 <= gid.value < 1 << 64
    assert isinstance(str(gid), str) and str(gid)
