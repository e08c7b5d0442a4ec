"""The register file the instruction handlers work on, and the faults they raise.

:class:`CpuState` is plain data: the general registers, RIP, RFLAGS, the segment registers,
control registers and EFER, loaded once per completion; the x87/SSE control state is loaded only
when a handler asks for it (``KVM_GET_FPU`` is not free). Handlers change it and record what must
go back (``dirty``), the event to deliver and whether the TLB must be flushed; the KVM side
(:mod:`hvvmm.x86.kvm_adapter`) writes it back. Unit tests build one by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .decode import CpuMode

U64 = (1 << 64) - 1

# RFLAGS bits (SDM vol. 1 3.4.3).
CF, PF, AF, ZF, SF, TF, IF, DF, OF = (1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 9,
                                      1 << 10, 1 << 11)
AC = 1 << 18
ARITHMETIC_FLAGS = CF | PF | AF | ZF | SF | OF

# Control registers and EFER (SDM vol. 3A 2.5, 2.2.1).
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_NE, CR0_WP, CR0_PG = (1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 5,
                                                         1 << 16, 1 << 31)
CR4_PSE, CR4_PAE, CR4_OSFXSR, CR4_LA57, CR4_FSGSBASE, CR4_PCIDE, CR4_OSXSAVE, CR4_SMEP, \
    CR4_SMAP = (1 << 4, 1 << 5, 1 << 9, 1 << 12, 1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 21)
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

# Exception vectors (SDM vol. 3A table 6-1).
DB_VECTOR, BP_VECTOR, UD_VECTOR, NM_VECTOR = 1, 3, 6, 7
SS_VECTOR, GP_VECTOR, PF_VECTOR, MF_VECTOR = 12, 13, 14, 16

SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


class GuestFault(Exception):
    """The instruction faults: deliver ``vector`` (with ``error_code``; CR2 = ``cr2`` for #PF)
    instead of completing it. RIP stays on the instruction (faults, SDM vol. 3A 6.5)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None,
                 why: str = ""):
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2
        self.why = why
        super().__init__(why or f"vector {vector}")


class CannotComplete(Exception):
    """hvvmm cannot complete this instruction (unsupported, or it touches memory that is not
    RAM); the run ends with this message. ``instruction``: the decoded instruction, if it
    decoded."""

    def __init__(self, message: str, instruction=None):
        super().__init__(message)
        self.instruction = instruction


@dataclass
class Segment:
    base: int = 0
    limit: int = 0xFFFF_FFFF
    selector: int = 0
    type: int = 3
    present: bool = True
    dpl: int = 0
    db: bool = True
    long: bool = False
    unusable: bool = False


@dataclass(frozen=True)
class Event:
    """What to deliver when the guest resumes. ``kind``: "exception" (a fault or #BP/#DB,
    delivered with RIP as set) or "soft-interrupt" (INT n)."""

    kind: str
    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass
class FpuControl:
    """The x87/SSE control state a handler may read or change (the legacy region of the
    XSAVE area, SDM vol. 1 table 10-2)."""

    fcw: int = 0x037F
    fsw: int = 0
    ftwx: int = 0          # abridged tag word: bit set = register valid
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    mxcsr: int = 0x1F80
    mxcsr_mask: int = 0xFFFF  # the MXCSR bits LDMXCSR accepts (SDM vol. 1 11.6.6)


@dataclass
class CpuState:
    gprs: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0
    rflags: int = 0x2
    segments: dict[str, Segment] = field(default_factory=lambda: {s: Segment() for s in SEGMENTS})
    cr0: int = CR0_PE | CR0_PG | CR0_NE | CR0_WP
    cr2: int = 0
    cr3: int = 0
    cr4: int = CR4_PAE | CR4_OSFXSR
    efer: int = EFER_LME | EFER_LMA | EFER_NXE
    # Loaded on first use through the loaders (None: the default state).
    fpu_loader: Callable[[], FpuControl] | None = None
    _fpu: FpuControl | None = None
    xcr0_loader: Callable[[], int] | None = None      # XCR0 (KVM_GET_XCRS)
    _xcr0: int | None = None
    xsave_loader: Callable[[], bytes] | None = None   # the XSAVE area, standard format
    _xsave: bytearray | None = None
    # Effects for the KVM side.
    dirty: set[str] = field(default_factory=set)  # "regs", "fpu", "fs_base", "gs_base"
    event: Event | None = None
    flush_tlb: bool = False

    # -- mode ---------------------------------------------------------------------------------

    @property
    def long_mode(self) -> bool:
        """IA-32e mode (EFER.LMA): 64-bit or compatibility mode."""
        return bool(self.efer & EFER_LMA)

    @property
    def mode(self) -> CpuMode:
        cs = self.segments["cs"]
        if self.long_mode and cs.long:
            return CpuMode(True, True)
        if not self.cr0 & CR0_PE:
            return CpuMode(False, False)  # real mode: 16-bit defaults
        if self.rflags & (1 << 17):
            return CpuMode(False, False)  # virtual-8086 mode
        return CpuMode(False, cs.db)

    @property
    def cpl(self) -> int:
        """The current privilege level: SS.DPL, as KVM reports it (SDM vol. 3A 5.5: CS.DPL and
        SS.DPL equal CPL in protected mode); 0 in real mode, 3 in virtual-8086 mode."""
        if not self.cr0 & CR0_PE:
            return 0
        if self.rflags & (1 << 17):
            return 3
        return self.segments["ss"].dpl

    # -- registers ----------------------------------------------------------------------------

    def gpr(self, number: int, size: int = 8) -> int:
        """Register ``number`` (0-15) read as ``size`` bytes (no high-byte registers here)."""
        return self.gprs[number] & ((1 << (8 * size)) - 1)

    def set_gpr(self, number: int, value: int, size: int = 8) -> None:
        """Write ``size`` bytes: 4-byte writes zero the upper half, 1/2-byte writes keep the
        rest (SDM vol. 1 3.4.1.1)."""
        mask = (1 << (8 * size)) - 1
        if size >= 4:
            self.gprs[number] = value & mask
        else:
            self.gprs[number] = (self.gprs[number] & ~mask & U64) | (value & mask)
        self.dirty.add("regs")

    def set_flags(self, clear: int, set_: int = 0) -> None:
        self.rflags = (self.rflags & ~clear & U64) | set_ | 0x2
        self.dirty.add("regs")

    def advance(self, length: int) -> None:
        """RIP past the completed instruction (wrapping as the code size does)."""
        mask = U64 if self.mode.long64 else 0xFFFF_FFFF
        if not self.mode.long64 and not self.mode.default32:
            mask = 0xFFFF
        self.rip = (self.rip + length) & mask
        self.dirty.add("regs")

    # -- x87/SSE control ----------------------------------------------------------------------

    @property
    def fpu(self) -> FpuControl:
        if self._fpu is None:
            self._fpu = self.fpu_loader() if self.fpu_loader is not None else FpuControl()
        return self._fpu

    def fpu_changed(self) -> None:
        self.dirty.add("fpu")

    def fpu_mxcsr_mask(self) -> int:
        """MXCSR_MASK: from the XSAVE area when it is loaded, else the x87/SSE control state."""
        if self._xsave is not None:
            return int.from_bytes(self._xsave[28:32], "little") or 0xFFBF
        return self.fpu.mxcsr_mask

    @property
    def xcr0(self) -> int:
        if self._xcr0 is None:
            self._xcr0 = self.xcr0_loader() if self.xcr0_loader is not None else 0x3
        return self._xcr0

    @property
    def xsave_area(self) -> bytearray:
        """The vCPU's XSAVE area in the standard (non-compacted) format, as KVM_GET_XSAVE
        gives it (4 KiB): legacy region, header at 512, components at their CPUID 0xD
        offsets. Write it back with ``dirty.add("xsave")``."""
        if self._xsave is None:
            self._xsave = bytearray(self.xsave_loader() if self.xsave_loader is not None
                                    else _default_xsave_area())
        return self._xsave

    # -- events -------------------------------------------------------------------------------

    def raise_event(self, event: Event) -> None:
        self.event = event


def _default_xsave_area() -> bytes:
    """A reset-state XSAVE area: FCW 0x037F, MXCSR 0x1F80, MXCSR_MASK 0xFFFF, all else 0."""
    area = bytearray(4096)
    area[0:2] = (0x037F).to_bytes(2, "little")
    area[24:28] = (0x1F80).to_bytes(4, "little")
    area[28:32] = (0xFFFF).to_bytes(4, "little")
    return bytes(area)
