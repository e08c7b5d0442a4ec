"""Multiboot (version 1, specification 0.6.96) kernel loader.

:func:`load_multiboot` places a Multiboot kernel, its boot modules and the ``multiboot_info`` block
in guest RAM and returns the register state the boot CPU must start with (:class:`BootState`). It
knows nothing of KVM: it only writes through :class:`~hvvmm.memory.GuestMemory`. Entering the kernel
(32-bit flat protected mode, ``EAX``/``EBX`` from the :class:`BootState`) is
:func:`hvvmm.boot.apply_entry_state`'s job.

The image comes from the user and is untrusted: every count, offset and size read from it is
checked against the file and against guest RAM before it is used, and any problem is reported as
:class:`KernelImageError` with one sentence saying what is wrong. Nothing is written to guest
memory until the whole load has been planned and checked, so a failed load leaves RAM untouched.

Guest-physical layout produced::

    kernel            where its ELF program headers (p_paddr) or a.out-kludge fields say
    modules           page aligned, one after another, from the page after the kernel's end
    info block        from the page after the last module: struct multiboot_info, memory map,
                      module list, then the NUL-terminated strings (command line, module strings,
                      boot loader name)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from hvvmm.layout import MemoryMapEntry
from hvvmm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

from .elf import is_elf, parse_elf
from .placement import check_kernel as _check_kernel, ram_contains as _ram_contains, write as _write
from .state import BootState, KernelImageError

__all__ = [
    "MULTIBOOT_HEADER_MAGIC",
    "MULTIBOOT_BOOTLOADER_MAGIC",
    "MULTIBOOT_SEARCH",
    "MULTIBOOT_INFO_SIZE",
    "KernelImageError",
    "MemoryMapEntry",
    "MultibootModule",
    "MultibootHeader",
    "BootState",
    "find_multiboot_header",
    "load_multiboot",
]

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192  # the header must lie wholly inside the first 8 KiB of the image

# Header flags (the kernel's requests).
MULTIBOOT_PAGE_ALIGN = 1 << 0  # modules page aligned: always done
MULTIBOOT_MEMORY_INFO = 1 << 1  # mem_* fields (and the memory map): always provided
MULTIBOOT_VIDEO_MODE = 1 << 2  # video mode table: no framebuffer, refused
MULTIBOOT_AOUT_KLUDGE = 1 << 16  # load from the header's address fields, not the ELF headers
_SUPPORTED_REQUIRED = MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO

# Boot information flags (what we provide).
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_MEM_MAP = 1 << 6
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9

# struct multiboot_info, spec 0.6.96: fields up to and including color_info (offsets 110-115).
MULTIBOOT_INFO_SIZE = 116
_INFO_FLAGS, _INFO_MEM_LOWER, _INFO_MEM_UPPER = 0, 4, 8
_INFO_CMDLINE, _INFO_MODS_COUNT, _INFO_MODS_ADDR = 16, 20, 24
_INFO_MMAP_LENGTH, _INFO_MMAP_ADDR = 44, 48
_INFO_BOOT_LOADER_NAME = 64
_MMAP_ENTRY = struct.Struct("<IQQI")  # size (=20, not counting itself), base_addr, length, type
_MOD_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end (exclusive), string, reserved

_KiB = 1024
_MiB = 1024 * 1024
_4GiB = 1 << 32
_LOWER_MEMORY_END = 640 * _KiB
_UPPER_MEMORY_START = _MiB

_U32 = struct.Struct("<I")
_HEADER_BASE = struct.Struct("<III")  # magic, flags, checksum
_HEADER_AOUT = struct.Struct("<IIIII")  # header_addr, load_addr, load_end_addr, bss_end_addr, entry

@dataclass(frozen=True)
class MultibootModule:
    """A boot module: its contents and its command line ("name args...", passed as given)."""

    data: bytes
    cmdline: str


@dataclass(frozen=True)
class MultibootHeader:
    """The Multiboot header found in a kernel image.

    The a.out-kludge address fields are only meaningful (and only read) when ``flags`` bit 16 is
    set; otherwise they are 0.
    """

    offset: int  # file offset of the magic
    flags: int
    checksum: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & MULTIBOOT_AOUT_KLUDGE)


@dataclass(frozen=True)
class _Segment:
    """A planned copy into guest RAM: ``data`` at ``gpa``, then zeros up to ``gpa + memsz``."""

    gpa: int
    memsz: int
    data: bytes | memoryview
    vaddr: int
    name: str

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


# -- header ------------------------------------------------------------------------------------


def _describe_bits(bits: int) -> str:
    numbers = [str(bit) for bit in range(32) if bits >> bit & 1]
    return ("bit " if len(numbers) == 1 else "bits ") + ", ".join(numbers)


def find_multiboot_header(image: bytes | bytearray | memoryview) -> MultibootHeader:
    """Find, parse and check the Multiboot header of ``image``.

    The header is the first 32-bit aligned occurrence of the magic in the first 8192 bytes whose
    checksum is right (as GRUB searches). Raises :class:`KernelImageError` if there is none, if the
    header asks for a required feature (flags bits 0-15) the loader cannot honour, or if the
    a.out-kludge fields it declares do not fit in the first 8192 bytes of the file.
    """
    image = bytes(image) if not isinstance(image, bytes) else image
    limit = min(len(image), MULTIBOOT_SEARCH)
    magic = _U32.pack(MULTIBOOT_HEADER_MAGIC)
    bad_checksum_at: int | None = None
    misaligned_at: int | None = None
    straddling_at: int | None = None
    offset = image.find(magic, 0, limit)
    found: tuple[int, int, int] | None = None
    while offset != -1:
        if offset % 4:
            if misaligned_at is None:
                misaligned_at = offset
        elif offset + _HEADER_BASE.size <= limit:
            _, flags, checksum = _HEADER_BASE.unpack_from(image, offset)
            if (MULTIBOOT_HEADER_MAGIC + flags + checksum) & 0xFFFF_FFFF == 0:
                found = (offset, flags, checksum)
                break
            if bad_checksum_at is None:
                bad_checksum_at = offset
        elif offset + _HEADER_BASE.size <= len(image):
            straddling_at = offset
        offset = image.find(magic, offset + 1, limit)

    if found is None:
        if bad_checksum_at is not None:
            raise KernelImageError(
                f"the multiboot header at file offset {bad_checksum_at:#x} has a bad checksum "
                f"(magic + flags + checksum must be 0 modulo 2^32)")
        later = straddling_at if straddling_at is not None else image.find(magic, limit)
        while later != -1 and later % 4:
            later = image.find(magic, later + 1)
        if later != -1:
            raise KernelImageError(
                f"the multiboot header magic is at file offset {later:#x}, but the header must lie "
                f"within the first {MULTIBOOT_SEARCH} bytes of the image")
        if misaligned_at is not None:
            raise KernelImageError(
                f"the multiboot header magic at file offset {misaligned_at:#x} is not 32-bit "
                f"aligned")
        raise KernelImageError(
            f"no multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#010x}) in the first "
            f"{MULTIBOOT_SEARCH} bytes of the image")

    offset, flags, checksum = found
    if flags & MULTIBOOT_VIDEO_MODE:
        raise KernelImageError(
            "the multiboot header requires a video mode (flags bit 2), but this machine has no "
            "framebuffer")
    unsupported = flags & 0xFFFF & ~_SUPPORTED_REQUIRED
    if unsupported:
        raise KernelImageError(
            f"the multiboot header requires unsupported features "
            f"(flags {_describe_bits(unsupported)} of {flags:#010x})")
    if not flags & MULTIBOOT_AOUT_KLUDGE:
        return MultibootHeader(offset, flags, checksum)

    fields_end = offset + _HEADER_BASE.size + _HEADER_AOUT.size
    if fields_end > limit:
        raise KernelImageError(
            f"the multiboot header at file offset {offset:#x} sets the a.out kludge (flags bit 16) "
            f"but its address fields end past "
            f"{'the end of the file' if limit < MULTIBOOT_SEARCH else 'the first 8192 bytes'}")
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = _HEADER_AOUT.unpack_from(
        image, offset + _HEADER_BASE.size)
    return MultibootHeader(offset, flags, checksum, header_addr, load_addr, load_end_addr,
                           bss_end_addr, entry_addr)


# -- kernel image ------------------------------------------------------------------------------


def _plan_aout(image: bytes, header: MultibootHeader) -> tuple[list[_Segment], int]:
    """The a.out-kludge load: one segment from the header's address fields, and the entry."""
    h = header
    if h.load_addr > h.header_addr:
        raise KernelImageError(
            f"a.out kludge: load_addr {h.load_addr:#x} is above header_addr {h.header_addr:#x}")
    file_offset = h.offset - (h.header_addr - h.load_addr)
    if file_offset < 0:
        raise KernelImageError(
            f"a.out kludge: header_addr - load_addr ({h.header_addr - h.load_addr:#x}) is larger "
            f"than the header's file offset ({h.offset:#x}), so the load would start before the "
            f"beginning of the file")
    if h.load_end_addr == 0:
        load_size = len(image) - file_offset
    else:
        if h.load_end_addr <= h.load_addr:
            raise KernelImageError(
                f"a.out kludge: load_end_addr {h.load_end_addr:#x} is not above load_addr "
                f"{h.load_addr:#x}")
        load_size = h.load_end_addr - h.load_addr
        if file_offset + load_size > len(image):
            raise KernelImageError(
                f"a.out kludge: loading {load_size:#x} bytes from file offset {file_offset:#x} "
                f"runs past the end of the {len(image):#x}-byte file")
    load_end = h.load_addr + load_size
    if h.bss_end_addr == 0:
        kernel_end = load_end
    elif h.bss_end_addr < load_end:
        raise KernelImageError(
            f"a.out kludge: bss_end_addr {h.bss_end_addr:#x} is below the end of the loaded "
            f"image {load_end:#x}")
    else:
        kernel_end = h.bss_end_addr
    if kernel_end > _4GiB:
        raise KernelImageError(
            f"a.out kludge: the image ({kernel_end - h.load_addr:#x} bytes at {h.load_addr:#x}) "
            f"extends past 4 GiB")
    if not h.load_addr <= h.entry_addr < kernel_end:
        raise KernelImageError(
            f"a.out kludge: entry_addr {h.entry_addr:#x} lies outside the kernel image "
            f"[{h.load_addr:#x}, {kernel_end:#x})")
    data = memoryview(image)[file_offset:file_offset + load_size]
    segment = _Segment(h.load_addr, kernel_end - h.load_addr, data, h.load_addr,
                       "a.out kernel segment")
    return [segment], h.entry_addr


def _plan_elf(image: bytes) -> tuple[list[_Segment], int]:
    """The ELF load: the PT_LOAD segments (by physical address) and the physical entry point."""
    if not is_elf(image):
        raise KernelImageError(
            "the kernel is not an ELF file and its multiboot header does not set the a.out kludge "
            "(flags bit 16)")
    elf = parse_elf(image)
    segments = [_Segment(seg.paddr, seg.memsz, seg.data, seg.vaddr, seg.name)
                for seg in elf.segments]
    # The entry point is a virtual address; find it in a segment and translate (as GRUB does).
    for segment in segments:
        if segment.vaddr <= elf.entry < segment.vaddr + segment.memsz:
            entry = elf.entry - segment.vaddr + segment.gpa
            break
    else:
        raise KernelImageError(
            f"the {elf.kind} entry point {elf.entry:#x} lies in no loadable segment")
    if entry >= _4GiB:
        raise KernelImageError(
            f"the {elf.kind} entry point {entry:#x} (physical) is not below 4 GiB, where 32-bit "
            f"protected-mode code can reach it")
    return segments, entry


# -- boot information --------------------------------------------------------------------------


def _c_string(text: str, what: str) -> bytes:
    encoded = text.encode("utf-8")
    if b"\0" in encoded:
        raise ValueError(f"the {what} contains a NUL character")
    return encoded + b"\0"


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _available_run(memory_map: Sequence[MemoryMapEntry], start: int) -> int:
    """Bytes of contiguous available (type 1) memory starting at ``start``, per ``memory_map``."""
    end = start
    grown = True
    while grown:
        grown = False
        for entry in memory_map:
            if entry.type == 1 and entry.base <= end < entry.end:
                end = entry.end
                grown = True
    for entry in memory_map:  # a non-available entry overlapping the run cuts it short
        if entry.type != 1 and entry.length and entry.base < end and entry.end > start:
            end = min(end, max(entry.base, start))
    return end - start


def _check_memory_map(memory_map: Sequence[MemoryMapEntry]) -> None:
    for entry in memory_map:
        if not (0 <= entry.base < 1 << 64 and 0 <= entry.length < 1 << 64
                and entry.base + entry.length <= 1 << 64 and 0 <= entry.type < 1 << 32):
            raise ValueError(f"bad memory map entry {entry}")


def load_multiboot(memory: GuestMemory, image: bytes | bytearray | memoryview, *, kernel_name: str,
                   append: str = "", modules: Sequence[MultibootModule] = (),
                   memory_map: Sequence[MemoryMapEntry], loader_name: str = "hvvmm") -> BootState:
    """Load the Multiboot kernel ``image``, its ``modules`` and the boot information into RAM.

    ``memory_map`` is what the guest is told (and what ``mem_lower``/``mem_upper`` are derived
    from); it should describe ``memory``. The kernel command line is ``kernel_name``, followed by
    ``" " + append`` if ``append`` is not empty. Raises :class:`KernelImageError` if the image is
    malformed, asks for something unsupported, or does not fit (with its modules and the info
    block) in guest RAM; :class:`ValueError` for bad arguments (a NUL in a string, a memory map
    entry out of range). On error nothing has been written to ``memory``.
    """
    image = bytes(image) if not isinstance(image, bytes) else image
    _check_memory_map(memory_map)
    cmdline = _c_string(kernel_name + (" " + append if append else ""), "kernel command line")
    module_strings = [_c_string(module.cmdline, "module command line") for module in modules]
    loader = _c_string(loader_name, "boot loader name")

    header = find_multiboot_header(image)
    if header.aout_kludge:
        segments, entry = _plan_aout(image, header)
    else:
        segments, entry = _plan_elf(image)
    _check_kernel(memory, segments)
    kernel_start = min(segment.gpa for segment in segments)
    kernel_end = max(segment.end for segment in segments)

    # Modules: page aligned (header flags bit 0), one after another, after the kernel.
    cursor = _align(kernel_end, PAGE_SIZE)
    placed: list[tuple[int, int]] = []
    for module in modules:
        placed.append((cursor, cursor + len(module.data)))
        cursor = _align(cursor + len(module.data), PAGE_SIZE)

    # Info block: struct, memory map, module list, strings.
    info = cursor
    mmap_addr = info + MULTIBOOT_INFO_SIZE + 4  # 8-byte aligned for the u64 fields' sake
    mmap_length = len(memory_map) * _MMAP_ENTRY.size
    mods_addr = mmap_addr + mmap_length
    strings_addr = mods_addr + len(modules) * _MOD_ENTRY.size
    strings = bytearray()

    def add_string(encoded: bytes) -> int:
        address = strings_addr + len(strings)
        strings.extend(encoded)
        return address

    cmdline_addr = add_string(cmdline)
    module_string_addrs = [add_string(encoded) for encoded in module_strings]
    loader_addr = add_string(loader)
    info_end = strings_addr + len(strings)

    start = _align(kernel_end, PAGE_SIZE)
    if info_end > _4GiB or not _ram_contains(memory, start, info_end - start):
        raise KernelImageError(
            f"the modules and boot information ({info_end - start:#x} bytes from {start:#x}, after "
            f"the kernel) do not fit in guest RAM below 4 GiB")
    for entry_ in memory_map:
        if entry_.type != 1 and entry_.length and entry_.base < info_end and entry_.end > start:
            raise KernelImageError(
                f"the modules and boot information ([{start:#x}, {info_end:#x}), after the kernel) "
                f"do not fit in guest RAM: they would overlap reserved memory at "
                f"[{entry_.base:#x}, {entry_.end:#x})")

    block = bytearray(info_end - info)
    mem_lower = min(_available_run(memory_map, 0), _LOWER_MEMORY_END) // _KiB
    mem_upper = min(_available_run(memory_map, _UPPER_MEMORY_START) // _KiB, 0xFFFF_FFFF)
    flags = (MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_CMDLINE | MULTIBOOT_INFO_MODS
             | MULTIBOOT_INFO_MEM_MAP | MULTIBOOT_INFO_BOOT_LOADER_NAME)
    for offset, value in ((_INFO_FLAGS, flags), (_INFO_MEM_LOWER, mem_lower),
                          (_INFO_MEM_UPPER, mem_upper), (_INFO_CMDLINE, cmdline_addr),
                          (_INFO_MODS_COUNT, len(modules)),
                          (_INFO_MODS_ADDR, mods_addr if modules else 0),
                          (_INFO_MMAP_LENGTH, mmap_length), (_INFO_MMAP_ADDR, mmap_addr),
                          (_INFO_BOOT_LOADER_NAME, loader_addr)):
        _U32.pack_into(block, offset, value)
    for index, entry_ in enumerate(memory_map):
        _MMAP_ENTRY.pack_into(block, mmap_addr - info + index * _MMAP_ENTRY.size,
                              _MMAP_ENTRY.size - 4, entry_.base, entry_.length, entry_.type)
    for index, ((mod_start, mod_end), string_addr) in enumerate(zip(placed, module_string_addrs)):
        _MOD_ENTRY.pack_into(block, mods_addr - info + index * _MOD_ENTRY.size,
                             mod_start, mod_end, string_addr, 0)
    block[strings_addr - info:] = strings

    # Everything is checked: write.
    try:
        for segment in segments:
            _write(memory, segment.gpa, segment.data, segment.memsz)
        for module, (mod_start, _) in zip(modules, placed):
            _write(memory, mod_start, module.data)
        _write(memory, info, block)
    except GuestMemoryError as error:  # not expected after the checks above
        raise KernelImageError(f"the kernel image does not fit in guest RAM ({error})") from error
    return BootState(entry=entry, registers={"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": info},
                     kernel_start=kernel_start, kernel_end=kernel_end, info_end=info_end)
