"""The firmware's debug console: present (0xE9, SeaBIOS then writes its log) only when asked."""

import logging

from hvvmm.firmware import DebugConsole


def test_absent_console_reads_as_an_empty_port_and_drops_writes():
    console = DebugConsole(present=False)
    assert console.read(0, 1) == 0xFF  # SeaBIOS then turns its debug output off
    console.write(0, 1, ord("x"))
    assert console.output == b""


def test_present_console_answers_the_probe_and_keeps_the_log():
    console = DebugConsole(present=True)
    assert console.read(0, 1) == 0xE9
    for byte in b"Found 1 cpu(s)\n":
        console.write(0, 1, byte)
    assert console.output == b"Found 1 cpu(s)\n"


def test_by_default_present_when_the_firmware_log_is_shown(caplog):
    caplog.set_level(logging.INFO, logger="hvvmm.firmware")
    assert not DebugConsole().present
    caplog.set_level(logging.DEBUG, logger="hvvmm.firmware")
    assert DebugConsole().present
