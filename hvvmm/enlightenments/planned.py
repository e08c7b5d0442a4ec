"""Enlightenments hvvmm knows by name but does not implement yet.

They are declared here (names, requirements, CPUID bits, MSRs, hypercalls) so that a ``--hyperv``
spec naming one gets "hv-synic is not implemented yet" instead of "unknown option", so that the
registry reserves their MSRs and hypercall codes (a new module cannot claim them by accident), and
so that their requirements are already checked. None has an ``attach``, so none contributes a
CPUID bit or registers anything: their MSRs raise #GP and their hypercalls answer
INVALID_HYPERCALL_CODE. When one is implemented, its declaration moves into its own module.

Requirements are QEMU's (``kvm_hyperv_properties[].dependencies`` and the "Requires:" lines of
``docs/system/i386/hyperv.rst``; the project reference ``hyperv-interface.md`` §15).
"""

from __future__ import annotations

from hvvmm.enlightenments import Enlightenment, features, privileges, recommendations
from hvvmm.hv.hvdef import (
    HV_X64_MSR_EOI,
    HV_X64_MSR_EOM,
    HV_X64_MSR_ICR,
    HV_X64_MSR_REENLIGHTENMENT_CONTROL,
    HV_X64_MSR_SCONTROL,
    HV_X64_MSR_SIEFP,
    HV_X64_MSR_SIMP,
    HV_X64_MSR_SINT0,
    HV_X64_MSR_SIRBP,
    HV_X64_MSR_STIMER0_CONFIG,
    HV_X64_MSR_SVERSION,
    HV_X64_MSR_SYNDBG_CONTROL,
    HV_X64_MSR_SYNDBG_OPTIONS,
    HV_X64_MSR_SYNDBG_PENDING_BUFFER,
    HV_X64_MSR_TPR,
    HV_X64_MSR_TSC_EMULATION_CONTROL,
    HV_X64_MSR_TSC_EMULATION_STATUS,
    HV_SYNIC_SINT_COUNT,
    HV_SYNIC_STIMER_COUNT,
    HvEnlightenmentInformation,
    HvFeatures,
    HvPartitionPrivilege,
    HypercallCode,
)

_HINT = HvEnlightenmentInformation

ENLIGHTENMENTS = (
    Enlightenment(
        name="hv-synic",
        summary="synthetic interrupt controller: SIM/SIEF pages, SINTs, PostMessage/SignalEvent",
        tlfs="inter-partition-communication.md: Synthetic Interrupt Controller",
        requires=("hv-vpindex",),
        cpuid=(*privileges(HvPartitionPrivilege.AccessSynicRegs), *recommendations(
            _HINT.HV_DEPRECATING_AEOI_RECOMMENDED)),
        msrs=(HV_X64_MSR_SCONTROL, HV_X64_MSR_SVERSION, HV_X64_MSR_SIEFP, HV_X64_MSR_SIMP,
              HV_X64_MSR_EOM, HV_X64_MSR_SIRBP,
              *(HV_X64_MSR_SINT0 + n for n in range(HV_SYNIC_SINT_COUNT))),
        hypercalls=(HypercallCode.HvCallPostMessage, HypercallCode.HvCallSignalEvent),
    ),
    Enlightenment(
        name="hv-stimer",
        summary="synthetic timers (message mode)",
        tlfs="timers.md: Synthetic Timers",
        requires=("hv-synic", "hv-time", "hv-vpindex"),
        cpuid=privileges(HvPartitionPrivilege.AccessSyntheticTimerRegs),
        msrs=tuple(HV_X64_MSR_STIMER0_CONFIG + n for n in range(2 * HV_SYNIC_STIMER_COUNT)),
    ),
    Enlightenment(
        name="hv-stimer-direct",
        summary="synthetic timers in direct mode (an APIC vector instead of a message)",
        tlfs="timers.md: Direct Synthetic Timers",
        requires=("hv-stimer",),
        cpuid=features(HvFeatures.HV_STIMER_DIRECT_MODE_AVAILABLE),
    ),
    Enlightenment(
        name="hv-vapic",
        summary="EOI/ICR/TPR MSRs and the VP assist page (lazy EOI)",
        tlfs="virtual-interrupts.md: EOI assist",
        # HV_X64_MSR_VP_ASSIST_PAGE is served by hv-core until this exists (Linux writes it
        # unconditionally); it moves here then.
        cpuid=(*privileges(HvPartitionPrivilege.AccessIntrCtrlRegs),
               *recommendations(_HINT.HV_X64_APIC_ACCESS_RECOMMENDED)),
        msrs=(HV_X64_MSR_EOI, HV_X64_MSR_ICR, HV_X64_MSR_TPR),
    ),
    Enlightenment(
        name="hv-ipi",
        summary="HvCallSendSyntheticClusterIpi(Ex)",
        tlfs="hypercalls/HvCallSendSyntheticClusterIpi.md",
        requires=("hv-vpindex",),
        cpuid=recommendations(_HINT.HV_X64_CLUSTER_IPI_RECOMMENDED
                              | _HINT.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED),
        hypercalls=(HypercallCode.HvCallSendSyntheticClusterIpi,
                    HypercallCode.HvCallSendSyntheticClusterIpiEx),
    ),
    Enlightenment(
        name="hv-tlbflush",
        summary="HvCallFlushVirtualAddressSpace/List(Ex)",
        tlfs="hypercalls/HvCallFlushVirtualAddressSpace.md",
        requires=("hv-vpindex",),
        cpuid=recommendations(_HINT.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED
                              | _HINT.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED),
        hypercalls=(HypercallCode.HvCallFlushVirtualAddressSpace,
                    HypercallCode.HvCallFlushVirtualAddressList,
                    HypercallCode.HvCallFlushVirtualAddressSpaceEx,
                    HypercallCode.HvCallFlushVirtualAddressListEx),
    ),
    Enlightenment(
        name="hv-tlbflush-ext",
        summary="extended GVA ranges for HvCallFlushVirtualAddressList",
        tlfs="hypercalls/HvCallFlushVirtualAddressList.md",
        requires=("hv-tlbflush",),
        cpuid=features(HvFeatures.HV_FEATURE_EXT_GVA_RANGES_FLUSH),
    ),
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
