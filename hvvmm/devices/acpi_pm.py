"""The ACPI PM register block: PM1a event, PM1a control (soft power-off) and the PM timer.

Twelve ports from the PM base (0x600, QEMU's PM base for q35's ICH9 LPC), as the FADT describes
them (hvvmm.acpi.tables):

- base+0 PM1a_STS (16 bits, write 1 to clear) and base+2 PM1a_EN (16 bits, read/write), the
  PM1 event block (ACPI 6.5 §4.8.3.1). Status bits: TMR_STS (the timer's bit 23 changed since it
  was last cleared), and the others no hardware here ever sets. Enable bits TMR_EN, GBL_EN,
  PWRBTN_EN, SLPBTN_EN and RTC_EN read back what was written (ACPICA checks that an enable bit
  sticks before it uses the event). The SCI (``sci``, level-triggered) is asserted while a status
  bit and its enable bit are both set; the status is looked at on each access, so a timer carry
  raises no interrupt by itself (Linux does not enable TMR_EN: it reads the timer by polling).
- base+4 PM1a_CNT (16 bits, §4.8.3.2.1). SCI_EN (bit 0) always reads 1: there is no SMM and the
  FADT has no SMI_CMD, so the hardware is always in ACPI mode (§5.2.9, SMI_CMD). A write with
  SLP_EN (bit 13) asks for the sleep state in SLP_TYP (bits 10-12): QEMU's DSDT encodes S5 as
  SLP_TYP 0 and hvvmm's ``\\_S5`` does the same, and ``acpi_pm1_cnt_write`` in QEMU
  ``hw/acpi/core.c`` treats type 0 as soft power-off; so ``outw(0x604, 0x2000)`` powers off, as
  hobby OSes expect, and calls ``on_poweroff()``. Other sleep types are logged (once each) and
  ignored. SLP_EN and GBL_RLS are write-only and read as 0.
- base+8 PM_TMR (32-bit read, §4.8.3.3): a 24-bit counter at 3.579545 MHz from the host's
  monotonic clock, as QEMU's PIIX4/ICH9 timer (FADT TMR_VAL_EXT clear). Linux calibrates against
  it and keeps it as a clocksource.

Byte and word accesses read or update their part of a register. Accesses outside the block read
as all ones and are ignored.

Sources: ACPI Specification 6.5, §4.8.3 (PM1 event, control and timer registers); QEMU
``hw/acpi/core.c``, ``include/hw/acpi/acpi.h`` (bit names), ``hw/isa/lpc_ich9.c`` /
``include/hw/i386/ich9.h`` (ICH9_PMIO base 0x600).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from hvvmm.bus import IrqLine
from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

ACPI_PM_BASE = 0x600
ACPI_PM1_EVT_OFFSET = 0x00
ACPI_PM1_EVT_LENGTH = 4         # PM1_STS and PM1_EN, two bytes each
ACPI_PM1_CNT_OFFSET = 0x04
ACPI_PM1_CNT_LENGTH = 2
ACPI_PM_TMR_OFFSET = 0x08
ACPI_PM_TMR_LENGTH = 4
ACPI_PM_BLOCK_LENGTH = 0x0C     # register the whole block at ACPI_PM_BASE with this length
ACPI_PM1A_CNT_PORT = ACPI_PM_BASE + ACPI_PM1_CNT_OFFSET  # 0x604
ACPI_PM1A_CNT_LENGTH = ACPI_PM1_CNT_LENGTH
ACPI_PM_TMR_PORT = ACPI_PM_BASE + ACPI_PM_TMR_OFFSET      # 0x608

PM_TIMER_FREQUENCY = 3_579_545  # Hz (§4.8.3.3)
PM_TIMER_MASK = (1 << 24) - 1
PM_TIMER_MSB_SHIFT = 23

# PM1 status and enable bits (§4.8.3.1.1, §4.8.3.1.2).
ACPI_BITMASK_TIMER_STATUS = 0x0001
ACPI_BITMASK_BUS_MASTER_STATUS = 0x0010
ACPI_BITMASK_GLOBAL_LOCK_STATUS = 0x0020
ACPI_BITMASK_POWER_BUTTON_STATUS = 0x0100
ACPI_BITMASK_SLEEP_BUTTON_STATUS = 0x0200
ACPI_BITMASK_RTC_STATUS = 0x0400
ACPI_BITMASK_WAKE_STATUS = 0x8000
ACPI_PM1_ENABLE_BITS = 0x0721   # TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN

# PM1 control bits (§4.8.3.2.1).
ACPI_BITMASK_SCI_ENABLE = 0x0001
ACPI_BITMASK_GLOBAL_LOCK_RELEASE = 0x0004
ACPI_BITMASK_SLEEP_TYPE = 0x1C00   # SLP_TYP, bits 10-12
ACPI_BITMASK_SLEEP_ENABLE = 0x2000  # SLP_EN, bit 13
SLP_TYP_SHIFT = 10
SLP_TYP_S5_QEMU = 0  # soft off, in QEMU's DSDT encoding (and hvvmm's \_S5)


def _merge(register: int, offset: int, size: int, value: int) -> tuple[int, int]:
    """``register`` (16 bits) with the ``size`` bytes written at byte ``offset`` of it, and the
    mask of the bits written."""
    mask = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFF
    return (register & ~mask) | ((value << (8 * offset)) & mask), mask


class AcpiPm:
    """The PM1a event and control registers and the PM timer; register at :data:`ACPI_PM_BASE`
    with length :data:`ACPI_PM_BLOCK_LENGTH`. ``clock`` returns nanoseconds (injected for
    tests)."""

    def __init__(self, on_poweroff: Callable[[], None], sci: IrqLine | None = None,
                 clock: Callable[[], int] = time.monotonic_ns):
        self._on_poweroff = on_poweroff
        self._sci = sci
        self._clock = clock
        self._origin = clock()
        self._lock = threading.Lock()
        self._cnt = ACPI_BITMASK_SCI_ENABLE
        self._enable = 0
        self._status = 0
        self._timer_carries_seen = 0  # timer MSB changes when TMR_STS was last cleared
        self._sci_level = False
        self._log_once = LogOnce(log)

    # -- the PM timer ---------------------------------------------------------------------------

    def _ticks(self) -> int:
        return (self._clock() - self._origin) * PM_TIMER_FREQUENCY // 1_000_000_000

    def timer_value(self) -> int:
        """PM_TMR: the 24-bit count."""
        return self._ticks() & PM_TIMER_MASK

    def _status_now(self) -> int:
        status = self._status
        if self._ticks() >> PM_TIMER_MSB_SHIFT != self._timer_carries_seen:
            status |= ACPI_BITMASK_TIMER_STATUS
        return status

    # -- bus interface --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset < 0 or offset + size > ACPI_PM_BLOCK_LENGTH:
            return mask
        with self._lock:
            # The block as little-endian bytes, so any access within it reads its part.
            block = (self._status_now() | (self._enable << 16) | (self._cnt << 32)
                     | (self.timer_value() << 64))
            self._update_sci_locked()
        return (block >> (8 * offset)) & mask

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > ACPI_PM_BLOCK_LENGTH:
            return
        value &= (1 << (8 * size)) - 1
        poweroff = False
        with self._lock:
            # Split an access that spans registers into one part per 16-bit register.
            for register in range(offset // 2 * 2, offset + size, 2):
                first = max(offset, register)
                last = min(offset + size, register + 2)
                part = (value >> (8 * (first - offset))) & ((1 << (8 * (last - first))) - 1)
                if register < ACPI_PM_TMR_OFFSET:
                    poweroff |= self._write_register_locked(register, first - register,
                                                            last - first, part)
            self._update_sci_locked()
        if poweroff:
            self._on_poweroff()

    def _write_register_locked(self, register: int, offset: int, size: int, value: int) -> bool:
        if register == ACPI_PM1_EVT_OFFSET:  # PM1_STS: write 1 to clear
            cleared, _ = _merge(0, offset, size, value)
            self._status &= ~cleared
            if cleared & ACPI_BITMASK_TIMER_STATUS:
                self._timer_carries_seen = self._ticks() >> PM_TIMER_MSB_SHIFT
            return False
        if register == ACPI_PM1_EVT_OFFSET + 2:  # PM1_EN
            self._enable, _ = _merge(self._enable, offset, size, value)
            self._enable &= ACPI_PM1_ENABLE_BITS
            return False
        return self._write_control_locked(offset, size, value)

    def _write_control_locked(self, offset: int, size: int, value: int) -> bool:
        value, _ = _merge(self._cnt, offset, size, value)
        self._cnt = (value & ~(ACPI_BITMASK_SLEEP_ENABLE | ACPI_BITMASK_GLOBAL_LOCK_RELEASE)
                     | ACPI_BITMASK_SCI_ENABLE)
        if not value & ACPI_BITMASK_SLEEP_ENABLE:
            return False
        sleep_type = (value & ACPI_BITMASK_SLEEP_TYPE) >> SLP_TYP_SHIFT
        if sleep_type == SLP_TYP_S5_QEMU:
            self._log_once(sleep_type, logging.INFO,
                           "guest requested ACPI soft power-off (PM1a_CNT %#06x)", value)
            return True
        self._log_once(sleep_type, logging.INFO,
                       "guest requested ACPI sleep type %d (PM1a_CNT %#06x); ignored",
                       sleep_type, value)
        return False

    def _update_sci_locked(self) -> None:
        level = bool(self._status_now() & self._enable)
        if level != self._sci_level:
            self._sci_level = level
            if self._sci is not None:
                self._sci.set_level(level)
