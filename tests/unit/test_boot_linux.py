"""The Linux loaders without /dev/kvm: struct layouts against the documents' offsets, the e820
table from the PC layout, format detection, payload decompression, placement, the entry state,
and mutated images that may only raise KernelImageError."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import tracemalloc
from types import SimpleNamespace

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm import boot
from hvvmm.boot import linux, pvh
from hvvmm.boot.decompress import decompress_payload, payload_format
from hvvmm.boot.state import BootState, CpuMode, apply_entry_state, boot_gdt, identity_page_tables
from hvvmm.layout import PC, MemoryMapEntry
from hvvmm.memory import GuestMemory

MiB = 1 << 20
RAM = 64 * MiB
MAP = PC.memory_map(RAM)

# -- layouts: offsets typed from the documents, not from the code under test --------------------

# Linux Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header": offset, size in bytes.
BOOT_RST_HEADER = {
    "setup_sects": (0x1F1, 1), "root_flags": (0x1F2, 2), "syssize": (0x1F4, 4),
    "ram_size": (0x1F8, 2), "vid_mode": (0x1FA, 2), "root_dev": (0x1FC, 2),
    "boot_flag": (0x1FE, 2), "jump": (0x200, 2), "header": (0x202, 4), "version": (0x206, 2),
    "realmode_swtch": (0x208, 4), "start_sys_seg": (0x20C, 2), "kernel_version": (0x20E, 2),
    "type_of_loader": (0x210, 1), "loadflags": (0x211, 1), "setup_move_size": (0x212, 2),
    "code32_start": (0x214, 4), "ramdisk_image": (0x218, 4), "ramdisk_size": (0x21C, 4),
    "bootsect_kludge": (0x220, 4), "heap_end_ptr": (0x224, 2), "ext_loader_ver": (0x226, 1),
    "ext_loader_type": (0x227, 1), "cmd_line_ptr": (0x228, 4), "initrd_addr_max": (0x22C, 4),
    "kernel_alignment": (0x230, 4), "relocatable_kernel": (0x234, 1), "min_alignment": (0x235, 1),
    "xloadflags": (0x236, 2), "cmdline_size": (0x238, 4), "hardware_subarch": (0x23C, 4),
    "hardware_subarch_data": (0x240, 8), "payload_offset": (0x248, 4),
    "payload_length": (0x24C, 4), "setup_data": (0x250, 8), "pref_address": (0x258, 8),
    "init_size": (0x260, 4), "handover_offset": (0x264, 4), "kernel_info_offset": (0x268, 4),
}
# Documentation/arch/x86/zero-page.rst
ZERO_PAGE = {"acpi_rsdp_addr": (0x070, 8), "ext_ramdisk_image": (0x0C0, 4),
             "ext_ramdisk_size": (0x0C4, 4), "ext_cmd_line_ptr": (0x0C8, 4),
             "e820_entries": (0x1E8, 1), "sentinel": (0x1EF, 1), "e820_table": (0x2D0, 20)}
# Xen xen/include/public/arch-x86/hvm/start_info.h
START_INFO = {"magic": 0, "version": 4, "flags": 8, "nr_modules": 12, "modlist_paddr": 16,
              "cmdline_paddr": 24, "rsdp_paddr": 32, "memmap_paddr": 40, "memmap_entries": 48,
              "reserved": 52}


def test_setup_header_fields_match_boot_rst():
    assert {name: (offset, struct.calcsize("<" + fmt))
            for name, (offset, fmt) in linux.SETUP_HEADER_FIELDS.items()} == BOOT_RST_HEADER


def test_boot_params_fields_match_zero_page_rst():
    assert {name: (offset, struct.calcsize("<" + fmt))
            for name, (offset, fmt) in linux.BOOT_PARAMS_FIELDS.items()} == ZERO_PAGE


def test_hvm_start_info_layout_matches_xen_header():
    assert pvh.HVM_START_INFO.size == 56
    assert pvh.HVM_MODLIST_ENTRY.size == 32 and pvh.HVM_MEMMAP_TABLE_ENTRY.size == 24
    values = list(range(1, 11))
    packed = pvh.HVM_START_INFO.pack(*values)
    widths = {"modlist_paddr": 8, "cmdline_paddr": 8, "rsdp_paddr": 8, "memmap_paddr": 8}
    for value, name in zip(values, pvh.HVM_START_INFO_FIELDS):
        offset, width = START_INFO[name], widths.get(name, 4)
        assert int.from_bytes(packed[offset:offset + width], "little") == value, name
    assert pvh.XEN_HVM_START_MAGIC_VALUE == 0x336EC578 and pvh.XEN_ELFNOTE_PHYS32_ENTRY == 18


def test_start_info_contents():
    memmap = [MemoryMapEntry(0, 0x9FC00, 1), MemoryMapEntry(0xE0000, 0x10000, 3)]
    info, modlist, table = pvh.make_start_info(cmdline_paddr=0x11000, memmap=memmap,
                                               memmap_paddr=0x9000, modlist_paddr=0x8100,
                                               modules=[(0x7000000, 1234)], rsdp=0xE0000)
    field = lambda name, width=4: int.from_bytes(info[START_INFO[name]:START_INFO[name] + width],
                                                 "little")
    assert (field("magic"), field("version"), field("nr_modules")) == (0x336EC578, 1, 1)
    assert (field("modlist_paddr", 8), field("cmdline_paddr", 8), field("rsdp_paddr", 8),
            field("memmap_paddr", 8), field("memmap_entries")) == (0x8100, 0x11000, 0xE0000,
                                                                    0x9000, 2)
    assert struct.unpack("<QQQQ", modlist) == (0x7000000, 1234, 0, 0)
    assert struct.unpack("<QQIIQQII", table) == (0, 0x9FC00, 1, 0, 0xE0000, 0x10000, 3, 0)


@pytest.mark.parametrize("size", [64 * MiB, 5 << 30])
def test_e820_table_is_the_layout_memory_map(size):
    params = linux.make_boot_params(linux.synthetic_header(), memory_map=PC.memory_map(size),
                                    cmdline_addr=0x11000, initrd=None, rsdp=None)
    count = params[0x1E8]
    table = [MemoryMapEntry(*struct.unpack_from("<QQI", params, 0x2D0 + 20 * i))
             for i in range(count)]
    assert table == PC.memory_map(size)
    assert params[0x1EF] == 0  # sentinel


def test_boot_params_fields_the_loader_fills():
    params = linux.make_boot_params(linux.synthetic_header(), memory_map=MAP,
                                    cmdline_addr=0x1_2345_6000, initrd=(0x1_0000_0000, 5 << 32),
                                    rsdp=0xE0000, code32_start=0x100000)
    u32 = lambda offset: struct.unpack_from("<I", params, offset)[0]
    assert struct.unpack_from("<H", params, 0x1FE)[0] == 0xAA55 and u32(0x202) == 0x53726448
    assert params[0x210] == 0xFF and params[0x211] & 1  # type_of_loader, LOADED_HIGH
    assert (u32(0x228), u32(0xC8)) == (0x2345_6000, 1)
    assert (u32(0x218), u32(0xC0), u32(0x21C), u32(0xC4)) == (0, 1, 0, 5)
    assert struct.unpack_from("<Q", params, 0x70)[0] == 0xE0000
    assert u32(0x214) == 0x100000


# -- test images ----------------------------------------------------------------------------------


def put(buffer: bytearray, offset: int, width: int, value: int) -> None:
    buffer[offset:offset + width] = value.to_bytes(width, "little")


def elf_image(segments, entry: int, *, bits: int = 64, notes: bytes = b"") -> bytes:
    """An ELF executable: ``segments`` (paddr, vaddr, data, memsz), optional PT_NOTE bytes."""
    ehsize, phentsize = (52, 32) if bits == 32 else (64, 56)
    phnum = len(segments) + (1 if notes else 0)
    offset = ehsize + phentsize * phnum
    blobs, phdrs = b"", []
    for paddr, vaddr, data, memsz in segments:
        phdrs.append((1, offset + len(blobs), vaddr, paddr, len(data), memsz))
        blobs += data + bytes(-len(data) % 16)
    if notes:
        phdrs.append((4, offset + len(blobs), 0, 0, len(notes), len(notes)))
        blobs += notes
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9)
    if bits == 32:
        head = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, ehsize, 0, 0, ehsize,
                                   phentsize, phnum, 40, 0, 0)
        table = b"".join(struct.pack("<8I", t, o, v, p, f, m, 7, 16) for t, o, v, p, f, m in phdrs)
    else:
        head = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize,
                                   phentsize, phnum, 64, 0, 0)
        table = b"".join(struct.pack("<IIQQQQQQ", t, 7, o, v, p, f, m, 16)
                         for t, o, v, p, f, m in phdrs)
    return head + table + blobs


def pvh_note(entry: int, width: int = 4) -> bytes:
    return struct.pack("<III", 4, width, 18) + b"Xen\0" + entry.to_bytes(width, "little")


KERNEL_CODE = bytes(range(256)) * 16
PVH_ELF = elf_image([(0x200000, 0x200000, KERNEL_CODE, 0x2000)], 0x200000,
                    notes=pvh_note(0x200010))
VMLINUX = elf_image([(0x1000000, 0xFFFFFFFF81000000, KERNEL_CODE, 0x3000)], 0x1000000)


def bzimage(payload: bytes = b"", *, version: int = 0x020F, xloadflags: int = 1,
            init_size: int = 0x40000, pref_address: int = 0x100000, cmdline_size: int = 2047,
            initrd_addr_max: int = 0x7FFFFFFF, relocatable: int = 0,
            alignment: int = 0x200000) -> bytes:
    """A bzImage: one setup sector and the protected-mode part (startup_64 at +0x200, then the
    payload), its header filled in at boot.rst's offsets."""
    setup = bytearray(1024)
    pm = bytearray(0x400) + payload
    pm += bytes(-len(pm) % 16)
    for offset, width, value in ((0x1F1, 1, 1), (0x1F4, 4, len(pm) // 16), (0x1FE, 2, 0xAA55),
                                 (0x200, 1, 0xEB), (0x201, 1, 0x6A), (0x202, 4, 0x53726448),
                                 (0x206, 2, version), (0x211, 1, 1), (0x214, 4, 0x100000),
                                 (0x22C, 4, initrd_addr_max), (0x230, 4, alignment),
                                 (0x234, 1, relocatable), (0x236, 2, xloadflags),
                                 (0x238, 4, cmdline_size), (0x248, 4, 0x400),
                                 (0x24C, 4, len(payload)), (0x258, 8, pref_address),
                                 (0x260, 4, init_size)):
        put(setup, offset, width, value)
    return bytes(setup + pm)


def with_size(compressed: bytes, original: bytes) -> bytes:
    return compressed + len(original).to_bytes(4, "little")


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    out = bytearray(struct.pack("<I", 0x184C2102))
    for start in range(0, len(data), block):
        chunk = lz4.block.compress(data[start:start + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return with_size(bytes(out), data)


COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data),
    "bzip2": lambda data: with_size(bz2.compress(data), data),
    "lzma": lambda data: with_size(lzma.compress(data, format=lzma.FORMAT_ALONE), data),
    "xz": lambda data: with_size(lzma.compress(
        data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
        filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]), data),
    "lz4": lz4_legacy,
    "zstd": lambda data: with_size(zstandard.ZstdCompressor(level=19).compress(data), data),
}


def load(image: bytes, ram: int = RAM, **kwargs) -> tuple[GuestMemory, BootState]:
    memory = GuestMemory.from_bytes(ram)
    kwargs.setdefault("memory_map", PC.memory_map(ram))
    kwargs.setdefault("name", "kernel")
    return memory, boot.load(memory, image, **kwargs)


# -- format detection -----------------------------------------------------------------------------


def test_the_setup_header_ends_at_0x202_plus_the_jump_offset():
    """boot.rst: the header ends at 0x202 + the byte at 0x201 (0x6A here: 0x26C, after
    kernel_info_offset). Its last byte reaches the zero page; the byte after it does not."""
    image = bytearray(bzimage())
    put(image, 0x268, 4, 0xA1B2C3D4)  # kernel_info_offset: the header's last 4 bytes
    image[0x26C] = 0x77                # not header: the setup code that follows it
    header = linux.parse_setup_header(bytes(image))
    assert len(header.raw) == 0x26C and header["kernel_info_offset"] == 0xA1B2C3D4
    params = linux.make_boot_params(header.raw, memory_map=MAP, cmdline_addr=0x20000,
                                    initrd=None, rsdp=None)
    assert params[0x268:0x26C] == image[0x268:0x26C] and params[0x26C] == 0


def test_format_detection():
    checksum = -(0x1BADB002 + 0x10003) & 0xFFFFFFFF
    multiboot_header = struct.pack("<III", 0x1BADB002, 0x10003, checksum)
    assert boot.detect_format(bzimage()) == "bzimage"
    assert boot.detect_format(PVH_ELF) == "pvh"
    assert boot.detect_format(VMLINUX) == "vmlinux"
    assert boot.detect_format(bytes(64) + multiboot_header + bytes(64)) == "multiboot"
    with pytest.raises(boot.KernelImageError, match="not a Linux bzImage.*no multiboot header"):
        boot.detect_format(bytes(4096))
    elf32_without_note = elf_image([(0x100000, 0x100000, KERNEL_CODE, 0x1000)], 0x100000, bits=32)
    with pytest.raises(boot.KernelImageError):
        boot.detect_format(elf32_without_note)


def test_linux_takes_one_initrd_as_a_whole_file_name(tmp_path):
    path = tmp_path / "initrd with space,comma"
    path.write_bytes(b"abc")
    assert boot.read_modules([str(path)], "bzimage")[0].data == b"abc"
    with pytest.raises(boot.KernelImageError, match="one initrd, not 2"):
        boot.read_modules([str(path), str(path)], "pvh")


def test_an_initrd_larger_than_ram_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as file:
        file.truncate(3 << 30)  # sparse: reading it would take 3 GiB
    with pytest.raises(boot.KernelImageError, match=r"\(3072 MiB\) is larger than guest RAM"):
        boot.read_modules([str(path)], "bzimage", ram_size=RAM)


# -- decompression ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_each_payload_format_decompresses(name):
    data = PVH_ELF + os.urandom(3000) + bytes(50000)
    payload = COMPRESSORS[name](data)
    assert payload_format(payload) == name
    assert decompress_payload(payload, RAM) == data


def test_lz4_legacy_with_several_blocks():
    data = bytes(range(256)) * (40 << 10) + os.urandom(1 << 20)  # 11 MiB: two 8 MiB blocks
    assert decompress_payload(lz4_legacy(data), 64 * MiB) == data


@pytest.mark.parametrize("name", ["gzip", "bzip2", "xz"])  # the formats with a checksum
def test_corrupt_payload_is_an_image_error(name):
    payload = bytearray(COMPRESSORS[name](os.urandom(20000)))
    middle = len(payload) // 2
    payload[middle:middle + 64] = bytes(64)
    with pytest.raises(boot.KernelImageError, match="does not decompress|trailer says"):
        decompress_payload(bytes(payload), RAM)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_truncated_payload_is_an_image_error(name):
    payload = COMPRESSORS[name](os.urandom(20000) + bytes(20000))
    with pytest.raises(boot.KernelImageError, match=f"the {name} kernel payload"):
        decompress_payload(payload[:len(payload) // 2] + payload[-4:], RAM)


def test_payload_larger_than_ram_is_refused_before_decompressing():
    payload = gzip.compress(bytes(100))[:-4] + (RAM + 1).to_bytes(4, "little")
    with pytest.raises(boot.KernelImageError, match="more than the guest's 64 MiB"):
        decompress_payload(payload, RAM)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_payload_expanding_past_its_trailer_stops_at_the_trailer(name):
    """A decompression bomb: a payload whose trailer claims 4 KiB but expands to 32 MiB is refused
    without the host ever holding much more than the trailer's size of output."""
    payload = COMPRESSORS[name](bytes(32 * MiB))
    payload = payload[:-4] + (4096).to_bytes(4, "little")
    tracemalloc.start()
    try:
        with pytest.raises(boot.KernelImageError, match=f"the {name} kernel payload "
                           "decompresses to more than the 4096 bytes its trailer says"):
            decompress_payload(payload, RAM)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The bound leaves room for an LZ4 legacy block (8 MiB, twice while appended) and the
    # 8 MiB LZMA dictionary; decompressing the whole bomb would hold 32 MiB.
    assert peak < 20 * MiB


def test_lzo_payload_is_left_to_the_guest():
    _, state = load(bzimage(b"\x89LZO\x00\r\n\x1a\n" + bytes(100)))
    assert state.mode is CpuMode.LONG64 and state.entry == 0x100200


# -- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_bzimage_host_decompression_loads_the_pvh_kernel(name):
    initrd = os.urandom(5000)
    memory, state = load(bzimage(COMPRESSORS[name](PVH_ELF)), append="console=ttyS0",
                         modules=[boot.BootModule(initrd, "initrd")], rsdp=0xE0000)
    assert state.protocol.startswith("PVH") and state.mode is CpuMode.PROTECTED32
    assert state.entry == 0x200010 and state.ebx == 0x8000
    assert memory.read(0x200000, len(KERNEL_CODE)) == KERNEL_CODE
    assert memory.read_u32(0x8000) == 0x336EC578
    assert memory.read_u64(0x8000 + 32) == 0xE0000
    module = memory.read_u64(0x8000 + 16)
    address, size = memory.read_u64(module), memory.read_u64(module + 8)
    assert memory.read(address, size) == initrd and address % 4096 == 0
    assert memory.read(memory.read_u64(0x8000 + 24), 14) == b"console=ttyS0\0"


def test_bzimage_host_decompression_of_a_vmlinux_without_note():
    memory, state = load(bzimage(gzip.compress(VMLINUX), cmdline_size=100), append="quiet")
    assert state.mode is CpuMode.LONG64 and state.entry == 0x1000000 and state.rsi == 0x8000
    assert memory.read(0x1000000, len(KERNEL_CODE)) == KERNEL_CODE
    assert memory.read_u32(0x8000 + 0x238) == 100  # the bzImage's header is kept


def test_bzimage_guest_decompression_64_bit_entry():
    image = bzimage(gzip.compress(PVH_ELF), pref_address=0x1000000, relocatable=1)
    memory, state = load(image, decompress="guest", append="root=/dev/vda")
    assert state.mode is CpuMode.LONG64 and state.entry == 0x1000200 and state.rsi == 0x8000
    assert state.gdt is not None and state.cr3 == 0x2000
    assert memory.read(0x1000000, 16) == image[1024:1040]
    assert memory.read(0x8000 + 0x1F1, 0x26C - 0x1F1)[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    cmdline = memory.read_u32(0x8000 + 0x228)
    assert memory.read(cmdline, 14) == b"root=/dev/vda\0"


def test_bzimage_without_kernel_64_uses_the_32_bit_entry():
    memory, state = load(bzimage(version=0x020A, xloadflags=0), decompress="guest")
    assert state.mode is CpuMode.PROTECTED32 and state.entry == 0x100000 and state.rsi == 0x8000


def test_relocatable_load_address_respects_kernel_alignment():
    _, state = load(bzimage(pref_address=0x180000, relocatable=1, alignment=0x400000),
                    decompress="guest")
    assert state.entry == 0x400200


def test_initrd_highest_fit_below_initrd_addr_max():
    _, state = load(bzimage(initrd_addr_max=0x1FFFFFF), decompress="guest",
                    modules=[boot.BootModule(bytes(10000), "i")])
    assert state.info_end == 0x1FFD000 + 10000  # highest page-aligned fit below 32 MiB


def test_protocol_too_old():
    with pytest.raises(boot.KernelImageError, match="protocol 2.05, too old.*2.06 or later"):
        load(bzimage(version=0x0205))


@pytest.mark.parametrize("cut", [0x220, 1024, 1024 + 0x300])
def test_truncated_bzimage(cut):
    with pytest.raises(boot.KernelImageError, match="truncated"):
        load(bzimage(gzip.compress(PVH_ELF))[:cut])


def test_command_line_longer_than_cmdline_size():
    with pytest.raises(boot.KernelImageError, match=r"cmdline_size 10\)"):
        load(bzimage(cmdline_size=10), append="x" * 11)
    load(bzimage(cmdline_size=10), append="x" * 10)


def test_initrd_larger_than_ram():
    with pytest.raises(boot.KernelImageError, match="larger than guest RAM"):
        load(PVH_ELF, ram=8 * MiB, modules=[boot.BootModule(bytes(9 * MiB), "i")])


def test_initrd_that_does_not_fit_below_initrd_addr_max():
    with pytest.raises(boot.KernelImageError, match="initrd_addr_max"):
        load(bzimage(initrd_addr_max=0x3FFFFF), decompress="guest",
             modules=[boot.BootModule(bytes(4 * MiB), "i")])


def test_load_address_below_1_mib_is_refused():
    with pytest.raises(boot.KernelImageError, match="below 1 MiB"):
        load(bzimage(pref_address=0x2000), decompress="guest")


def test_kernel_that_does_not_fit_in_ram():
    with pytest.raises(boot.KernelImageError, match="init_size"):
        load(bzimage(init_size=100 * MiB), decompress="guest")


def test_failed_load_writes_nothing():
    memory = GuestMemory.from_bytes(RAM)
    with pytest.raises(boot.KernelImageError):
        boot.load(memory, bzimage(cmdline_size=1), name="k", append="too long",
                  memory_map=MAP, decompress="guest")
    assert memory.read(0, RAM) == bytes(RAM)


# -- entry state --------------------------------------------------------------------------------


class FakeVcpu:
    def __init__(self):
        segment = lambda: SimpleNamespace(base=1, limit=2, selector=3, type=4, present=0, dpl=3,
                                          db=0, s=0, l=0, g=0, avl=1, unusable=1)
        self.sregs = SimpleNamespace(**{name: segment() for name in
                                        ("cs", "ds", "es", "fs", "gs", "ss", "tr")},
                                     gdt=SimpleNamespace(base=0, limit=0), cr0=0x60000010, cr3=0,
                                     cr4=0, efer=0)
        self.regs = SimpleNamespace(rax=9, rbx=9, rcx=9, rdx=0x600, rsi=9, rdi=9, rbp=9, rsp=9,
                                    rip=0xFFF0, rflags=0x202)

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, sregs):
        self.sregs = sregs

    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs


def test_long_mode_entry_state():
    vcpu = FakeVcpu()
    apply_entry_state(vcpu, BootState(entry=0x1000200, registers={"rsi": 0x8000},
                                      mode=CpuMode.LONG64, cr3=0x2000, gdt=(0x1000, 0x2F)))
    s, r = vcpu.sregs, vcpu.regs
    assert (s.cs.selector, s.cs.l, s.cs.db) == (0x10, 1, 0)
    assert (s.ds.selector, s.ss.selector) == (0x18, 0x18)
    assert s.cr0 & 0x80000001 == 0x80000001 and s.cr4 & 0x20 and s.efer == 0x500
    assert s.cr3 == 0x2000 and (s.gdt.base, s.gdt.limit) == (0x1000, 0x2F)
    assert (s.tr.type, s.tr.present, s.tr.unusable) == (11, 1, 0)
    assert (r.rip, r.rsi, r.rax, r.rdx, r.rsp, r.rflags) == (0x1000200, 0x8000, 0, 0, 0, 2)


def test_protected_mode_entry_state():
    vcpu = FakeVcpu()
    apply_entry_state(vcpu, BootState(entry=0x100000, registers={"rax": 0x2BADB002,
                                                                 "rbx": 0x9000}))
    s, r = vcpu.sregs, vcpu.regs
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.limit) == (0x10, 0, 1, 0xFFFFFFFF)
    assert (s.cr0, s.cr4, s.efer) == (0x11, 0, 0)
    assert (r.rip, r.rax, r.rbx, r.rflags) == (0x100000, 0x2BADB002, 0x9000, 2)


def test_boot_gdt_and_identity_map():
    gdt = boot_gdt(CpuMode.LONG64)
    code, data = struct.unpack_from("<QQ", gdt, 0x10)
    assert code == 0x00AF9B000000FFFF and data == 0x00CF93000000FFFF  # boot.rst's flat segments
    assert struct.unpack_from("<Q", boot_gdt(CpuMode.PROTECTED32), 0x10)[0] == 0x00CF9B000000FFFF
    tables = identity_page_tables(0x2000)
    assert len(tables) == 6 * 4096
    assert struct.unpack_from("<Q", tables, 0)[0] == 0x3003
    assert struct.unpack_from("<4Q", tables, 4096) == (0x4003, 0x5003, 0x6003, 0x7003)
    last = struct.unpack_from("<Q", tables, 6 * 4096 - 8)[0]
    assert last == (4 << 30) - (2 << 20) | 0x83


# -- mutated images: an image error, never anything else ----------------------------------------

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
BASE_BZ = bzimage(gzip.compress(PVH_ELF))
BASE_GUEST_BZ = bzimage(b"plain")
# Enough for the test kernels; zeroing 64 MiB of fake RAM per example made these tests the
# slowest of the unit suite.
FUZZ_RAM = 16 * MiB
VALUES = st.one_of(st.integers(0, 2**64 - 1),
                   st.sampled_from([0, 1, 0x1FF, 0x200, 0x205, 0x206, 0x20C, 0xFFFF, 0x7FFFFFFF,
                                    0xFFFFFFFF, 0x100000, FUZZ_RAM, FUZZ_RAM - 1, 2**63]))


def _load_or_image_error(image: bytes, **kwargs) -> None:
    try:
        load(image, ram=FUZZ_RAM, **kwargs)
    except boot.KernelImageError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.sampled_from([BASE_BZ, BASE_GUEST_BZ]),
       st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.sampled_from([1, 2, 4, 8]), VALUES),
                min_size=1, max_size=4),
       st.sampled_from(["host", "guest"]), st.integers(0, 3000))
def test_mutated_setup_headers_only_raise_image_errors(base, mutations, decompress, truncate):
    image = bytearray(base)
    for offset, width, value in mutations:
        image[offset:offset + width] = (value & (1 << 8 * width) - 1).to_bytes(width, "little")
    if truncate % 5 == 0:
        del image[truncate:]
    _load_or_image_error(bytes(image), decompress=decompress, append="a b c",
                         modules=[boot.BootModule(b"initrd", "i")])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 200), st.sampled_from([1, 2, 4, 8]), VALUES),
                min_size=1, max_size=4))
def test_mutated_pvh_elf_notes_only_raise_image_errors(mutations):
    image = bytearray(PVH_ELF)
    note_at = image.index(b"Xen\0") - 12
    for offset, width, value in mutations:
        # Most mutations hit the note; some the ELF and program headers.
        offset = note_at + offset % 24 if offset >= 60 else offset
        image[offset:offset + width] = (value & (1 << 8 * width) - 1).to_bytes(width, "little")
    _load_or_image_error(bytes(image))
