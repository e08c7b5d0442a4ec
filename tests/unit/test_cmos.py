"""MC146818 RTC / CMOS RAM behaviour, with a fake clock and without KVM."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.devices.cmos import CMOS_BASE, CMOS_PORT_COUNT, Cmos

MiB = 1 << 20
GiB = 1 << 30
SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, REG_A, REG_B, REG_C, REG_D, CENTURY = (
    0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x32)


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def utc(*fields: int) -> int:
    return calendar.timegm((*fields, 0, 0, 0))


def rd(dev: Cmos, index: int) -> int:
    dev.write(0, 1, index)
    return dev.read(1, 1)


def wr(dev: Cmos, index: int, value: int) -> None:
    dev.write(0, 1, index)
    dev.write(1, 1, value)


def time_regs(dev: Cmos) -> tuple[int, ...]:
    return tuple(rd(dev, i) for i in (CENTURY, YEAR, MONTH, MDAY, HOUR, MIN, SEC, WDAY))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(utc(2024, 2, 29, 13, 45, 7) + 0.25)  # a Thursday


def test_constants() -> None:
    assert (CMOS_BASE, CMOS_PORT_COUNT) == (0x70, 2)


def test_status_registers(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    assert rd(dev, REG_A) == 0x26  # UIP clear
    assert rd(dev, REG_B) == 0x02  # 24-hour, BCD
    assert rd(dev, REG_C) == 0x00
    assert rd(dev, REG_D) == 0x80
    wr(dev, REG_A, 0xA5)
    assert rd(dev, REG_A) == 0x25  # UIP is read-only
    wr(dev, REG_C, 0xFF)
    wr(dev, REG_D, 0x00)
    assert (rd(dev, REG_C), rd(dev, REG_D)) == (0x00, 0x80)


def test_bcd_24_hour(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    assert time_regs(dev) == (0x20, 0x24, 0x02, 0x29, 0x13, 0x45, 0x07, 5)


def test_binary_24_hour(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    wr(dev, REG_B, 0x06)
    assert time_regs(dev) == (20, 24, 2, 29, 13, 45, 7, 5)


@pytest.mark.parametrize("hour, bcd, binary", [
    (0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11),
    (12, 0x92, 0x80 | 12), (13, 0x81, 0x80 | 1), (23, 0x91, 0x80 | 11)])
def test_12_hour_mode_pm_flag(hour: int, bcd: int, binary: int) -> None:
    dev = Cmos(128 * MiB, FakeClock(utc(2021, 7, 4, hour, 0, 0)))
    wr(dev, REG_B, 0x00)
    assert rd(dev, HOUR) == bcd
    wr(dev, REG_B, 0x04)
    assert rd(dev, HOUR) == binary


def test_day_of_week_sunday_is_1() -> None:
    dev = Cmos(MiB, FakeClock(utc(2021, 7, 4, 0, 0, 0)))  # a Sunday
    assert rd(dev, WDAY) == 1
    dev = Cmos(MiB, FakeClock(utc(2021, 7, 10, 0, 0, 0)))  # a Saturday
    assert rd(dev, WDAY) == 7


def test_time_follows_the_clock(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    clock.t += 60 * 60 * 11 + 15 * 60 + 53  # to 2024-03-01 01:01:00
    assert time_regs(dev) == (0x20, 0x24, 0x03, 0x01, 0x01, 0x01, 0x00, 6)


def test_century_rollover() -> None:
    dev = Cmos(MiB, FakeClock(utc(2099, 12, 31, 23, 59, 59)))
    assert (rd(dev, CENTURY), rd(dev, YEAR)) == (0x20, 0x99)
    dev = Cmos(MiB, FakeClock(utc(2100, 1, 1, 0, 0, 0)))
    assert (rd(dev, CENTURY), rd(dev, YEAR), rd(dev, MONTH), rd(dev, MDAY)) == (0x21, 0, 1, 1)


def test_nmi_bit_is_masked_off_the_index(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    dev.write(0, 1, 0x80 | REG_D)
    assert dev.nmi_disabled
    assert dev.read(1, 1) == 0x80
    dev.write(0, 1, 0x80 | 0x40)
    dev.write(1, 1, 0x5A)
    dev.write(0, 1, 0x40)
    assert not dev.nmi_disabled
    assert dev.read(1, 1) == 0x5A


def test_index_port_reads_ff(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    dev.write(0, 1, 0x10)
    assert dev.read(0, 1) == 0xFF


def test_nvram_bytes(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    for index in (0x01, 0x03, 0x05, 0x0E, 0x40, 0x7F):
        wr(dev, index, index ^ 0xA5)
    for index in (0x01, 0x03, 0x05, 0x0E, 0x40, 0x7F):
        assert rd(dev, index) == index ^ 0xA5


def test_wide_access_is_index_then_data(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    dev.write(0, 2, 0x7740)  # index 0x40, data 0x77
    assert rd(dev, 0x40) == 0x77
    dev.write(0, 1, 0x40)
    assert dev.read(0, 2) == 0x77FF


def test_guest_write_sets_time_offset(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    wr(dev, MIN, 0x30)
    wr(dev, HOUR, 0x08)
    assert time_regs(dev) == (0x20, 0x24, 0x02, 0x29, 0x08, 0x30, 0x07, 5)
    clock.t += 10
    assert rd(dev, SEC) == 0x17
    assert rd(dev, MIN) == 0x30
    clock.t += 50
    assert (rd(dev, MIN), rd(dev, SEC)) == (0x31, 0x07)


def test_invalid_date_written_is_normalised(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    wr(dev, YEAR, 0x30)  # 2030-02-29 does not exist: like QEMU's mktimegm, it is 2030-03-01
    assert time_regs(dev) == (0x20, 0x30, 0x03, 0x01, 0x13, 0x45, 0x07, 6)


def test_guest_write_in_binary_12_hour(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    wr(dev, REG_B, 0x04)  # binary, 12-hour
    wr(dev, HOUR, 0x80 | 12)  # 12 PM
    wr(dev, REG_B, 0x06)
    assert rd(dev, HOUR) == 12
    wr(dev, REG_B, 0x04)
    wr(dev, HOUR, 12)  # 12 AM
    wr(dev, REG_B, 0x06)
    assert rd(dev, HOUR) == 0


def test_set_bit_freezes_and_sets_the_time(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    wr(dev, REG_B, 0x82)
    clock.t += 100
    assert rd(dev, SEC) == 0x07  # frozen while SET
    for index, value in ((CENTURY, 0x20), (YEAR, 0x01), (MONTH, 0x02), (MDAY, 0x03),
                         (HOUR, 0x04), (MIN, 0x05), (SEC, 0x06)):
        wr(dev, index, value)
    clock.t += 100
    assert rd(dev, SEC) == 0x06
    wr(dev, REG_B, 0x02)
    assert time_regs(dev) == (0x20, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)  # a Saturday
    clock.t += 5
    assert rd(dev, SEC) == 0x11


def test_century_write(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    wr(dev, CENTURY, 0x21)
    assert (rd(dev, CENTURY), rd(dev, YEAR), rd(dev, MONTH)) == (0x21, 0x24, 0x02)


def test_time_write_sets_the_offset_only(clock: FakeClock) -> None:
    a = Cmos(128 * MiB, clock)
    b = Cmos(128 * MiB, clock)
    wr(a, MIN, 0x46)
    assert rd(b, MIN) == 0x45  # another device, untouched: guest time is per device
    assert rd(a, MIN) == 0x46


def _bytes(dev: Cmos, *indexes: int) -> list[int]:
    return [rd(dev, i) for i in indexes]


def test_memory_size_bytes_128m(clock: FakeClock) -> None:
    dev = Cmos(128 * MiB, clock)
    assert _bytes(dev, 0x15, 0x16) == [0x80, 0x02]  # 640 KiB
    assert _bytes(dev, 0x17, 0x18) == [0xFF, 0xFF]  # 127 MiB in KiB, capped
    assert _bytes(dev, 0x30, 0x31) == [0xFF, 0xFF]
    assert _bytes(dev, 0x34, 0x35) == [0x00, 0x07]  # 112 MiB / 64 KiB = 0x700
    assert _bytes(dev, 0x5B, 0x5C, 0x5D) == [0, 0, 0]


def test_memory_size_bytes_32m(clock: FakeClock) -> None:
    dev = Cmos(32 * MiB, clock)
    assert _bytes(dev, 0x17, 0x18, 0x30, 0x31) == [0x00, 0x7C, 0x00, 0x7C]  # 31 MiB = 0x7c00 KiB
    assert _bytes(dev, 0x34, 0x35) == [0x00, 0x01]


def test_memory_size_bytes_5g(clock: FakeClock) -> None:
    dev = Cmos(5 * GiB, clock)  # 3 GiB below 4 GiB by default, 2 GiB above
    assert _bytes(dev, 0x15, 0x16) == [0x80, 0x02]
    assert _bytes(dev, 0x17, 0x18) == [0xFF, 0xFF]
    assert _bytes(dev, 0x34, 0x35) == [0x00, 0xBF]  # (3 GiB - 16 MiB) / 64 KiB = 0xbf00
    assert _bytes(dev, 0x5B, 0x5C, 0x5D) == [0x00, 0x80, 0x00]  # 2 GiB / 64 KiB = 0x8000
    dev = Cmos(5 * GiB, clock, low_ram_limit=2 * GiB)
    assert _bytes(dev, 0x34, 0x35) == [0x00, 0x7F]
    assert _bytes(dev, 0x5B, 0x5C, 0x5D) == [0x00, 0xC0, 0x00]


def test_memory_size_bytes_tiny(clock: FakeClock) -> None:
    dev = Cmos(512 * 1024, clock)
    assert _bytes(dev, 0x15, 0x16) == [0x00, 0x02]  # 512 KiB
    assert _bytes(dev, 0x17, 0x18, 0x34, 0x35, 0x5B) == [0, 0, 0, 0, 0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 2]), st.integers(0, 1),
                          st.integers(0, 0xFFFF), st.integers(-10**6, 10**6)), max_size=80))
def test_random_accesses_never_raise_or_widen(ops) -> None:
    clock = FakeClock(utc(2024, 1, 1, 0, 0, 0))
    dev = Cmos(6 * GiB, clock)
    for is_write, size, offset, value, step in ops:
        clock.t += step
        offset = min(offset, CMOS_PORT_COUNT - size)
        if is_write:
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= dev.read(offset, size) < 1 << (8 * size)
