"""A guest with its own minimal virtio-blk driver (tests/guests/virtio_blk.c) drives the device
directly on a Multiboot boot: PCI discovery and BAR placement, feature negotiation, indirect
chains, several requests in flight, write + flush, GET_ID, an error status, and completions
signalled by INTx (PIIX3 PIRQ routing to the in-kernel IOAPIC) and by MSI-X."""

import struct

import pytest
from procutil import assert_guest_passed

from hvvmm.devices.virtio_blk import DriveSpec
from hvvmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.guest

SECTOR = 512
SECTORS = 2048


def patterned_disk(path, sectors=SECTORS):
    """Sector N: N as a u64, then byte i = (N + i) & 0xFF (what the guest checks)."""
    data = bytearray()
    for sector in range(sectors):
        block = bytearray((sector + i) & 0xFF for i in range(SECTOR))
        block[:8] = struct.pack("<Q", sector)
        data += block
    path.write_bytes(data)
    return bytes(data)


def test_guest_driver_reads_writes_flushes_and_sees_errors(guest_image, tmp_path):
    path = tmp_path / "disk.img"
    original = patterned_disk(path)
    with Machine(MachineConfig(kernel=str(guest_image("virtio_blk")), append=f"sectors={SECTORS}",
                               drives=[DriveSpec(str(path))], memory=256 << 20)) as machine:
        result = machine.run(timeout=60)
        console = machine.console_text
    assert_guest_passed(result, console)
    for line in ("eight requests in flight", "INTx reached the IOAPIC pin",
                 "MSI-X message delivered"):
        assert f"PASS: {line}" in console, console
    after = path.read_bytes()
    written = bytes((i * 7 + 3) & 0xFF for i in range(2 * SECTOR))
    assert after == original[:10 * SECTOR] + written + original[12 * SECTOR:]


def test_guest_driver_on_a_read_only_drive_gets_ioerr_for_the_write(guest_image, tmp_path):
    path = tmp_path / "disk.img"
    original = patterned_disk(path)
    with Machine(MachineConfig(kernel=str(guest_image("virtio_blk")), append=f"sectors={SECTORS}",
                               drives=[DriveSpec(str(path), read_only=True)],
                               memory=256 << 20)) as machine:
        machine.run(timeout=60)
        console = machine.console_text
    assert "FAIL: write and flush complete" in console
    assert "PASS: read sectors 0-7" in console
    assert path.read_bytes() == original


def test_a_killed_vmm_leaves_the_flushed_writes_in_the_image(guest_image, tmp_path):
    """SIGKILL right after the guest saw its write and flush complete: the raw image holds the
    written sectors (the flush reached the file; nothing was buffered in the VMM)."""
    import os
    import signal
    import subprocess
    import sys

    from procutil import read_line

    path = tmp_path / "disk.img"
    original = patterned_disk(path)
    proc = subprocess.Popen([sys.executable, "-m", "hvvmm", "run", "--kernel",
                             str(guest_image("virtio_blk")), "--append", f"sectors={SECTORS}",
                             "--drive", f"file={path}", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        while "write and flush complete" not in (line := read_line(proc, timeout=60)):
            assert not line.startswith("FAIL"), line
        assert line.startswith("PASS"), line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    written = bytes((i * 7 + 3) & 0xFF for i in range(2 * SECTOR))
    assert path.read_bytes() == original[:10 * SECTOR] + written + original[12 * SECTOR:]
