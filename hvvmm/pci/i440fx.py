"""The i440FX host bridge (with its PAM registers) and the PIIX3 PCI-to-ISA bridge (with its PIRQ
routing), as QEMU's ``pc`` machine has them at 00.0 and 01.0.

PAM (Intel 82441FX datasheet §3.2.19, "PAM0-PAM6"): seven registers at 0x59-0x5F give each
segment of 0xC0000-0xFFFFF one of four modes: 0 reads and writes go to the PCI side (the BIOS ROM
for 0xE0000-0xFFFFF), 1 reads RAM, writes PCI (RAM read-only), 2 writes RAM, reads PCI, 3 RAM.
PAM0's high nibble covers 0xF0000-0xFFFFF (64 KiB); each other register's nibbles cover two
16 KiB segments, low nibble first, from 0xC0000 up. Firmware uses them to copy itself into RAM
("shadowing") and write-protect the copy.

PIRQ routing (82371SB datasheet §2.2.10, "PIRQRC[A:D]"): registers 0x60-0x63 route PIRQA-D to an
ISA IRQ (bits 0-3) unless bit 7 disables the route; the power-on value is 0x80. Which PIRQ a
device's pin drives follows QEMU's and SeaBIOS's swizzle: ``(slot - 1 + pin - 1) mod 4``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ..bus import IrqLine
from .config import PciFunction

I440FX_VENDOR, I440FX_DEVICE = 0x8086, 0x1237
PIIX3_VENDOR, PIIX3_DEVICE = 0x8086, 0x7000
QEMU_SUBSYSTEM_VENDOR, QEMU_SUBSYSTEM = 0x1AF4, 0x1100  # "Red Hat, QEMU virtual machine"
CLASS_HOST_BRIDGE = 0x060000
CLASS_ISA_BRIDGE = 0x060100

PAM0 = 0x59
PAM_REGISTERS = 7
PIRQ_ROUTE = 0x60
PIRQ_COUNT = 4
PIRQ_DISABLED = 0x80

PAM_PCI, PAM_READ_ONLY, PAM_WRITE_ONLY, PAM_RAM = 0, 1, 2, 3


@dataclass(frozen=True)
class PamSegment:
    base: int
    size: int
    mode: int


def pam_segments(registers: bytes) -> list[PamSegment]:
    """The 13 segments of 0xC0000-0xFFFFF and their modes, from the seven PAM bytes."""
    segments = [PamSegment(0xF_0000, 0x1_0000, (registers[0] >> 4) & 3)]
    for index in range(1, PAM_REGISTERS):
        for nibble in range(2):
            base = 0xC_0000 + ((index - 1) * 2 + nibble) * 0x4000
            segments.append(PamSegment(base, 0x4000, (registers[index] >> (4 * nibble)) & 3))
    return sorted(segments, key=lambda s: s.base)


class I440fxHostBridge(PciFunction):
    """00.0: 8086:1237 with QEMU's subsystem ID, which SeaBIOS checks before it uses fw_cfg
    (SeaBIOS ``src/fw/paravirt.c``, ``qemu_detect``)."""

    def __init__(self, on_pam_change: Callable[[list[PamSegment]], None] | None = None):
        super().__init__("i440fx", I440FX_VENDOR, I440FX_DEVICE, CLASS_HOST_BRIDGE, revision=2,
                         subsystem_vendor=QEMU_SUBSYSTEM_VENDOR, subsystem=QEMU_SUBSYSTEM)
        self.on_pam_change = on_pam_change
        self.set_writable(PAM0, 1, 0x30)
        for offset in range(PAM0 + 1, PAM0 + PAM_REGISTERS):
            self.set_writable(offset, 1, 0x33)

    @property
    def pam(self) -> list[PamSegment]:
        return pam_segments(bytes(self.config[PAM0:PAM0 + PAM_REGISTERS]))

    def config_written(self, offset: int, size: int, old: bytes) -> None:
        if offset < PAM0 + PAM_REGISTERS and PAM0 < offset + size:
            if bytes(self.config[offset:offset + size]) != old and self.on_pam_change:
                self.on_pam_change(self.pam)

    def reset(self) -> None:
        super().reset()
        if self.on_pam_change:
            self.on_pam_change(self.pam)


class Piix3IsaBridge(PciFunction):
    """01.0: 8086:7000, a multi-function device (QEMU adds IDE and PM functions; hvvmm none).
    Also the PIRQ router: :meth:`route_intx` is the PCI bus's INTx hook."""

    def __init__(self, isa_irq: Callable[[int], IrqLine]):
        super().__init__("piix3", PIIX3_VENDOR, PIIX3_DEVICE, CLASS_ISA_BRIDGE,
                         subsystem_vendor=QEMU_SUBSYSTEM_VENDOR, subsystem=QEMU_SUBSYSTEM,
                         multifunction=True)
        self._isa_irq = isa_irq
        self._asserted: set[tuple[int, int]] = set()  # (devfn, pin) pairs driving high
        self._levels: dict[int, bool] = {}            # ISA IRQ -> level last driven
        self._route_lock = threading.Lock()
        for pirq in range(PIRQ_COUNT):
            self.config[PIRQ_ROUTE + pirq] = PIRQ_DISABLED
            self.set_writable(PIRQ_ROUTE + pirq, 1, 0x8F)

    @staticmethod
    def pirq_of(devfn: int, pin: int) -> int:
        return ((devfn >> 3) - 1 + pin - 1) & 3

    def isa_irq_of(self, pirq: int) -> int | None:
        route = self.config[PIRQ_ROUTE + pirq]
        if route & PIRQ_DISABLED:
            return None
        irq = route & 0x0F
        # IRQs 0-2, 8 and 13 are reserved (82371SB §2.2.10); QEMU ignores them the same way.
        return None if irq in (0, 1, 2, 8, 13) else irq

    def route_intx(self, devfn: int, pin: int, level: bool) -> None:
        with self._route_lock:
            if level:
                self._asserted.add((devfn, pin))
            else:
                self._asserted.discard((devfn, pin))
            self._drive()

    def _drive(self) -> None:
        wanted: dict[int, bool] = {irq: False for irq in self._levels}
        for devfn, pin in self._asserted:
            irq = self.isa_irq_of(self.pirq_of(devfn, pin))
            if irq is not None:
                wanted[irq] = True
        for irq, level in wanted.items():
            if self._levels.get(irq) != level:
                self._levels[irq] = level
                self._isa_irq(irq).set_level(level)

    def config_written(self, offset: int, size: int, old: bytes) -> None:
        if offset < PIRQ_ROUTE + PIRQ_COUNT and PIRQ_ROUTE < offset + size:
            with self._route_lock:
                self._drive()

    def reset(self) -> None:
        super().reset()
        for pirq in range(PIRQ_COUNT):
            self.config[PIRQ_ROUTE + pirq] = PIRQ_DISABLED
        with self._route_lock:
            self._drive()
