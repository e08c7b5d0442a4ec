"""Moves a :class:`~hvvmm.x86.state.CpuState` in and out of a KVM vCPU (an
:class:`hvvmm.kvm.Vcpu`, duck-typed: anything with its register methods works).

Only what a completion changed goes back: ``KVM_SET_REGS`` for GPRs/RIP/RFLAGS,
``KVM_SET_XSAVE`` (``KVM_SET_FPU`` without KVM_CAP_XSAVE) for the x87/SSE state and XRSTOR, the
FS/GS base MSRs (IA32_FS_BASE 0xC0000100, IA32_GS_BASE 0xC0000101: the 64-bit bases without
``KVM_SET_SREGS``), then the event. A #PF needs CR2, which
only ``KVM_SET_SREGS`` sets; that call also rewrites TPR from CR8, so TPR bits 3:0 are put back
as :func:`hvvmm.hyperv.flush_vcpu_guest_tlb` does. A TLB flush (INVPCID) is that function.
"""

from __future__ import annotations

import struct

from .state import PF_VECTOR, CannotComplete, CpuState, FpuControl, Segment

# The legacy region of an XSAVE/FXSAVE area (SDM vol. 1 table 10-2): FCW, FSW, abridged FTW,
# reserved, FOP, FIP (64-bit form), FDP, MXCSR, MXCSR_MASK.
_LEGACY_REGION = struct.Struct("<HHBxHQQII")

MSR_FS_BASE = 0xC000_0100
MSR_GS_BASE = 0xC000_0101
# struct kvm_regs order -> encoding order (rax rcx rdx rbx rsp rbp rsi rdi r8..r15).
_KVM_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


def load_state(vcpu, use_xsave: bool = True) -> CpuState:
    return _load_state(vcpu, use_xsave)[0]


def _load_state(vcpu, use_xsave: bool = True):
    """The vCPU's registers (``KVM_GET_REGS``, ``KVM_GET_SREGS``; the x87/SSE control state
    only on demand, from ``KVM_GET_XSAVE`` with ``use_xsave`` (KVM_CAP_XSAVE), else from
    ``KVM_GET_FPU``)."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    segments = {}
    for name in _SEGMENTS:
        seg = getattr(sregs, name)
        segments[name] = Segment(seg.base, seg.limit, seg.selector, seg.type, bool(seg.present),
                                 seg.dpl, bool(seg.db), bool(seg.l), bool(seg.unusable))

    def load_fpu() -> FpuControl:
        if use_xsave:
            fields = _LEGACY_REGION.unpack_from(vcpu.get_xsave())
            return FpuControl(*fields[:7], mxcsr_mask=fields[7] or 0xFFBF)
        fpu = vcpu.get_fpu()
        return FpuControl(fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp,
                          fpu.mxcsr)

    def no_xsave() -> bytes:
        raise CannotComplete("this KVM has no KVM_GET_XSAVE for the XSAVE state")

    state = CpuState(gprs=[getattr(regs, name) for name in _KVM_GPRS], rip=regs.rip,
                     rflags=regs.rflags, segments=segments, cr0=sregs.cr0, cr2=sregs.cr2,
                     cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer, fpu_loader=load_fpu,
                     xcr0_loader=lambda: vcpu.get_xcrs().get(0, 1),
                     xsave_loader=vcpu.get_xsave if use_xsave else no_xsave)
    return state, regs


def store_state(vcpu, state: CpuState, use_xsave: bool = True, regs=None) -> None:
    """Write back what changed, then inject ``state.event`` and flush if asked. ``regs``: the
    ``struct kvm_regs`` the state was loaded from (saves a KVM_GET_REGS); nothing else may
    have changed the vCPU's registers since."""
    if "regs" in state.dirty:
        if regs is None:
            regs = vcpu.get_regs()
        for name, value in zip(_KVM_GPRS, state.gprs):
            setattr(regs, name, value)
        regs.rip, regs.rflags = state.rip, state.rflags
        vcpu.set_regs(regs)
    if "fpu" in state.dirty:
        control = state.fpu
        if use_xsave:
            area = bytearray(vcpu.get_xsave())
            _LEGACY_REGION.pack_into(area, 0, control.fcw, control.fsw, control.ftwx,
                                     control.last_opcode, control.last_ip, control.last_dp,
                                     control.mxcsr, control.mxcsr_mask)
            # XSTATE_BV bits 0 (x87) and 1 (SSE, which carries MXCSR): without them KVM_SET_XSAVE
            # would load the init state instead (SDM vol. 1 13.8.1). The area KVM returned holds
            # valid (init) values for both even when the bits were clear.
            xstate_bv = int.from_bytes(area[512:520], "little") | 0x3
            area[512:520] = xstate_bv.to_bytes(8, "little")
            vcpu.set_xsave(bytes(area))
        else:
            fpu = vcpu.get_fpu()
            fpu.fcw, fpu.fsw, fpu.ftwx = control.fcw, control.fsw, control.ftwx
            fpu.last_opcode, fpu.last_ip, fpu.last_dp = (control.last_opcode, control.last_ip,
                                                         control.last_dp)
            fpu.mxcsr = control.mxcsr
            vcpu.set_fpu(fpu)
    if "xsave" in state.dirty:
        vcpu.set_xsave(bytes(state.xsave_area))
    msrs = {}
    if "fs_base" in state.dirty:
        msrs[MSR_FS_BASE] = state.segments["fs"].base
    if "gs_base" in state.dirty:
        msrs[MSR_GS_BASE] = state.segments["gs"].base
    if msrs:
        vcpu.set_msrs(msrs)
    event = state.event
    if event is not None:
        if event.vector == PF_VECTOR and event.cr2 is not None:
            _set_cr2(vcpu, event.cr2)
        if event.kind == "soft-interrupt":
            vcpu.inject_soft_interrupt(event.vector)
        else:
            vcpu.inject_exception(event.vector, event.error_code)
    if state.flush_tlb:
        from ..hyperv import flush_vcpu_guest_tlb

        flush_vcpu_guest_tlb(vcpu)


def _set_cr2(vcpu, cr2: int) -> None:
    from ..hyperv import APIC_BASE_EXTD, APIC_TPR_OFFSET, MSR_X2APIC_TPR

    tpr = vcpu.get_lapic()[APIC_TPR_OFFSET]
    sregs = vcpu.get_sregs()
    sregs.cr2 = cr2
    vcpu.set_sregs(sregs)
    if tpr & 0x0F and sregs.apic_base & APIC_BASE_EXTD:
        vcpu.set_msrs({MSR_X2APIC_TPR: tpr})


class VcpuInstructionCompleter:
    """The vCPU loop's hook for ``KVM_INTERNAL_ERROR_EMULATION`` exits: ``self(thread, exit)``
    completes the instruction on ``thread.vcpu`` and returns None (the vCPU runs on), or returns
    the one-line reason the run must end. ``memory``: guest RAM (``view(gpa, size)``).
    ``ud_queued_by_kvm``: KVM without ``KVM_CAP_EXIT_ON_EMULATION_FAILURE`` enabled queues #UD
    before it exits (``handle_emulation_failure()`` in arch/x86/kvm/x86.c); a completion must
    then drop it."""

    def __init__(self, completer, memory, *, log, ud_queued_by_kvm: bool = False,
                 use_xsave: bool = True):
        self.completer = completer
        self._use_xsave = use_xsave
        self.memory = memory
        self._log = log
        self._logged: set[str] = set()
        self._ud_queued_by_kvm = ud_queued_by_kvm

    def __call__(self, thread, exit) -> str | None:
        from .complete import COMPLETED
        from .state import UD_VECTOR, CannotComplete, Event

        vcpu = thread.vcpu
        insn_bytes = exit.instruction_bytes
        state, regs = _load_state(vcpu, self._use_xsave)
        where = f"vCPU {thread.index} at rip {state.rip:#x}"
        try:
            completion = self.completer.complete(state, self.memory, insn_bytes)
        except CannotComplete as exc:
            if exc.instruction is not None:
                shown = f"{exc.instruction.raw.hex(' ')} ({exc.instruction.mnemonic})"
            else:
                shown = insn_bytes.hex(" ") if insn_bytes else "(bytes not readable)"
            if state.cpl > 0:
                # What KVM itself does for a guest user-mode instruction it cannot emulate.
                state.event = Event("exception", UD_VECTOR)
                self._clear_queued_ud(vcpu)
                store_state(vcpu, state, self._use_xsave, regs)
                self._once(f"ud:{shown}", "%s: KVM could not emulate the user-mode instruction "
                           "%s and hvvmm cannot complete it (%s); the guest gets #UD", where,
                           shown, exc)
                return None
            return (f"{where}: KVM could not emulate the instruction {shown} and hvvmm cannot "
                    f"complete it: {exc}")
        if state.event is None:
            self._clear_queued_ud(vcpu)
        store_state(vcpu, state, self._use_xsave, regs)
        instruction = completion.instruction
        if completion.outcome == COMPLETED:
            self._once(instruction.mnemonic, "%s: completed %s for KVM's instruction emulator "
                       "(logged once per instruction)", where, instruction.describe())
        else:
            self._once(f"fault:{instruction.mnemonic}", "%s: %s raises vector %d in the guest, "
                       "as the CPU would", where, instruction.describe(), state.event.vector)
        return None

    def _clear_queued_ud(self, vcpu) -> None:
        if not self._ud_queued_by_kvm:
            return
        events = vcpu.get_vcpu_events()
        if events.exception.injected and events.exception.nr == 6:
            events.exception.injected = 0
            events.flags = 0
            vcpu.set_vcpu_events(events)

    def _once(self, key: str, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self._log.info(message, *args)


def instruction_completion(kvm, vm, memory, supported_cpuid, *, exclusive, log):
    """``(Completer, VcpuInstructionCompleter)`` for a new VM: instructions KVM's emulator
    cannot run (hosts that emulate guest ring 0) are completed here. With
    KVM_CAP_EXIT_ON_EMULATION_FAILURE enabled KVM exits for every such failure without queuing
    #UD first (Linux Documentation/virt/kvm/api.rst). ``exclusive``: as :class:`~hvvmm.x86.complete.Completer`
    takes it."""
    from ..kvm import constants as kvmc
    from .complete import Completer, xsave_layout

    cap = kvmc.KVM_CAP_EXIT_ON_EMULATION_FAILURE
    exits_cleanly = bool(kvm.check_extension(cap))
    if exits_cleanly:
        vm.enable_cap(cap, 1)
    completer = Completer(exclusive=exclusive, xsave_layout=xsave_layout(supported_cpuid))
    return completer, VcpuInstructionCompleter(
        completer, memory, log=log, ud_queued_by_kvm=not exits_cleanly,
        use_xsave=bool(kvm.check_extension(kvmc.KVM_CAP_XSAVE)))
