"""hv-vapic: the EOI/ICR/TPR MSRs (0x40000070-72) and the VP assist page -- declared, refused.

TLFS ``virtual-interrupts.md`` and ``datatypes/hv_vp_assist_page.md``; the guest side
is Linux ``arch/x86/hyperv/hv_apic.c``. CPUID 0x40000003 EAX bit 4
(AccessIntrCtrlRegs) grants EOI, ICR, TPR and VP_ASSIST_PAGE; 0x40000004 EAX bit 3
(HV_X64_APIC_ACCESS_RECOMMENDED) tells the guest to use the three MSRs instead of the APIC.

Why hvvmm cannot offer it on KVM's in-kernel LAPIC (Linux v6.16.1, ``KT0511/linux-6.16.1`` @
``30b97c8a18bba91bd6f7779c6550ec123e78e2c5``, ``arch/x86/kvm/lapic.c``):

* KVM's own hv-vapic performs these MSRs with ``kvm_hv_vapic_msr_write()`` ->
  ``kvm_lapic_msr_write()``, in either APIC mode. An EOI there is ``apic_set_eoi()``: clear the
  highest ISR bit, update PPR (and SVI under APICv), and ``kvm_ioapic_send_eoi()`` for a
  level-triggered vector, which clears the IOAPIC pin's Remote IRR. User space has no ioctl that
  reaches ``kvm_hv_vapic_msr_write()``.
* In x2APIC mode user space can get the exact same effect: a host-initiated ``KVM_SET_MSRS`` of
  the x2APIC EOI (0x80B), ICR (0x830) or TPR (0x808) MSR goes ``kvm_set_msr_common()`` ->
  ``kvm_x2apic_msr_write()`` -> ``kvm_lapic_msr_write()``. But ``kvm_x2apic_msr_write()`` starts
  with ``if (!lapic_in_kernel(vcpu) || !apic_x2apic_mode(apic)) return 1;``.
* In xAPIC mode only ``KVM_GET_LAPIC``/``KVM_SET_LAPIC`` remain, and ``kvm_apic_set_state()`` is
  not an EOI: it ``memcpy``s the whole register page back (an interrupt accepted into IRR between
  the read and the write -- another vCPU's IPI, the LAPIC timer, an IOAPIC or MSI interrupt --
  is lost; under APICv ``apicv_post_state_restore`` also clears the posted-interrupt
  descriptor), it cancels and re-arms the LAPIC timer, and it sends no EOI to the IOAPIC, so a
  level-triggered pin keeps Remote IRR set and never interrupts again. TPR could only be written
  through ``KVM_SET_SREGS``' CR8 (``kvm_set_cr8()`` -> ``kvm_lapic_set_tpr()``, which drops TPR
  bits 3:0, and the same ioctl reloads the PDPTEs and flushes the TLB in PAE mode): far too
  heavy for the TPR write Windows makes at every IRQL change.
* The APIC mode cannot be known when CPUID is fixed: KVM freezes the CPUID table at the first
  ``KVM_RUN`` (Linux ``arch/x86/kvm/cpuid.c`` ``kvm_set_cpuid()``), and the guest picks its APIC
  mode after reading CPUID. Linux 6.1 with hint 3 uses all three MSRs in xAPIC mode and only the EOI
  MSR in x2APIC mode (``arch/x86/hyperv/hv_apic.c`` ``hv_apic_init()``, since commit e211288b72f1),
  and Linux booted with ``nox2apic``, a guest CPUID without x2APIC, or an OS that never enables
  x2APIC stays in xAPIC mode. Even the lazy EOI of the VP assist page (``apic_assist`` bit 0) falls
  back to the EOI MSR whenever the bit is clear, so it does not help.

Advertising AccessIntrCtrlRegs would therefore promise MSRs that fail (or corrupt interrupt
state) whenever the guest runs its LAPIC in xAPIC mode. "Advertise only what works": both bits
stay off and ``--hyperv hv-vapic`` is refused with :data:`REFUSAL`. The declaration stays (name,
requirements of hv-evmcs and hv-tlbflush-direct, and the MSRs, which keep raising #GP).

HV_X64_MSR_VP_ASSIST_PAGE stays with hv-core, which accepts and stores it without advertising it
because Linux 6.1 writes it on every CPU regardless of CPUID (Linux ``arch/x86/hyperv/hv_init.c``
``hv_cpu_init()``); a guest that honours the missing privilege never writes it, and nothing is ever
written into the page (``apic_assist`` bit 0 is never set, which the TLFS allows).

Routes that would make it possible later: a user-space LAPIC (then every piece is ordinary
emulation), or, on hosts built with ``CONFIG_KVM_HYPERV=y``, leaving 0x40000070-0x40000073 out of
the MSR filter so that KVM's in-kernel ``kvm_hv_vapic_msr_write()`` and its PV-EOI handling of
the assist page (``kvm_lapic_set_pv_eoi()``) serve them -- two Hyper-V implementations in one VM,
which hvvmm avoids (it filters the synthetic MSRs, KVM api.rst
``KVM_X86_SET_MSR_FILTER``).
"""

from __future__ import annotations

from hvvmm.enlightenments import Enlightenment, privileges, recommendations
from hvvmm.hv.hvdef import (
    HV_X64_MSR_EOI,
    HV_X64_MSR_ICR,
    HV_X64_MSR_TPR,
    HvEnlightenmentInformation,
    HvPartitionPrivilege,
)

NAME = "hv-vapic"

REFUSAL = (f"{NAME} cannot be offered with KVM's in-kernel LAPIC: user space can perform an EOI "
           "(including the IOAPIC EOI of a level-triggered vector) and a TPR write only through "
           "the x2APIC MSRs, i.e. only while the guest's LAPIC is in x2APIC mode, and the CPUID "
           "bits cannot depend on a mode the guest picks later (see "
           "hvvmm/enlightenments/vapic.py)")

ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="EOI/ICR/TPR MSRs and the VP assist page (lazy EOI)",
    tlfs="virtual-interrupts.md: EOI assist",
    cpuid=(*privileges(HvPartitionPrivilege.AccessIntrCtrlRegs),
           *recommendations(HvEnlightenmentInformation.HV_X64_APIC_ACCESS_RECOMMENDED)),
    msrs=(HV_X64_MSR_EOI, HV_X64_MSR_ICR, HV_X64_MSR_TPR),
    refusal=REFUSAL,
)
