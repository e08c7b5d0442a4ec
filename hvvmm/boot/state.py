"""What every loader hands the machine: where the boot CPU starts, in which mode, with which
registers, and the one function that puts a vCPU into that state.

Loaders write only guest memory; :func:`apply_entry_state` is the only place that touches a vCPU,
and it does so through the KVM wrapper's ``get_sregs``/``set_sregs``/``get_regs``/``set_regs``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Mapping

from hvvmm.layout import PC


class KernelImageError(ValueError):
    """The kernel image (or what it asks of the loader) cannot be booted; the message says why."""


class CpuMode(enum.Enum):
    """The CPU mode a boot protocol enters the kernel in."""

    # Flat 4 GiB segments, paging off (Multiboot 0.6.96 §3.2, the Linux 32-bit boot protocol,
    # the Xen PVH ABI).
    PROTECTED32 = "32-bit protected mode"
    # Long mode with identity-mapped page tables (Linux Documentation/arch/x86/boot.rst,
    # "64-bit Boot Protocol").
    LONG64 = "64-bit long mode"


# The boot GDT's selectors. Linux's 32- and 64-bit boot protocols name them (__BOOT_CS 0x10,
# __BOOT_DS 0x18, boot.rst "32-bit Boot Protocol"/"64-bit Boot Protocol"); Multiboot and PVH
# kernels load their own GDT but get the same flat selectors. The TSS follows (KVM needs a usable
# TR to enter a long-mode guest on VMX: Intel SDM vol. 3 §28.3.1.2).
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT_LIMIT = BOOT_TSS + 16 - 1  # a 64-bit TSS descriptor takes two slots

_CODE_TYPE, _DATA_TYPE, _TSS_BUSY_TYPE = 0xB, 0x3, 0xB


@dataclass(frozen=True)
class BootState:
    """Where the loaded kernel starts and what it must be handed.

    ``registers`` holds the general registers the protocol defines at entry (``rax``, ``rbx``,
    ``rsi``, ...; the rest are zero). ``cr3`` is the page-table root for :attr:`CpuMode.LONG64`,
    ``gdt`` the ``(base, limit)`` of the GDT the loader wrote (``None``: none in memory).
    ``kernel_start``/``kernel_end`` bound the kernel's loaded image (end exclusive, bss
    included); ``info_end`` is one past the highest byte the loader wrote for the kernel.
    ``protocol`` names the boot format, for messages.
    """

    entry: int
    registers: Mapping[str, int] = field(default_factory=dict)
    mode: CpuMode = CpuMode.PROTECTED32
    cr3: int = 0
    gdt: tuple[int, int] | None = None
    kernel_start: int = 0
    kernel_end: int = 0
    info_end: int = 0
    protocol: str = "multiboot"

    @property
    def eax(self) -> int:
        return self.registers.get("rax", 0)

    @property
    def ebx(self) -> int:
        return self.registers.get("rbx", 0)

    @property
    def rsi(self) -> int:
        return self.registers.get("rsi", 0)


# -- GDT and page tables the loaders write ------------------------------------------------------


def _descriptor(base: int, limit: int, seg_type: int, *, s: int, long: int, db: int, g: int) -> int:
    """An 8-byte segment descriptor (Intel SDM vol. 3 §3.4.5, Figure 3-8), present, DPL 0."""
    return ((limit & 0xFFFF) | (base & 0xFF_FFFF) << 16 | seg_type << 40 | s << 44 | 1 << 47
            | (limit >> 16 & 0xF) << 48 | long << 53 | db << 54 | g << 55
            | (base >> 24 & 0xFF) << 56)


def boot_gdt(mode: CpuMode) -> bytes:
    """The boot GDT: two null slots, __BOOT_CS (64-bit code in long mode, else 32-bit), __BOOT_DS
    (flat data) and a TSS of 0x68 bytes at 0 (busy; a 64-bit descriptor in long mode)."""
    long = 1 if mode is CpuMode.LONG64 else 0
    code = _descriptor(0, 0xFFFFF, _CODE_TYPE, s=1, long=long, db=1 - long, g=1)
    data = _descriptor(0, 0xFFFFF, _DATA_TYPE, s=1, long=0, db=1, g=1)
    tss = _descriptor(0, 0x67, _TSS_BUSY_TYPE, s=0, long=0, db=0, g=0)
    return struct.pack("<6Q", 0, 0, code, data, tss, 0)


_PTE_PRESENT, _PTE_WRITE, _PTE_LARGE = 1 << 0, 1 << 1, 1 << 7
IDENTITY_MAP_SIZE = 4 << 30  # boot.rst's 64-bit protocol: "at least" the kernel; we map 4 GiB


def identity_page_tables(base: int, size: int = IDENTITY_MAP_SIZE) -> bytes:
    """4-level page tables at ``base`` (page aligned) that identity-map ``[0, size)`` with 2 MiB
    pages: the PML4 page, one PDPT page, then one page directory per GiB. CR3 = ``base``."""
    gibs = -(-size // (1 << 30))
    if gibs > 512:
        raise ValueError("the boot identity map covers at most 512 GiB")
    pml4, pdpt = bytearray(4096), bytearray(4096)
    struct.pack_into("<Q", pml4, 0, base + 4096 | _PTE_PRESENT | _PTE_WRITE)
    directories = bytearray(4096 * gibs)
    for gib in range(gibs):
        struct.pack_into("<Q", pdpt, 8 * gib, base + 8192 + 4096 * gib | _PTE_PRESENT | _PTE_WRITE)
        for index in range(512):
            address = (gib << 30) + (index << 21)
            struct.pack_into("<Q", directories, 4096 * gib + 8 * index,
                             address | _PTE_PRESENT | _PTE_WRITE | _PTE_LARGE)
    return bytes(pml4 + pdpt + directories)


# Where the Linux loaders put what they write below 1 MiB: the start of the boot data area of
# the PC layout, one page for the GDT, six for the page tables, one for the zero page (or the PVH
# start info), one for the PVH memory map; the command line from the next 64 KiB boundary.
BOOT_GDT = PC.boot_data[0]
BOOT_PAGE_TABLES = BOOT_GDT + 0x1000
BOOT_PARAMS = BOOT_PAGE_TABLES + 0x6000
BOOT_MEMMAP = BOOT_PARAMS + 0x1000
BOOT_CMDLINE = PC.boot_data[0] + 0x1_0000
BOOT_CMDLINE_MAX = PC.boot_data[1] - BOOT_CMDLINE  # bytes, NUL included


# -- applying the state to a vCPU ----------------------------------------------------------------


_CR0_PE, _CR0_ET, _CR0_PG = 1 << 0, 1 << 4, 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
_RFLAGS_RESERVED = 1 << 1  # bit 1 is always set; IF, TF, VM clear


def apply_entry_state(vcpu, boot: BootState) -> None:
    """Put ``vcpu`` into the entry state ``boot`` describes: flat segments with the boot
    selectors, the mode's control registers, ``rip`` = the entry, the protocol's registers, the
    rest zero and interrupts off."""
    long = boot.mode is CpuMode.LONG64
    sregs = vcpu.get_sregs()
    for name, selector, seg_type in (("cs", BOOT_CS, _CODE_TYPE), ("ds", BOOT_DS, _DATA_TYPE),
                                     ("es", BOOT_DS, _DATA_TYPE), ("fs", BOOT_DS, _DATA_TYPE),
                                     ("gs", BOOT_DS, _DATA_TYPE), ("ss", BOOT_DS, _DATA_TYPE)):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF_FFFF, selector, seg_type
        seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
        seg.l = 1 if long and name == "cs" else 0
        seg.db = 0 if long and name == "cs" else 1
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = 0, 0x67, BOOT_TSS, _TSS_BUSY_TYPE
    tr.present, tr.dpl, tr.s, tr.l, tr.db, tr.g, tr.avl, tr.unusable = 1, 0, 0, 0, 0, 0, 0, 0
    if boot.gdt is not None:
        sregs.gdt.base, sregs.gdt.limit = boot.gdt
    if long:
        sregs.cr0 = _CR0_PE | _CR0_ET | _CR0_PG
        sregs.cr3 = boot.cr3
        sregs.cr4 = _CR4_PAE
        sregs.efer = _EFER_LME | _EFER_LMA
    else:
        sregs.cr0 = _CR0_PE | _CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"):
        setattr(regs, name, boot.registers.get(name, 0))
    regs.rip = boot.entry
    regs.rflags = _RFLAGS_RESERVED
    vcpu.set_regs(regs)
