"""isa-debug-exit, the i8042 and port 0x80, without KVM (the ACPI PM block: test_acpi_pm.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.bus import pio_bus
from hvvmm.devices.acpi_pm import ACPI_PM_BLOCK_LENGTH, AcpiPm
from hvvmm.devices.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_PORT_COUNT, DebugExit, exit_status
from hvvmm.devices.i8042 import (
    I8042,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    I8042_PORT_COUNT,
    KBD_IRQ,
)
from hvvmm.devices.port80 import POST_CODE_PORT, POST_CODE_PORT_COUNT, PostCodePort
from hvvmm.devices.port92 import PORT92_A20, PORT92_FAST_RESET, SystemControlPortA
from hvvmm.devices.reset_control import RESET_CONTROL_PORT_COUNT, ResetControl


class RecordingIrq:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)


# -- isa-debug-exit ---------------------------------------------------------------------------

def test_debug_exit_constants() -> None:
    assert (DEBUG_EXIT_BASE, DEBUG_EXIT_PORT_COUNT) == (0xF4, 4)


@pytest.mark.parametrize("offset, size, value, expected", [
    (0, 1, 0x00, 0x00), (0, 1, 0x31, 0x31), (0, 4, 0x12345678, 0x12345678),
    (2, 2, 0xBEEF, 0xBEEF), (3, 1, 0x1FF, 0xFF)])
def test_debug_exit_reports_the_value(offset: int, size: int, value: int, expected: int) -> None:
    calls: list[int] = []
    dev = DebugExit(calls.append)
    dev.write(offset, size, value)
    assert calls == [expected]
    assert dev.last_value == expected


def test_debug_exit_status_formula() -> None:
    assert exit_status(0) == 1
    assert exit_status(0x10) == 0x21
    assert exit_status(0x31) == 0x63


def test_debug_exit_reads_zero_and_do_not_exit() -> None:
    calls: list[int] = []
    dev = DebugExit(calls.append)
    assert dev.read(0, 4) == 0
    assert dev.read(1, 1) == 0
    assert calls == []


# -- port 0x80 --------------------------------------------------------------------------------

def test_post_code_port() -> None:
    assert (POST_CODE_PORT, POST_CODE_PORT_COUNT) == (0x80, 1)
    dev = PostCodePort()
    assert dev.last_code is None
    dev.write(0, 1, 0x42)
    dev.write(0, 1, 0x43)
    assert dev.last_code == 0x43
    assert dev.write_count == 2
    assert dev.read(0, 1) == 0xFF
    assert dev.read(0, 2) == 0xFFFF
    assert dev.read(0, 4) == 0xFFFFFFFF


# -- i8042 ------------------------------------------------------------------------------------

class Kbd:
    def __init__(self, irq: RecordingIrq | None = None) -> None:
        self.resets = 0
        self.dev = I8042(self._reset, irq)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.dev.command_port.read(0, 1)

    def command(self, value: int) -> None:
        self.dev.command_port.write(0, 1, value)

    def data_in(self) -> int:
        return self.dev.data_port.read(0, 1)

    def data_out(self, value: int) -> None:
        self.dev.data_port.write(0, 1, value)


def test_i8042_constants() -> None:
    assert (I8042_DATA_PORT, I8042_COMMAND_PORT, I8042_PORT_COUNT, KBD_IRQ) == (0x60, 0x64, 1, 1)


def test_i8042_registers_without_claiming_0x61_to_0x63() -> None:
    kbd = Kbd()
    bus = pio_bus()
    bus.register(I8042_DATA_PORT, I8042_PORT_COUNT, kbd.dev.data_port)
    bus.register(I8042_COMMAND_PORT, I8042_PORT_COUNT, kbd.dev.command_port)
    assert bus.find(0x61) is None and bus.find(0x63) is None
    bus.write(0x64, 1, 0xAA)
    assert bus.read(0x64, 1) & 0x01
    assert bus.read(0x60, 1) == 0x55


def test_i8042_status_and_self_tests() -> None:
    kbd = Kbd()
    assert kbd.status() & 0x01 == 0  # no byte pending
    kbd.command(0xAA)
    assert kbd.status() & 0x01
    assert kbd.data_in() == 0x55
    assert kbd.status() & 0x01 == 0
    assert kbd.status() & 0x04  # system flag after self-test
    kbd.command(0xAB)
    assert kbd.data_in() == 0x00
    assert kbd.status() & 0x08  # last write was a command
    kbd.data_out(0xF4)  # to the (absent) keyboard: ignored
    assert kbd.status() & 0x08 == 0
    assert kbd.status() & 0x01 == 0


def test_i8042_config_byte() -> None:
    kbd = Kbd()
    kbd.command(0x20)
    assert kbd.data_in() == 0x03
    kbd.command(0x60)
    kbd.data_out(0x65)
    kbd.command(0x20)
    assert kbd.data_in() == 0x65
    kbd.command(0xAE)  # enable keyboard: clears bit 4
    kbd.command(0xA8)  # enable aux: clears bit 5
    kbd.command(0x20)
    assert kbd.data_in() == 0x45
    kbd.command(0xAD)
    kbd.command(0xA7)
    kbd.command(0x20)
    assert kbd.data_in() == 0x75


def test_i8042_reset_by_pulse_command() -> None:
    kbd = Kbd()
    kbd.command(0xFE)
    assert kbd.resets == 1
    kbd.command(0xFF)  # pulse nothing
    kbd.command(0xF1)  # pulse bits 1-3, not reset
    assert kbd.resets == 1
    kbd.command(0xF0)  # pulse bits 0-3, reset among them
    assert kbd.resets == 2


def test_i8042_reset_by_output_port_write() -> None:
    kbd = Kbd()
    kbd.command(0xD0)
    assert kbd.data_in() == 0xCF
    kbd.command(0xD1)
    kbd.data_out(0xDF)  # bit 0 set: no reset
    assert kbd.resets == 0
    kbd.command(0xD1)
    kbd.data_out(0xDE)  # bit 0 clear: reset
    assert kbd.resets == 1
    kbd.data_out(0xDE)  # a data byte with no command pending goes to the keyboard
    assert kbd.resets == 1


def test_i8042_write_output_buffer_and_inport() -> None:
    kbd = Kbd()
    kbd.command(0xD2)
    kbd.data_out(0x1C)
    assert kbd.data_in() == 0x1C
    kbd.command(0xC0)
    assert kbd.data_in() == 0x80
    assert kbd.data_in() == 0x80  # an empty buffer repeats the last byte


def test_i8042_unknown_command_is_ignored() -> None:
    kbd = Kbd()
    for _ in range(3):
        kbd.command(0x99)
    assert kbd.status() & 0x01 == 0
    assert kbd.resets == 0


def test_i8042_irq_follows_obf_and_config() -> None:
    irq = RecordingIrq()
    kbd = Kbd(irq)
    kbd.command(0xAA)
    assert irq.levels == [True]  # keyboard interrupts are enabled at reset
    kbd.data_in()
    assert irq.levels == [True, False]
    kbd.command(0x60)
    kbd.data_out(0x00)  # interrupts off
    kbd.command(0xAA)
    assert irq.levels == [True, False]
    assert kbd.data_in() == 0x55


# -- property tests ---------------------------------------------------------------------------

def _devices():
    kbd = I8042(lambda: None, RecordingIrq())
    return [
        (DebugExit(lambda value: None), DEBUG_EXIT_PORT_COUNT),
        (PostCodePort(), POST_CODE_PORT_COUNT),
        (AcpiPm(lambda: None), ACPI_PM_BLOCK_LENGTH),
        (ResetControl(lambda: None), RESET_CONTROL_PORT_COUNT),
        (SystemControlPortA(lambda: None), 1),
        (kbd.data_port, I8042_PORT_COUNT),
        (kbd.command_port, I8042_PORT_COUNT),
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans(), st.sampled_from([1, 2, 4]),
                          st.integers(0, 3), st.integers(0, 0xFFFFFFFF)), max_size=80))
def test_random_accesses_never_raise_or_widen(ops) -> None:
    devices = _devices()
    for which, is_write, size, offset, value in ops:
        dev, length = devices[which]
        if size > length:
            size = 1
        offset = min(offset, length - size)
        if is_write:
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= dev.read(offset, size) < 1 << (8 * size)


def test_i8042_attached_keyboard_answers_and_never_types() -> None:
    dev = I8042(lambda: None, keyboard=True)

    def answers(*data):
        for byte in data:
            dev.data_port.write(0, 1, byte)
        out = []
        while dev.command_port.read(0, 1) & 0x01:
            out.append(dev.data_port.read(0, 1))
        return out

    assert answers(0xFF) == [0xFA, 0xAA]          # reset: ACK, self-test passed
    assert answers(0xF2) == [0xFA, 0xAB, 0x83]    # identify: an MF2 keyboard
    assert answers(0xF0, 0x00) == [0xFA, 0xFA, 0x02]  # which scan code set: 2
    assert answers(0xED, 0x07) == [0xFA, 0xFA]    # LEDs and their parameter
    assert answers(0xEE) == [0xEE]                # echo
    assert answers(0xF4) == [0xFA]                # enable scanning: and nothing more comes
    assert answers() == []


def test_port92_a20_reads_back_and_fast_reset_fires_on_a_rising_bit_0() -> None:
    resets = []
    port = SystemControlPortA(lambda: resets.append(1))
    assert port.read(0, 1) == PORT92_A20  # A20 on after reset, as QEMU under KVM
    port.write(0, 1, 0)                    # SeaBIOS may turn A20 off and on: kept
    assert port.read(0, 1) == 0 and not resets
    port.write(0, 1, PORT92_A20 | PORT92_FAST_RESET)
    assert resets == [1] and port.read(0, 1) == PORT92_A20  # the reset bit does not stick
    port.write(0, 1, PORT92_A20)           # A20 kept, no reset bit: nothing happens
    assert resets == [1] and port.read(0, 1) == PORT92_A20
    port.write(0, 2, 0x0101)               # only byte accesses decode
    assert resets == [1] and port.read(0, 2) == 0xFFFF
