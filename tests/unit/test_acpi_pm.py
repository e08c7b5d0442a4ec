"""The ACPI PM register block (PM1a event and control, PM timer) and the 0xCF9 reset register,
without KVM."""

from __future__ import annotations

import pytest

from hvvmm.bus import pio_bus
from hvvmm.devices.acpi_pm import (ACPI_PM1A_CNT_PORT, ACPI_PM_BASE, ACPI_PM_BLOCK_LENGTH,
                                   ACPI_PM_TMR_PORT, PM_TIMER_FREQUENCY, AcpiPm)
from hvvmm.devices.reset_control import RESET_CONTROL_PORT, ResetControl

CNT = 4   # PM1a_CNT offset in the block
STS, EN, TMR = 0, 2, 8


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


class RecordingIrq:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)


def make(clock=None, sci=None):
    calls: list[None] = []
    return AcpiPm(lambda: calls.append(None), sci, clock or FakeClock()), calls


def test_constants() -> None:
    assert (ACPI_PM_BASE, ACPI_PM_BLOCK_LENGTH) == (0x600, 12)
    assert (ACPI_PM1A_CNT_PORT, ACPI_PM_TMR_PORT) == (0x604, 0x608)


# -- PM1a_CNT ---------------------------------------------------------------------------------

def test_poweroff_on_slp_en_with_type_0() -> None:
    dev, calls = make()
    dev.write(CNT, 2, 0x2000)
    assert calls == [None]
    assert dev.read(CNT, 2) == 0x0001  # SLP_EN reads back as 0; SCI_EN always reads 1


def test_sci_en_always_reads_1() -> None:
    dev, _ = make()
    assert dev.read(CNT, 2) == 0x0001
    dev.write(CNT, 2, 0x0000)  # the hardware has no legacy mode to go back to
    assert dev.read(CNT, 2) & 1


@pytest.mark.parametrize("value", [0x0000, 0x0001, 0x1C00, 0x0400, 0x2400, 0x2800, 0x3C00, 0x1FFF,
                                   0xDFFF])
def test_no_poweroff_for_other_values(value: int) -> None:
    dev, calls = make()
    dev.write(CNT, 2, value)
    assert calls == []
    assert dev.read(CNT, 2) == (value & ~0x2004) | 1  # SLP_EN and GBL_RLS are write-only


def test_byte_accesses_update_their_half() -> None:
    dev, calls = make()
    dev.write(CNT + 1, 1, 0x04)  # SLP_TYP 1 without SLP_EN
    assert dev.read(CNT, 2) == 0x0401
    assert (dev.read(CNT, 1), dev.read(CNT + 1, 1)) == (0x01, 0x04)
    assert calls == []
    dev.write(CNT + 1, 1, 0x24)  # SLP_EN with type 1: not power-off
    assert calls == []
    dev.write(CNT + 1, 1, 0x20)  # SLP_EN with type 0
    assert len(calls) == 1


def test_poweroff_through_the_bus() -> None:
    calls: list[None] = []
    bus = pio_bus()
    bus.register(ACPI_PM_BASE, ACPI_PM_BLOCK_LENGTH, AcpiPm(lambda: calls.append(None)))
    bus.write(0x604, 2, 0x2000)  # outw(0x604, 0x2000)
    assert len(calls) == 1


# -- PM1a event block and the SCI ---------------------------------------------------------------

def test_enable_bits_stick_and_others_do_not() -> None:
    dev, _ = make()
    dev.write(EN, 2, 0xFFFF)
    assert dev.read(EN, 2) == 0x0721  # TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN
    dev.write(EN, 1, 0x20)            # byte write: only the low half changes
    assert dev.read(EN, 2) == 0x0720
    dev.write(STS, 4, 0x0000_0000)    # a dword write covers PM1_STS and PM1_EN
    assert dev.read(EN, 2) == 0


def test_timer_status_sets_on_msb_change_and_clears_by_writing_1() -> None:
    clock = FakeClock()
    dev, _ = make(clock)
    assert dev.read(STS, 2) == 0
    clock.ns += (1 << 23) * 1_000_000_000 // PM_TIMER_FREQUENCY + 1000  # bit 23 flips
    assert dev.read(STS, 2) & 1
    dev.write(STS, 2, 0x0000)         # writing 0 leaves it
    assert dev.read(STS, 2) & 1
    dev.write(STS, 2, 0x0001)         # writing 1 clears it
    assert dev.read(STS, 2) == 0


def test_sci_follows_status_and_enable() -> None:
    clock, sci = FakeClock(), RecordingIrq()
    dev, _ = make(clock, sci)
    dev.write(EN, 2, 0x0001)                     # TMR_EN, nothing pending
    assert sci.levels == []
    clock.ns += 3 * 1_000_000_000                # past a carry of bit 23 (2.34 s)
    dev.read(STS, 2)
    assert sci.levels == [True]
    dev.write(STS, 2, 0x0001)                    # acknowledge
    assert sci.levels == [True, False]


# -- PM timer -----------------------------------------------------------------------------------

def test_pm_timer_counts_at_3_579545_mhz_and_wraps_at_24_bits() -> None:
    clock = FakeClock()
    dev, _ = make(clock)
    start = dev.read(TMR, 4)
    clock.ns += 1_000_000                        # 1 ms
    assert (dev.read(TMR, 4) - start) & 0xFFFFFF in (3579, 3580)
    clock.ns += 10 * 1_000_000_000               # 10 s: 35.8 M ticks, past 2^24
    value = dev.read(TMR, 4)
    assert value < 1 << 24
    assert value == (start + (10_001_000_000 * PM_TIMER_FREQUENCY // 1_000_000_000)) & 0xFFFFFF


def test_pm_timer_is_read_only_and_outside_the_block_is_all_ones() -> None:
    clock = FakeClock()
    dev, calls = make(clock)
    before = dev.read(TMR, 4)
    dev.write(TMR, 4, 0x123456)
    assert dev.read(TMR, 4) == before
    assert dev.read(12, 1) == 0xFF and dev.read(11, 2) == 0xFFFF
    dev.write(12, 1, 0xFF)
    assert calls == []


def test_pm_timer_advances_with_the_real_clock() -> None:
    dev = AcpiPm(lambda: None)
    first = dev.read(TMR, 4)
    import time
    time.sleep(0.01)
    assert (dev.read(TMR, 4) - first) & 0xFFFFFF >= 30000  # 10 ms is 35795 ticks


# -- reset control at 0xCF9 -----------------------------------------------------------------------

def test_reset_control_resets_on_rst_cpu() -> None:
    resets: list[None] = []
    bus = pio_bus()
    dev = ResetControl(lambda: resets.append(None))
    bus.register(RESET_CONTROL_PORT, 1, dev)
    bus.write(0xCF9, 1, 0x02)           # SYS_RST alone: kept, no reset (Linux's reboot=pci)
    assert resets == [] and bus.read(0xCF9, 1) == 0x02
    bus.write(0xCF9, 1, 0x06)           # SYS_RST | RST_CPU: the FADT's RESET_VALUE
    assert resets == [None]
    bus.write(0xCF9, 1, 0x04)
    assert len(resets) == 2


def test_reset_control_ignores_other_sizes() -> None:
    resets: list[None] = []
    dev = ResetControl(lambda: resets.append(None))
    dev.write(0, 2, 0x0606)
    assert resets == [] and dev.read(0, 2) == 0xFFFF
