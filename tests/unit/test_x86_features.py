"""The Linux command-line options for hosts whose KVM emulates guest ring 0
(hvvmm/x86/features.py)."""

from hvvmm.cpuid import CpuidEntry
from hvvmm.x86.features import LINUX_FEATURE_BITS, emulator_safe_linux_options, feature_names

# Leaf 1 ECX with SSSE3 (9), CX16 (13), POPCNT (23); leaf 7 EBX with FSGSBASE (0), SMAP (20).
SUPPORTED = [
    CpuidEntry(1, 0, 0, 0, 0, (1 << 9) | (1 << 13) | (1 << 23), 0),
    CpuidEntry(7, 0, 1, 0, (1 << 0) | (1 << 20), 0, 0),
]


def test_feature_names_from_cpuid():
    assert {"ssse3", "cx16", "popcnt", "fsgsbase", "smap"} <= feature_names(SUPPORTED)
    assert "avx" not in feature_names(SUPPORTED)


def test_nothing_on_hosts_that_run_ring_0_on_hardware():
    assert emulator_safe_linux_options(SUPPORTED, emulates_ring0=False, host_flags=()) == ""


def test_noxsave_and_linux_6_1_bit_numbers():
    options = emulator_safe_linux_options(SUPPORTED, emulates_ring0=True, host_flags=())
    # X86_FEATURE_SSSE3 4*32+9, CX16 4*32+13, POPCNT 4*32+23, FSGSBASE 9*32+0, SMAP 9*32+20
    assert options == "noxsave clearcpuid=137,141,151,288,308"


def test_host_cpu_flags_count_too():
    # A PVM guest sees the host CPU's leaf 1/7 even where KVM_GET_SUPPORTED_CPUID omits them.
    options = emulator_safe_linux_options([], emulates_ring0=True,
                                          host_flags=["rdrand", "sha_ni", "fpu", "invpcid"])
    assert options == "noxsave clearcpuid=158,298,317"


def test_bit_numbers_are_cpufeatures_h_words():
    # word 4 = CPUID 1 ECX, word 6 = 0x80000001 ECX, word 9 = CPUID 7.0 EBX (Linux 6.1)
    assert LINUX_FEATURE_BITS["sse4_2"] == 148 and LINUX_FEATURE_BITS["abm"] == 197
    assert LINUX_FEATURE_BITS["rdseed"] == 306 and LINUX_FEATURE_BITS["invpcid"] == 298
    assert emulator_safe_linux_options([], emulates_ring0=True, host_flags=()) == "noxsave"


def test_feature_names_from_kvm_supported_cpuid_entries():
    # Kvm.supported_cpuid() gives KvmCpuidEntry tuples, without CpuidEntry.register(): this
    # call raised AttributeError, so hvvmm could not compute the options on a real host.
    from hvvmm.kvm import KvmCpuidEntry

    entries = [KvmCpuidEntry(1, 0, 0, 0, 0, 1 << 23, 0), KvmCpuidEntry(7, 0, 1, 0, 1 << 20, 0, 0)]
    assert {"popcnt", "smap"} <= feature_names(entries)
    assert emulator_safe_linux_options(entries, emulates_ring0=True,
                                       host_flags=()) == "noxsave clearcpuid=151,308"
