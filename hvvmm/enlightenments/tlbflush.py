"""hv-tlbflush and hv-tlbflush-ext: HvCallFlushVirtualAddressSpace/List (0x0002/0x0003) and their
Ex forms (0x0013/0x0014).

TLFS ``hypercalls/HvCallFlushVirtualAddressSpace.md``, ``HvCallFlushVirtualAddressList.md`` and the
Ex pages; the guest side is Linux ``arch/x86/hyperv/mmu.c``. "This call guarantees that by the time
control returns back to the caller, the observable effects of all flushes on the specified virtual
processors have occurred" (TLFS): the guest frees and reuses page tables right after the call
returns, so an incomplete flush corrupts memory (virtio-win #1582: TLB-flush bugs surface as
IRQL_NOT_LESS_OR_EQUAL in nt!MiUserFault).

Inputs:

* 0x0002 (simple) and 0x0003 (rep, one ``HV_GVA`` per element), 24-byte header:
  ``u64 AddressSpace`` @0, ``u64 Flags`` @8, ``u64 ProcessorMask`` @16.
* 0x0013 (simple) and 0x0014 (rep), 32-byte header: AddressSpace, Flags, then the HV_VP_SET's
  Format @16 and ValidBanksMask @24; the bank contents are the variable header and the GVA list
  follows them (Linux ``flush->gva_list + nr_bank``; :mod:`hvvmm.hv.vpset`).
* Fast forms: the inputs exceed RDX/R8, so only with XMM fast input (hv-xmm-input, EDX bit 4;
  otherwise #UD from the dispatcher, TLFS). KVM takes XMM input for these four calls too.

Flags: bit 0 HV_FLUSH_ALL_PROCESSORS (the mask or set is ignored), bit 1
HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES, bit 2 HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY ("does not make sense
for [the list call] and is treated as an invalid option", TLFS), bit 3
HV_FLUSH_USE_EXTENDED_RANGE_FORMAT (list elements in the extended format; CPUID 0x40000003 EDX
bit 14, hv-tlbflush-ext). "All other flags are reserved and must be set to zero" (TLFS). A flag
the call does not take -> HV_STATUS_INVALID_PARAMETER; KVM ignores the flags altogether.

What is flushed: everything. Every target's whole guest TLB (all address spaces, all PCIDs, global
entries too) is flushed, whatever AddressSpace, the flags and the GVA list say, and a list call
reports every element done. That is always allowed (over-flushing is invisible to the guest; Xen
always does it, KVM does it whenever its 16-entry per-vCPU fifo overflows, Linux
``arch/x86/kvm/hyperv.c`` ``KVM_HV_TLB_FLUSH_FIFO_SIZE``) and it is what the mechanism below can do.
Invalid GVAs "are ignored" (TLFS), so the list elements are not validated; with hv-tlbflush-ext
their extended encoding needs no decoding either.

Targets: HV_FLUSH_ALL_PROCESSORS or HV_GENERIC_SET_ALL -> every VP. A non-Ex ProcessorMask of 0 ->
every VP as well: KVM's workaround for WS2012, which "sends hypercalls with processor_mask = 0x0 and
HV_FLUSH_ALL_PROCESSORS clear, while also expecting us to flush something and crashing if we don't"
(Linux ``arch/x86/kvm/hyperv.c`` ``kvm_hv_flush_tlb()``). An Ex sparse set with no VP flushes
nothing (KVM). The caller may be a target; it is flushed like the others.

How the targets are flushed -- the finding behind this module
-------------------------------------------------------------

KVM has no "flush vCPU N's TLB" ioctl. What it does have: user space can change a parked vCPU's
control registers with ``KVM_SET_SREGS``, and that is defined to flush. Sources: Linux v6.16.1
(``KT0511/linux-6.16.1`` @ ``30b97c8a18bba91bd6f7779c6550ec123e78e2c5``, a plain import).

1. ``arch/x86/kvm/x86.c`` ``__set_sregs_common()``: ``*mmu_reset_needed |= kvm_read_cr4(vcpu) !=
   sregs->cr4;`` (likewise for CR3, EFER and CR0; in PAE paging it reloads the PDPTEs and sets
   ``mmu_reset_needed = 1``).
2. ``__set_sregs()`` (what ``KVM_SET_SREGS`` and the sync-regs path call)::

       if (mmu_reset_needed) {
               kvm_mmu_reset_context(vcpu);
               kvm_make_request(KVM_REQ_TLB_FLUSH_GUEST, vcpu);
       }

   The request was added by kvm-x86 commit 4346db6e6e7a, "KVM: x86: Force TLB flush on changes
   to special registers" (M. Luczaj, applied Aug 2023 for the 6.6 merge window): "Userspace can
   directly modify content of vCPU's EFER/CRn via KVM_SYNC_X86_SREGS and KVM_SET_SREGS{,2}. Make
   sure that when MMU context reset is triggered, guest's TLB and paging-structure caches will be
   flushed." ``__set_sregs2()`` has the same lines.
3. ``vcpu_enter_guest()`` services pending requests before every entry (and before
   ``kvm_mmu_reload()``): ``kvm_service_local_tlb_flush_requests(vcpu)`` -> ``if
   (kvm_check_request(KVM_REQ_TLB_FLUSH_GUEST, vcpu)) kvm_vcpu_flush_tlb_guest(vcpu);``. A request
   made while the vCPU is outside ``KVM_RUN`` is therefore serviced before it next runs guest
   code (a halted vCPU only after it wakes, which is also before it runs guest code).
4. ``kvm_vcpu_flush_tlb_guest()``: without TDP it first syncs every shadow root
   (``kvm_mmu_sync_roots()``, ``kvm_mmu_sync_prev_roots()``: "A TLB flush on behalf of the guest
   is equivalent to INVPCID(all), toggling CR4.PGE, etc."), then ``kvm_x86_call(flush_tlb_guest)``.
5. Intel, ``arch/x86/kvm/vmx/vmx.c`` ``vmx_flush_tlb_guest()``:
   ``vpid_sync_context(vmx_get_current_vpid(vcpu))`` = INVVPID single-context (all-context where
   single-context is unsupported), which invalidates the linear and the combined (EPT) mappings
   tagged with the vCPU's VPID, for every PCID (SDM vol. 3, INVVPID). With VPID off (vpid 0),
   "VM-Enter and VM-Exit are required to flush GVA->{G,H}PA mappings" (same function's comment).
6. AMD, ``arch/x86/kvm/svm/svm.c``: ``.flush_tlb_guest = svm_flush_tlb_asid`` (since "KVM: SVM:
   Flush Hyper-V TLB when required", J. Piotrowski, 2023; before it ``svm_flush_tlb``, the same
   body): with FLUSHBYASID ``vmcb->control.tlb_ctl = TLB_CONTROL_FLUSH_ASID``, else
   ``asid_generation--`` so the next VMRUN takes a fresh ASID. Either way nothing the guest
   cached under the old ASID is reachable.
7. Kernels without 4346db6e6e7a (before 6.6): ``kvm_mmu_reset_context()`` is
   ``kvm_mmu_unload()`` (frees every root, ``KVM_MMU_ROOTS_ALL``) + ``kvm_init_mmu()``, so the
   next entry runs ``kvm_mmu_reload()`` -> ``kvm_mmu_load()`` (``arch/x86/kvm/mmu/mmu.c``), which
   syncs the shadow roots and ends with ``kvm_x86_flush_tlb_current(vcpu)`` ("Flush any TLB
   entries for the new root, the provenance of the root is unknown"): ``vmx_flush_tlb_current()``
   is INVEPT single-context on the new root's EPTP (invalidates the combined mappings of that
   EP4TA for all VPIDs and PCIDs; a root with a different EPTP cannot hit stale entries), or
   INVVPID without EPT; ``svm_flush_tlb_current()`` flushes the ASID.

So :meth:`flush_guest_tlbs` of the KVM platform parks every other vCPU outside ``KVM_RUN``
(``Machine.exclusive``), and for each target: ``KVM_GET_SREGS``, ``KVM_SET_SREGS`` with CR4.PGE
flipped, ``KVM_SET_SREGS`` with the original value -- the two calls a guest's own "toggle
CR4.PGE" full flush corresponds to -- and only then lets the vCPUs go and the hypercall return.

Caveats, each handled or stated there: TPR bits 3:0 do not survive ``KVM_SET_SREGS``
(``kvm_set_cr8()`` -> ``kvm_lapic_set_tpr()`` writes ``(cr8 & 0xf) << 4``): they are put back
through the x2APIC TPR MSR in x2APIC mode; in xAPIC mode there is no race-free way and they stay
cleared (priority decisions use TPR bits 7:4 only, so this is invisible except to a TPR read). In
PAE paging the PDPTEs are reloaded from memory, as the guest's own CR4.PGE toggle would (SDM: MOV
to CR4 that changes PGE loads the PDPTEs). A target with CR0.PG = 0 has nothing to flush and is
skipped (enabling paging loads a root, which KVM flushes). A vCPU running a nested guest (L2)
would be flushed in L2's context; hvvmm offers no nested virtualization in its Hyper-V leaves.
Sean Christopherson, applying 4346db6e6e7a, called flushing on every MMU context reset "overkill",
so a later kernel may narrow it: ``tests/guest/test_hyperv_ipi_tlbflush.py`` has the guest test
that proves the flush on a VT-x/AMD-V host (it is skipped on emulating hosts such as PVM, where
it proves nothing).

CPUID: hv-tlbflush sets 0x40000004 EAX bit 2 (HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED: Linux 6.1
installs ``hyperv_flush_tlb_multi``) and bit 11 (ExProcessorMasks, shared with hv-ipi: the Ex
forms, which Linux needs for a VP >= 64); hv-tlbflush-ext sets 0x40000003 EDX bit 14. The four
calls exist while hv-tlbflush is off and answer ACCESS_DENIED there, as KVM does without the
recommendation (``hv_check_hypercall_access()``).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hvvmm.enlightenments import AttachError, Enlightenment, features, recommendations
from hvvmm.hv.hvdef import HvEnlightenmentInformation, HvFeatures, HvStatus, HypercallCode
from hvvmm.hv.hypercall import (
    HypercallError,
    HypercallKind,
    HypercallRequest,
    HypercallResult,
    HypercallSpec,
)
from hvvmm.hv.vpset import (
    HV_VP_SET_HEADER_SIZE,
    VpSet,
    check_vp_set_size,
    decode_vp_set,
    processor_mask_vps,
)

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-tlbflush"
EXT_NAME = "hv-tlbflush-ext"

HV_FLUSH_ALL_PROCESSORS = 1 << 0
HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES = 1 << 1
HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY = 1 << 2
HV_FLUSH_USE_EXTENDED_RANGE_FORMAT = 1 << 3

FLUSH_INPUT_SIZE = 24  # AddressSpace, Flags, ProcessorMask
FLUSH_EX_INPUT_SIZE = 32  # AddressSpace, Flags, Format, ValidBanksMask
GVA_SIZE = 8  # one HV_GVA (or extended GVA range) per rep element

_SPACE_FLAGS = (HV_FLUSH_ALL_PROCESSORS | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES
                | HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY)
_LIST_FLAGS = HV_FLUSH_ALL_PROCESSORS | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES


class TlbFlushState:
    """The four handlers and a counter. ``extended_ranges`` is switched on by hv-tlbflush-ext."""

    def __init__(self, partition: "Partition"):
        self._platform = partition.platform
        self.vp_count = partition.vp_count
        self.extended_ranges = False
        self.flushes = 0  # hypercalls that flushed at least one VP

    def allowed_flags(self, is_list: bool) -> int:
        allowed = _LIST_FLAGS if is_list else _SPACE_FLAGS
        if self.extended_ranges:
            allowed |= HV_FLUSH_USE_EXTENDED_RANGE_FORMAT
        return allowed

    def _check_flags(self, flags: int, is_list: bool) -> None:
        bad = flags & ~self.allowed_flags(is_list)
        if bad:
            raise HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER,
                                 message=f"flush flags {flags:#x}: {bad:#x} not valid for this "
                                         "call")

    def _targets(self, request: HypercallRequest, is_ex: bool, is_list: bool) -> VpSet:
        header = request.header
        _space, flags = struct.unpack_from("<QQ", header)
        vp_set_bytes = b""
        if is_ex:
            # The set's shape first (KVM: var_cnt vs ValidBanksMask), then the flags.
            vp_set_bytes = header[FLUSH_EX_INPUT_SIZE - HV_VP_SET_HEADER_SIZE:] + \
                request.variable_header
            check_vp_set_size(vp_set_bytes)
        self._check_flags(flags, is_list)
        if flags & HV_FLUSH_ALL_PROCESSORS:
            return VpSet(all=True)  # "the ProcessorMask parameter is ignored" (TLFS)
        if is_ex:
            return decode_vp_set(vp_set_bytes, self.vp_count)
        (mask,) = struct.unpack_from("<Q", header, 16)
        if mask == 0:
            return VpSet(all=True)  # KVM's WS2012 workaround (module docstring)
        return VpSet(all=False, vps=processor_mask_vps(mask, self.vp_count))

    def _flush(self, request: HypercallRequest, is_ex: bool, is_list: bool) -> HypercallResult:
        targets = self._targets(request, is_ex, is_list).members(self.vp_count)
        if targets:
            # Returns only once every target's TLB is flushed, or will be before it next runs
            # guest code (the HvPlatform contract): the TLFS guarantee for the caller.
            self._platform.flush_guest_tlbs(request.vp_index, targets)
            self.flushes += 1
        if is_list:
            # A full flush covers every element of the list, so all reps are done.
            return HypercallResult(reps_completed=request.rep_count)
        return HypercallResult()

    def flush_space(self, request: HypercallRequest) -> HypercallResult:
        return self._flush(request, is_ex=False, is_list=False)

    def flush_list(self, request: HypercallRequest) -> HypercallResult:
        return self._flush(request, is_ex=False, is_list=True)

    def flush_space_ex(self, request: HypercallRequest) -> HypercallResult:
        return self._flush(request, is_ex=True, is_list=False)

    def flush_list_ex(self, request: HypercallRequest) -> HypercallResult:
        return self._flush(request, is_ex=True, is_list=True)


def attach(partition: "Partition") -> TlbFlushState:
    if not callable(getattr(partition.platform, "flush_guest_tlbs", None)):
        raise AttachError(f"{NAME} needs a platform that can flush other VPs' TLBs "
                          "(flush_guest_tlbs)")
    state = TlbFlushState(partition)
    common = dict(fast_allowed=True, xmm_fast_allowed=True)
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallFlushVirtualAddressSpace, handler=state.flush_space,
        input_size=FLUSH_INPUT_SIZE, **common))
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallFlushVirtualAddressList, handler=state.flush_list,
        kind=HypercallKind.REP, input_size=FLUSH_INPUT_SIZE, rep_input_size=GVA_SIZE, **common))
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallFlushVirtualAddressSpaceEx, handler=state.flush_space_ex,
        input_size=FLUSH_EX_INPUT_SIZE, variable_header_allowed=True, **common))
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallFlushVirtualAddressListEx, handler=state.flush_list_ex,
        kind=HypercallKind.REP, input_size=FLUSH_EX_INPUT_SIZE, rep_input_size=GVA_SIZE,
        variable_header_allowed=True, **common))
    return state


def attach_ext(partition: "Partition") -> None:
    state = partition.state.get(NAME)
    if not isinstance(state, TlbFlushState):  # "requires" attaches hv-tlbflush first
        raise AttachError(f"{EXT_NAME} needs {NAME}")
    state.extended_ranges = True


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="HvCallFlushVirtualAddressSpace/List(Ex): remote TLB flushes, completed before the "
            "call returns",
    tlfs="hypercalls/HvCallFlushVirtualAddressSpace.md, HvCallFlushVirtualAddressList.md (+Ex)",
    attach=attach,
    requires=("hv-vpindex",),
    cpuid=recommendations(HvEnlightenmentInformation.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED
                          | HvEnlightenmentInformation.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED),
    hypercalls=(HypercallCode.HvCallFlushVirtualAddressSpace,
                HypercallCode.HvCallFlushVirtualAddressList,
                HypercallCode.HvCallFlushVirtualAddressSpaceEx,
                HypercallCode.HvCallFlushVirtualAddressListEx),
    denied_when_off=True,
)

EXT_ENLIGHTENMENT = Enlightenment(
    name=EXT_NAME,
    summary="extended GVA ranges (flush flag bit 3) for HvCallFlushVirtualAddressList(Ex)",
    tlfs="feature-discovery.md: ExtendedGvaRangesForFlushVirtualAddressList",
    attach=attach_ext,
    requires=(NAME,),
    cpuid=features(HvFeatures.HV_FEATURE_EXT_GVA_RANGES_FLUSH),
)
