"""Fakes for the hypercall unit tests: a dict-backed register file and call helpers.

Modelled on OpenVMM ``hv1_hypercall/src/tests.rs``: a fake register file, heap-backed guest
memory, and a fill pattern that makes over-reads and over-writes visible.
"""

from __future__ import annotations

import struct

from hvvmm.memory import GuestMemory

FILL_PATTERN = 0x123456789ABCDEF0  # OpenVMM's fill pattern
PAGE_BASE = 0xFFFF_F000  # where the fake hypercall page lives
STUB_RIP = PAGE_BASE + 6  # RIP after `endbr64; out NN, al` (emulator path, hypercall-trap.md §11)

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
U64 = (1 << 64) - 1
U128 = (1 << 128) - 1


class FakeRegisters:
    """A :class:`hvvmm.hv.hypercall.HypercallRegisters` over plain dicts, recording accesses."""

    def __init__(self, *, long_mode: bool = True, protected: bool = True, cpl: int = 0,
                 gprs: dict[str, int] | None = None, xmm: list[int] | None = None,
                 rip: int = STUB_RIP):
        self.long_mode = long_mode
        self.protected = protected
        self._cpl = cpl
        # Distinct junk in every register, so an unexpected write is visible.
        self.gprs = {name: (0xA5A5_0000_0000_0000 | i) for i, name in enumerate(GPR_NAMES)}
        if gprs:
            self.gprs.update(gprs)
        self.xmm = list(xmm) if xmm is not None else [(0xC3C3 << 112) | i for i in range(16)]
        self.rip = rip
        self.retries = 0
        self.xmm_reads: list[int] = []
        self.xmm_writes: list[int] = []
        self.gpr_writes: list[str] = []

    # -- HypercallRegisters -------------------------------------------------------------------

    def is_long_mode(self) -> bool:
        return self.long_mode

    def is_protected_mode(self) -> bool:
        return self.protected

    def cpl(self) -> int:
        return self._cpl

    def get_gpr(self, name: str) -> int:
        return self.gprs[name]

    def set_gpr(self, name: str, value: int) -> None:
        assert name in self.gprs, name
        assert 0 <= value <= U64, (name, value)
        self.gpr_writes.append(name)
        self.gprs[name] = value

    def get_xmm(self, index: int) -> int:
        assert 0 <= index < 6, index
        self.xmm_reads.append(index)
        return self.xmm[index]

    def set_xmm(self, index: int, value: int) -> None:
        assert 0 <= index < 6, index
        assert 0 <= value <= U128, value
        self.xmm_writes.append(index)
        self.xmm[index] = value

    def retry(self) -> None:
        self.retries += 1
        self.rip = PAGE_BASE

    # -- test helpers -------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        return dict(self.gprs), list(self.xmm), self.rip

    def set_call(self, control: int, input_gpa: int = 0, output_gpa: int = 0) -> None:
        """Load the input registers of the caller's convention (not recorded as writes)."""
        if self.long_mode:
            self.gprs["rcx"], self.gprs["rdx"], self.gprs["r8"] = control, input_gpa, output_gpa
        else:
            self.gprs["rdx"], self.gprs["rax"] = control >> 32, control & 0xFFFF_FFFF
            self.gprs["rbx"], self.gprs["rcx"] = input_gpa >> 32, input_gpa & 0xFFFF_FFFF
            self.gprs["rdi"], self.gprs["rsi"] = output_gpa >> 32, output_gpa & 0xFFFF_FFFF

    def set_fast_block(self, block: bytes) -> None:
        """Load a fast-call input block: pair 0 = RDX:R8 (EBX:ECX, EDI:ESI), then XMM0.."""
        block = block.ljust(-(-len(block) // 16) * 16, b"\0")
        for i in range(0, len(block), 16):
            lo, hi = struct.unpack_from("<QQ", block, i)
            if i == 0:
                self.set_call(self.control(), lo, hi)
            else:
                self.xmm[i // 16 - 1] = lo | (hi << 64)

    def control(self) -> int:
        if self.long_mode:
            return self.gprs["rcx"]
        return ((self.gprs["rdx"] & 0xFFFF_FFFF) << 32) | (self.gprs["rax"] & 0xFFFF_FFFF)

    def result(self) -> int:
        if self.long_mode:
            return self.gprs["rax"]
        return ((self.gprs["rdx"] & 0xFFFF_FFFF) << 32) | (self.gprs["rax"] & 0xFFFF_FFFF)

    def xmm_bytes(self, index: int) -> bytes:
        return self.xmm[index].to_bytes(16, "little")


def filled_memory(size: int = 0x10000, gpa: int = 0) -> GuestMemory:
    """Guest RAM filled with :data:`FILL_PATTERN`."""
    memory = GuestMemory.from_bytes(size, gpa)
    pattern = FILL_PATTERN.to_bytes(8, "little") * (size // 8)
    memory.write(gpa, pattern)
    return memory


def pattern_bytes(gpa: int, size: int) -> bytes:
    """What :func:`filled_memory` holds at ``[gpa, gpa+size)`` (8-aligned base)."""
    pattern = FILL_PATTERN.to_bytes(8, "little")
    start = gpa % 8
    return (pattern * ((start + size) // 8 + 2))[start:start + size]
