"""hvvmm.cpuid: per-vCPU topology, hypervisor bit, feature masking, and the Hyper-V leaves."""

from __future__ import annotations

import struct

import pytest

from hvvmm.cpuid import (
    CPU_FEATURES,
    HV_CPUID_MAX_LEAF,
    KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
    CpuidEntry,
    CpuidError,
    build_cpuid,
    format_cpuid_table,
    hyperv_cpuid_leaves,
    parse_cpu_features_mask,
)
from hvvmm.hv.features import parse_hyperv_spec

SIG = KVM_CPUID_FLAG_SIGNIFICANT_INDEX


def regs(text: bytes) -> tuple[int, int, int]:
    return struct.unpack("<III", text)


GENUINE_INTEL = regs(b"GenuineIntel")  # EBX, EDX, ECX order below
KVM_SIG = regs(b"KVMKVMKVM\0\0\0")

# A KVM_GET_SUPPORTED_CPUID table shaped like the development machine's (Intel, KVM PV leaves).
HOST = [
    CpuidEntry(0, 0, 0, 0x1F, GENUINE_INTEL[0], GENUINE_INTEL[2], GENUINE_INTEL[1]),
    # leaf 1 ECX = 0x81202000 on the development machine (hypervisor, TSC-deadline, x2APIC, cx16)
    CpuidEntry(1, 0, 0, 0x000906EA, 0x00000800, 0x81202000 | (1 << 26) | (1 << 28),
               0x1FABFBFF | (1 << 9)),
    CpuidEntry(4, 0, SIG, 0x1C004121, 0x01C0003F, 0x3F, 0),  # L1d
    CpuidEntry(4, 1, SIG, 0x1C004122, 0x01C0003F, 0x3F, 0),  # L1i
    CpuidEntry(4, 2, SIG, 0x1C004143, 0x00C0003F, 0x3FF, 0),  # L2
    CpuidEntry(4, 3, SIG, 0x1C03C163, 0x03C0003F, 0x3FFF, 4),  # L3
    CpuidEntry(4, 4, SIG, 0, 0, 0, 0),
    CpuidEntry(7, 0, SIG, 0, (1 << 5) | (1 << 16) | (1 << 3), 1 << 2, 0),
    CpuidEntry(0xB, 0, SIG, 1, 2, 0x100, 7),
    CpuidEntry(0xB, 1, SIG, 4, 16, 0x201, 7),
    CpuidEntry(0xD, 0, SIG, 7, 0x340, 0x340, 0),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, *KVM_SIG),
    CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0),
    CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
    CpuidEntry(0x80000001, 0, 0, 0, 0, 0x121, 0x2C100800),
    CpuidEntry(0x80000008, 0, 0, 0x3027, 0, 0, 0),
]


def leaf(table, function, index=0):
    matches = [e for e in table if e.function == function and e.index == index]
    assert len(matches) == 1, (hex(function), index, matches)
    return matches[0]


def has_leaf(table, function):
    return any(e.function == function for e in table)


# -- topology --------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpu_index, vcpu_count", [(0, 1), (0, 2), (1, 2), (2, 3), (4, 5),
                                                    (63, 64)])
def test_apic_ids_and_topology(vcpu_index, vcpu_count):
    table = build_cpuid(HOST, vcpu_index=vcpu_index, vcpu_count=vcpu_count, hyperv=None)
    core_bits = (vcpu_count - 1).bit_length()
    leaf1 = leaf(table, 1)
    assert leaf1.ebx >> 24 == vcpu_index
    assert (leaf1.ebx >> 16) & 0xFF == 1 << core_bits
    assert leaf1.ebx & 0xFFFF == 0x0800  # brand index / CLFLUSH size kept
    assert bool(leaf1.edx & (1 << 28)) == (vcpu_count > 1)
    smt, core, end = leaf(table, 0xB, 0), leaf(table, 0xB, 1), leaf(table, 0xB, 2)
    assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (0, 1, 0x100, vcpu_index)
    assert (core.eax, core.ebx, core.ecx, core.edx) == (core_bits, vcpu_count, 0x201, vcpu_index)
    assert (end.eax, end.ebx, end.ecx & 0xFF00, end.edx) == (0, 0, 0, vcpu_index)
    assert all(e.flags & SIG for e in table if e.function == 0xB)
    assert not has_leaf(table, 0x1F)  # only rebuilt where the host has it
    l1d, l3 = leaf(table, 4, 0), leaf(table, 4, 3)
    assert l1d.eax >> 26 == (1 << core_bits) - 1 and (l1d.eax >> 14) & 0xFFF == 0
    assert (l3.eax >> 14) & 0xFFF == (1 << core_bits) - 1
    assert leaf(table, 4, 4).eax == 0


def test_leaf_1f_is_rebuilt_when_present():
    host = HOST + [CpuidEntry(0x1F, 0, SIG, 1, 2, 0x100, 3), CpuidEntry(0x1F, 1, SIG, 4, 8,
                                                                        0x201, 3)]
    table = build_cpuid(host, vcpu_index=3, vcpu_count=4, hyperv=None)
    assert [e.index for e in table if e.function == 0x1F] == [0, 1, 2]
    assert all(e.edx == 3 for e in table if e.function == 0x1F)


def test_amd_core_count():
    amd = regs(b"AuthenticAMD")
    host = [CpuidEntry(0, 0, 0, 0x10, amd[0], amd[2], amd[1]), CpuidEntry(1, 0, 0, 0, 0, 0, 0),
            CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x0000_700F, 0),
            CpuidEntry(0x8000001D, 0, SIG, 0x00000121, 0x01C0003F, 0x3F, 0),  # L1d
            CpuidEntry(0x8000001D, 3, SIG, 0x0003C163, 0x03C0003F, 0x7FFF, 1),  # L3, 16 sharing
            CpuidEntry(0x8000001E, 0, 0, 5, 0x105, 0x300, 0)]
    table = build_cpuid(host, vcpu_index=2, vcpu_count=3, hyperv=None)
    assert leaf(table, 0x80000008).ecx == (2 << 12) | 2
    assert (leaf(table, 0x8000001E).eax, leaf(table, 0x8000001E).ebx) == (2, 2)
    assert (leaf(table, 0x8000001D, 0).eax >> 14) & 0xFFF == 0
    assert leaf(table, 0x8000001D, 3).eax == 0x0000C163  # 4 addressable cores share the L3


def test_bad_vcpu_index():
    with pytest.raises(CpuidError, match="vCPU index 2 outside 0..1"):
        build_cpuid(HOST, vcpu_index=2, vcpu_count=2, hyperv=None)


# -- hypervisor leaves ------------------------------------------------------------------------


def test_hypervisor_bit_always_set():
    host = [e if e.function != 1 else CpuidEntry(1, 0, 0, 0, 0, 0, 0) for e in HOST]
    for hyperv in (None, parse_hyperv_spec("none"), parse_hyperv_spec("minimal")):
        table = build_cpuid(host, vcpu_index=0, vcpu_count=1, hyperv=hyperv)
        assert leaf(table, 1).ecx & (1 << 31)


def test_plain_kvm_machine_keeps_kvm_leaves():
    for hyperv in (None, parse_hyperv_spec("none")):
        table = build_cpuid(HOST, vcpu_index=0, vcpu_count=1, hyperv=hyperv)
        kvm = leaf(table, 0x40000000)
        assert (kvm.ebx, kvm.ecx, kvm.edx) == KVM_SIG


def test_hyperv_replaces_every_kvm_leaf():
    host = HOST + [CpuidEntry(0x40000100, 0, 0, 0x40000101, *KVM_SIG),
                   CpuidEntry(0x4000FF00, 0, 0, 0, *KVM_SIG)]
    table = build_cpuid(host, vcpu_index=0, vcpu_count=2, hyperv=parse_hyperv_spec("minimal"))
    hypervisor_leaves = sorted(e.function for e in table if 0x40000000 <= e.function <= 0x4FFFFFFF)
    assert hypervisor_leaves == [*range(0x40000000, 0x4000000B), 0x40000080, 0x40000081,
                                 0x40000082]
    assert not any((e.ebx, e.ecx, e.edx) == KVM_SIG for e in table)
    assert table == sorted(table, key=lambda e: (e.function, e.index))


def test_identification_leaves():
    leaves = hyperv_cpuid_leaves(parse_hyperv_spec("minimal"), 4)
    vendor = leaf(leaves, 0x40000000)
    assert vendor.eax == HV_CPUID_MAX_LEAF == 0x40000006
    assert struct.pack("<III", vendor.ebx, vendor.ecx, vendor.edx) == b"Microsoft Hv"
    assert leaf(leaves, 0x40000001).eax == 0x31237648  # "Hv#1"
    version = leaf(leaves, 0x40000002)
    assert (version.eax, version.ebx, version.ecx, version.edx) == (0x3839, 0x000A0000, 0, 0)
    limits = leaf(leaves, 0x40000005)
    assert (limits.eax, limits.ebx, limits.ecx, limits.edx) == (4, 4, 0, 0)
    for zero in (0x40000006, 0x40000007, 0x40000008, 0x40000009, 0x4000000A, 0x40000080,
                 0x40000081, 0x40000082):
        entry = leaf(leaves, zero)
        assert (entry.eax, entry.ebx, entry.ecx, entry.edx) == (0, 0, 0, 0), hex(zero)
    assert hyperv_cpuid_leaves(parse_hyperv_spec("none"), 4) == []


# Exact 0x40000003 EAX/EBX/EDX and 0x40000004 EAX/EBX for each preset.
#   EAX: 0 VpRunTime, 1 RefCounter, 2 SynicRegs, 5 HypercallMsrs, 6 VpIndex, 7 Reset, 9 RefTsc,
#        10 GuestIdle, 11 Frequencies; EBX 4 PostMessages, 5 SignalEvents,
#        20 EnableExtendedHypercalls;
#   EDX: 4 XMM input, 5 guest idle, 8 frequencies, 10 crash, 14 extended GVA ranges for
#        flushes, 18 hypercall MSR lock;
#   hints EAX 2 remote TLB flush, 5 relaxed, 9 deprecate AutoEOI, 10 cluster IPI, 11 Ex masks.
@pytest.mark.parametrize("spec, eax, ebx, edx, hints", [
    ("minimal", 0x060, 0, 0x40000, 0),
    ("linux", 0xE6E, 0x100030, 0xC0520, 0xE24),
    ("windows", 0xE6F, 0x100030, 0x40520, 0xE24),
    ("all", 0xEEF, 0x100030, 0xC4530, 0xE24),  # + hv-stimer (EAX 3), hv-stimer-direct (EDX 19)
    (None, 0xEEF, 0x100030, 0xC4530, 0xE24),
    ("hv-vpindex,hv-reset", 0x0E0, 0, 0x40000, 0),
    ("hv-vpindex,hv-relaxed", 0x060, 0, 0x40000, 0x20),
    ("hv-spinlocks=0xfff", 0x020, 0, 0x40000, 0),
])
def test_preset_bits(spec, eax, ebx, edx, hints):
    leaves = hyperv_cpuid_leaves(parse_hyperv_spec(spec), 2)
    features = leaf(leaves, 0x40000003)
    assert (hex(features.eax), hex(features.ebx), features.ecx, hex(features.edx)) == (
        hex(eax), hex(ebx), 0, hex(edx))
    recommendations = leaf(leaves, 0x40000004)
    assert recommendations.eax == hints
    assert recommendations.ecx == recommendations.edx == 0


def test_linux_preset_matches_the_documented_dmesg_line():
    # arch/x86/kernel/cpu/mshyperv.c prints
    # "Hyper-V: privilege flags low %#x, high %#x, hints %#x, misc %#x"
    leaves = hyperv_cpuid_leaves(parse_hyperv_spec("linux"), 2)
    f, h = leaf(leaves, 0x40000003), leaf(leaves, 0x40000004)
    line = f"privilege flags low {f.eax:#x}, high {f.ebx:#x}, hints {h.eax:#x}, misc {f.edx:#x}"
    # Only the bits Linux 6.1 reads give "low 0xe6a, high 0x0, hints 0xe24, misc 0x80508".
    # The hints are the same. The rest differs where hvvmm differs: SynIC (bit 2; QEMU's rules
    # make stimers need it) with PostMessages/SignalEvents (EBX 4/5), extended hypercalls
    # (EBX 20), guest idle paired with EDX bit 5 as the TLFS says, the HYPERCALL lock bit
    # (EDX 18), and no CPU hot-add (EDX 3: hvvmm has none).
    assert line == "privilege flags low 0xe6e, high 0x100030, hints 0xe24, misc 0xc0520"


def test_forbidden_privileges_are_never_set():
    # Microsoft's "Requirements for Implementing the Microsoft Hypervisor Interface" (REQ):
    # CreatePartitions, AccessPartitionId, AccessMemoryPool, AdjustMessageBuffers,
    # CreatePort, AccessStats, CpuManagement, ConfigureProfiler must be 0.
    forbidden_ebx = sum(1 << bit for bit in (0, 1, 2, 3, 6, 8, 12, 13, 22))
    for spec in (None, "linux", "windows", "minimal"):
        assert leaf(hyperv_cpuid_leaves(parse_hyperv_spec(spec), 1), 0x40000003).ebx \
            & forbidden_ebx == 0


def test_spin_count_vendor_and_version_options():
    config = parse_hyperv_spec("minimal,hv-spinlocks=0x1fff,hv-vendor-id=ABC,"
                               "hv-version-id-sbranch=3,hv-version-id-snumber=0x12")
    leaves = hyperv_cpuid_leaves(config, 1)
    assert leaf(leaves, 0x40000004).ebx == 0x1FFF
    assert leaf(leaves, 0x40000004).ebx != 0xFFFF_FFFF
    vendor = leaf(leaves, 0x40000000)
    assert struct.pack("<III", vendor.ebx, vendor.ecx, vendor.edx) == b"ABC" + b"\0" * 9
    assert leaf(leaves, 0x40000002).edx == (3 << 24) | 0x12
    assert leaf(hyperv_cpuid_leaves(parse_hyperv_spec("minimal"), 1), 0x40000004).ebx \
        == 0xFFFF_FFFF


# -- host feature masking ----------------------------------------------------------------------


def test_mask_hides_features_and_their_dependents():
    table = build_cpuid(HOST, vcpu_index=0, vcpu_count=1, hyperv=None,
                        cpu_features_mask="-cx16,-xsave")
    leaf1 = leaf(table, 1)
    assert not leaf1.ecx & (1 << 13)  # cx16
    assert not leaf1.ecx & (1 << 26)  # xsave
    assert not leaf1.ecx & (1 << 28)  # avx goes with xsave
    assert not leaf(table, 7).ebx & ((1 << 5) | (1 << 16))  # avx2, avx512f go with avx
    assert leaf(table, 7).ebx & (1 << 3)  # bmi1 stays
    assert leaf1.ecx & (1 << 21)  # x2apic stays


def test_mask_spellings_and_other_leaves():
    table = build_cpuid(HOST, vcpu_index=0, vcpu_count=1, hyperv=None,
                        cpu_features_mask=" -TSC-Deadline , -lahf-lm,-umip, +x2apic")
    assert not leaf(table, 1).ecx & (1 << 24)
    assert not leaf(table, 0x80000001).ecx & 1
    assert not leaf(table, 7).ecx & (1 << 2)


@pytest.mark.parametrize("mask, message", [
    ("-frobnicate", "unknown CPU feature 'frobnicate'"),
    ("cx16", "needs a sign"),
    ("+avx512f,-avx512f", "both hidden and required"),
    ("-osxsave", "cannot mask 'osxsave'"),
])
def test_mask_errors(mask, message):
    with pytest.raises(CpuidError, match=message):
        parse_cpu_features_mask(mask)


def test_requiring_a_missing_feature_is_an_error():
    with pytest.raises(CpuidError, match="the host does not support 'sha'"):
        build_cpuid(HOST, vcpu_index=0, vcpu_count=1, hyperv=None, cpu_features_mask="+sha")


def test_hypervisor_bit_cannot_be_hidden_with_hyperv_on():
    with pytest.raises(CpuidError, match="cannot hide 'hypervisor' while Hyper-V is on"):
        build_cpuid(HOST, vcpu_index=0, vcpu_count=1, hyperv=parse_hyperv_spec("minimal"),
                    cpu_features_mask="-hypervisor")
    table = build_cpuid(HOST, vcpu_index=0, vcpu_count=1, hyperv=parse_hyperv_spec("none"),
                        cpu_features_mask="-hypervisor")
    assert not leaf(table, 1).ecx & (1 << 31)


def test_feature_table_has_no_collisions():
    seen = {}
    for feature in CPU_FEATURES.values():
        key = (feature.leaf, feature.subleaf, feature.register, feature.bit)
        assert key not in seen, (feature.name, seen.get(key))
        seen[key] = feature.name


# -- printing ------------------------------------------------------------------------------------


def test_format_names_every_hyperv_bit():
    table = build_cpuid(HOST, vcpu_index=1, vcpu_count=2, hyperv=parse_hyperv_spec("linux"))
    text = format_cpuid_table(table)
    for expected in ("vendor 'Microsoft Hv'", "interface 'Hv#1'", "version 10.0 build 14393",
                     "AccessHypercallMsrs", "AccessVpIndex", "AccessPartitionReferenceTsc",
                     "EnableExtendedHypercalls", "HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE",
                     "HV_X64_RELAXED_TIMING_RECOMMENDED", "spinlock retries: never notify",
                     "max VPs 2", "initial APIC ID 1", "x2apic", "hypervisor",
                     "level 1 (core)"):
        assert expected in text, expected
    assert "KVMKVMKVM" not in text
    assert format_cpuid_table([]) == ""


def test_extended_leaf_0x80000001_bits_are_named():
    # Intel SDM Vol. 2A CPUID 80000001H and AMD APM Vol. 3 Fn8000_0001: every defined bit by name.
    from hvvmm.cpuid import CpuidEntry, format_cpuid_table

    text = format_cpuid_table([CpuidEntry(0x8000_0001, ecx=0x3DEB_BFFF, edx=0xEFD3_FBFF)])
    ecx_line = next(line for line in text.splitlines() if line.strip().startswith("ecx:"))
    edx_line = next(line for line in text.splitlines() if line.strip().startswith("edx:"))
    assert "bit" not in ecx_line and "bit" not in edx_line, text
    for name in ("lahf_lm", "cmp_legacy", "svm", "abm", "prefetchw", "xop", "fma4", "mwaitx"):
        assert f" {name}" in ecx_line
    for name in ("fpu", "cmov", "syscall", "nx", "pdpe1gb", "rdtscp", "lm", "3dnow"):
        assert f" {name}" in edx_line


@pytest.mark.parametrize("vcpu_count", [65, 100, 128, 200, 255])
def test_many_vcpus_fit_the_registers(vcpu_count):
    # Up to hvvmm's 255 vCPUs every register is 32 bits; leaf 4's six-bit core count saturates.
    table = build_cpuid(HOST, vcpu_index=vcpu_count - 1, vcpu_count=vcpu_count, hyperv=None)
    assert all(getattr(e, r) >> 32 == 0 for e in table for r in ("eax", "ebx", "ecx", "edx"))
    l1d, l3 = leaf(table, 4, 0), leaf(table, 4, 3)
    assert l1d.eax >> 26 == 63 and l1d.eax & 0x3FFF == 0x0121
    assert (l3.eax >> 14) & 0xFFF == (1 << (vcpu_count - 1).bit_length()) - 1
