"""The Linux x86 boot protocol: bzImage and ELF ``vmlinux`` kernels entered with ``boot_params``.

Sources: Linux ``Documentation/arch/x86/boot.rst`` (the setup header, "Loading The Rest of The
Kernel", "32-bit Boot Protocol", "64-bit Boot Protocol") and ``Documentation/arch/x86/
zero-page.rst`` (the ``boot_params`` fields outside the header).

A bzImage is entered at ``startup_64`` (load address + 0x200) in long mode when its header says
the kernel has that entry (protocol 2.12 ``XLF_KERNEL_64``), else at the load address in 32-bit
protected mode; in both, RSI/ESI holds the zero page's address. An ELF ``vmlinux`` (a bzImage's
payload unpacked in the host, or a kernel build's own ``vmlinux``) is loaded at its physical
addresses and entered at its entry point in long mode, with a zero page whose header is the
bzImage's, or one made up for it. :mod:`hvvmm.boot.pvh` enters a vmlinux through its PVH note
instead; this module also serves it the command line and initrd placement.

Everything read from the image is checked; problems raise :class:`KernelImageError` with one
sentence. Nothing is written to guest memory before the whole load has been planned.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Sequence

from hvvmm.layout import E820_RAM, MemoryMapEntry, MiB
from hvvmm.memory import PAGE_SIZE, GuestMemory

from .decompress import HOST_FORMATS, decompress_payload, payload_format
from .elf import EM_X86_64, ElfImage, parse_elf
from .placement import check_kernel, ram_contains, write
from .state import (BOOT_CMDLINE, BOOT_CMDLINE_MAX, BOOT_GDT, BOOT_PAGE_TABLES, BOOT_PARAMS,
                    GDT_LIMIT, BootState, CpuMode, KernelImageError, boot_gdt,
                    identity_page_tables)

log = logging.getLogger(__name__)

# -- the setup header (boot.rst, "The Real-Mode Kernel Header") ---------------------------------

# name: (offset in the image and in boot_params, struct format)
SETUP_HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "setup_sects": (0x1F1, "B"),
    "root_flags": (0x1F2, "H"),
    "syssize": (0x1F4, "I"),
    "ram_size": (0x1F8, "H"),
    "vid_mode": (0x1FA, "H"),
    "root_dev": (0x1FC, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "realmode_swtch": (0x208, "I"),
    "start_sys_seg": (0x20C, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "setup_move_size": (0x212, "H"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "bootsect_kludge": (0x220, "I"),
    "heap_end_ptr": (0x224, "H"),
    "ext_loader_ver": (0x226, "B"),
    "ext_loader_type": (0x227, "B"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"),
    "hardware_subarch_data": (0x240, "Q"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
    "handover_offset": (0x264, "I"),
    "kernel_info_offset": (0x268, "I"),
}
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_MAX_END = 0x290  # boot_params.edd_mbr_sig_buffer follows struct setup_header

# boot_params outside the setup header (zero-page.rst): name: (offset, struct format)
BOOT_PARAMS_FIELDS: dict[str, tuple[int, str]] = {
    "acpi_rsdp_addr": (0x070, "Q"),
    "ext_ramdisk_image": (0x0C0, "I"),
    "ext_ramdisk_size": (0x0C4, "I"),
    "ext_cmd_line_ptr": (0x0C8, "I"),
    "e820_entries": (0x1E8, "B"),
    "sentinel": (0x1EF, "B"),
    "e820_table": (0x2D0, "QQI"),  # struct boot_e820_entry {u64 addr, size; u32 type} packed
}
BOOT_PARAMS_SIZE = 4096
E820_MAX_ENTRIES_ZEROPAGE = 128
_E820_ENTRY = struct.Struct("<QQI")

HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x0206
LOADED_HIGH = 1 << 0
XLF_KERNEL_64 = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
STARTUP_64_OFFSET = 0x200
DEFAULT_CMDLINE_SIZE = 2047  # COMMAND_LINE_SIZE (2048, asm/setup.h) less the NUL
_4GiB = 1 << 32
_PROTECTED_MODE_MIN = 0x10_0000  # boot.rst: the protected-mode kernel goes at 1 MiB or above


def is_bzimage(image: bytes) -> bool:
    return len(image) >= 0x206 and struct.unpack_from("<I", image, 0x202)[0] == HDRS_MAGIC


def header_field(buffer: bytes | bytearray, name: str) -> int:
    offset, fmt = SETUP_HEADER_FIELDS[name]
    return struct.unpack_from("<" + fmt, buffer, offset)[0]


def set_field(buffer: bytearray, name: str, value: int) -> None:
    offset, fmt = SETUP_HEADER_FIELDS.get(name) or BOOT_PARAMS_FIELDS[name]
    struct.pack_into("<" + fmt, buffer, offset, value)


def protocol_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


@dataclass(frozen=True)
class SetupHeader:
    """A bzImage's setup header, checked against the file."""

    raw: bytes          # image bytes [0, header end): the header at its boot_params offsets
    version: int
    setup_size: int     # bytes of real-mode setup code (the protected-mode part follows)
    kernel: memoryview  # the protected-mode part, as long as the header says

    def __getitem__(self, name: str) -> int:
        offset, fmt = SETUP_HEADER_FIELDS[name]
        if offset + struct.calcsize("<" + fmt) > len(self.raw):
            return 0
        return header_field(self.raw, name)


def parse_setup_header(image: bytes) -> SetupHeader:
    """Check a bzImage's header (protocol 2.06 or later) and find its protected-mode part."""
    if not is_bzimage(image):
        raise KernelImageError("not a bzImage (no \"HdrS\" at offset 0x202)")
    version = header_field(image, "version")
    if version < MIN_PROTOCOL:
        raise KernelImageError(
            f"the bzImage uses Linux boot protocol {protocol_text(version)}, too old: hvvmm needs "
            f"{protocol_text(MIN_PROTOCOL)} or later")
    # The header ends at 0x202 + the jump's offset byte (boot.rst, "the end of the setup header").
    end = min(0x202 + image[0x201], SETUP_HEADER_MAX_END)
    if len(image) < end or end < 0x23C:  # 2.06 has fields up to cmdline_size
        raise KernelImageError(
            f"the bzImage is truncated inside its setup header ({len(image)} bytes)")
    setup_sects = header_field(image, "setup_sects") or 4  # 0 means 4 (boot.rst)
    setup_size = (setup_sects + 1) * 512
    syssize = header_field(image, "syssize") * 16  # 16-byte paragraphs, protocol 2.04+
    kernel_size = syssize or len(image) - setup_size
    if setup_size + kernel_size > len(image) or kernel_size <= STARTUP_64_OFFSET:
        raise KernelImageError(
            f"the bzImage is truncated: its header says {setup_size} bytes of setup and "
            f"{kernel_size} bytes of kernel, but the file has {len(image)} bytes")
    kernel = memoryview(image)[setup_size:setup_size + kernel_size]
    return SetupHeader(bytes(image[:end]), version, setup_size, kernel)


# -- boot data common to the bzImage and vmlinux entries ----------------------------------------


def cmdline_bytes(append: str, limit: int) -> bytes:
    """The NUL-terminated command line, checked against the kernel's ``cmdline_size``."""
    encoded = append.encode("utf-8")
    if b"\0" in encoded:
        raise ValueError("the kernel command line contains a NUL character")
    limit = min(limit, BOOT_CMDLINE_MAX - 1)
    if len(encoded) > limit:
        raise KernelImageError(
            f"the command line is {len(encoded)} bytes, longer than this kernel accepts "
            f"(cmdline_size {limit})")
    return encoded + b"\0"


def place_initrd(memory_map: Sequence[MemoryMapEntry], size: int, *, above: int, limit: int,
                 ram_size: int) -> int:
    """The highest page-aligned address where ``size`` bytes lie in one e820 RAM range, at or
    above ``above`` and ending at or below ``limit`` (``initrd_addr_max`` + 1), as boot.rst asks
    ("as high as possible")."""
    if size > ram_size:
        raise KernelImageError(
            f"the initrd ({-(-size // MiB)} MiB) is larger than guest RAM ({ram_size // MiB} MiB)")
    for entry in sorted(memory_map, key=lambda e: e.base, reverse=True):
        if entry.type != E820_RAM:
            continue
        top = min(entry.end, limit)
        address = (top - size) // PAGE_SIZE * PAGE_SIZE
        if address >= max(entry.base, above) and address + size <= top:
            return address
    raise KernelImageError(
        f"the initrd ({-(-size // MiB)} MiB) does not fit in guest RAM between the kernel's end "
        f"({above:#x}) and the highest address it may use ({limit - 1:#x}, initrd_addr_max)")


def _e820_table(memory_map: Sequence[MemoryMapEntry]) -> list[MemoryMapEntry]:
    entries = [entry for entry in memory_map if entry.length]
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"the memory map has {len(entries)} entries; the zero page holds "
                         f"{E820_MAX_ENTRIES_ZEROPAGE}")
    return entries


def make_boot_params(header: bytes, *, memory_map: Sequence[MemoryMapEntry], cmdline_addr: int,
                     initrd: tuple[int, int] | None, rsdp: int | None,
                     code32_start: int | None = None) -> bytearray:
    """The zero page: all zeros (so ``sentinel`` is 0), the setup header copied from the image
    at its offsets, and what the loader fills in (boot.rst "Details of Header Fields",
    zero-page.rst)."""
    params = bytearray(BOOT_PARAMS_SIZE)
    end = min(len(header), SETUP_HEADER_MAX_END)
    params[SETUP_HEADER_START:end] = header[SETUP_HEADER_START:end]
    set_field(params, "vid_mode", 0xFFFF)  # "normal"
    set_field(params, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    set_field(params, "loadflags", params[0x211] | LOADED_HIGH)
    set_field(params, "cmd_line_ptr", cmdline_addr & 0xFFFF_FFFF)
    set_field(params, "ext_cmd_line_ptr", cmdline_addr >> 32)
    set_field(params, "hardware_subarch", 0)  # a PC
    if code32_start is not None:
        set_field(params, "code32_start", code32_start)
    if initrd is not None:
        address, size = initrd
        set_field(params, "ramdisk_image", address & 0xFFFF_FFFF)
        set_field(params, "ramdisk_size", size & 0xFFFF_FFFF)
        set_field(params, "ext_ramdisk_image", address >> 32)
        set_field(params, "ext_ramdisk_size", size >> 32)
    if rsdp:
        set_field(params, "acpi_rsdp_addr", rsdp)
    entries = _e820_table(memory_map)
    set_field(params, "e820_entries", len(entries))
    table = BOOT_PARAMS_FIELDS["e820_table"][0]
    for index, entry in enumerate(entries):
        _E820_ENTRY.pack_into(params, table + index * _E820_ENTRY.size, entry.base, entry.length,
                              entry.type)
    return params


def synthetic_header() -> bytes:
    """A setup header for a kernel that has none (an ELF vmlinux): what a bzImage of protocol
    2.15 would say, as rust-vmm linux-loader and Firecracker make up for ELF kernels."""
    raw = bytearray(SETUP_HEADER_MAX_END)
    for name, value in (("boot_flag", BOOT_FLAG), ("header", HDRS_MAGIC), ("version", 0x020F),
                        ("loadflags", LOADED_HIGH), ("kernel_alignment", 0x100_0000),
                        ("initrd_addr_max", 0x7FFF_FFFF), ("cmdline_size", DEFAULT_CMDLINE_SIZE),
                        ("xloadflags", XLF_KERNEL_64)):
        set_field(raw, name, value)
    return bytes(raw)


@dataclass(frozen=True)
class _Plan:
    """What a Linux load writes: (gpa, bytes, zero-fill size) copies, and the entry."""

    writes: list[tuple[int, bytes | memoryview, int]]
    state: BootState


def _write_plan(memory: GuestMemory, plan: _Plan) -> BootState:
    for gpa, data, size in plan.writes:
        write(memory, gpa, data, size)
    return plan.state


def _boot_tables(mode: CpuMode) -> list[tuple[int, bytes, int]]:
    writes = [(BOOT_GDT, boot_gdt(mode), 0)]
    if mode is CpuMode.LONG64:
        writes.append((BOOT_PAGE_TABLES, identity_page_tables(BOOT_PAGE_TABLES), 0))
    return writes


def low_ram_end(memory_map: Sequence[MemoryMapEntry]) -> int:
    """The end of the highest RAM range that starts below 4 GiB: the loaders keep what they
    place (the initrd) below it, inside the boot identity map and 32-bit reach."""
    return max((e.end for e in memory_map if e.type == E820_RAM and e.base < _4GiB),
               default=0)


def _common(memory: GuestMemory, *, header: bytes, mode: CpuMode, entry: int,
            kernel_range: tuple[int, int], append: str, initrd: bytes | None,
            memory_map: Sequence[MemoryMapEntry], rsdp: int | None,
            initrd_limit: int, code32_start: int | None,
            protocol: str) -> tuple[list[tuple[int, bytes | memoryview, int]], BootState]:
    """Command line, initrd, zero page, GDT and page tables; the entry state with RSI."""
    cmdline = cmdline_bytes(append, header_field(header, "cmdline_size") or DEFAULT_CMDLINE_SIZE)
    writes: list[tuple[int, bytes | memoryview, int]] = []
    initrd_at = None
    info_end = BOOT_CMDLINE + len(cmdline)
    if initrd is not None:
        limit = min(initrd_limit, low_ram_end(memory_map))
        address = place_initrd(memory_map, len(initrd), above=kernel_range[1], limit=limit,
                               ram_size=memory.size)
        initrd_at = (address, len(initrd))
        writes.append((address, initrd, 0))
        info_end = max(info_end, address + len(initrd))
    params = make_boot_params(header, memory_map=memory_map, cmdline_addr=BOOT_CMDLINE,
                              initrd=initrd_at, rsdp=rsdp, code32_start=code32_start)
    writes += _boot_tables(mode)
    writes += [(BOOT_PARAMS, bytes(params), 0), (BOOT_CMDLINE, cmdline, 0)]
    state = BootState(entry=entry, registers={"rsi": BOOT_PARAMS}, mode=mode,
                      cr3=BOOT_PAGE_TABLES if mode is CpuMode.LONG64 else 0,
                      gdt=(BOOT_GDT, GDT_LIMIT), kernel_start=kernel_range[0],
                      kernel_end=kernel_range[1], info_end=max(info_end, kernel_range[1]),
                      protocol=protocol)
    return writes, state


# -- bzImage ------------------------------------------------------------------------------------


def _load_address(header: SetupHeader) -> int:
    """pref_address (2.10+) for the kernel's own choice, else 1 MiB; a relocatable kernel's
    address rounded up to kernel_alignment (boot.rst, "relocatable_kernel")."""
    address = header["pref_address"] if header.version >= 0x020A else 0x10_0000
    address = address or 0x10_0000
    alignment = header["kernel_alignment"]
    if header["relocatable_kernel"] and alignment and alignment & (alignment - 1) == 0:
        address = -(-address // alignment) * alignment
    return address


def load_bzimage(memory: GuestMemory, image: bytes, *, append: str, initrd: bytes | None,
                 memory_map: Sequence[MemoryMapEntry], rsdp: int | None,
                 decompress: str = "host") -> BootState:
    """Load a bzImage. ``decompress="host"`` unpacks the payload here and boots the vmlinux
    (through PVH if it has the note); ``"guest"``, or a payload this host cannot unpack, enters
    the kernel's own decompressor."""
    header = parse_setup_header(image)
    if decompress == "host":
        vmlinux = _host_unpack(header, memory.size)
        if vmlinux is not None:
            from .pvh import PVH_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, load_pvh

            elf = parse_elf(vmlinux)
            if elf.find_note(PVH_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY) is not None:
                return load_pvh(memory, vmlinux, append=append, initrd=initrd,
                                memory_map=memory_map, rsdp=rsdp, header=header.raw, elf=elf)
            return load_vmlinux(memory, vmlinux, append=append, initrd=initrd,
                                memory_map=memory_map, rsdp=rsdp, header=header.raw, elf=elf)
    elif decompress != "guest":
        raise ValueError(f"decompress must be 'host' or 'guest', not {decompress!r}")

    load_at = _load_address(header)
    span = max(header["init_size"], len(header.kernel))
    long = header.version >= 0x020C and header["xloadflags"] & XLF_KERNEL_64
    if load_at < _PROTECTED_MODE_MIN:
        raise KernelImageError(
            f"the bzImage asks to be loaded at {load_at:#x} (pref_address), below 1 MiB where a "
            f"protected-mode kernel must lie")
    if load_at + span > _4GiB or not ram_contains(memory, load_at, span) or not all(
            e.type == E820_RAM or not e.length or e.end <= load_at or e.base >= load_at + span
            for e in memory_map):
        raise KernelImageError(
            f"the kernel needs {-(-span // MiB)} MiB of RAM from {load_at:#x} (init_size), "
            f"more than the guest's {memory.size // MiB} MiB allow")
    mode = CpuMode.LONG64 if long else CpuMode.PROTECTED32
    entry = load_at + STARTUP_64_OFFSET if long else load_at
    writes, state = _common(
        memory, header=header.raw, mode=mode, entry=entry, kernel_range=(load_at, load_at + span),
        append=append, initrd=initrd, memory_map=memory_map, rsdp=rsdp,
        initrd_limit=header["initrd_addr_max"] + 1, code32_start=load_at,
        protocol=f"Linux bzImage (boot protocol {protocol_text(header.version)}, "
                 f"{'64' if long else '32'}-bit entry)")
    writes.insert(0, (load_at, header.kernel, 0))
    return _write_plan(memory, _Plan(writes, state))


def _host_unpack(header: SetupHeader, limit: int) -> bytes | None:
    """The payload unpacked, or ``None`` when it is left to the guest (no payload fields before
    protocol 2.08, no payload, or a format hvvmm cannot unpack)."""
    if header.version < 0x0208:
        return None
    offset, length = header["payload_offset"], header["payload_length"]
    if not length:
        return None
    if offset + length > len(header.kernel):
        raise KernelImageError(
            f"the bzImage is truncated: its payload ({length} bytes at {offset:#x}) runs past the "
            f"end of the kernel ({len(header.kernel)} bytes)")
    payload = bytes(header.kernel[offset:offset + length])
    name = payload_format(payload)
    if name not in HOST_FORMATS:
        log.info("the kernel payload (%s) is left to the kernel's own decompressor",
                 name or "uncompressed or unknown format")
        return None
    vmlinux = decompress_payload(payload, limit)
    if not vmlinux.startswith(b"\x7fELF"):
        raise KernelImageError(f"the {name} kernel payload decompresses to something other than "
                               f"an ELF vmlinux")
    return vmlinux


# -- ELF vmlinux, 64-bit entry ------------------------------------------------------------------


def plan_elf_segments(memory: GuestMemory, elf: ElfImage) -> tuple[int, int]:
    """Check the vmlinux's segments against RAM; their ``(start, end)``."""
    check_kernel(memory, elf.segments)
    start = min(seg.paddr for seg in elf.segments)
    end = max(seg.end for seg in elf.segments)
    boot_end = BOOT_CMDLINE + BOOT_CMDLINE_MAX
    if start < boot_end:
        raise KernelImageError(f"the kernel's segments start at {start:#x}, inside the boot data "
                               f"below {boot_end:#x}")
    return start, end


def segment_writes(elf: ElfImage) -> list[tuple[int, bytes | memoryview, int]]:
    return [(seg.paddr, seg.data, seg.memsz) for seg in elf.segments]


def _physical_entry(elf: ElfImage) -> int:
    """vmlinux's e_entry is physical (ENTRY(phys_startup_64)); a virtual one is translated."""
    for seg in elf.segments:
        if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz and seg.vaddr != seg.paddr:
            return elf.entry - seg.vaddr + seg.paddr
    for seg in elf.segments:
        if seg.paddr <= elf.entry < seg.end:
            return elf.entry
    raise KernelImageError(f"the {elf.kind} entry point {elf.entry:#x} lies in no loadable "
                           f"segment")


def load_vmlinux(memory: GuestMemory, image: bytes, *, append: str, initrd: bytes | None,
                 memory_map: Sequence[MemoryMapEntry], rsdp: int | None,
                 header: bytes | None = None, elf: ElfImage | None = None) -> BootState:
    """Load an x86-64 ELF vmlinux and enter its ``startup_64`` in long mode with RSI = the zero
    page (``arch/x86/kernel/head_64.S``). ``header``: the bzImage's setup header, if any."""
    elf = elf or parse_elf(image)
    if elf.machine != EM_X86_64:
        raise KernelImageError(f"the {elf.kind} kernel has no PVH note and is not x86-64, so "
                               f"there is no way to enter it")
    kernel_range = plan_elf_segments(memory, elf)
    entry = _physical_entry(elf)
    head = bytes(header) if header is not None else synthetic_header()
    writes, state = _common(
        memory, header=head, mode=CpuMode.LONG64, entry=entry, kernel_range=kernel_range,
        append=append, initrd=initrd, memory_map=memory_map, rsdp=rsdp,
        initrd_limit=header_field(head, "initrd_addr_max") + 1, code32_start=None,
        protocol="Linux ELF vmlinux (64-bit boot protocol)")
    return _write_plan(memory, _Plan(segment_writes(elf) + writes, state))


__all__ = ["SETUP_HEADER_FIELDS", "BOOT_PARAMS_FIELDS", "SetupHeader",
           "parse_setup_header", "is_bzimage", "load_bzimage", "load_vmlinux",
           "make_boot_params", "place_initrd", "cmdline_bytes"]
