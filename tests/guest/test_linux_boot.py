"""Linux boot protocols under /dev/kvm, with test kernels built here (tests/guests/linuxboot):
a bzImage entered at startup_64 (64-bit boot protocol, boot_params), the same bzImage whose
payload (a compressed PVH kernel) hvvmm unpacks in the host, a PVH ELF (32-bit entry,
hvm_start_info) and an ELF vmlinux without the note. Each kernel checks what it was handed (the
CPU state, the zero page or start info, the e820 map, the command line, the initrd's checksum)
and reports PASS/FAIL lines and its verdict through isa-debug-exit."""

from __future__ import annotations

import gzip
import lzma
import os

import lz4.block
import pytest
from linuxboot import build_bzimage, build_pvh
from procutil import run_hvvmm as _hvvmm

from hvvmm import ExitKind, Machine, MachineConfig
from hvvmm.layout import E820_RAM, PC

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30
MEMORY = 256 << 20


def fnv1a(data: bytes) -> int:
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFF_FFFF
    return value


def lz4_legacy(data: bytes) -> bytes:
    """The kernel's LZ4 legacy framing (lib/decompress_unlz4.c) of ``data`` in 8 MiB blocks."""
    out = bytearray((0x184C2102).to_bytes(4, "little"))
    for start in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[start:start + (8 << 20)], store_size=False)
        out += len(block).to_bytes(4, "little") + block
    return bytes(out + len(data).to_bytes(4, "little"))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("linuxboot")
    pvh = build_pvh(out)
    gz_bz, vmlinux = build_bzimage(out, gzip.compress(pvh.read_bytes()), name="bz-gzip")
    lz4_bz, _ = build_bzimage(out, lz4_legacy(pvh.read_bytes()), name="bz-lz4")
    xz_raw = lzma.compress(pvh.read_bytes(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    xz_bz, _ = build_bzimage(out, xz_raw + len(pvh.read_bytes()).to_bytes(4, "little"),
                             name="bz-xz")
    plain_bz, _ = build_bzimage(out, b"not compressed", name="bz-plain")
    low_bz, _ = build_bzimage(out, b"", name="bz-low-initrd", initrd_addr_max=0x0FFF_FFFF)
    initrd = out / "initrd.img"
    initrd.write_bytes(os.urandom(70_000))
    return {"pvh": pvh, "bz-gzip": gz_bz, "bz-lz4": lz4_bz, "bz-xz": xz_bz, "bz-plain": plain_bz,
            "bz-low-initrd": low_bz, "vmlinux": vmlinux, "initrd": initrd, "dir": out}


def expectations(initrd: bytes, memory: int) -> str:
    ram = sum(entry.length for entry in PC.memory_map(memory) if entry.type == E820_RAM)
    return f"console=ttyS0 size={len(initrd):#x} sum={fnv1a(initrd):#x} ram={ram:#x}"


def boot(kernels, name, *, decompress="host", memory=MEMORY):
    initrd = kernels["initrd"]
    config = MachineConfig(kernel=kernels[name], initrd=(str(initrd),), memory=memory,
                           append=expectations(initrd.read_bytes(), memory),
                           kernel_decompress=decompress)
    with Machine(config) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        return result, machine.console_text, machine.boot


def assert_passed(result, console):
    assert "FAIL" not in console, console
    assert "RESULT: PASS" in console, console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, (result, console)


@pytest.mark.parametrize("name", ["bz-gzip", "bz-lz4", "bz-xz"])
def test_bzimage_payload_unpacked_in_the_host_boots_through_pvh(kernels, name):
    result, console, state = boot(kernels, name)
    assert_passed(result, console)
    assert "linuxboot: PVH entry" in console
    assert state.protocol.startswith("PVH")


def test_bzimage_guest_decompression_enters_startup_64(kernels):
    result, console, state = boot(kernels, "bz-gzip", decompress="guest")
    assert_passed(result, console)
    assert "linuxboot: 64-bit entry" in console and "protocol 0x20f" in console
    assert state.entry == 0x100200  # pref_address + 0x200


def test_bzimage_without_xlf_kernel_64_enters_the_32_bit_protocol(kernels):
    image, _ = build_bzimage(kernels["dir"], b"", name="bz-32", xloadflags=0)
    with Machine(MachineConfig(kernel=image, memory=MEMORY)) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        assert "linuxboot: 32-bit entry" in machine.console_text
        assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, machine.console_text
        assert machine.boot.entry == 0x100000


def test_bzimage_payload_of_no_known_format_is_left_to_the_guest(kernels):
    result, console, _ = boot(kernels, "bz-plain")
    assert_passed(result, console)
    assert "linuxboot: 64-bit entry" in console


def test_bzimage_with_ram_above_4g(kernels):
    # 3.25 GiB: the e820 map has RAM above 4 GiB; initrd_addr_max keeps the initrd below 2 GiB.
    result, console, _ = boot(kernels, "bz-gzip", decompress="guest", memory=(13 << 28))
    assert_passed(result, console)
    assert "initrd at 0x7ff" in console


def test_initrd_addr_max_is_respected(kernels):
    result, console, _ = boot(kernels, "bz-low-initrd", memory=512 << 20)
    assert_passed(result, console)
    assert "initrd at 0xffee000 " in console  # the highest page that fits below 256 MiB


def test_pvh_elf(kernels):
    result, console, state = boot(kernels, "pvh")
    assert_passed(result, console)
    assert "linuxboot: PVH entry" in console and state.ebx == 0x8000


def test_elf_vmlinux_without_pvh_note_enters_64_bit(kernels):
    result, console, _ = boot(kernels, "vmlinux")
    assert_passed(result, console)
    assert "linuxboot: 64-bit entry" in console


@pytest.mark.parametrize("name,decompress", [("bz-gzip", "guest"), ("pvh", "host")])
@pytest.mark.parametrize("acpi", [True, False])
def test_the_rsdp_address_reaches_the_kernel(kernels, name, decompress, acpi):
    initrd = kernels["initrd"]
    config = MachineConfig(kernel=kernels[name], initrd=(str(initrd),), memory=MEMORY, acpi=acpi,
                           append=expectations(initrd.read_bytes(), MEMORY),
                           kernel_decompress=decompress)
    with Machine(config) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        assert_passed(result, machine.console_text)
        assert (machine.acpi_rsdp is not None) == acpi
        assert f"rsdp={machine.acpi_rsdp or 0:#x}\n" in machine.console_text


@pytest.mark.parametrize("keep", [False, True], ids=["emulator-safe", "keep-cmdline"])
def test_the_kernel_gets_the_emulator_safe_options_where_ring0_is_emulated(kernels, keep):
    """The command line the kernel reads: --append, then on a host whose KVM emulates guest
    ring 0 the options hvvmm.x86.features names (nothing on VT-x/AMD-V hosts); with
    --keep-cmdline (emulator_safe_cmdline=False) --append alone, on every host."""
    from hvvmm.host import host_virtualization
    from hvvmm.kvm import Kvm
    from hvvmm.x86.features import emulator_safe_linux_options

    initrd = kernels["initrd"]
    append = expectations(initrd.read_bytes(), MEMORY)
    with Kvm() as kvm:
        added = emulator_safe_linux_options(
            kvm.supported_cpuid(), not host_virtualization().can_boot_stock_kernels)
    expected = append if keep or not added else f"{append} {added}"
    config = MachineConfig(kernel=kernels["pvh"], initrd=(str(initrd),), memory=MEMORY,
                           append=append, emulator_safe_cmdline=not keep)
    with Machine(config) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        assert_passed(result, machine.console_text)
        assert f"cmdline: {expected}\n" in machine.console_text, machine.console_text


# -- the command lines ---------------------------------------------------------------------------

def test_hvvmm_run_kernel_initrd_append(kernels):
    initrd = kernels["initrd"]
    proc = _hvvmm("run", "--kernel", kernels["bz-lz4"], "--initrd", initrd, "--append",
                  expectations(initrd.read_bytes(), MEMORY))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # debug-exit 0: "every check passed"
    assert "RESULT: PASS" in proc.stdout and "PVH entry" in proc.stdout


def test_qemu_kernel_initrd_append(kernels):
    initrd = kernels["initrd"]
    proc = _hvvmm("qemu", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-serial", "stdio",
                  "-m", "256", "-kernel", kernels["bz-gzip"], "-initrd", initrd, "-append",
                  expectations(initrd.read_bytes(), MEMORY))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "RESULT: PASS" in proc.stdout


def test_qemu_linux_initrd_name_with_a_comma_is_one_file(kernels, tmp_path):
    initrd = tmp_path / "initrd,v1.img"
    initrd.write_bytes(kernels["initrd"].read_bytes())
    proc = _hvvmm("qemu", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-serial", "stdio",
                  "-m", "256", "-kernel", kernels["pvh"], "-initrd", initrd, "-append",
                  expectations(initrd.read_bytes(), MEMORY))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "RESULT: PASS" in proc.stdout


def test_qemu_missing_linux_initrd(kernels, tmp_path):
    proc = _hvvmm("qemu", "-kernel", kernels["pvh"], "-initrd", tmp_path / "none.img")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"qemu: error reading initrd {tmp_path / 'none.img'}: " \
                                  f"No such file or directory"


# -- bad input: one line, exit status 4 --------------------------------------------------------

def assert_image_error(proc, fragment):
    assert proc.returncode == 4, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert proc.stdout == ""


def test_truncated_bzimage(kernels, tmp_path):
    image = kernels["bz-gzip"].read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(image[:len(image) // 2])
    assert_image_error(_hvvmm("run", "--kernel", cut), "truncated")


def test_boot_protocol_too_old(kernels, tmp_path):
    image = bytearray(kernels["bz-gzip"].read_bytes())
    image[0x206:0x208] = (0x0205).to_bytes(2, "little")
    old = tmp_path / "old"
    old.write_bytes(image)
    assert_image_error(_hvvmm("run", "--kernel", old), "boot protocol 2.05, too old")


def test_payload_that_does_not_decompress(kernels):
    payload = bytearray(gzip.compress(kernels["pvh"].read_bytes()))
    payload[20:40] = bytes(range(20))  # deflate data broken; the size trailer stays
    corrupt, _ = build_bzimage(kernels["dir"], bytes(payload), name="bz-corrupt")
    assert_image_error(_hvvmm("run", "--kernel", corrupt), "gzip kernel payload does not "
                                                           "decompress")


def test_initrd_larger_than_ram(kernels, tmp_path):
    big = tmp_path / "big.img"
    big.write_bytes(bytes(20 << 20))
    assert_image_error(_hvvmm("run", "--kernel", kernels["pvh"], "--initrd", big, "--memory",
                              "16M"), "is larger than guest RAM")


def test_initrd_above_initrd_addr_max(kernels, tmp_path):
    image, _ = build_bzimage(kernels["dir"], b"", name="bz-4m", initrd_addr_max=0x3F_FFFF)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(4 << 20))
    assert_image_error(_hvvmm("run", "--kernel", image, "--initrd", initrd,
                              "--kernel-decompress", "guest"), "initrd_addr_max")


def test_command_line_longer_than_cmdline_size(kernels):
    image, _ = build_bzimage(kernels["dir"], b"", name="bz-short-cmdline", cmdline_size=16)
    assert_image_error(_hvvmm("run", "--kernel", image, "--append", "x" * 17),
                       "longer than this kernel accepts (cmdline_size 16)")
