"""Which CPU features a guest has, and the Linux command-line options that keep a Linux guest
away from the instructions an emulating KVM cannot run.

On a host whose KVM runs guest ring 0 in its instruction emulator (no VT-x/AMD-V visible, or
PVM), the guest's CPUID leaf 1 ECX and leaf 7 may come from the host CPU whatever
``KVM_SET_CPUID2`` says, so hiding features from the vCPU does not stop a kernel from using them.
Linux itself can be told: ``noxsave`` (no XSAVE, hence no AVX state) and ``clearcpuid=`` with the
bit numbers of ``arch/x86/include/asm/cpufeatures.h`` ("Disable CPUID feature X for the kernel",
``Documentation/admin-guide/kernel-parameters.txt``). Linux 5.19 and later also take the
/proc/cpuinfo names there (commit 1625c833db93, "x86/cpu: Allow feature bit names from
/proc/cpuinfo in clearcpuid="); the numbers work in every version, so hvvmm gives numbers. Using
clearcpuid taints the kernel (same commit); that is the price of booting on such a host.
"""

from __future__ import annotations

from typing import Iterable

from ..cpuid import CPU_FEATURES, CpuidEntry

# X86_FEATURE_* = word * 32 + bit, Linux 6.1 arch/x86/include/asm/cpufeatures.h: word 4 is
# CPUID 1 ECX, word 6 CPUID 0x80000001 ECX, word 9 CPUID 7.0 EBX (the same since Linux 4.x).
LINUX_FEATURE_BITS = {
    "ssse3": 4 * 32 + 9,        # X86_FEATURE_SSSE3
    "fma": 4 * 32 + 12,         # X86_FEATURE_FMA
    "cx16": 4 * 32 + 13,        # X86_FEATURE_CX16
    "sse4_1": 4 * 32 + 19,      # X86_FEATURE_XMM4_1
    "sse4_2": 4 * 32 + 20,      # X86_FEATURE_XMM4_2
    "popcnt": 4 * 32 + 23,      # X86_FEATURE_POPCNT
    "aes": 4 * 32 + 25,         # X86_FEATURE_AES
    "pclmulqdq": 4 * 32 + 1,    # X86_FEATURE_PCLMULQDQ
    "avx": 4 * 32 + 28,         # X86_FEATURE_AVX
    "f16c": 4 * 32 + 29,        # X86_FEATURE_F16C
    "rdrand": 4 * 32 + 30,      # X86_FEATURE_RDRAND
    "abm": 6 * 32 + 5,          # X86_FEATURE_ABM (LZCNT)
    "fsgsbase": 9 * 32 + 0,     # X86_FEATURE_FSGSBASE
    "bmi1": 9 * 32 + 3,         # X86_FEATURE_BMI1
    "avx2": 9 * 32 + 5,         # X86_FEATURE_AVX2
    "bmi2": 9 * 32 + 8,         # X86_FEATURE_BMI2
    "invpcid": 9 * 32 + 10,     # X86_FEATURE_INVPCID
    "avx512f": 9 * 32 + 16,     # X86_FEATURE_AVX512F
    "rdseed": 9 * 32 + 18,      # X86_FEATURE_RDSEED
    "adx": 9 * 32 + 19,         # X86_FEATURE_ADX
    "smap": 9 * 32 + 20,        # X86_FEATURE_SMAP
    "sha": 9 * 32 + 29,         # X86_FEATURE_SHA_NI
}

# What a kernel would use that KVM's instruction emulator lacks: SSSE3 and later SIMD (the
# kernel's crypto, RAID and string code use them where the CPU has them), POPCNT, CMPXCHG16B,
# SMAP's CLAC/STAC, the FS/GS base instructions, INVPCID, RDRAND/RDSEED and the BMI/ADX/LZCNT
# integer extensions. SSE2 stays: every x86-64 kernel needs it.
EMULATOR_UNSAFE_FEATURES = tuple(LINUX_FEATURE_BITS)


def feature_names(entries: Iterable[CpuidEntry]) -> frozenset[str]:
    """The :data:`hvvmm.cpuid.CPU_FEATURES` names whose bit is set in ``entries``: hvvmm's
    :class:`CpuidEntry` or what ``Kvm.supported_cpuid()`` returns (registers as attributes)."""
    table = {(entry.function, entry.index): entry for entry in entries}
    present = set()
    for name, feature in CPU_FEATURES.items():
        entry = table.get((feature.leaf, feature.subleaf))
        if entry is not None and getattr(entry, feature.register) >> feature.bit & 1:
            present.add(name)
    return frozenset(present)


# /proc/cpuinfo spellings that differ from hvvmm.cpuid's.
_CPUINFO_NAMES = {"sha_ni": "sha"}


def emulator_safe_linux_options(supported: Iterable[CpuidEntry], emulates_ring0: bool,
                                host_flags: Iterable[str] | None = None) -> str:
    """Linux command-line options for a guest on this host: ``""`` where KVM runs ring 0 on
    hardware (``emulates_ring0`` false: ``not host_virtualization().ring0_on_hardware``);
    else ``noxsave`` plus ``clearcpuid=`` with the bit number of each feature in
    :data:`EMULATOR_UNSAFE_FEATURES` that the guest may see, in ascending order.

    What the guest sees there is ``supported`` (``Kvm.supported_cpuid()``) *and* the host CPU's
    own flags (``host_flags``, /proc/cpuinfo by default): on a PVM host the guest reads leaf 1
    ECX and leaf 7 from the host CPU while KVM_GET_SUPPORTED_CPUID omits POPCNT, SMAP, SSSE3 and
    others (measured on the host this was written on)."""
    if not emulates_ring0:
        return ""
    if host_flags is None:
        from ..host import _cpu_flags

        host_flags = _cpu_flags()
    present = feature_names(supported) | {_CPUINFO_NAMES.get(flag, flag) for flag in host_flags}
    bits = sorted(LINUX_FEATURE_BITS[name] for name in EMULATOR_UNSAFE_FEATURES
                  if name in present)
    options = ["noxsave"]
    if bits:
        options.append("clearcpuid=" + ",".join(str(bit) for bit in bits))
    return " ".join(options)
