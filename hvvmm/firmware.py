"""Firmware boot: a BIOS image (SeaBIOS) mapped below 4 GiB, started at the reset vector.

The image is mapped read-only so that it ends at 4 GiB (the reset vector, F000:FFF0, is its last
16 bytes), and its last 128 KiB also appear at 0xE0000-0xFFFFF while the PAM registers of the
i440FX route that window to the PCI side; the firmware then copies itself into RAM through the
same registers (:class:`LegacyWindow`). The vCPU starts in KVM's power-on state, which is the
architectural reset state (Intel SDM Vol. 3A §9.1.1), so no entry state is set.

fw_cfg tells the firmware what QEMU would (QEMU ``hw/i386/fw_cfg.c``, SeaBIOS
``src/fw/paravirt.c``): the RAM as ``etc/e820``, the boot disk in ``bootorder``, no boot menu,
and ready SMBIOS tables (:mod:`hvvmm.smbios`).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from typing import Sequence

from .devices.fw_cfg import FW_CFG_BOOT_MENU, FwCfg
from .kvm import PinnedBuffer
from .layout import E820_RAM, PC, KiB
from .memory import GuestMemory, GuestMemoryError
from .memslots import MemslotManager, Window
from .pci.i440fx import PAM_RAM, PAM_READ_ONLY, PAM_WRITE_ONLY, PamSegment
from .smbios import SMBIOS_ANCHOR_FILE, SMBIOS_TABLES_FILE, build_smbios

log = logging.getLogger(__name__)

DEFAULT_BIOS = "/usr/share/seabios/bios-256k.bin"
_E820_ENTRY = struct.Struct("<QQI")  # struct e820_entry as QEMU's etc/e820 holds it


class FirmwareError(ValueError):
    """A firmware image that cannot be used; the message says why."""


class FirmwareRom:
    """The firmware image in host memory, pinned, shown read-only to the guest."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        try:
            with open(path, "rb") as stream:
                image = stream.read(PC.firmware_max_size + 1)
        except OSError as exc:
            raise FirmwareError(f"cannot read firmware {path}: {exc.strerror}") from None
        if not image or len(image) % (64 * KiB) or len(image) > PC.firmware_max_size:
            raise FirmwareError(f"firmware {path}: {len(image)} bytes; expected a BIOS image of "
                                f"64, 128, 192 or 256 KiB")
        self.path = path
        self.size = len(image)
        self._buffer = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buffer[:] = image
        self._pinned = PinnedBuffer(self._buffer)
        self.host_address = self._pinned.address
        self.gpa = PC.firmware_end - self.size

    def low_alias(self) -> tuple[int, int, int]:
        """``(gpa, size, host address)`` of the image's tail as it appears below 1 MiB."""
        start, end = PC.firmware_low_alias
        size = min(end - start, self.size)
        return end - size, size, self.host_address + self.size - size

    def byte_at_low(self, gpa: int, size: int) -> int | None:
        """The image's bytes at a low-alias address, or None outside the alias."""
        base, length, _ = self.low_alias()
        if not (base <= gpa and gpa + size <= base + length):
            return None
        offset = self.size - length + gpa - base
        return int.from_bytes(self._buffer[offset:offset + size], "little")

    def close(self) -> None:
        self._pinned.release()
        self._buffer.close()


class LegacyWindow:
    """0xC0000-0xFFFFF as the PAM registers decode it: memslot windows for what KVM can map
    (RAM, RAM read-only, the ROM), and a bus device for the accesses that exit (writes to
    read-only or write-to-RAM segments, reads of segments nothing decodes)."""

    def __init__(self, memslots: MemslotManager, memory: GuestMemory, ram_host_address: int,
                 rom: FirmwareRom | None):
        self._memslots = memslots
        self._memory = memory
        self._ram_host = ram_host_address  # host address of guest-physical 0
        self._rom = rom
        self._segments: list[PamSegment] = []

    def apply_pam(self, segments: list[PamSegment]) -> None:
        self._segments = list(segments)
        windows = []
        for segment in segments:
            if segment.mode == PAM_RAM:
                continue  # the RAM below shows through
            if segment.mode == PAM_READ_ONLY:
                windows.append(Window(segment.base, segment.size,
                                      self._ram_host + segment.base, readonly=True))
                continue
            # Reads go to the PCI side: the ROM's alias where it has one, else nothing.
            host = None
            if self._rom is not None:
                base, size, rom_host = self._rom.low_alias()
                if base <= segment.base and segment.base + segment.size <= base + size:
                    host = rom_host + segment.base - base
            windows.append(Window(segment.base, segment.size, host, readonly=True))
        self._memslots.set_windows("pam", windows)

    def _segment(self, gpa: int) -> PamSegment | None:
        for segment in self._segments:
            if segment.base <= gpa < segment.base + segment.size:
                return segment
        return None

    # BusDevice on the MMIO bus at PC.pam_window.
    def read(self, offset: int, size: int) -> int:
        gpa = PC.pam_window[0] + offset
        if self._rom is not None:
            value = self._rom.byte_at_low(gpa, size)
            if value is not None:
                return value
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        gpa = PC.pam_window[0] + offset
        segment = self._segment(gpa)
        if segment is not None and segment.mode in (PAM_WRITE_ONLY, PAM_RAM):
            try:
                self._memory.write(gpa, value.to_bytes(size, "little"))
            except GuestMemoryError:
                pass


class DebugConsole:
    """QEMU's isa-debugcon at 0x402: the firmware's log, kept (bounded) and logged per line.

    SeaBIOS writes its log there only when a read of the port returns 0xE9 (``src/hw/serialio.c``,
    ``qemu_debug_preinit``); each byte is a port exit. So the console answers only when someone
    reads the log (``present``; by default, when this module logs at DEBUG, ``hvvmm run
    --debug``), as QEMU has none unless asked (``-debugcon``): an absent one reads as an empty
    port (0xFF) and saves a boot some 2,700 exits."""

    LIMIT = 1 << 20
    READBACK = 0xE9

    def __init__(self, present: bool | None = None):
        self.present = log.isEnabledFor(logging.DEBUG) if present is None else present
        self.output = bytearray()
        self._line = bytearray()

    def read(self, offset: int, size: int) -> int:
        return self.READBACK if self.present else 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if not self.present:
            return
        byte = value & 0xFF
        if len(self.output) < self.LIMIT:
            self.output.append(byte)
        if byte == 0x0A or len(self._line) > 512:
            log.debug("firmware: %s", self._line.decode("latin-1").rstrip())
            self._line.clear()
        elif byte != 0x0D:
            self._line.append(byte)


def firmware_e820(memory_size: int) -> bytes:
    """``etc/e820``: the RAM only, as QEMU gives it; SeaBIOS reserves its own areas."""
    return b"".join(_E820_ENTRY.pack(gpa, size, E820_RAM)
                    for gpa, size in PC.memory_layout(memory_size))


def boot_order(slots: Sequence[int]) -> bytes:
    """``bootorder``: OpenFirmware paths of the boot disks in order (QEMU ``get_boot_devices_list``;
    SeaBIOS matches ``/pci@i0cf8/*@SLOT`` against them)."""
    return "".join(f"/pci@i0cf8/scsi@{slot:x}/disk@0,0\n" for slot in slots).encode()


def configure_fw_cfg(fw_cfg: FwCfg, memory_size: int, boot_slots: Sequence[int],
                     cpu_count: int = 1) -> None:
    fw_cfg.add_file("etc/e820", firmware_e820(memory_size))
    # Ready SMBIOS tables spare SeaBIOS building them in (slow, on some KVMs emulated) ring 0.
    smbios = build_smbios(memory_size, cpu_count)
    fw_cfg.add_file(SMBIOS_ANCHOR_FILE, smbios.entry_point())
    fw_cfg.add_file(SMBIOS_TABLES_FILE, smbios.table)
    fw_cfg.add_file("bootorder", boot_order(boot_slots))
    fw_cfg.add_file("etc/boot-menu-wait", struct.pack("<H", 0))
    fw_cfg.set_item(FW_CFG_BOOT_MENU, struct.pack("<H", 0))  # SeaBIOS: etc/show-boot-menu



def install(rom: FirmwareRom, memslots: MemslotManager, fw_cfg: FwCfg, pio_bus,
            memory_size: int, boot_slots: Sequence[int], *, cpu_count: int = 1) -> DebugConsole:
    """Map ``rom`` below 4 GiB, describe the machine to it through fw_cfg, and put its debug
    console on its port; returns that console."""
    memslots.set_windows("firmware", [Window(rom.gpa, rom.size, rom.host_address)])
    configure_fw_cfg(fw_cfg, memory_size, boot_slots, cpu_count)
    debugcon = DebugConsole()
    slot = PC.device("debugcon")
    pio_bus.register(slot.port, slot.ports, debugcon, slot.name)
    return debugcon

# KVM's paravirtual MSRs a firmware or OS may have enabled (Linux Documentation/virt/kvm/x86/
# msr.rst): system time, async page faults, steal time, PV EOI. A reset turns them off, or KVM
# would go on writing into guest RAM the next boot owns.
KVM_PV_MSRS = (0x12, 0x4B56_4D01, 0x4B56_4D02, 0x4B56_4D03, 0x4B56_4D04)


class PowerOnState:
    """A vCPU's registers, FPU and LAPIC as KVM created it: the architectural state after RESET
    (Intel SDM Vol. 3A §9.1.1, real mode at F000:FFF0). Captured before the first run; restored
    by an in-place reset."""

    def __init__(self, vcpu):
        self.mp_state = vcpu.get_mp_state()  # an AP waits for INIT/SIPI
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self.fpu = vcpu.get_fpu()
        self.lapic = vcpu.get_lapic()
        self.pv_msrs = {}
        for index in KVM_PV_MSRS:
            try:
                self.pv_msrs.update(vcpu.get_msrs([index]))
            except OSError:
                pass  # not offered by this KVM

    def restore(self, vcpu) -> None:
        vcpu.set_lapic(self.lapic)
        vcpu.set_fpu(self.fpu)
        vcpu.set_sregs(self.sregs)
        vcpu.set_regs(self.regs)
        if self.pv_msrs:
            vcpu.set_msrs(self.pv_msrs)
        vcpu.set_mp_state(self.mp_state)
