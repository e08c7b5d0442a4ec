"""hv-frequencies: HV_X64_MSR_TSC_FREQUENCY and HV_X64_MSR_APIC_FREQUENCY.

TLFS ``feature-discovery.md`` (AccessFrequencyRegs, "Timer frequency details available") and
``partition-properties.md``; Linux ``arch/x86/kernel/cpu/mshyperv.c``. Both MSRs are read-only and
partition-wide, in Hz. Both CPUID bits are needed -- 0x40000003 EAX bit 11 and EDX bit 8 -- and with
them Linux skips TSC calibration (``X86_FEATURE_TSC_KNOWN_FREQ``) and sets the LAPIC timer period
from APIC_FREQUENCY (``ms_hyperv_init_platform()`` and ``hv_get_tsc_khz()`` in ``mshyperv.c``). The
values come from the platform: the guest TSC rate (``KVM_GET_TSC_KHZ`` x 1000) and the LAPIC timer
rate (10**9 with KVM's in-kernel LAPIC).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import AttachError, Enlightenment, features, privileges
from hvvmm.hv.hvdef import (
    HV_U64_MASK,
    HV_X64_MSR_APIC_FREQUENCY,
    HV_X64_MSR_TSC_FREQUENCY,
    HvFeatures,
    HvPartitionPrivilege,
)

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-frequencies"


def attach(partition: "Partition") -> None:
    platform = partition.platform
    tsc_hz = int(platform.tsc_frequency_hz)
    apic_hz = int(platform.apic_frequency_hz)
    if not 0 < tsc_hz <= HV_U64_MASK or not 0 < apic_hz <= HV_U64_MASK:
        # Advertising the bits with a zero value makes Linux compute tsc_khz = 0 (hv_get_tsc_khz()
        # in arch/x86/kernel/cpu/mshyperv.c): refuse the configuration instead.
        raise AttachError(f"{NAME} needs the TSC and APIC timer frequencies, but the platform "
                          f"reports {tsc_hz} Hz and {apic_hz} Hz")
    partition.register_msr(HV_X64_MSR_TSC_FREQUENCY, read=lambda vp_index: tsc_hz,
                           scope="partition")
    partition.register_msr(HV_X64_MSR_APIC_FREQUENCY, read=lambda vp_index: apic_hz,
                           scope="partition")


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="TSC_FREQUENCY and APIC_FREQUENCY MSRs: no calibration in the guest",
    tlfs="feature-discovery.md: AccessFrequencyRegs",
    attach=attach,
    cpuid=(*privileges(HvPartitionPrivilege.AccessFrequencyRegs),
           *features(HvFeatures.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE)),
    msrs=(HV_X64_MSR_TSC_FREQUENCY, HV_X64_MSR_APIC_FREQUENCY),
)
