"""Unit tests for the Multiboot v1 loader (no /dev/kvm: images are built here with ``struct``)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.memory import GuestMemory, MemoryRegion
from hvvmm.boot.multiboot import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    MULTIBOOT_HEADER_MAGIC,
    MULTIBOOT_INFO_SIZE,
    BootState,
    KernelImageError,
    MemoryMapEntry,
    MultibootModule,
    find_multiboot_header,
    load_multiboot,
)

KiB, MiB = 1024, 1024 * 1024
PAGE = 4096
RAM = 4 * MiB

MAP = (
    MemoryMapEntry(0, 0x9FC00, 1),
    MemoryMapEntry(0x9FC00, 0x400, 2),
    MemoryMapEntry(0xF0000, 0x10000, 2),
    MemoryMapEntry(0x100000, 127 * MiB, 1),
)
SMALL_MAP = (MemoryMapEntry(0, 0x9FC00, 1), MemoryMapEntry(0x100000, RAM - MiB, 1))


# -- image builders ----------------------------------------------------------------------------


def mb_header(flags: int = 0x3, aout: tuple[int, int, int, int, int] | None = None,
              checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFF_FFFF
    head = struct.pack("<III", MULTIBOOT_HEADER_MAGIC, flags, checksum)
    return head + (struct.pack("<5I", *aout) if aout is not None else b"")


def elf(segments, entry: int, *, bits: int = 32, mb_flags: int = 0x3, e_type: int = 2,
        machine: int | None = None, extra_phdrs=()) -> bytes:
    """An ELF executable. ``segments``: (paddr, vaddr, data, memsz); ``extra_phdrs``: raw
    (type, offset, vaddr, paddr, filesz, memsz) program headers appended after the PT_LOADs."""
    ehsize, phentsize = (52, 32) if bits == 32 else (64, 56)
    phdrs = [(1, None, vaddr, paddr, len(data), memsz) for paddr, vaddr, data, memsz in segments]
    phdrs += list(extra_phdrs)
    header = mb_header(mb_flags)
    mb_offset = ehsize + phentsize * len(phdrs)
    data_offset = (mb_offset + len(header) + 15) & ~15
    blobs, offsets = b"", []
    for _, _, data, _ in segments:
        offsets.append(data_offset + len(blobs))
        blobs += data + bytes(-len(data) % 16)
    if machine is None:
        machine = 3 if bits == 32 else 62
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9)
    if bits == 32:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", e_type, machine, 1, entry, ehsize, 0, 0,
                                   ehsize, phentsize, len(phdrs), 40, 0, 0)
    else:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, ehsize, 0, 0,
                                   ehsize, phentsize, len(phdrs), 64, 0, 0)
    table = b""
    for index, (p_type, offset, vaddr, paddr, filesz, memsz) in enumerate(phdrs):
        if offset is None:
            offset = offsets[index]
        if bits == 32:
            table += struct.pack("<8I", p_type, offset, vaddr, paddr, filesz, memsz, 7, 16)
        else:
            table += struct.pack("<IIQQQQQQ", p_type, 7, offset, vaddr, paddr, filesz, memsz, 16)
    image = ehdr + table + header
    image += bytes(data_offset - len(image)) + blobs
    return image


def aout(body: bytes, *, load_addr: int = 0x100000, header_offset: int = 0x20,
         load_end: int | None = 0, bss_end: int = 0, entry: int | None = None,
         header_addr: int | None = None, flags: int = 0x10003) -> bytes:
    """A flat a.out-kludge image: header at ``header_offset`` in ``body`` (loaded from offset 0)."""
    if header_addr is None:
        header_addr = load_addr + header_offset
    if entry is None:
        entry = load_addr
    if load_end is None:
        load_end = load_addr + len(body)
    header = mb_header(flags, (header_addr, load_addr, load_end, bss_end, entry))
    image = bytearray(body)
    image[header_offset:header_offset + len(header)] = header
    return bytes(image)


CODE = bytes(range(1, 200))
DATA = b"data" * 50


def basic_elf(bits: int = 32, **kwargs) -> bytes:
    return elf([(0x100000, 0x100000, CODE, len(CODE)),
                (0x102000, 0x102000, DATA, 0x1800)], 0x100010, bits=bits, **kwargs)


def load(image: bytes, memory: GuestMemory | None = None,
         **kwargs) -> tuple[GuestMemory, BootState]:
    memory = memory if memory is not None else GuestMemory.from_bytes(RAM)
    kwargs.setdefault("kernel_name", "kernel")
    kwargs.setdefault("memory_map", SMALL_MAP)
    return memory, load_multiboot(memory, image, **kwargs)


def u32(memory: GuestMemory, gpa: int) -> int:
    return memory.read_u32(gpa)


def c_string(memory: GuestMemory, gpa: int) -> bytes:
    out = bytearray()
    while (byte := memory.read_u8(gpa + len(out))) != 0:
        out.append(byte)
    return bytes(out)


# -- header ------------------------------------------------------------------------------------


class TestHeader:
    def test_found_at_aligned_offset(self):
        image = bytes(0x40) + mb_header(0x3) + bytes(100)
        header = find_multiboot_header(image)
        assert (header.offset, header.flags) == (0x40, 0x3)
        assert (header.flags + header.checksum + MULTIBOOT_HEADER_MAGIC) % 2**32 == 0
        assert not header.aout_kludge

    def test_last_possible_offset(self):
        image = bytes(8192 - 12) + mb_header(0)
        assert find_multiboot_header(image).offset == 8180

    def test_beyond_8192_bytes(self):
        image = bytes(8192) + mb_header(0)
        with pytest.raises(KernelImageError, match="first 8192 bytes"):
            find_multiboot_header(image)

    def test_straddling_8192_bytes(self):
        image = bytes(8184) + mb_header(0) + bytes(16)
        with pytest.raises(KernelImageError, match="offset 0x1ff8, but .* first 8192 bytes"):
            find_multiboot_header(image)

    def test_misaligned(self):
        image = bytes(2) + mb_header(0) + bytes(16)
        with pytest.raises(KernelImageError, match="aligned"):
            find_multiboot_header(image)

    def test_bad_checksum(self):
        image = bytes(8) + mb_header(0x3, checksum=0x1234) + bytes(16)
        with pytest.raises(KernelImageError, match="checksum"):
            find_multiboot_header(image)

    def test_bad_checksum_candidate_skipped(self):
        image = mb_header(0x3, checksum=0) + bytes(4) + mb_header(0x2) + bytes(4)
        assert find_multiboot_header(image).offset == 16

    def test_misaligned_magic_skipped(self):
        image = bytes(1) + mb_header(0x3) + bytes(3) + mb_header(0x1)
        assert find_multiboot_header(image).offset == 16

    @pytest.mark.parametrize("image", [b"", b"\x02\xb0\xad", bytes(9000), b"\x7fELF" + bytes(60)])
    def test_missing(self, image):
        with pytest.raises(KernelImageError, match="no multiboot header"):
            find_multiboot_header(image)

    @pytest.mark.parametrize("bit", [3, 4, 7, 15])
    def test_unsupported_required_flag(self, bit):
        with pytest.raises(KernelImageError, match=f"bit {bit}\\b"):
            find_multiboot_header(mb_header(0x3 | 1 << bit))

    def test_several_unsupported_bits_named(self):
        with pytest.raises(KernelImageError, match="bits 5, 8"):
            find_multiboot_header(mb_header(1 << 5 | 1 << 8))

    def test_video_mode_refused(self):
        with pytest.raises(KernelImageError, match="video mode.*bit 2.*framebuffer"):
            find_multiboot_header(mb_header(0x7) + bytes(36))

    @pytest.mark.parametrize("bit", [17, 20, 31])
    def test_optional_flags_ignored(self, bit):
        assert find_multiboot_header(mb_header(0x3 | 1 << bit)).flags == 0x3 | 1 << bit

    def test_aout_fields_parsed(self):
        image = mb_header(0x10000, (1, 2, 3, 4, 5))
        header = find_multiboot_header(image)
        assert header.aout_kludge
        assert (header.header_addr, header.load_addr, header.load_end_addr, header.bss_end_addr,
                header.entry_addr) == (1, 2, 3, 4, 5)

    def test_aout_fields_truncated(self):
        with pytest.raises(KernelImageError, match="a.out kludge.*end of the file"):
            find_multiboot_header(mb_header(0x10000, (1, 2, 3, 4, 5))[:28])

    def test_aout_fields_past_8192(self):
        image = bytes(8176) + mb_header(0x10000, (1, 2, 3, 4, 5))
        with pytest.raises(KernelImageError, match="a.out kludge.*first 8192 bytes"):
            find_multiboot_header(image)

    def test_accepts_bytearray_and_memoryview(self):
        image = bytes(4) + mb_header()
        assert find_multiboot_header(bytearray(image)).offset == 4
        assert find_multiboot_header(memoryview(image)).offset == 4


# -- ELF ---------------------------------------------------------------------------------------


class TestElf:
    @pytest.mark.parametrize("bits", [32, 64])
    def test_segments_placed_and_bss_zeroed(self, bits):
        memory = GuestMemory.from_bytes(RAM)
        memory.fill(0, RAM, 0xAA)
        _, state = load(basic_elf(bits), memory)
        assert memory.read(0x100000, len(CODE)) == CODE
        assert memory.read(0x102000, len(DATA)) == DATA
        assert memory.read(0x102000 + len(DATA), 0x1800 - len(DATA)) == bytes(0x1800 - len(DATA))
        assert memory.read_u8(0x102000 + 0x1800) == 0xAA  # nothing past memsz
        assert memory.read(0x100000 + len(CODE), 0x2000 - len(CODE)) == b"\xaa" * (
            0x2000 - len(CODE))  # the gap between segments is untouched
        assert state.entry == 0x100010
        assert (state.eax, state.kernel_start, state.kernel_end) == (
            MULTIBOOT_BOOTLOADER_MAGIC, 0x100000, 0x103800)

    @pytest.mark.parametrize("bits", [32, 64])
    def test_higher_half_entry_translated(self, bits):
        base = 0xC0000000 if bits == 32 else 0xFFFFFFFF80000000
        image = elf([(0x100000, 0x100000, b"\x90" * 32, 32),
                     (0x200000, base + 0x200000, CODE, 0x1000)], base + 0x200004, bits=bits)
        memory, state = load(image)
        assert state.entry == 0x200004
        assert memory.read(0x200000, len(CODE)) == CODE
        assert state.kernel_end == 0x201000

    def test_entry_in_identity_segment_unchanged(self):
        image = elf([(0x100000, 0x100000, CODE, 0x1000),
                     (0x200000, 0xC0200000, DATA, 0x1000)], 0x100020)
        assert load(image)[1].entry == 0x100020

    def test_entry_outside_segments(self):
        with pytest.raises(KernelImageError, match="entry point 0x300000 lies in no loadable"):
            load(elf([(0x100000, 0x100000, CODE, 0x1000)], 0x300000))

    def test_entry_above_4g(self):
        image = elf([(0x1_0000_0000, 0x1_0000_0000, CODE, 0x1000)], 0x1_0000_0000, bits=64)
        with pytest.raises(KernelImageError, match="not below 4 GiB"):
            load(image)

    def test_segment_below_1m_in_ram(self):
        image = elf([(0x8000, 0x8000, CODE, 0x1000)], 0x8000)
        memory, state = load(image)
        assert memory.read(0x8000, len(CODE)) == CODE
        assert (state.kernel_start, state.kernel_end) == (0x8000, 0x9000)

    def test_non_load_and_empty_segments_ignored(self):
        image = elf([(0x100000, 0x100000, CODE, 0x1000), (0x3000_0000, 0x3000_0000, b"", 0)],
                    0x100000, extra_phdrs=[(4, 0, 0x5000_0000, 0x5000_0000, 0x10, 0x10),
                                           (0x6474E551, 0, 0, 0, 0, 0)])
        assert load(image)[1].kernel_end == 0x101000

    def test_elf32_with_64bit_code_is_fine(self):
        # What `objcopy -O elf32-i386` makes of a 64-bit kernel: EM_386, ELFCLASS32.
        image = elf([(0x100000, 0x100000, b"\x48\x31\xc0\xf4", 4)], 0x100000, bits=32)
        assert load(image)[1].entry == 0x100000

    def test_no_pt_load(self):
        image = elf([], 0x100000, extra_phdrs=[(4, 0, 0, 0, 0, 0)])
        with pytest.raises(KernelImageError, match="no loadable"):
            load(image)

    def test_no_program_headers(self):
        with pytest.raises(KernelImageError, match="no program headers"):
            load(elf([], 0x100000))

    def test_only_empty_pt_load(self):
        with pytest.raises(KernelImageError, match="no loadable"):
            load(elf([(0x100000, 0x100000, b"", 0)], 0x100000))

    @pytest.mark.parametrize("bits, machine", [(32, 62), (64, 3), (32, 40)])
    def test_wrong_machine(self, bits, machine):
        with pytest.raises(KernelImageError, match=f"machine {machine}"):
            load(basic_elf(bits, machine=machine))

    @pytest.mark.parametrize("e_type, what", [(3, "ET_DYN"), (1, "type 1"), (4, "type 4")])
    def test_not_executable(self, e_type, what):
        with pytest.raises(KernelImageError, match=what):
            load(basic_elf(e_type=e_type))

    def test_big_endian(self):
        image = bytearray(basic_elf())
        image[5] = 2
        with pytest.raises(KernelImageError, match="little-endian"):
            load(bytes(image))

    def test_bad_class(self):
        image = bytearray(basic_elf())
        image[4] = 3
        with pytest.raises(KernelImageError, match="class 3"):
            load(bytes(image))

    def test_not_elf_without_aout_kludge(self):
        with pytest.raises(KernelImageError, match="not an ELF file.*bit 16"):
            load(mb_header() + bytes(100))

    @pytest.mark.parametrize("bits", [32, 64])
    def test_phentsize_too_small(self, bits):
        image = bytearray(basic_elf(bits))
        struct.pack_into("<H", image, 42 if bits == 32 else 54, 16)
        with pytest.raises(KernelImageError, match="e_phentsize 16"):
            load(bytes(image))

    def test_pn_xnum(self):
        image = bytearray(basic_elf())
        struct.pack_into("<H", image, 44, 0xFFFF)
        with pytest.raises(KernelImageError, match="extended program header numbering"):
            load(bytes(image))

    def test_phdrs_past_end_of_file(self):
        image = bytearray(basic_elf())
        struct.pack_into("<I", image, 28, len(image) - 40)  # e_phoff
        with pytest.raises(KernelImageError, match="program headers .* run past the end"):
            load(bytes(image))

    def test_filesz_larger_than_memsz(self):
        image = elf([(0x100000, 0x100000, CODE, 16)], 0x100000)
        with pytest.raises(KernelImageError, match="file size .* larger than its memory size"):
            load(image)

    @pytest.mark.parametrize("bits", [32, 64])
    def test_segment_data_past_end_of_file(self, bits):
        image = elf([(0x100000, 0x100000, b"", 0x1000)], 0x100000, bits=bits,
                    extra_phdrs=[(1, 0x40, 0x200000, 0x200000, 0x10000, 0x10000)])
        with pytest.raises(KernelImageError, match="segment 1 .* past the end of the"):
            load(image)

    def test_offset_overflow_elf64(self):
        image = elf([(0x100000, 0x100000, CODE, 0x1000)], 0x100000, bits=64,
                    extra_phdrs=[(1, 2**64 - 8, 0x200000, 0x200000, 16, 16)])
        with pytest.raises(KernelImageError, match="past the end"):
            load(image)

    @pytest.mark.parametrize("cut", [8, 20, 40, 60, 100, -20])
    def test_truncated(self, cut):
        image = basic_elf()
        with pytest.raises(KernelImageError):
            load(image[:cut])

    def test_truncated_inside_elf_header_with_multiboot_header(self):
        image = b"\x7fELF\x01\x01\x01" + bytes(9) + mb_header()  # 28 bytes: ELF32 header is 52
        with pytest.raises(KernelImageError, match="truncated inside its ELF header"):
            load(image)

    def test_kernel_larger_than_ram(self):
        image = elf([(0x100000, 0x100000, CODE, 8 * MiB)], 0x100000)
        with pytest.raises(KernelImageError, match="kernel needs 8 MiB but the guest has 4 MiB"):
            load(image)

    def test_kernel_larger_than_ram_huge_memsz(self):
        image = elf([(0x100000, 0x100000, CODE, 2**63)], 0x100000, bits=64)
        with pytest.raises(KernelImageError, match="kernel needs"):
            load(image)

    @pytest.mark.parametrize("paddr", [RAM - 0x800, RAM, 0x8000_0000, 0xFFFF_F000])
    def test_segment_outside_ram(self, paddr):
        image = elf([(paddr, paddr, CODE, 0x1000)], paddr)
        with pytest.raises(KernelImageError, match="segment 0 .*lies outside guest RAM"):
            load(image)

    def test_overlapping_segments(self):
        image = elf([(0x100000, 0x100000, CODE, 0x2000),
                     (0x101000, 0x201000, DATA, 0x1000)], 0x100000)
        with pytest.raises(KernelImageError, match="segment 0 .* overlaps .*segment 1"):
            load(image)

    def test_error_leaves_memory_untouched(self):
        image = elf([(0x100000, 0x100000, CODE, 0x1000),
                     (RAM - 0x800, RAM - 0x800, DATA, 0x1000)], 0x100000)
        memory = GuestMemory.from_bytes(RAM)
        with pytest.raises(KernelImageError):
            load(image, memory)
        assert memory.read(0, RAM) == bytes(RAM)


# -- a.out kludge ------------------------------------------------------------------------------


class TestAout:
    def test_load_end_zero_loads_whole_file_and_zeroes_bss(self):
        body = bytes(range(256)) * 8  # 2 KiB
        image = aout(body, load_end=0, bss_end=0x100000 + 0x2F00, entry=0x100040)
        memory = GuestMemory.from_bytes(RAM)
        memory.fill(0, RAM, 0xAA)
        _, state = load(image, memory)
        assert memory.read(0x100000, len(image)) == image
        assert memory.read(0x100000 + len(image), 0x2F00 - len(image)) == bytes(
            0x2F00 - len(image))
        assert memory.read_u8(0x102F00) == 0xAA
        assert (state.entry, state.kernel_start, state.kernel_end) == (0x100040, 0x100000,
                                                                        0x102F00)
        assert state.ebx == 0x103000

    def test_load_end_and_no_bss(self):
        image = aout(bytes(range(256)) * 4, load_end=0x100000 + 0x200, bss_end=0)
        memory = GuestMemory.from_bytes(RAM)
        memory.fill(0, RAM, 0xAA)
        _, state = load(image, memory)
        assert memory.read(0x100000, 0x200) == image[:0x200]
        assert memory.read_u8(0x100200) == 0xAA
        assert state.kernel_end == 0x100200

    def test_load_starts_inside_the_file(self):
        # Header at file offset 0x1020, header_addr 0x200020: the load starts at file offset 0x1000.
        body = bytes(0x1000) + bytes(range(200)) * 4
        image = aout(body, header_offset=0x1020, header_addr=0x200020, load_addr=0x200000,
                     entry=0x200000)
        memory, state = load(image)
        assert memory.read(0x200000, len(image) - 0x1000) == image[0x1000:]
        assert memory.read_u8(0x1FFFFF) == 0
        assert state.kernel_end == 0x200000 + len(image) - 0x1000

    def test_aout_used_even_for_elf_files(self):
        body = bytearray(basic_elf())  # bit 16 wins over the ELF headers, as in QEMU
        body[find_multiboot_header(bytes(body)).offset + 8] ^= 1  # the ELF's own header is invalid
        body = bytes(body)
        image = aout(body + bytes(64), header_offset=len(body), load_addr=0x300000,
                     entry=0x300000)
        memory, state = load(image)
        assert memory.read(0x300000, len(image)) == image
        assert memory.read(0x100000, 16) == bytes(16)
        assert state.entry == 0x300000

    @pytest.mark.parametrize("kwargs, message", [
        (dict(load_addr=0x100040, header_addr=0x100020), "load_addr .* above header_addr"),
        (dict(load_addr=0x100000, header_addr=0x100100), "before the beginning of the file"),
        (dict(load_end=0x100000), "load_end_addr .* not above load_addr"),
        (dict(load_end=0x0F0000), "load_end_addr .* not above load_addr"),
        (dict(load_end=0x100000 + 0x2000), "runs past the end of the"),
        (dict(load_end=0xFFFFFFFF), "runs past the end of the"),
        (dict(bss_end=0x100100), "bss_end_addr .* below the end"),
        (dict(entry=0x0FFFFF), "entry_addr .* outside the kernel image"),
        (dict(entry=0x100000 + 0x800), "entry_addr .* outside the kernel image"),
        (dict(load_addr=0xFFFFFF00, header_addr=0xFFFFFF20, entry=0xFFFFFF00), "past 4 GiB"),
        (dict(load_addr=0x3FFF00, header_addr=0x3FFF20, entry=0x3FFF00), "outside guest RAM"),
        (dict(bss_end=0x100000 + 8 * MiB), "kernel needs 8 MiB but the guest has 4 MiB"),
    ])
    def test_bad_fields(self, kwargs, message):
        image = aout(bytes(0x800), **kwargs)
        memory = GuestMemory.from_bytes(RAM)
        with pytest.raises(KernelImageError, match=message):
            load(image, memory)
        assert memory.read(0, RAM) == bytes(RAM)


# -- boot information --------------------------------------------------------------------------


class TestInfo:
    def test_layout_byte_exact(self):
        memory = GuestMemory.from_bytes(RAM)
        _, state = load(basic_elf(), memory, kernel_name="/boot/kernel.elf",
                        append="console=ttyS0 debug", memory_map=MAP, loader_name="hvvmm 1.0")
        info = state.ebx
        assert info == 0x104000  # the page after kernel_end 0x103800
        assert state.eax == 0x2BADB002

        mmap_addr = u32(memory, info + 48)
        mods_addr = u32(memory, info + 24)
        cmdline_addr = u32(memory, info + 16)
        loader_addr = u32(memory, info + 64)
        expected = bytearray(MULTIBOOT_INFO_SIZE)
        struct.pack_into("<IIII", expected, 0, 0x24D, 639, 127 * 1024, 0)
        struct.pack_into("<III", expected, 16, cmdline_addr, 0, 0)
        struct.pack_into("<II", expected, 44, 4 * 24, mmap_addr)
        struct.pack_into("<I", expected, 64, loader_addr)
        assert memory.read(info, MULTIBOOT_INFO_SIZE) == bytes(expected)
        assert mods_addr == 0

        assert mmap_addr % 4 == 0 and info + MULTIBOOT_INFO_SIZE <= mmap_addr
        entries = b"".join(struct.pack("<IQQI", 20, e.base, e.length, e.type) for e in MAP)
        assert memory.read(mmap_addr, len(entries)) == entries

        assert c_string(memory, cmdline_addr) == b"/boot/kernel.elf console=ttyS0 debug"
        assert c_string(memory, loader_addr) == b"hvvmm 1.0"
        assert state.info_end == loader_addr + len(b"hvvmm 1.0\0")
        for address in (mmap_addr, cmdline_addr, loader_addr):
            assert info <= address < state.info_end
        assert memory.read(state.info_end, 64) == bytes(64)

    def test_cmdline_without_append(self):
        memory, state = load(basic_elf(), kernel_name="kern")
        assert c_string(memory, u32(memory, state.ebx + 16)) == b"kern"

    def test_default_loader_name(self):
        memory, state = load(basic_elf())
        assert c_string(memory, u32(memory, state.ebx + 64)) == b"hvvmm"

    def test_utf8_strings(self):
        memory, state = load(basic_elf(), kernel_name="k", append="name=\u00e9")
        assert c_string(memory, u32(memory, state.ebx + 16)) == "k name=\u00e9".encode()

    def test_nul_in_string_is_a_value_error(self):
        with pytest.raises(ValueError, match="NUL"):
            load(basic_elf(), append="a\0b")

    def test_two_modules(self):
        first, second = b"\x11" * 5000, b"\x22" * 3
        modules = [MultibootModule(first, "initrd.img root=/dev/ram"),
                   MultibootModule(second, "m2")]
        memory, state = load(basic_elf(), modules=modules)
        info = state.ebx
        assert u32(memory, info) & 1 << 3
        assert u32(memory, info + 20) == 2
        mods = u32(memory, info + 24)
        (s1, e1, str1, r1), (s2, e2, str2, r2) = struct.iter_unpack("<IIII",
                                                                     memory.read(mods, 32))
        assert (s1, e1) == (0x104000, 0x104000 + 5000)  # page after the kernel (0x103800)
        assert (s2, e2) == (0x106000, 0x106003)  # next page boundary after the first
        assert s1 % PAGE == 0 and s2 % PAGE == 0 and r1 == r2 == 0
        assert memory.read(s1, len(first)) == first
        assert memory.read(s2, len(second)) == second
        assert c_string(memory, str1) == b"initrd.img root=/dev/ram"
        assert c_string(memory, str2) == b"m2"
        assert info == 0x107000  # the page after the last module
        assert info <= mods < state.info_end and info <= str1 < str2 < state.info_end

    def test_empty_module(self):
        memory, state = load(basic_elf(), modules=[MultibootModule(b"", "empty")])
        start, end = struct.unpack("<II", memory.read(u32(memory, state.ebx + 24), 8))
        assert start == end == 0x104000
        assert state.ebx == 0x104000

    def test_modules_do_not_fit(self):
        memory = GuestMemory.from_bytes(RAM)
        modules = [MultibootModule(bytes(RAM - 0x104000), "big")]
        with pytest.raises(KernelImageError, match="do not fit in guest RAM"):
            load(basic_elf(), memory, modules=modules)
        assert memory.read(0, RAM) == bytes(RAM)

    def test_info_block_does_not_fit(self):
        # The kernel ends exactly at the end of RAM: no room for the info block.
        image = elf([(RAM - 0x1000, RAM - 0x1000, CODE, 0x1000)], RAM - 0x1000)
        with pytest.raises(KernelImageError, match="do not fit in guest RAM"):
            load(image)

    def test_info_must_avoid_reserved_memory(self):
        image = elf([(0x10000, 0x10000, CODE, 0x1000)], 0x10000)
        memory_map = (MemoryMapEntry(0, 0x11000, 1), MemoryMapEntry(0x11000, 0x1000, 2))
        with pytest.raises(KernelImageError, match="overlap reserved memory"):
            load(image, memory_map=memory_map)

    @pytest.mark.parametrize("memory_map, lower, upper", [
        (MAP, 639, 127 * 1024),
        ((), 0, 0),
        ((MemoryMapEntry(0, 2 * MiB, 1),), 640, 1024),  # lower capped at 640 KiB
        ((MemoryMapEntry(0x1000, 0x9E000, 1), MemoryMapEntry(0x100000, MiB, 1)), 0, 1024),
        ((MemoryMapEntry(0x100000, MiB, 1), MemoryMapEntry(0x200000, MiB, 1)), 0, 2048),
        ((MemoryMapEntry(0x100000, MiB, 1), MemoryMapEntry(0x201000, MiB, 1)), 0, 1024),
        ((MemoryMapEntry(0x200000, MiB, 1), MemoryMapEntry(0x100000, MiB, 1)), 0, 2048),
        ((MemoryMapEntry(0, 0x50000, 1), MemoryMapEntry(0x100000, 8 * MiB, 1),
          MemoryMapEntry(0x180000, 0x1000, 2)), 320, 512),
        ((MemoryMapEntry(0x100000, 8 * MiB, 1), MemoryMapEntry(0x80000, 0x80001, 2)), 0, 0),
    ])
    def test_mem_lower_upper(self, memory_map, lower, upper):
        memory, state = load(basic_elf(), memory_map=memory_map)
        assert (u32(memory, state.ebx + 4), u32(memory, state.ebx + 8)) == (lower, upper)
        assert u32(memory, state.ebx + 44) == 24 * len(memory_map)

    def test_bad_memory_map_entry(self):
        with pytest.raises(ValueError, match="memory map"):
            load(basic_elf(), memory_map=[MemoryMapEntry(-1, 10, 1)])


# -- RAM in several regions --------------------------------------------------------------------


class TestRegions:
    def test_segment_across_adjacent_regions(self):
        memory = GuestMemory([MemoryRegion(0, bytearray(0x101000)),
                              MemoryRegion(0x101000, bytearray(0x200000))])
        data = bytes(range(256)) * 32  # 8 KiB from 0x100000 crosses 0x101000
        _, state = load(elf([(0x100000, 0x100000, data, 0x3000)], 0x100000), memory)
        assert memory.read(0x100000, 0x1000) + memory.read(0x101000, 0x1000) == data[:0x2000]
        assert state.ebx == 0x103000

    def test_segment_across_a_hole(self):
        memory = GuestMemory([MemoryRegion(0, bytearray(0x101000)),
                              MemoryRegion(0x102000, bytearray(0x200000))])
        with pytest.raises(KernelImageError, match="outside guest RAM"):
            load(elf([(0x100000, 0x100000, CODE, 0x3000)], 0x100000), memory)

    def test_ram_above_4g_not_used_for_info(self):
        memory = GuestMemory([MemoryRegion(0xFFFF0000, bytearray(0x10000)),
                              MemoryRegion(1 << 32, bytearray(0x10000))])
        image = elf([(0xFFFF0000, 0xFFFF0000, CODE, 0x10000)], 0xFFFF0000)
        with pytest.raises(KernelImageError, match="below 4 GiB"):
            load(image, memory, memory_map=())


# -- property-based: nothing but KernelImageError, writes only where they belong ---------------


class SpyMemory(GuestMemory):
    """A GuestMemory that records every view handed out (the loader writes only through views)."""

    def __init__(self, size: int):
        super().__init__([MemoryRegion(0, bytearray(size))])
        self.ranges: list[tuple[int, int]] = []

    def view(self, gpa, size):
        self.ranges.append((gpa, size))
        return super().view(gpa, size)


SPY_RAM = 2 * MiB
SPY_MAP = (MemoryMapEntry(0, 0x9FC00, 1), MemoryMapEntry(0x100000, SPY_RAM - MiB, 1))
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def check_load(image: bytes, modules=()) -> None:
    memory = SpyMemory(SPY_RAM)
    try:
        state = load_multiboot(memory, image, kernel_name="k", append="a", modules=modules,
                               memory_map=SPY_MAP)
    except KernelImageError as error:
        assert str(error)
        assert memory.ranges == []  # a failed load writes nothing
        return
    assert state.eax == MULTIBOOT_BOOTLOADER_MAGIC
    assert state.kernel_start <= state.entry < state.kernel_end <= state.ebx < state.info_end
    assert state.ebx % PAGE == 0 and state.info_end <= min(SPY_RAM, 1 << 32)
    kernel_area = (state.kernel_start, state.kernel_end)
    boot_area = ((state.kernel_end + PAGE - 1) // PAGE * PAGE, state.info_end)
    for gpa, size in memory.ranges:
        assert 0 <= gpa and gpa + size <= SPY_RAM
        assert any(start <= gpa and gpa + size <= end for start, end in (kernel_area, boot_area))


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    check_load(data)


@FUZZ
@given(st.binary(max_size=256), st.sampled_from([0x0, 0x3, 0x10003, 0x10000]),
       st.binary(max_size=256))
def test_fuzz_random_bytes_after_valid_header(prefix, flags, rest):
    prefix = prefix[:len(prefix) & ~3]
    check_load(prefix + mb_header(flags) + rest)


def _base_images() -> list[bytes]:
    return [
        basic_elf(32),
        basic_elf(64),
        elf([(0x100000, 0xC0100000, CODE, 0x1000)], 0xC0100008),
        aout(bytes(range(256)) * 4, bss_end=0x100000 + 0x2000, entry=0x100010),
        aout(bytes(range(256)) * 4, load_end=0x100000 + 0x300, entry=0x100010),
    ]


BASE_IMAGES = _base_images()
# Offsets worth mutating: ELF identification/header fields, the program headers, the multiboot
# header and a.out fields (found by searching), with values near interesting boundaries.
FIELD_VALUES = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2, 3, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000, 0x1FFFFF,
                     0x200000, 0xC0100000, SPY_RAM, SPY_RAM - 1, 2**63, 2**64 - 1]),
    st.integers(0, 0x300000),
)


@FUZZ
@given(st.integers(0, len(BASE_IMAGES) - 1),
       st.lists(st.tuples(st.integers(0, 200), st.sampled_from([1, 2, 4, 8]), FIELD_VALUES),
                min_size=1, max_size=4),
       st.booleans(), st.integers(0, 4096))
def test_fuzz_field_mutations(which, mutations, fix_checksum, truncate):
    image = bytearray(BASE_IMAGES[which])
    header_at = find_multiboot_header(bytes(image)).offset
    for offset, width, value in mutations:
        # Half the mutations hit the multiboot header region, the rest the start of the file.
        offset = header_at + offset % 32 if offset >= 100 else offset
        if offset + width <= len(image):
            image[offset:offset + width] = (value & (1 << 8 * width) - 1).to_bytes(width, "little")
    if fix_checksum:
        flags = int.from_bytes(image[header_at + 4:header_at + 8], "little")
        image[header_at:header_at + 4] = MULTIBOOT_HEADER_MAGIC.to_bytes(4, "little")
        image[header_at + 8:header_at + 12] = (-(MULTIBOOT_HEADER_MAGIC + flags)
                                              & 0xFFFF_FFFF).to_bytes(4, "little")
    if truncate < len(image) and truncate % 3 == 0:
        del image[truncate:]
    check_load(bytes(image))


@FUZZ
@given(st.integers(0, len(BASE_IMAGES) - 1),
       st.lists(st.tuples(st.integers(0, 2 * PAGE), st.sampled_from(["m", "mod arg=1", ""])),
                max_size=3))
def test_fuzz_valid_images_with_modules(which, module_specs):
    modules = [MultibootModule(bytes([index + 1]) * size, name)
               for index, (size, name) in enumerate(module_specs)]
    check_load(BASE_IMAGES[which], modules)
