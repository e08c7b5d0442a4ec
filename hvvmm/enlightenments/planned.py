"""Enlightenments hvvmm knows by name but does not implement yet.

They are declared here (names, requirements, CPUID bits, MSRs, hypercalls) so that a ``--hyperv``
spec naming one gets "hv-syndbg is not implemented yet" instead of "unknown option", so that the
registry reserves their MSRs and hypercall codes (a new module cannot claim them by accident), and
so that their requirements are already checked. None has an ``attach``, so none contributes a
CPUID bit or registers anything: their MSRs raise #GP and their hypercalls answer
INVALID_HYPERCALL_CODE. When one is implemented, its declaration moves into its own module.

Requirements are QEMU's (``kvm_hyperv_properties[].dependencies`` and the "Requires:" lines of
``docs/system/i386/hyperv.rst``).
"""

from __future__ import annotations

from hvvmm.enlightenments import Enlightenment, features, privileges, recommendations
from hvvmm.hv.hvdef import (
    HV_X64_MSR_REENLIGHTENMENT_CONTROL,
    HV_X64_MSR_SYNDBG_CONTROL,
    HV_X64_MSR_SYNDBG_OPTIONS,
    HV_X64_MSR_SYNDBG_PENDING_BUFFER,
    HV_X64_MSR_TSC_EMULATION_CONTROL,
    HV_X64_MSR_TSC_EMULATION_STATUS,
    HvEnlightenmentInformation,
    HvFeatures,
    HvPartitionPrivilege,
    HypercallCode,
)

_HINT = HvEnlightenmentInformation

ENLIGHTENMENTS = (
    Enlightenment(
        name="hv-tlbflush-direct",
        summary="direct TLB flush for nested guests",
        tlfs="nested-virtualization.md",
        requires=("hv-vapic",),
    ),
    Enlightenment(
        name="hv-reenlightenment",
        summary="reenlightenment notifications and TSC emulation after migration",
        tlfs="nested-virtualization.md: Reenlightenment",
        cpuid=privileges(HvPartitionPrivilege.AccessReenlightenmentControls),
        msrs=(HV_X64_MSR_REENLIGHTENMENT_CONTROL, HV_X64_MSR_TSC_EMULATION_CONTROL,
              HV_X64_MSR_TSC_EMULATION_STATUS),
    ),
    Enlightenment(
        name="hv-evmcs",
        summary="enlightened VMCS for nested Hyper-V",
        tlfs="nested-virtualization.md: Enlightened VMCS",
        requires=("hv-vapic",),
        cpuid=recommendations(_HINT.HV_X64_ENLIGHTENED_VMCS_RECOMMENDED),
    ),
    Enlightenment(
        name="hv-emsr-bitmap",
        summary="enlightened MSR bitmap for nested guests",
        tlfs="nested-virtualization.md",
    ),
    Enlightenment(
        name="hv-avic",
        aliases=("hv-apicv",),
        summary="AutoEOI deprecation hint so APICv/AVIC stays on",
        tlfs="feature-discovery.md: Implementation Recommendations",
        cpuid=recommendations(_HINT.HV_DEPRECATING_AEOI_RECOMMENDED),
    ),
    Enlightenment(
        name="hv-no-nonarch-coresharing",
        summary="no non-architectural core sharing recommendation",
        tlfs="feature-discovery.md: Implementation Recommendations",
        cpuid=recommendations(_HINT.HV_X64_NO_NONARCH_CORESHARING),
    ),
    Enlightenment(
        name="hv-syndbg",
        summary="synthetic kernel debugger",
        tlfs="feature-discovery.md: Hypervisor Feature Identification (debug MSRs)",
        requires=("hv-synic", "hv-relaxed"),
        cpuid=features(HvFeatures.HV_FEATURE_DEBUG_MSRS_AVAILABLE),
        msrs=(*range(HV_X64_MSR_SYNDBG_CONTROL, HV_X64_MSR_SYNDBG_PENDING_BUFFER + 1),
              HV_X64_MSR_SYNDBG_OPTIONS),
        hypercalls=(HypercallCode.HvCallPostDebugData, HypercallCode.HvCallRetrieveDebugData,
                    HypercallCode.HvCallResetDebugSession),
    ),
)
