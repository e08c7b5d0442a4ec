"""Booting a disk through SeaBIOS (Debian's ``seabios`` package): ``hvvmm run DISK`` loads the
test boot sector from a virtio-blk disk; it prints on COM1, reads and writes sectors with int 13h
and powers off. The image afterwards holds the written sector and nothing else changed."""

import logging
import os
import subprocess

import pytest
from procutil import HVVMM
from procutil import run_hvvmm as hvvmm

from hvvmm.block import RawBackend
from hvvmm.guestbuild import build_boot_sector

pytestmark = [pytest.mark.guest, pytest.mark.slow]  # each test boots SeaBIOS (seconds)

GUESTS = os.path.join(os.path.dirname(__file__), "..", "guests")
SECTOR = 512
PATTERN = bytes((i & 0xFF) ^ 0x5A for i in range(SECTOR))  # what mbr.S writes to LBA 2


@pytest.fixture(scope="session")
def boot_sector(tmp_path_factory):
    return build_boot_sector(os.path.join(GUESTS, "mbr.S"),
                             output_dir=tmp_path_factory.mktemp("mbr")).read_bytes()


@pytest.fixture
def disk(tmp_path, boot_sector):
    """A 1 MiB raw disk: the boot sector, the marker in LBA 1, a known pattern elsewhere."""
    image = bytearray(os.urandom(1 << 20))
    image[:SECTOR] = boot_sector
    image[SECTOR:2 * SECTOR] = b"HVVMM-LBA-1".ljust(SECTOR, b"\0")
    path = tmp_path / "disk.img"
    path.write_bytes(image)
    return path, bytes(image)


def expected_after_write(original: bytes) -> bytes:
    return original[:2 * SECTOR] + PATTERN + original[3 * SECTOR:]


def test_run_disk_boots_the_mbr_which_reads_writes_and_powers_off(disk):
    path, original = disk
    proc = hvvmm("run", str(path), "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MBR: hello" in proc.stdout and "MBR: ok" in proc.stdout
    assert path.read_bytes() == expected_after_write(original)


def test_drive_option_with_plain_kvm_and_bios_named(disk):
    path, original = disk
    proc = hvvmm("run", "--drive", f"file={path},format=raw,cache=none", "--hyperv", "none",
                 "--bios", "/usr/share/seabios/bios-256k.bin", "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert path.read_bytes() == expected_after_write(original)


def test_read_only_drive_fails_the_write_and_keeps_the_image(disk):
    path, original = disk
    proc = hvvmm("run", "--drive", f"file={path},readonly=on", "--timeout", "60")
    # mbr.S reports the failed int 13h write as step 3 on isa-debug-exit: (3 << 1) | 1.
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "MBR: hello" in proc.stdout and "MBR: ok" not in proc.stdout
    assert path.read_bytes() == original


def test_qemu_front_end_boots_hda_and_drive_if_none(disk):
    path, original = disk
    proc = subprocess.run([*HVVMM, "qemu", "-hda", str(path), "-nographic"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MBR: ok" in proc.stdout
    path.write_bytes(original)
    proc = subprocess.run([*HVVMM, "qemu", "-drive", f"file={path},if=none,id=d0,format=raw",
                           "-device", "virtio-blk-pci,drive=d0", "-serial", "stdio",
                           "-display", "none"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MBR: ok" in proc.stdout
    assert path.read_bytes() == expected_after_write(original)


def test_an_image_open_elsewhere_is_refused_with_status_4(disk):
    path, original = disk
    with RawBackend(path):  # holds QEMU-style write locks, as another VMM would
        proc = hvvmm("run", str(path))
    assert proc.returncode == 4
    assert proc.stderr.count("\n") == 1 and "in use" in proc.stderr
    assert path.read_bytes() == original


@pytest.mark.parametrize("args,fragment", [
    (("run", "/nonexistent/disk.img"), "cannot open /nonexistent/disk.img"),
    (("run", "DISK", "--bios", "/nonexistent/bios.bin"), "cannot read firmware"),
])
def test_missing_files_are_one_line_with_status_4(disk, args, fragment):
    path, _ = disk
    proc = hvvmm(*[str(path) if a == "DISK" else a for a in args])
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr


@pytest.mark.parametrize("smp,mode", [(1, "R"), (2, "R"), (1, "T")])
def test_reboot_restarts_the_firmware_in_place(disk, smp, mode, caplog):
    """The MBR pulses the i8042 reset line (R) or triple-faults (T) on its first boot; the same
    process (and machine) runs SeaBIOS again, which boots the MBR a second time (with two
    vCPUs, SeaBIOS starts the AP both times: it must be back in wait-for-SIPI)."""
    caplog.set_level(logging.DEBUG, logger="hvvmm.firmware")  # SeaBIOS's log is then written
    from hvvmm.devices.virtio_blk import DriveSpec
    from hvvmm.machine import ExitKind, Machine, MachineConfig

    path, original = disk
    image = bytearray(original)
    image[SECTOR:2 * SECTOR] = f"HVVMM-LBA-1{mode}".encode().ljust(SECTOR, b"\0")
    image[3 * SECTOR] = 0
    path.write_bytes(image)
    with Machine(MachineConfig(drives=[DriveSpec(str(path))], on_reset="restart", smp=smp,
                               memory=128 << 20)) as machine:
        result = machine.run(timeout=90)
        console = machine.console_text
        resets = machine.resets
        firmware_log = machine.debugcon.output.decode("latin-1")
    assert result.kind is ExitKind.POWEROFF, (result, console)
    assert console.index("MBR: rebooting") < console.index("MBR: booted again") \
        < console.index("MBR: ok"), console
    assert resets == 1
    assert firmware_log.count(f"Found {smp} cpu(s)") == 2, firmware_log
    after = path.read_bytes()
    assert after[3 * SECTOR] == 1 and after[2 * SECTOR:3 * SECTOR] == PATTERN


def test_reboot_exits_with_status_10_when_asked(disk):
    path, original = disk
    image = bytearray(original)
    image[SECTOR:2 * SECTOR] = b"HVVMM-LBA-1R".ljust(SECTOR, b"\0")
    image[3 * SECTOR] = 0
    path.write_bytes(image)
    proc = hvvmm("run", str(path), "--on-reset", "exit", "--timeout", "60")
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert "MBR: rebooting" in proc.stdout and "booted again" not in proc.stdout


def test_a_vhd_disk_boots_and_keeps_the_write(disk, tmp_path, host_tool):
    """The same MBR from a dynamic VHD made by qemu-img (format probed): the written sector is
    in the image afterwards, as qemu-img reads it back."""
    path, original = disk
    vhd = tmp_path / "disk.vhd"
    qemu_img = host_tool("qemu-img", "qemu-utils")
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic",
                    str(path), str(vhd)], check=True, capture_output=True)
    proc = hvvmm("run", str(vhd), "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MBR: ok" in proc.stdout
    back = tmp_path / "back.img"
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(vhd), str(back)],
                   check=True, capture_output=True)
    assert back.read_bytes()[:len(original)] == expected_after_write(original)


def test_the_same_image_twice_is_one_line_with_status_4(disk):
    path, _ = disk
    proc = hvvmm("run", str(path), "--drive", f"file={path.parent}/../{path.parent.name}/disk.img")
    assert proc.returncode == 4
    assert proc.stderr.count("\n") == 1 and "given twice" in proc.stderr, proc.stderr
