"""The ACPI PM1a control register (PM1a_CNT), enough for soft power-off.

A 16-bit register at the PM base + 4: port 0x604 with QEMU q35's PM base 0x600 (ICH9 LPC). A write
with SLP_EN (bit 13) set asks the platform to enter the sleep state in SLP_TYP (bits 10-12); QEMU's
DSDT encodes S5 as SLP_TYP 0, and ``acpi_pm1_cnt_write`` in QEMU ``hw/acpi/core.c`` treats type 0
as soft power-off. So ``outw(0x604, 0x2000)`` powers off, as hobby OSes expect; that calls
``on_poweroff()``. Other sleep types are logged (once each) and ignored. SLP_EN is write-only:
reads return the last value written without it. Byte accesses read or update their half of the
register (a write of 0x20 to 0x605 is SLP_EN with type 0).

Sources: ACPI Specification 6.5, section 4.8.3.2.1 (PM1 Control Registers); QEMU ``hw/acpi/core.c``
and ``hw/isa/lpc_ich9.c`` / ``include/hw/i386/ich9.h`` (ICH9_PMIO base 0x600).
"""

from __future__ import annotations

import logging
from typing import Callable

from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

ACPI_PM_BASE = 0x600
ACPI_PM1_CNT_OFFSET = 0x04
ACPI_PM1A_CNT_PORT = ACPI_PM_BASE + ACPI_PM1_CNT_OFFSET  # 0x604
ACPI_PM1A_CNT_LENGTH = 2

ACPI_BITMASK_SCI_ENABLE = 0x0001
ACPI_BITMASK_SLEEP_TYPE = 0x1C00   # SLP_TYP, bits 10-12
ACPI_BITMASK_SLEEP_ENABLE = 0x2000  # SLP_EN, bit 13
SLP_TYP_SHIFT = 10
SLP_TYP_S5_QEMU = 0  # soft off, in QEMU's DSDT encoding


class AcpiPm:
    """PM1a_CNT; register it at :data:`ACPI_PM1A_CNT_PORT` with length
    :data:`ACPI_PM1A_CNT_LENGTH`."""

    def __init__(self, on_poweroff: Callable[[], None]):
        self._on_poweroff = on_poweroff
        self._cnt = 0
        self._log_once = LogOnce(log)

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset >= ACPI_PM1A_CNT_LENGTH:
            return mask
        return (self._cnt >> (8 * offset)) & mask

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= ACPI_PM1A_CNT_LENGTH:
            return
        # Merge the written bytes into the 16-bit register (offset 1 is the high byte).
        mask = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFF
        value = (self._cnt & ~mask) | ((value << (8 * offset)) & mask)
        self._cnt = value & ~ACPI_BITMASK_SLEEP_ENABLE
        if not value & ACPI_BITMASK_SLEEP_ENABLE:
            return
        sleep_type = (value & ACPI_BITMASK_SLEEP_TYPE) >> SLP_TYP_SHIFT
        if sleep_type == SLP_TYP_S5_QEMU:
            self._log_once(sleep_type, logging.INFO,
                           "guest requested ACPI soft power-off (PM1a_CNT %#06x)", value)
            self._on_poweroff()
        else:
            self._log_once(sleep_type, logging.INFO,
                           "guest requested ACPI sleep type %d (PM1a_CNT %#06x); ignored",
                           sleep_type, value)
