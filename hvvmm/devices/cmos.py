"""The MC146818 real-time clock and its 128 bytes of CMOS RAM, as on PCs.

Index port base+0 (0x70; bit 7 of the byte written is the NMI-disable bit, kept in
:attr:`Cmos.nmi_disabled` and masked off the index; reading it returns 0xff, as QEMU), data port
base+1 (0x71). The time registers (seconds 0x00, minutes 0x02, hours 0x04, day of week 0x06, day of
month 0x07, month 0x08, year 0x09, and the century at 0x32) are computed on each read from the
injected UTC clock, in BCD or binary per register B's DM bit and in 24- or 12-hour form per its
24/12 bit (12-hour: PM is bit 7 of the hour). A guest write to a time register sets the guest's time
(kept as an offset from the clock, as QEMU does), so later reads advance from the written time;
while register B's SET bit is set the time registers are frozen and writes collect there, and
clearing SET starts the clock from them. Register A reports UIP 0 (the update cycle is never in
progress) and keeps the divider/rate bits (reset 0x26), register B resets to 0x02 (24-hour, BCD),
register C reads as 0 and clears (no periodic, alarm or update interrupts are emulated), register
D reads 0x80 (valid RAM and time). Every other byte is NVRAM.

The constructor fills the memory-size bytes the QEMU pc/q35 machines write in ``pc_cmos_init``
(``hw/i386/pc.c``) and SeaBIOS reads (``src/hw/rtc.h`` CMOS_MEM_*): 0x15/0x16 base memory in KiB
(640), 0x17/0x18 and 0x30/0x31 extended memory between 1 MiB and 64 MiB in KiB (capped at 0xffff),
0x34/0x35 memory between 16 MiB and 4 GiB in 64 KiB units, 0x5b-0x5d memory above 4 GiB in 64 KiB
units. RAM below 4 GiB is ``min(ram_size, low_ram_limit)``; the rest is above 4 GiB.

Sources: Motorola MC146818A datasheet; QEMU ``hw/rtc/mc146818rtc.c``,
``include/hw/rtc/mc146818rtc_regs.h``, ``hw/i386/pc.c``; SeaBIOS ``src/hw/rtc.h``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

CMOS_BASE = 0x70
CMOS_PORT_COUNT = 2
CMOS_SIZE = 128
RTC_IRQ = 8
CMOS_NMI_DISABLE = 0x80  # bit 7 of the index byte

RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32

REG_A_UIP = 0x80
REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04   # 1: binary, 0: BCD
REG_B_24H = 0x02  # 1: 24-hour, 0: 12-hour
REG_B_DSE = 0x01
REG_D_VRT = 0x80  # valid RAM and time
HOURS_PM = 0x80   # 12-hour mode: PM flag in the hours register

REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1.024 kHz periodic rate
REG_B_DEFAULT = REG_B_24H

TIME_REGISTERS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
                  RTC_MONTH, RTC_YEAR, RTC_CENTURY)

# Memory-size bytes (QEMU pc_cmos_init / SeaBIOS).
CMOS_MEM_BASE_LOW = 0x15
CMOS_MEM_BASE_HIGH = 0x16
CMOS_MEM_EXTMEM_LOW = 0x17
CMOS_MEM_EXTMEM_HIGH = 0x18
CMOS_MEM_EXTMEM2_LOW = 0x30
CMOS_MEM_EXTMEM2_HIGH = 0x31
CMOS_MEM_EXTMEM3_LOW = 0x34   # SeaBIOS: CMOS_MEM_EXTMEM2_LOW (16 MiB - 4 GiB, 64 KiB units)
CMOS_MEM_EXTMEM3_HIGH = 0x35
CMOS_MEM_HIGHMEM_LOW = 0x5B
CMOS_MEM_HIGHMEM_MID = 0x5C
CMOS_MEM_HIGHMEM_HIGH = 0x5D

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# Where RAM stops below 4 GiB to leave room for 32-bit MMIO; pass the VMM's own layout.
DEFAULT_LOW_RAM_LIMIT = 3 * GiB


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01, tolerating out-of-range fields as QEMU's mktimegm does."""
    if month < 3:
        month += 12
        year -= 1
    return (day + (153 * month - 457) // 5 + 365 * year + year // 4 - year // 100 + year // 400
            - 719469)


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day number since 1970-01-01 (H. Hinnant's algorithm)."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


class Cmos:
    """RTC + CMOS RAM. Register at :data:`CMOS_BASE` with length :data:`CMOS_PORT_COUNT`."""

    def __init__(self, ram_size: int, clock: Callable[[], float] = time.time, *,
                 low_ram_limit: int = DEFAULT_LOW_RAM_LIMIT):
        if ram_size < 0 or low_ram_limit < 0:
            raise ValueError("cmos: negative memory size")
        self._clock = clock
        self._lock = threading.Lock()
        self._data = bytearray(CMOS_SIZE)
        self._index = 0
        self.nmi_disabled = False
        self._offset = 0  # guest time minus clock time, whole seconds
        self._log_once = LogOnce(log)
        self._data[RTC_REG_A] = REG_A_DEFAULT
        self._data[RTC_REG_B] = REG_B_DEFAULT
        self._data[RTC_REG_D] = REG_D_VRT
        self._set_memory_sizes(min(ram_size, low_ram_limit), max(ram_size - low_ram_limit, 0))

    def _set_memory_sizes(self, below_4g: int, above_4g: int) -> None:
        data = self._data
        base = min(below_4g // KiB, 640)
        data[CMOS_MEM_BASE_LOW], data[CMOS_MEM_BASE_HIGH] = base & 0xFF, base >> 8
        ext = min(max(below_4g - 1 * MiB, 0) // KiB, 0xFFFF)
        data[CMOS_MEM_EXTMEM_LOW], data[CMOS_MEM_EXTMEM_HIGH] = ext & 0xFF, ext >> 8
        data[CMOS_MEM_EXTMEM2_LOW], data[CMOS_MEM_EXTMEM2_HIGH] = ext & 0xFF, ext >> 8
        ext3 = min(max(below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
        data[CMOS_MEM_EXTMEM3_LOW], data[CMOS_MEM_EXTMEM3_HIGH] = ext3 & 0xFF, ext3 >> 8
        high = min(above_4g // (64 * KiB), 0xFFFFFF)
        data[CMOS_MEM_HIGHMEM_LOW] = high & 0xFF
        data[CMOS_MEM_HIGHMEM_MID] = (high >> 8) & 0xFF
        data[CMOS_MEM_HIGHMEM_HIGH] = high >> 16

    # -- BusDevice ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        # Two 8-bit ports: wider accesses are split into byte accesses, as the ISA bus does.
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        if offset != 1:
            return 0xFF  # the index port is write-only
        index = self._index
        if index in TIME_REGISTERS and not self._data[RTC_REG_B] & REG_B_SET:
            return self._time_registers(self._now(), self._data[RTC_REG_B])[index]
        if index == RTC_REG_C:
            value = self._data[RTC_REG_C]
            self._data[RTC_REG_C] = 0  # read-to-clear
            return value
        return self._data[index]

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == 0:
            self._index = value & ~CMOS_NMI_DISABLE & 0xFF
            self.nmi_disabled = bool(value & CMOS_NMI_DISABLE)
            return
        if offset != 1:
            return
        index = self._index
        reg_b = self._data[RTC_REG_B]
        if index in TIME_REGISTERS:
            if reg_b & REG_B_SET:
                self._data[index] = value  # collected until SET is cleared
            else:
                regs = self._time_registers(self._now(), reg_b)
                regs[index] = value
                self._set_time(regs, reg_b)
        elif index == RTC_REG_A:
            self._data[RTC_REG_A] = value & ~REG_A_UIP
        elif index == RTC_REG_B:
            self._write_reg_b(reg_b, value)
        elif index in (RTC_REG_C, RTC_REG_D):
            self._log_once(f"ro-{index}", logging.INFO,
                           "cmos: write to read-only register %#x ignored", index)
        else:
            self._data[index] = value

    def _write_reg_b(self, old: int, new: int) -> None:
        if new & REG_B_SET and not old & REG_B_SET:
            # Updates stop: freeze the current time in the registers (in the old format).
            for index, value in self._time_registers(self._now(), old).items():
                self._data[index] = value
        elif old & REG_B_SET and not new & REG_B_SET:
            # Updates resume from the time the guest left in the registers.
            self._set_time({index: self._data[index] for index in TIME_REGISTERS}, old)
        elif new & old & REG_B_SET and (new ^ old) & REG_B_24H:
            # 12/24-hour switch while frozen: convert the frozen hour, as QEMU does.
            hour = self._decode_hour(self._data[RTC_HOURS], old)
            self._data[RTC_HOURS] = self._encode_hour(hour, new)
        if new & (REG_B_PIE | REG_B_AIE | REG_B_UIE):
            self._log_once("irq", logging.INFO,
                           "cmos: RTC interrupts (register B %#x) are not emulated", new)
        self._data[RTC_REG_B] = new

    # -- time ---------------------------------------------------------------------------------

    def _now(self) -> int:
        return math.floor(self._clock()) + self._offset

    def _set_time(self, regs: dict[int, int], reg_b: int) -> None:
        """Make the guest's time the one ``regs`` (register values in format ``reg_b``) hold."""
        decode = lambda index: self._decode(regs[index], reg_b)  # noqa: E731
        year = decode(RTC_CENTURY) * 100 + decode(RTC_YEAR)
        days = _days_from_civil(year, decode(RTC_MONTH), decode(RTC_DAY_OF_MONTH))
        seconds = (days * 86400 + self._decode_hour(regs[RTC_HOURS], reg_b) * 3600
                   + decode(RTC_MINUTES) * 60 + decode(RTC_SECONDS))
        self._offset = seconds - math.floor(self._clock())

    def _time_registers(self, now: int, reg_b: int) -> dict[int, int]:
        days, seconds = divmod(now, 86400)
        year, month, day = _civil_from_days(days)
        encode = lambda value: self._encode(value, reg_b)  # noqa: E731
        return {
            RTC_SECONDS: encode(seconds % 60),
            RTC_MINUTES: encode(seconds // 60 % 60),
            RTC_HOURS: self._encode_hour(seconds // 3600, reg_b),
            RTC_DAY_OF_WEEK: encode((days + 4) % 7 + 1),  # 1970-01-01 was a Thursday; Sunday = 1
            RTC_DAY_OF_MONTH: encode(day),
            RTC_MONTH: encode(month),
            RTC_YEAR: encode(year % 100),
            RTC_CENTURY: encode(year // 100 % 100),
        }

    @staticmethod
    def _encode(value: int, reg_b: int) -> int:
        if reg_b & REG_B_DM:
            return value & 0xFF
        value %= 100
        return (value // 10) << 4 | value % 10

    @staticmethod
    def _decode(value: int, reg_b: int) -> int:
        if reg_b & REG_B_DM:
            return value
        return (value >> 4) * 10 + (value & 0x0F)  # lenient with invalid BCD, like QEMU

    @classmethod
    def _encode_hour(cls, hour: int, reg_b: int) -> int:
        if reg_b & REG_B_24H:
            return cls._encode(hour, reg_b)
        hour12 = hour % 12 or 12
        return cls._encode(hour12, reg_b) | (HOURS_PM if hour >= 12 else 0)

    @classmethod
    def _decode_hour(cls, value: int, reg_b: int) -> int:
        if reg_b & REG_B_24H:
            return cls._decode(value, reg_b)
        hour = cls._decode(value & ~HOURS_PM, reg_b) % 12
        return hour + 12 if value & HOURS_PM else hour

