"""The guest's CPUID table: the host's supported CPUID, per-vCPU topology, feature masking, and
the Hyper-V leaves 0x40000000+ built from the enabled enlightenments.

:func:`build_cpuid` is what the VMM hands to ``KVM_SET_CPUID2`` for each vCPU. It starts from
``KVM_GET_SUPPORTED_CPUID`` and:

1. sets this vCPU's APIC ID with a sane topology -- one package, one thread per core, as many
   cores as vCPUs: leaf 1 EBX[31:24] (initial APIC ID) and EBX[23:16] (addressable IDs), leaves
   0xB/0x1F (x2APIC topology, EDX = x2APIC ID), leaf 4 EAX[31:26]/[25:14], and AMD's 0x80000008
   ECX, 0x8000001D and 0x8000001E. The IDs must match the MADT (Windows bugcheck 0x3E otherwise,
   cloud-hypervisor issue #5400);
2. sets the hypervisor-present bit (leaf 1 ECX[31]): without it no guest looks at 0x40000000+
   (TLFS ``feature-discovery.md``);
3. hides host features named in ``cpu_features_mask`` (``-cx16,-xsave``; features that depend
   on a hidden one are hidden with it, e.g. ``-xsave`` also hides AVX);
4. with Hyper-V on, removes every leaf of the hypervisor range 0x40000000-0x4FFFFFFF -- KVM's own
   "KVMKVMKVM" leaves in particular: Linux keeps the hypervisor whose signature sits at the highest
   base, so a KVM signature anywhere would win over Hyper-V (Linux
   ``arch/x86/kernel/cpu/hypervisor.c`` ``detect_hypervisor_vendor()``) -- and adds
   0x40000000-0x4000000A and 0x40000080-0x40000082 (:func:`hyperv_cpuid_leaves`).

The Hyper-V privilege/feature/recommendation bits come only from the enabled, implemented
enlightenments' declarations (:mod:`hvvmm.enlightenments`), the same declarations that register
the MSRs and hypercalls, so the guest is never told about something the VM does not do.

CPUID is frozen after the first ``KVM_RUN`` (Linux ``arch/x86/kvm/cpuid.c`` ``kvm_set_cpuid()``
then accepts only an identical table), so every leaf is final from reset.
Nothing here imports the KVM layer, nor does the KVM layer import this: it takes any entry with
``function``, ``index``, ``flags`` and the four registers, and gives back plain tuples.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from hvvmm.enlightenments import REGISTRY, EnlightenmentRegistry
from hvvmm.hv.features import HyperVConfig
from hvvmm.hv.hvdef import (
    HV_HARDWARE_NESTING_LEVEL_MASK,
    HV_NO_VP_LIMIT,
    HV_SPINLOCK_NEVER_NOTIFY,
    HYPERV_CPUID_ENLIGHTMENT_INFO,
    HYPERV_CPUID_FEATURES,
    HYPERV_CPUID_HARDWARE_FEATURES,
    HYPERV_CPUID_IMPLEMENT_LIMITS,
    HYPERV_CPUID_INTERFACE,
    HYPERV_CPUID_NESTED_FEATURES,
    HYPERV_CPUID_SIGNATURE_EAX,
    HYPERV_CPUID_SYNDBG_PLATFORM_CAPABILITIES,
    HYPERV_CPUID_SYNDBG_VENDOR_AND_MAX_FUNCTIONS,
    HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS,
    HYPERV_CPUID_VERSION,
    HYPERV_HYPERVISOR_PRESENT_BIT,
    HvEnlightenmentInformation,
    HvFeatures,
    HvHardwareFeatures,
    HvPartitionPrivilege,
)

KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1  # KVM spells it KVM_CPUID_FLAG_SIGNIFCANT_INDEX
HYPERVISOR_RANGE = (0x4000_0000, 0x4FFF_FFFF)  # KVM_XEN/KVM/Hyper-V leaves all live here
# Max hypervisor leaf reported in 0x40000000 EAX: 0x40000006 (hardware features, zero) as Xen. Not
# 0x4000000A: hvvmm has no nested support, and advertising the nested leaf broke Windows 11 with
# VBS (openvmm #3646). Leaves up to 0x4000000A exist anyway, all zero, so a guest probing them
# reads zeros rather than KVM's out-of-range answer (the max basic leaf, on Intel).
HV_CPUID_MAX_LEAF = HYPERV_CPUID_HARDWARE_FEATURES
_U32 = 0xFFFF_FFFF


class CpuidError(ValueError):
    """A CPUID request hvvmm cannot build (unknown feature name, feature the host lacks, ...)."""


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf (``struct kvm_cpuid_entry2``): ``function`` is the leaf (EAX in),
    ``index`` the subleaf (ECX in), ``flags`` KVM's (bit 0: the index is significant)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def register(self, name: str) -> int:
        return getattr(self, name)


# --------------------------------------------------------------------------------------------
# Host feature names (Linux /proc/cpuinfo spellings; Intel SDM vol. 2A CPUID; AMD APM vol. 3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuFeature:
    name: str
    leaf: int
    subleaf: int
    register: str
    bit: int


def _features(leaf: int, subleaf: int, register: str, names: dict[str, int]) -> list[CpuFeature]:
    return [CpuFeature(name, leaf, subleaf, register, bit) for name, bit in names.items()]


CPU_FEATURES: dict[str, CpuFeature] = {f.name: f for f in [
    *_features(1, 0, "ecx", {
        "sse3": 0, "pclmulqdq": 1, "monitor": 3, "vmx": 5, "ssse3": 9, "fma": 12, "cx16": 13,
        "pcid": 17, "sse4_1": 19, "sse4_2": 20, "x2apic": 21, "movbe": 22, "popcnt": 23,
        "tsc_deadline": 24, "aes": 25, "xsave": 26, "osxsave": 27, "avx": 28, "f16c": 29,
        "rdrand": 30, "hypervisor": 31}),
    *_features(1, 0, "edx", {
        "fpu": 0, "vme": 1, "de": 2, "pse": 3, "tsc": 4, "msr": 5, "pae": 6, "mce": 7, "cx8": 8,
        "apic": 9, "sep": 11, "mtrr": 12, "pge": 13, "mca": 14, "cmov": 15, "pat": 16,
        "pse36": 17, "clflush": 19, "mmx": 23, "fxsr": 24, "sse": 25, "sse2": 26, "ht": 28}),
    *_features(7, 0, "ebx", {
        "fsgsbase": 0, "tsc_adjust": 1, "bmi1": 3, "avx2": 5, "smep": 7, "bmi2": 8, "erms": 9, "invpcid": 10,
        "avx512f": 16, "rdseed": 18, "adx": 19, "smap": 20, "clflushopt": 23, "clwb": 24, "sha": 29}),
    *_features(7, 0, "ecx", {"umip": 2, "pku": 3, "la57": 16, "rdpid": 22}),
    *_features(0x8000_0001, 0, "ecx", {
        "lahf_lm": 0, "cmp_legacy": 1, "svm": 2, "extapic": 3, "cr8_legacy": 4, "abm": 5,
        "sse4a": 6, "misalignsse": 7, "prefetchw": 8, "osvw": 9, "ibs": 10, "xop": 11,
        "skinit": 12, "wdt": 13, "lwp": 15, "fma4": 16, "tce": 17, "nodeid_msr": 19, "tbm": 21,
        "topoext": 22, "perfctr_core": 23, "perfctr_nb": 24, "bpext": 26, "ptsc": 27,
        "perfctr_llc": 28, "mwaitx": 29}),
    *_features(0x8000_0001, 0, "edx", {
        "syscall": 11, "mp": 19, "nx": 20, "mmxext": 22, "fxsr_opt": 25, "pdpe1gb": 26,
        "rdtscp": 27, "lm": 29, "3dnowext": 30, "3dnow": 31}),
]}

# AMD repeats these leaf-1 EDX bits in leaf 0x80000001 EDX (AMD64 APM Vol. 3, CPUID
# Fn8000_0001_EDX); named there for printing, hidden through their leaf-1 name.
_AMD_EDX_MIRRORED = {f.bit: f.name for f in CPU_FEATURES.values()
                     if (f.leaf, f.register) == (1, "edx")
                     and f.bit in (*range(10), *range(12, 18), 23, 24)}

# Hiding a feature hides what cannot work without it (as Linux's cpuid-deps and QEMU do).
_IMPLIED_HIDDEN = {
    "xsave": ("avx",),
    "avx": ("fma", "f16c", "avx2"),
    "avx2": ("avx512f",),
    "apic": ("x2apic", "tsc_deadline"),
}
_UNMASKABLE = {
    "osxsave": "osxsave mirrors the guest's CR4.OSXSAVE (KVM computes it); hide xsave instead",
    "ht": "ht is derived from the vCPU topology",
}


def normalize_cpu_feature(name: str) -> str:
    """``SSE4.1`` / ``sse4-1`` / ``tsc-deadline`` -> ``sse4_1`` / ``tsc_deadline``."""
    return name.strip().lower().replace("-", "_").replace(".", "_")


@dataclass(frozen=True)
class CpuFeatureMask:
    """Parsed ``--cpu-features``: features to hide and features that must be present."""

    hide: frozenset[str] = frozenset()
    require: frozenset[str] = frozenset()


def parse_cpu_features_mask(spec: str | None) -> CpuFeatureMask:
    """Parse ``-name,+name,...``. ``-name`` hides a host feature (plus what depends on it);
    ``+name`` only asserts the host has it (hvvmm never invents features)."""
    hide: set[str] = set()
    require: set[str] = set()
    for raw in (spec or "").split(","):
        item = raw.strip()
        if not item:
            continue
        sign, name = item[0], normalize_cpu_feature(item[1:])
        if sign not in "+-":
            raise CpuidError(f"CPU feature {item!r} needs a sign: '-{item}' hides it, '+{item}' "
                             "requires the host to have it")
        if name not in CPU_FEATURES:
            known = ", ".join(sorted(CPU_FEATURES))
            raise CpuidError(f"unknown CPU feature {name!r} (known: {known})")
        if name in _UNMASKABLE:
            raise CpuidError(f"cannot mask {name!r}: {_UNMASKABLE[name]}")
        if sign == "-":
            stack = [name]
            while stack:
                current = stack.pop()
                if current not in hide:
                    hide.add(current)
                    stack.extend(_IMPLIED_HIDDEN.get(current, ()))
        else:
            require.add(name)
    clash = hide & require
    if clash:
        raise CpuidError(f"CPU feature(s) {', '.join(sorted(clash))} both hidden and required")
    return CpuFeatureMask(frozenset(hide), frozenset(require))


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _find(entries: Sequence[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    for entry in entries:
        if entry.function == function and (
                entry.index == index or not entry.flags & KVM_CPUID_FLAG_SIGNIFICANT_INDEX):
            return entry
    return None


def _vendor(entries: Sequence[CpuidEntry]) -> bytes:
    leaf0 = _find(entries, 0)
    if leaf0 is None:
        return b""
    return struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx)


def _core_bits(vcpu_count: int) -> int:
    """Bits of the APIC ID that number the cores (ceil(log2(count)))."""
    return max(vcpu_count - 1, 0).bit_length()


def _topology(entries: list[CpuidEntry], vcpu_index: int, vcpu_count: int) -> list[CpuidEntry]:
    """One package, ``vcpu_count`` cores, one thread each; APIC ID = x2APIC ID = vcpu_index."""
    core_bits = _core_bits(vcpu_count)
    addressable = 1 << core_bits
    amd = _vendor(entries) in (b"AuthenticAMD", b"HygonGenuine")
    out: list[CpuidEntry] = []
    for entry in entries:
        if entry.function == 1:
            ebx = (entry.ebx & 0x0000_FFFF) | (min(addressable, 0xFF) << 16) | (
                (vcpu_index & 0xFF) << 24)
            # HTT means "EBX[23:16] is valid"; Linux and QEMU set it for more than one CPU.
            edx = entry.edx | (1 << 28) if vcpu_count > 1 else entry.edx & ~(1 << 28)
            entry = replace(entry, ebx=ebx, edx=edx)
        elif entry.function in (0xB, 0x1F):
            continue  # rebuilt below
        elif entry.function == 4 and entry.eax & 0x1F:  # a cache descriptor (type != 0)
            level = (entry.eax >> 5) & 0x7
            sharing = addressable - 1 if level >= 3 else 0  # L1/L2 per core, L3 per package
            # EAX[31:26] is cores per package - 1 in six bits (Intel SDM Vol. 2A, CPUID leaf
            # 04H): more than 64 cores saturate at 63, as on real many-core parts.
            eax = (entry.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | \
                ((min(addressable, 64) - 1) << 26)
            entry = replace(entry, eax=eax)
        elif entry.function == 0x8000_0008 and amd:
            ecx = (entry.ecx & ~0xF0FF) | (core_bits << 12) | ((vcpu_count - 1) & 0xFF)
            entry = replace(entry, ecx=ecx)
        elif entry.function == 0x8000_001D and amd and entry.eax & 0x1F:  # AMD cache topology
            level = (entry.eax >> 5) & 0x7
            sharing = addressable - 1 if level >= 3 else 0
            entry = replace(entry, eax=(entry.eax & ~(0xFFF << 14)) | (sharing << 14))
        elif entry.function == 0x8000_001E and amd:
            entry = replace(entry, eax=vcpu_index, ebx=vcpu_index & 0xFF, ecx=0)
        out.append(entry)
    for leaf in (0xB, 0x1F):
        if any(e.function == leaf for e in entries):
            out.extend(_x2apic_topology_leaf(leaf, vcpu_index, core_bits, vcpu_count))
    return out


def _x2apic_topology_leaf(leaf: int, vcpu_index: int, core_bits: int, vcpu_count: int
                          ) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F subleaves: 0 = SMT (1 thread), 1 = core (all vCPUs), 2 = end marker."""
    flags = KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    return [
        # EAX[4:0]: shift to the next level's ID; EBX: logical processors at this level;
        # ECX[15:8]: level type (1 SMT, 2 core), ECX[7:0]: subleaf; EDX: x2APIC ID.
        CpuidEntry(leaf, 0, flags, 0, 1, (1 << 8) | 0, vcpu_index),
        CpuidEntry(leaf, 1, flags, core_bits, vcpu_count, (2 << 8) | 1, vcpu_index),
        CpuidEntry(leaf, 2, flags, 0, 0, 2, vcpu_index),
    ]


def _apply_mask(entries: list[CpuidEntry], mask: CpuFeatureMask) -> list[CpuidEntry]:
    for name in sorted(mask.require):
        feature = CPU_FEATURES[name]
        entry = _find(entries, feature.leaf, feature.subleaf)
        if entry is None or not entry.register(feature.register) >> feature.bit & 1:
            raise CpuidError(f"the host does not support {name!r}; '+{name}' can only require "
                             "features the host has")
    hidden: dict[tuple[int, int, str], int] = {}
    for name in mask.hide:
        feature = CPU_FEATURES[name]
        key = (feature.leaf, feature.subleaf, feature.register)
        hidden[key] = hidden.get(key, 0) | (1 << feature.bit)
    out = []
    for entry in entries:
        for (leaf, subleaf, register), bits in hidden.items():
            if entry.function == leaf and entry.index == subleaf:
                entry = replace(entry, **{register: entry.register(register) & ~bits})
        out.append(entry)
    return out


def physical_address_bits(entries: Sequence[CpuidEntry]) -> int:
    """MAXPHYADDR the guest sees: CPUID 0x80000008 EAX[7:0], or 36 where the leaf is missing
    (Intel SDM Vol. 3A §4.1.4)."""
    entry = _find(entries, 0x8000_0008)
    bits = entry.eax & 0xFF if entry is not None else 0
    return bits if 32 <= bits <= 52 else 36


def build_cpuid(supported: Sequence[CpuidEntry], *, vcpu_index: int, vcpu_count: int,
                hyperv: HyperVConfig | None, cpu_features_mask: str | CpuFeatureMask | None = None,
                registry: EnlightenmentRegistry = REGISTRY) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_index`` of ``vcpu_count`` (see the module docstring).

    ``supported`` is ``KVM_GET_SUPPORTED_CPUID``; ``hyperv`` None or disabled gives a plain KVM
    machine (KVM's own PV leaves stay). Raises :class:`CpuidError`."""
    if not 0 <= vcpu_index < vcpu_count:
        raise CpuidError(f"vCPU index {vcpu_index} outside 0..{vcpu_count - 1}")
    mask = cpu_features_mask if isinstance(cpu_features_mask, CpuFeatureMask) else \
        parse_cpu_features_mask(cpu_features_mask)
    hyperv_on = hyperv is not None and hyperv.enabled
    if hyperv_on and "hypervisor" in mask.hide:
        raise CpuidError("cannot hide 'hypervisor' while Hyper-V is on: guests only read the "
                         "Hyper-V leaves when CPUID.1:ECX[31] is set")
    entries = [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
               for e in supported]
    entries = _topology(entries, vcpu_index, vcpu_count)
    entries = [replace(e, ecx=e.ecx | HYPERV_HYPERVISOR_PRESENT_BIT) if e.function == 1 else e
               for e in entries]
    entries = _apply_mask(entries, mask)
    if hyperv_on:
        assert hyperv is not None
        low, high = HYPERVISOR_RANGE
        entries = [e for e in entries if not low <= e.function <= high]
        entries.extend(hyperv_cpuid_leaves(hyperv, vcpu_count, registry=registry))
    return sorted(entries, key=lambda e: (e.function, e.index))


def hyperv_cpuid_leaves(config: HyperVConfig, vcpu_count: int, *,
                        registry: EnlightenmentRegistry = REGISTRY) -> list[CpuidEntry]:
    """The Hyper-V leaves for ``config`` (TLFS ``feature-discovery.md``)."""
    if not config.enabled:
        return []
    bits = registry.cpuid_bits(config.features)

    def reg(leaf: int, register: str) -> int:
        return bits.get((leaf, register), 0)

    vendor_ebx, vendor_ecx, vendor_edx = struct.unpack(
        "<III", config.vendor_id.encode("ascii").ljust(12, b"\0"))
    build, version, service_pack, service = config.version.cpuid()
    leaves = [
        # "Microsoft Hv" (Linux accepts nothing else), max leaf within [0x40000005, 0x4000FFFF].
        CpuidEntry(HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS, eax=HV_CPUID_MAX_LEAF, ebx=vendor_ebx,
                   ecx=vendor_ecx, edx=vendor_edx),
        # "Hv#1": implies GUEST_OS_ID, HYPERCALL and VP_INDEX (TLFS).
        CpuidEntry(HYPERV_CPUID_INTERFACE, eax=HYPERV_CPUID_SIGNATURE_EAX),
        CpuidEntry(HYPERV_CPUID_VERSION, eax=build, ebx=version, ecx=service_pack, edx=service),
        # Privileges (EAX/EBX) and features (EDX) of exactly the enabled enlightenments; ECX
        # (power management) stays 0.
        CpuidEntry(HYPERV_CPUID_FEATURES, eax=reg(HYPERV_CPUID_FEATURES, "eax"),
                   ebx=reg(HYPERV_CPUID_FEATURES, "ebx"), ecx=reg(HYPERV_CPUID_FEATURES, "ecx"),
                   edx=reg(HYPERV_CPUID_FEATURES, "edx")),
        # Recommendations; EBX = spinlock retries (0xFFFFFFFF never notify); ECX 6:0 physical
        # address bits, 0 = not reported.
        CpuidEntry(HYPERV_CPUID_ENLIGHTMENT_INFO, eax=reg(HYPERV_CPUID_ENLIGHTMENT_INFO, "eax"),
                   ebx=config.spinlock_retries),
        # Limits: max VPs and max logical processors = the VM's vCPUs. 0xFFFFFFFF ("no limit",
        # HV_NO_VP_LIMIT) is allowed with the Ex hypercalls, but a real count costs nothing and
        # tells the guest the truth; ECX (interrupt-remapping vectors) not reported.
        CpuidEntry(HYPERV_CPUID_IMPLEMENT_LIMITS, eax=vcpu_count, ebx=vcpu_count),
        # Hardware features in use: informational; hvvmm cannot tell what the host KVM uses, so
        # zero, as QEMU.
        CpuidEntry(HYPERV_CPUID_HARDWARE_FEATURES),
    ]
    leaves.extend(CpuidEntry(leaf) for leaf in range(HYPERV_CPUID_HARDWARE_FEATURES + 1,
                                                      HYPERV_CPUID_NESTED_FEATURES + 1))
    # Linux reads 0x40000081 unconditionally (ms_hyperv_msi_ext_dest_id): explicit zeros, not
    # KVM's out-of-range answer (Linux arch/x86/kvm/cpuid.c get_out_of_range_cpuid_entry()).
    syndbg_first = HYPERV_CPUID_SYNDBG_VENDOR_AND_MAX_FUNCTIONS
    syndbg_last = HYPERV_CPUID_SYNDBG_PLATFORM_CAPABILITIES
    leaves.extend(CpuidEntry(leaf) for leaf in range(syndbg_first, syndbg_last + 1))
    return leaves


# --------------------------------------------------------------------------------------------
# Printing (``hvvmm cpuid``)
# --------------------------------------------------------------------------------------------


def _flag_names(flags_type, value: int) -> list[str]:
    names = []
    for bit in range(64):
        if value >> bit & 1:
            try:
                member = flags_type(1 << bit)
                names.append(member.name or f"bit{bit}")
            except ValueError:
                names.append(f"bit{bit}")
    return names


def _cpu_feature_names(entry: CpuidEntry, register: str) -> list[str]:
    value = entry.register(register)
    names = {f.bit: f.name for f in CPU_FEATURES.values()
             if f.leaf == entry.function and f.subleaf == entry.index and f.register == register}
    if (entry.function, register) == (0x8000_0001, "edx"):
        names = {**_AMD_EDX_MIRRORED, **names}
    return [names.get(bit, f"bit{bit}") for bit in range(32) if value >> bit & 1]


def _text(*registers: int) -> str:
    raw = b"".join(struct.pack("<I", r & _U32) for r in registers)
    return raw.rstrip(b"\0").decode("ascii", errors="replace")


def describe_cpuid_entry(entry: CpuidEntry) -> list[str]:
    """Decoded lines for one entry (empty for leaves without a decoder)."""
    f = entry.function
    lines: list[str] = []
    if f == 0:
        vendor = _text(entry.ebx, entry.edx, entry.ecx)
        lines.append(f"max basic leaf {entry.eax:#x}, vendor {vendor!r}")
    elif f == 1:
        lines.append(f"initial APIC ID {entry.ebx >> 24}, "
                     f"addressable IDs {(entry.ebx >> 16) & 0xFF}")
        lines.append("ecx: " + " ".join(_cpu_feature_names(entry, "ecx")))
        lines.append("edx: " + " ".join(_cpu_feature_names(entry, "edx")))
    elif f == 7 and entry.index == 0:
        lines.append("ebx: " + " ".join(_cpu_feature_names(entry, "ebx")))
        lines.append("ecx: " + " ".join(_cpu_feature_names(entry, "ecx")))
    elif f == 0x8000_0001:
        lines.append("ecx: " + " ".join(_cpu_feature_names(entry, "ecx")))
        lines.append("edx: " + " ".join(_cpu_feature_names(entry, "edx")))
    elif f in (0xB, 0x1F):
        kind = {0: "invalid", 1: "SMT", 2: "core"}.get((entry.ecx >> 8) & 0xFF, "other")
        lines.append(f"level {entry.ecx & 0xFF} ({kind}): shift {entry.eax & 0x1F}, "
                     f"{entry.ebx & 0xFFFF} logical, x2APIC ID {entry.edx}")
    elif f == HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS:
        lines.append(f"max hypervisor leaf {entry.eax:#x}, vendor "
                     f"{_text(entry.ebx, entry.ecx, entry.edx)!r}")
    elif f == HYPERV_CPUID_INTERFACE:
        lines.append(f"interface {_text(entry.eax)!r}")
    elif f == HYPERV_CPUID_VERSION:
        lines.append(f"version {entry.ebx >> 16}.{entry.ebx & 0xFFFF} build {entry.eax} "
                     f"SP{entry.ecx} branch {entry.edx >> 24} number {entry.edx & 0xFFFFFF}")
    elif f == HYPERV_CPUID_FEATURES:
        privileges = HvPartitionPrivilege.from_cpuid(entry.eax, entry.ebx)
        lines.append("privileges: " + (" ".join(_flag_names(HvPartitionPrivilege,
                                                            int(privileges))) or "none"))
        lines.append("features (edx): " + (" ".join(_flag_names(HvFeatures, entry.edx))
                                           or "none"))
        if entry.ecx:
            lines.append(f"power (ecx): {entry.ecx:#x}")
    elif f == HYPERV_CPUID_ENLIGHTMENT_INFO:
        lines.append("recommendations: " + (" ".join(
            _flag_names(HvEnlightenmentInformation, entry.eax)) or "none"))
        spin = "never notify" if entry.ebx == HV_SPINLOCK_NEVER_NOTIFY else f"{entry.ebx:#x}"
        lines.append(f"spinlock retries: {spin}")
    elif f == HYPERV_CPUID_IMPLEMENT_LIMITS:
        vps = "no limit" if entry.eax == HV_NO_VP_LIMIT else str(entry.eax)
        lines.append(f"max VPs {vps}, max logical processors {entry.ebx}, "
                     f"interrupt vectors {entry.ecx}")
    elif f == HYPERV_CPUID_HARDWARE_FEATURES:
        names = _flag_names(HvHardwareFeatures, entry.eax & ~HV_HARDWARE_NESTING_LEVEL_MASK)
        lines.append("hardware features: " + (" ".join(names) or "none"))
    return lines


def format_cpuid_table(entries: Iterable[CpuidEntry]) -> str:
    """The table, one entry per line, with the bits of known leaves named (``hvvmm cpuid``)."""
    out = []
    for entry in sorted(entries, key=lambda e: (e.function, e.index)):
        out.append(f"{entry.function:#010x}.{entry.index:<2x} eax={entry.eax:08x} "
                   f"ebx={entry.ebx:08x} ecx={entry.ecx:08x} edx={entry.edx:08x}")
        out.extend(f"    {line}" for line in describe_cpuid_entry(entry))
    return "\n".join(out) + ("\n" if out else "")
