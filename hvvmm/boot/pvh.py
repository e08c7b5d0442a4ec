"""The PVH boot ABI: an ELF kernel with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note entered in 32-bit
flat protected mode, paging off, with EBX = the physical address of ``struct hvm_start_info``.

Sources: Xen ``xen/include/public/arch-x86/hvm/start_info.h`` (the structures, version 1) and
``docs/misc/pvh.pandoc`` (the entry state); ``xen/include/public/elfnote.h`` (note type 18). Linux
implements it in ``arch/x86/platform/pvh/head.S`` and ``enlighten.c``: it requires version 1 or
later and a memory map, takes module 0 as the initrd, and reads the start info, memory map and
command line before it has mapped more than the first GiB, so they are placed low.
"""

from __future__ import annotations

import struct
from typing import Sequence

from hvvmm.layout import MemoryMapEntry
from hvvmm.memory import GuestMemory

from .elf import ElfImage, parse_elf
from .linux import (DEFAULT_CMDLINE_SIZE, cmdline_bytes, header_field, low_ram_end,
                    place_initrd, plan_elf_segments, segment_writes)
from .placement import write
from .state import (BOOT_CMDLINE, BOOT_CMDLINE_MAX, BOOT_GDT, BOOT_MEMMAP, BOOT_PARAMS, GDT_LIMIT,
                    BootState, CpuMode, KernelImageError, boot_gdt)

PVH_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1

# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
HVM_START_INFO_FIELDS = ("magic", "version", "flags", "nr_modules", "modlist_paddr",
                         "cmdline_paddr", "rsdp_paddr", "memmap_paddr", "memmap_entries",
                         "reserved")
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr, size, cmdline_paddr, reserved
HVM_MEMMAP_TABLE_ENTRY = struct.Struct("<QQII")  # addr, size, type, reserved
# XEN_HVM_MEMMAP_TYPE_* are the e820 types (start_info.h), so the layout's map goes as it is.
_MODLIST = BOOT_PARAMS + 0x100
_4GiB = 1 << 32


def pvh_entry(elf: ElfImage) -> int | None:
    """The 32-bit entry address of the PVH note (a 4- or 8-byte value), or ``None``."""
    note = elf.find_note(PVH_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) == 4:
        (entry,) = struct.unpack("<I", note.desc)
    elif len(note.desc) == 8:
        (entry,) = struct.unpack("<Q", note.desc)
    else:
        raise KernelImageError(f"the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) has a "
                               f"{len(note.desc)}-byte value; 4 or 8 bytes expected")
    if entry >= _4GiB:
        raise KernelImageError(f"the PVH entry point {entry:#x} is not below 4 GiB")
    if not any(seg.paddr <= entry < seg.end for seg in elf.segments):
        raise KernelImageError(f"the PVH entry point {entry:#x} lies in no loadable segment")
    return entry


def make_start_info(*, cmdline_paddr: int, memmap: Sequence[MemoryMapEntry], memmap_paddr: int,
                    modlist_paddr: int, modules: Sequence[tuple[int, int]],
                    rsdp: int | None) -> tuple[bytes, bytes, bytes]:
    """``hvm_start_info`` v1, the module list and the memory map table, as bytes."""
    start_info = HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC_VALUE, HVM_START_INFO_VERSION, 0, len(modules),
        modlist_paddr if modules else 0, cmdline_paddr, rsdp or 0, memmap_paddr, len(memmap), 0)
    modlist = b"".join(HVM_MODLIST_ENTRY.pack(paddr, size, 0, 0) for paddr, size in modules)
    table = b"".join(HVM_MEMMAP_TABLE_ENTRY.pack(e.base, e.length, e.type, 0) for e in memmap)
    return start_info, modlist, table


def load_pvh(memory: GuestMemory, image: bytes, *, append: str, initrd: bytes | None,
             memory_map: Sequence[MemoryMapEntry], rsdp: int | None,
             header: bytes | None = None, elf: ElfImage | None = None) -> BootState:
    """Load an ELF kernel with a PVH note at its physical addresses and enter it through the
    note. ``header``: the setup header of the bzImage it came from (its ``cmdline_size`` and
    ``initrd_addr_max`` apply)."""
    elf = elf or parse_elf(image)
    entry = pvh_entry(elf)
    if entry is None:
        raise KernelImageError("the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    kernel_start, kernel_end = plan_elf_segments(memory, elf)
    if header is not None:
        cmdline_limit = header_field(header, "cmdline_size") or DEFAULT_CMDLINE_SIZE
        initrd_limit = header_field(header, "initrd_addr_max") + 1
    else:
        cmdline_limit, initrd_limit = BOOT_CMDLINE_MAX - 1, _4GiB
    cmdline = cmdline_bytes(append, cmdline_limit)
    memmap = [entry_ for entry_ in memory_map if entry_.length]
    if len(memmap) * HVM_MEMMAP_TABLE_ENTRY.size > 4096:
        raise ValueError(f"the memory map has {len(memmap)} entries, more than one page holds")
    writes: list[tuple[int, bytes | memoryview, int]] = segment_writes(elf)
    modules = []
    info_end = BOOT_CMDLINE + len(cmdline)
    if initrd is not None:
        address = place_initrd(memory_map, len(initrd), above=kernel_end,
                               limit=min(initrd_limit, low_ram_end(memory_map)),
                               ram_size=memory.size)
        modules.append((address, len(initrd)))
        writes.append((address, initrd, 0))
        info_end = max(info_end, address + len(initrd))
    start_info, modlist, table = make_start_info(
        cmdline_paddr=BOOT_CMDLINE, memmap=memmap, memmap_paddr=BOOT_MEMMAP,
        modlist_paddr=_MODLIST, modules=modules, rsdp=rsdp)
    writes += [(BOOT_GDT, boot_gdt(CpuMode.PROTECTED32), 0), (BOOT_PARAMS, start_info, 0),
               (_MODLIST, modlist, 0), (BOOT_MEMMAP, table, 0), (BOOT_CMDLINE, cmdline, 0)]
    for gpa, data, size in writes:
        write(memory, gpa, data, size)
    return BootState(entry=entry, registers={"rbx": BOOT_PARAMS}, mode=CpuMode.PROTECTED32,
                     gdt=(BOOT_GDT, GDT_LIMIT), kernel_start=kernel_start, kernel_end=kernel_end,
                     info_end=max(info_end, kernel_end), protocol="PVH (hvm_start_info v1)")
