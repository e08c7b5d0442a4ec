"""Completing, in user space, instructions that KVM's instruction emulator cannot run.

On a host whose KVM runs guest ring-0 code in its instruction emulator (PVM-based KVM has no
VT-x/AMD-V underneath), an instruction the emulator lacks ends ``KVM_RUN`` with
``KVM_EXIT_INTERNAL_ERROR`` / ``KVM_INTERNAL_ERROR_EMULATION``, RIP still on the instruction and
its bytes in the exit (Linux ``Documentation/virt/kvm/api.rst``). :class:`Completer` decodes the
instruction, does what the CPU would have done to the register file and to guest memory (through
the guest's page tables), and leaves RIP past it -- or, where the CPU would fault, leaves RIP on
it and records the fault for delivery. On hosts with hardware virtualization the exit does not
happen for these instructions, and none of this runs.

Each handler follows the instruction's "Operation" and "Protected Mode Exceptions" in the Intel
SDM vol. 2; the docstrings name the points that matter. Nothing here imports the KVM layer: the
handlers work on a :class:`~hvvmm.x86.state.CpuState` and any object with a ``view(gpa, size)``
method for guest RAM, so unit tests use a plain register file and a ``bytearray``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, ContextManager

from .decode import RAX, RBX, RCX, RDX, DecodeError, Instruction, decode
from .paging import GuestMemoryAccess, PhysicalMemory, canonical
from .state import (AC, ARITHMETIC_FLAGS, BP_VECTOR, CF, CR0_EM, CR0_MP, CR0_NE, CR0_TS,
                    CR4_FSGSBASE, CR4_LA57, CR4_OSFXSR, CR4_OSXSAVE, CR4_PCIDE, DB_VECTOR,
                    GP_VECTOR, MF_VECTOR, NM_VECTOR, OF, UD_VECTOR, ZF, CannotComplete, CpuState,
                    Event, GuestFault)

OF_VECTOR = 4
FSW_ES = 1 << 7  # x87 error summary: an unmasked exception is pending (SDM vol. 1 8.1.3)

COMPLETED = "completed"
FAULTED = "faulted"

# Instructions hvvmm recognises but does not complete: the compacted XSAVE forms (Linux runs
# without them given `noxsave`).
_COMPACTED = "the compacted xsave forms are not completed by hvvmm (boot Linux with noxsave)"
NOT_COMPLETED = {"xsavec": _COMPACTED, "xsaves": _COMPACTED, "xrstors": _COMPACTED}


@dataclass(frozen=True)
class Completion:
    """What :meth:`Completer.complete` did: ``outcome`` is :data:`COMPLETED` (RIP past the
    instruction) or :data:`FAULTED` (RIP on it, ``state.event`` holds the fault)."""

    instruction: Instruction
    outcome: str


class Completer:
    """Completes one vCPU's (or several vCPUs') failed emulations.

    No CPUID feature is checked: under VT-x/AMD-V these instructions run on the CPU whatever
    the vCPU's CPUID table says, and on an emulating host the guest sees the host CPU's leaf 1
    and 7 anyway (``KVM_GET_SUPPORTED_CPUID`` may omit features the guest sees there).
    Architectural gates in control registers and CPL are checked. ``exclusive``: a context
    manager factory that stops every other vCPU (``Machine.exclusive``) around a locked
    read-modify-write, so it is atomic for the whole guest; without it a process-wide lock
    makes it atomic with respect to other completions only. ``random_bytes``: RDRAND/RDSEED's
    source (the host's ``os.urandom``)."""

    def __init__(self, *, exclusive: Callable[[], ContextManager] | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 xsave_layout: dict[int, tuple[int, int]] | None = None):
        # XSAVE state component i >= 2 -> (offset, size) in the standard format: CPUID 0xD
        # sub-leaf i EBX and EAX (SDM vol. 1 13.4.3), from :func:`xsave_layout`.
        self.xsave_layout = dict(xsave_layout or {})
        self._exclusive = exclusive
        self._random_bytes = random_bytes
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def atomically(self):
        """Every other vCPU stopped (first: a vCPU waiting for the lock instead of parking
        would deadlock the stop), then the lock against completions on other vCPUs."""
        with self._exclusive() if self._exclusive is not None else contextlib.nullcontext():
            with self._lock:
                yield

    def complete(self, state: CpuState, memory: PhysicalMemory,
                 instruction_bytes: bytes | None = None) -> Completion:
        """Complete the instruction at ``state.rip``. ``instruction_bytes`` are the bytes the
        exit carried (else they are fetched through the guest page tables). Raises
        :class:`CannotComplete` for what hvvmm cannot do; the state is then unchanged."""
        access = GuestMemoryAccess(state, memory)
        if not instruction_bytes:
            start = state.rip if state.mode.long64 else \
                (state.segments["cs"].base + state.rip) & 0xFFFF_FFFF
            instruction_bytes = access.fetch(start, 15)
        try:
            instruction = decode(instruction_bytes, state.mode)
        except DecodeError as exc:
            raise CannotComplete(str(exc)) from None
        handler = _HANDLERS.get(instruction.mnemonic)
        if handler is None:
            raise CannotComplete(NOT_COMPLETED.get(instruction.mnemonic,
                                                   f"no handler for {instruction.mnemonic}"),
                                 instruction)
        saved = (list(state.gprs), state.rip, state.rflags, set(state.dirty))
        try:
            if instruction.lock and instruction.mnemonic not in _LOCKABLE:
                raise GuestFault(UD_VECTOR, why="lock prefix")
            handler(_Context(self, state, access), instruction)
        except CannotComplete as exc:
            state.gprs, state.rip, state.rflags, state.dirty = saved
            raise CannotComplete(str(exc), instruction) from exc.__cause__
        except GuestFault as fault:
            state.gprs, state.rip, state.rflags, state.dirty = saved
            state.event = Event("exception", fault.vector, fault.error_code, fault.cr2)
            with self._lock:
                self.faults[instruction.mnemonic] += 1
            return Completion(instruction, FAULTED)
        with self._lock:
            self.counts[instruction.mnemonic] += 1
        return Completion(instruction, COMPLETED)


class _Context:
    __slots__ = ("completer", "state", "memory")

    def __init__(self, completer: Completer, state: CpuState, memory: GuestMemoryAccess):
        self.completer = completer
        self.state = state
        self.memory = memory

    def linear(self, insn: Instruction, size: int) -> int:
        """The linear address of the memory operand."""
        operand = insn.memory
        assert operand is not None
        gprs = self.state.gprs
        offset = operand.displacement
        if operand.base is not None:
            offset += gprs[operand.base]
        if operand.index is not None:
            offset += gprs[operand.index] * operand.scale
        if operand.rip_relative:
            offset += self.state.rip + insn.length
        return self.memory.linear_address(operand.segment, offset, size, operand.address_size)

    def read_operand(self, insn: Instruction, size: int) -> int:
        """The r/m operand: a register (mod == 3) or ``size`` bytes of memory."""
        if insn.rm is not None:
            return self.state.gpr(insn.rm, size)
        return int.from_bytes(self.memory.read(self.linear(insn, size), size), "little")


# -- software interrupts ---------------------------------------------------------------------
# RIP is moved past the instruction before the event is injected: the return address the guest's
# handler sees is the next instruction (SDM vol. 3A 6.5: #BP and INT n are traps). KVM delivers
# an event injected with KVM_SET_VCPU_EVENTS at the RIP user space set (its emulator path; on
# VMX/SVM a soft event would add the last exit's instruction length, but there these
# instructions never reach user space).

def _int3(ctx: _Context, insn: Instruction) -> None:
    ctx.state.advance(insn.length)
    ctx.state.raise_event(Event("exception", BP_VECTOR))


def _int1(ctx: _Context, insn: Instruction) -> None:
    ctx.state.advance(insn.length)
    ctx.state.raise_event(Event("exception", DB_VECTOR))


def _int_n(ctx: _Context, insn: Instruction) -> None:
    ctx.state.advance(insn.length)
    ctx.state.raise_event(Event("soft-interrupt", insn.immediate or 0))


def _into(ctx: _Context, insn: Instruction) -> None:
    """INTO is invalid in 64-bit mode; elsewhere a trap to #OF if RFLAGS.OF."""
    if ctx.state.mode.long64:
        raise GuestFault(UD_VECTOR, why="into in 64-bit mode")
    ctx.state.advance(insn.length)
    if ctx.state.rflags & OF:
        ctx.state.raise_event(Event("exception", OF_VECTOR))


# -- x87 and SSE control ---------------------------------------------------------------------

def _x87_available(state: CpuState) -> None:
    """#NM if CR0.EM or CR0.TS (SDM vol. 2 FNINIT/FNCLEX "Protected Mode Exceptions")."""
    if state.cr0 & (CR0_EM | CR0_TS):
        raise GuestFault(NM_VECTOR, why="x87 not available (CR0.EM/TS)")


def _fwait(ctx: _Context, insn: Instruction) -> None:
    """#NM if CR0.MP and CR0.TS; #MF if an unmasked x87 exception is pending and CR0.NE (with
    NE clear the CPU signals FERR# to an external interrupt line instead, which hvvmm does not
    wire: the wait completes). Otherwise a no-op."""
    state = ctx.state
    if state.cr0 & CR0_MP and state.cr0 & CR0_TS:
        raise GuestFault(NM_VECTOR, why="fwait with CR0.MP and CR0.TS")
    if state.fpu.fsw & FSW_ES and state.cr0 & CR0_NE:
        raise GuestFault(MF_VECTOR, why="pending x87 exception")
    state.advance(insn.length)


def _fninit(ctx: _Context, insn: Instruction) -> None:
    """FCW 0x037F, FSW 0, all tags empty, the last instruction/operand pointers cleared; MXCSR
    and the registers' contents stay (SDM vol. 2 FINIT/FNINIT)."""
    state = ctx.state
    _x87_available(state)
    fpu = state.fpu
    fpu.fcw, fpu.fsw, fpu.ftwx = 0x037F, 0, 0
    fpu.last_opcode = fpu.last_ip = fpu.last_dp = 0
    state.fpu_changed()
    state.advance(insn.length)


def _fnclex(ctx: _Context, insn: Instruction) -> None:
    """Clears FSW's exception flags (PE UE OE ZE DE IE), SF, ES and B (SDM vol. 2 FCLEX)."""
    state = ctx.state
    _x87_available(state)
    state.fpu.fsw &= ~0x80FF & 0xFFFF
    state.fpu_changed()
    state.advance(insn.length)


def _sse_available(state: CpuState) -> None:
    """#UD if CR0.EM or not CR4.OSFXSR; #NM if CR0.TS (SDM vol. 2 LDMXCSR)."""
    if state.cr0 & CR0_EM or not state.cr4 & CR4_OSFXSR:
        raise GuestFault(UD_VECTOR, why="SSE not enabled (CR0.EM or CR4.OSFXSR)")
    if state.cr0 & CR0_TS:
        raise GuestFault(NM_VECTOR, why="SSE with CR0.TS")


def _ldmxcsr(ctx: _Context, insn: Instruction) -> None:
    """#GP(0) for a bit outside MXCSR_MASK (the XSAVE area's, SDM vol. 1 11.6.6)."""
    state = ctx.state
    _sse_available(state)
    value = ctx.read_operand(insn, 4)
    if value & ~state.fpu.mxcsr_mask:
        raise GuestFault(GP_VECTOR, 0, why=f"reserved MXCSR bits in {value:#x}")
    state.fpu.mxcsr = value
    state.fpu_changed()
    state.advance(insn.length)


def _stmxcsr(ctx: _Context, insn: Instruction) -> None:
    state = ctx.state
    _sse_available(state)
    ctx.memory.write(ctx.linear(insn, 4), state.fpu.mxcsr.to_bytes(4, "little"))
    state.advance(insn.length)


# -- flags and bits ---------------------------------------------------------------------------

def _clac_stac(ctx: _Context, insn: Instruction) -> None:
    """#UD at CPL > 0 (SDM vol. 2 CLAC/STAC); sets or clears RFLAGS.AC, nothing else."""
    state = ctx.state
    if state.cpl > 0:
        raise GuestFault(UD_VECTOR, why=f"{insn.mnemonic} at CPL {state.cpl}")
    if insn.mnemonic == "stac":
        state.set_flags(0, AC)
    else:
        state.set_flags(AC)
    state.advance(insn.length)


def _popcnt(ctx: _Context, insn: Instruction) -> None:
    """ZF = (source == 0); CF, OF, SF, AF, PF cleared (SDM vol. 2 POPCNT "Flags Affected")."""
    state = ctx.state
    size = insn.operand_size
    source = ctx.read_operand(insn, size)
    state.set_gpr(insn.reg, bin(source).count("1"), size)
    state.set_flags(ARITHMETIC_FLAGS, ZF if source == 0 else 0)
    state.advance(insn.length)


def _rdrand(ctx: _Context, insn: Instruction) -> None:
    """A random value from the host and CF = 1 (valid); OF, SF, ZF, AF, PF cleared (SDM vol. 2
    RDRAND/RDSEED). The host's ``os.urandom`` never runs dry, so CF is always 1."""
    state = ctx.state
    size = insn.operand_size
    value = int.from_bytes(ctx.completer._random_bytes(size), "little")
    state.set_gpr(insn.rm, value, size)
    state.set_flags(ARITHMETIC_FLAGS, CF)
    state.advance(insn.length)


# -- segment bases ---------------------------------------------------------------------------

def _fsgsbase(ctx: _Context, insn: Instruction) -> None:
    """64-bit mode only and CR4.FSGSBASE, else #UD; WR*BASE of a non-canonical value is #GP(0)
    (SDM vol. 2 RDFSBASE/WRFSBASE). The 32-bit forms zero-extend."""
    state = ctx.state
    if not state.mode.long64:
        raise GuestFault(UD_VECTOR, why=f"{insn.mnemonic} outside 64-bit mode")
    if not state.cr4 & CR4_FSGSBASE:
        raise GuestFault(UD_VECTOR, why=f"{insn.mnemonic} with CR4.FSGSBASE clear")
    segment = "fs" if "fs" in insn.mnemonic else "gs"
    size = 8 if insn.rex_w else 4
    if insn.mnemonic.startswith("rd"):
        state.set_gpr(insn.rm, state.segments[segment].base, size)
    else:
        value = state.gpr(insn.rm, size)
        if not canonical(value, 57 if state.cr4 & CR4_LA57 else 48):
            raise GuestFault(GP_VECTOR, 0, why=f"non-canonical {segment} base {value:#x}")
        state.segments[segment].base = value
        state.dirty.add(f"{segment}_base")
    state.advance(insn.length)


# -- locked compare-exchange ------------------------------------------------------------------

def _cmpxchg8b_16b(ctx: _Context, insn: Instruction) -> None:
    """CMPXCHG8B/CMPXCHG16B (REX.W): compare EDX:EAX / RDX:RAX with the memory operand; equal:
    ZF = 1 and ECX:EBX / RCX:RBX is stored; else ZF = 0 and the operand is loaded into
    EDX:EAX / RDX:RAX. The 16-byte form needs a 16-byte aligned operand (#GP(0)). The operand
    is translated for writing either way (the CPU always writes it), and the read-modify-write
    runs with every other vCPU stopped (``Completer.atomically``)."""
    state = ctx.state
    wide = insn.rex_w
    half = 8 if wide else 4
    linear = ctx.linear(insn, 2 * half)
    if wide and linear % 16:
        raise GuestFault(GP_VECTOR, 0, why=f"cmpxchg16b operand {linear:#x} not 16-byte aligned")
    expected = state.gpr(RAX, half) | state.gpr(RDX, half) << (8 * half)
    with ctx.completer.atomically():
        # Translate for writing before reading, so a read-only page faults either way.
        ctx.memory.check_writable(linear, 2 * half)
        current = int.from_bytes(ctx.memory.read(linear, 2 * half), "little")
        if current == expected:
            replacement = state.gpr(RBX, half) | state.gpr(RCX, half) << (8 * half)
            ctx.memory.write(linear, replacement.to_bytes(2 * half, "little"))
    mask = (1 << (8 * half)) - 1
    if current == expected:
        state.set_flags(ZF, ZF)
    else:
        state.set_gpr(RAX, current & mask, half)
        state.set_gpr(RDX, current >> (8 * half), half)
        state.set_flags(ZF)
    state.advance(insn.length)


# -- TLB --------------------------------------------------------------------------------------

def _invpcid(ctx: _Context, insn: Instruction) -> None:
    """INVPCID (SDM vol. 2): #GP(0) at CPL > 0, for a type above 3, for descriptor bits 63:12
    set, for a non-canonical address (type 0), and for a non-zero PCID with CR4.PCIDE clear
    (types 0 and 1). Every type is done as a flush of the whole guest TLB, which is always
    allowed (it invalidates at least what the type asks for)."""
    state = ctx.state
    if state.cpl > 0:
        raise GuestFault(GP_VECTOR, 0, why="invpcid at CPL > 0")
    kind = state.gpr(insn.reg, 8 if state.mode.long64 else 4)
    descriptor = int.from_bytes(ctx.memory.read(ctx.linear(insn, 16), 16), "little")
    pcid, reserved, address = descriptor & 0xFFF, (descriptor >> 12) & ((1 << 52) - 1), \
        descriptor >> 64
    if kind > 3 or reserved:
        raise GuestFault(GP_VECTOR, 0, why=f"invpcid type {kind} / reserved descriptor bits")
    if kind == 0 and not canonical(address, 57 if state.cr4 & CR4_LA57 else 48):
        raise GuestFault(GP_VECTOR, 0, why=f"invpcid of non-canonical {address:#x}")
    if kind in (0, 1) and pcid and not state.cr4 & CR4_PCIDE:
        raise GuestFault(GP_VECTOR, 0, why="invpcid of a PCID with CR4.PCIDE clear")
    state.flush_tlb = True
    state.advance(insn.length)


# -- XSAVE / XRSTOR (standard format) ----------------------------------------------------------
# SDM vol. 1 13.7 (XSAVE) and 13.8 (XRSTOR). The vCPU's state comes from and goes back to
# KVM_GET/SET_XSAVE, whose 4 KiB area has the same standard layout: legacy region (x87 in bytes
# 0-23 and 32-159, MXCSR and MXCSR_MASK 24-31, XMM 160-415), XSAVE header at 512 (XSTATE_BV,
# XCOMP_BV), then component i at the CPUID 0xD.i offset. XSTATE_BV of KVM's area stands for
# XINUSE. The legacy region is copied in its 64-bit form (REX.W), what x86-64 kernels use.

XSAVE_HEADER = 512
_X87_RANGES = ((0, 24), (32, 160))
_SSE_RANGE = (160, 416)
_MXCSR_RANGE = (24, 32)
_MXCSR = -1  # not a component: MXCSR and MXCSR_MASK, shared by components 1 and 2
_AREA_SIZE = 4096


def xsave_layout(cpuid_entries) -> dict[int, tuple[int, int]]:
    """Component -> (offset, size) from CPUID 0xD sub-leaves 2..62 (``CpuidEntry`` objects)."""
    layout = {}
    for entry in cpuid_entries:
        if entry.function == 0xD and 2 <= entry.index < 63 and entry.eax:
            layout[entry.index] = (entry.ebx, entry.eax)
    return layout


def _component_ranges(ctx: _Context, rfbm: int) -> list[tuple[int, int, int]]:
    """(component, start, end) of every byte range of the area that RFBM selects."""
    ranges = []
    if rfbm & 1:
        ranges += [(0, start, end) for start, end in _X87_RANGES]
    if rfbm & 2:
        ranges.append((1, *_SSE_RANGE))
    if rfbm & 6:
        ranges.append((_MXCSR, *_MXCSR_RANGE))
    for component in range(2, 63):
        if rfbm >> component & 1:
            where = ctx.completer.xsave_layout.get(component)
            if where is None or where[0] + where[1] > _AREA_SIZE:
                raise CannotComplete(f"XSAVE state component {component} is not in the 4 KiB "
                                     "area KVM_GET_XSAVE gives")
            ranges.append((component, where[0], where[0] + where[1]))
    return ranges


def _xsave_checks(ctx: _Context, insn: Instruction) -> tuple[int, int]:
    """#UD without CR4.OSXSAVE, #NM with CR0.TS, #GP(0) unless 64-byte aligned; returns the
    area's linear address and RFBM = XCR0 & EDX:EAX."""
    state = ctx.state
    if not state.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD_VECTOR, why=f"{insn.mnemonic} with CR4.OSXSAVE clear")
    if state.cr0 & CR0_TS:
        raise GuestFault(NM_VECTOR, why=f"{insn.mnemonic} with CR0.TS")
    linear = ctx.linear(insn, XSAVE_HEADER + 64)
    if linear % 64:
        raise GuestFault(GP_VECTOR, 0, why=f"{insn.mnemonic} area {linear:#x} not 64-byte aligned")
    rfbm = state.xcr0 & ((state.gpr(RDX, 4) << 32) | state.gpr(RAX, 4))
    return linear, rfbm


def _xgetbv(ctx: _Context, insn: Instruction) -> None:
    """EDX:EAX = XCR[ECX]: XCR0, or for ECX = 1 XCR0 & XINUSE; #GP(0) for any other XCR, #UD
    without CR4.OSXSAVE (SDM vol. 2 XGETBV)."""
    state = ctx.state
    if not state.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD_VECTOR, why="xgetbv with CR4.OSXSAVE clear")
    index = state.gpr(RCX, 4)
    if index == 0:
        value = state.xcr0
    elif index == 1:
        in_use = int.from_bytes(state.xsave_area[XSAVE_HEADER:XSAVE_HEADER + 8], "little")
        value = state.xcr0 & in_use
    else:
        raise GuestFault(GP_VECTOR, 0, why=f"xgetbv of XCR{index}")
    state.set_gpr(RAX, value & 0xFFFF_FFFF, 4)
    state.set_gpr(RDX, value >> 32, 4)
    state.advance(insn.length)


def _xsave(ctx: _Context, insn: Instruction) -> None:
    """XSAVE/XSAVEOPT: each RFBM component to memory; XSTATE_BV[i] = XINUSE[i] for i in
    RFBM, the header's other bytes untouched (XSAVEOPT's optimizations are optional: it
    behaves as XSAVE here)."""
    state = ctx.state
    linear, rfbm = _xsave_checks(ctx, insn)
    ranges = _component_ranges(ctx, rfbm)
    area = state.xsave_area
    header = ctx.memory.read(linear + XSAVE_HEADER, 8)
    in_use = int.from_bytes(area[XSAVE_HEADER:XSAVE_HEADER + 8], "little")
    xstate_bv = (int.from_bytes(header, "little") & ~rfbm) | (in_use & rfbm)
    writes = [(start, bytes(area[start:end])) for _, start, end in ranges]
    writes.append((XSAVE_HEADER, xstate_bv.to_bytes(8, "little")))
    for offset, data in writes:  # every page checked before the first byte is written
        ctx.memory.check_writable(linear + offset, len(data))
    for offset, data in writes:
        ctx.memory.write(linear + offset, data)
    state.advance(insn.length)


def _xrstor(ctx: _Context, insn: Instruction) -> None:
    """XRSTOR, standard form: #GP(0) for XSTATE_BV bits outside XCR0, header bytes 8-23 not
    zero, or reserved MXCSR bits; each RFBM component is loaded from memory where XSTATE_BV
    has it and put in its initial state otherwise; MXCSR is loaded whenever RFBM[1] or
    RFBM[2] (SDM vol. 1 13.8.1). The compacted form (XCOMP_BV bit 63) is not completed."""
    state = ctx.state
    linear, rfbm = _xsave_checks(ctx, insn)
    header = ctx.memory.read(linear + XSAVE_HEADER, 64)
    xstate_bv = int.from_bytes(header[0:8], "little")
    if header[15] & 0x80:
        raise CannotComplete("xrstor of a compacted-format area is not completed by hvvmm")
    if xstate_bv & ~state.xcr0 or any(header[8:24]):
        raise GuestFault(GP_VECTOR, 0, why="xrstor: bad XSAVE header")
    ranges = _component_ranges(ctx, rfbm)
    mxcsr = None
    if rfbm & 6:
        mxcsr = int.from_bytes(ctx.memory.read(linear + 24, 4), "little")
        if mxcsr & ~state.fpu_mxcsr_mask():
            raise GuestFault(GP_VECTOR, 0, why=f"xrstor: reserved MXCSR bits in {mxcsr:#x}")
    area = state.xsave_area
    for component, start, end in ranges:
        if component == _MXCSR:
            continue
        if xstate_bv >> component & 1:
            area[start:end] = ctx.memory.read(linear + start, end - start)
        else:
            area[start:end] = bytes(end - start)
            if component == 0:
                area[0:2] = (0x037F).to_bytes(2, "little")  # FCW's initial value
    if mxcsr is not None:
        area[24:28] = mxcsr.to_bytes(4, "little")
    loaded = (int.from_bytes(area[XSAVE_HEADER:XSAVE_HEADER + 8], "little") & ~rfbm) | \
        (xstate_bv & rfbm)
    if mxcsr is not None:
        loaded |= 2  # KVM_SET_XSAVE takes MXCSR only with the SSE bit; XMM is loaded or zero
    area[XSAVE_HEADER:XSAVE_HEADER + 8] = loaded.to_bytes(8, "little")
    state.dirty.add("xsave")
    state.advance(insn.length)


_HANDLERS: dict[str, Callable[[_Context, Instruction], None]] = {
    "xsave": _xsave, "xsaveopt": _xsave, "xrstor": _xrstor, "xgetbv": _xgetbv,
    "int3": _int3, "int1": _int1, "int": _int_n, "into": _into,
    "fwait": _fwait, "fninit": _fninit, "fnclex": _fnclex,
    "ldmxcsr": _ldmxcsr, "stmxcsr": _stmxcsr,
    "clac": _clac_stac, "stac": _clac_stac,
    "popcnt": _popcnt,
    "rdrand": _rdrand, "rdseed": _rdrand,
    "rdfsbase": _fsgsbase, "rdgsbase": _fsgsbase, "wrfsbase": _fsgsbase, "wrgsbase": _fsgsbase,
    "cmpxchg8b": _cmpxchg8b_16b, "cmpxchg16b": _cmpxchg8b_16b,
    "invpcid": _invpcid,
}
_LOCKABLE = frozenset({"cmpxchg8b", "cmpxchg16b"})
COMPLETED_INSTRUCTIONS = tuple(sorted(_HANDLERS))
