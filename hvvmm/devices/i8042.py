"""The i8042 PS/2 controller, without keyboard or mouse: enough for probing and for reset.

Data port 0x60, status (read) / command (write) port 0x64; ports 0x61-0x63 belong to others (the
in-kernel PIT's speaker gate at 0x61), so the controller is two one-port devices,
:attr:`I8042.data_port` and :attr:`I8042.command_port`. Controller commands: 0x20 read and 0x60
write the configuration ("command") byte, 0xA7/0xA8 disable/enable the aux port, 0xAA self-test
(0x55), 0xAB keyboard interface test (0x00), 0xAD/0xAE disable/enable the keyboard, 0xC0 read the
input port, 0xD0/0xD1 read/write the output port (writing bit 0 clear resets the CPU), 0xD2 write
the keyboard output buffer, 0xDD/0xDF A20 off/on, 0xF0-0xFF pulse output lines (bit 0 clear, as
0xFE, pulses reset). Reset calls ``on_reset()``. Replies wait in the output buffer (status OBF);
with an ``irq`` given, IRQ 1 is raised while a reply is pending and the configuration byte enables
keyboard interrupts. Bytes for the (absent) keyboard and unknown commands are logged once each and
ignored. A20 is not emulated (always enabled), so turning it off is only logged.

With ``keyboard=True`` a PS/2 keyboard is attached that answers its commands and never types:
0xFF (reset) gives ACK 0xFA and the self-test pass 0xAA, 0xF2 (identify) ACK and the MF2 ID
0xAB 0x83, 0xEE (echo) 0xEE, 0xED/0xF0/0xF3 take a parameter byte (each byte ACKed; 0xF0 0
reports scan code set 2), everything else ACK. Firmware probes the keyboard at boot and waits a
second for the reset answer when none comes (SeaBIOS ``ps2_kbd_command``); QEMU
``hw/input/ps2.c`` answers the same way.

Sources: IBM PC/AT Technical Reference (8042 keyboard controller); OSDev wiki "8042 PS/2
Controller"; QEMU ``hw/input/pckbd.c`` (reset values, command set, 0xF0-0xFF pulse decoding).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from hvvmm.bus import IrqLine
from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # status register on reads
I8042_PORT_COUNT = 1       # for each of the two ports
KBD_IRQ = 1

# Status register.
KBD_STAT_OBF = 0x01
KBD_STAT_IBF = 0x02
KBD_STAT_SELFTEST = 0x04  # system flag
KBD_STAT_CMD = 0x08       # last write was to the command port
KBD_STAT_UNLOCKED = 0x10  # keyboard not inhibited
KBD_STAT_MOUSE_OBF = 0x20
KBD_STAT_GTO = 0x40
KBD_STAT_PERR = 0x80

# Configuration ("command") byte.
KBD_MODE_KBD_INT = 0x01
KBD_MODE_MOUSE_INT = 0x02
KBD_MODE_SYS = 0x04
KBD_MODE_NO_KEYLOCK = 0x08
KBD_MODE_DISABLE_KBD = 0x10
KBD_MODE_DISABLE_MOUSE = 0x20
KBD_MODE_KCC = 0x40

# Controller commands.
KBD_CCMD_READ_MODE = 0x20
KBD_CCMD_WRITE_MODE = 0x60
KBD_CCMD_MOUSE_DISABLE = 0xA7
KBD_CCMD_MOUSE_ENABLE = 0xA8
KBD_CCMD_SELF_TEST = 0xAA
KBD_CCMD_KBD_TEST = 0xAB
KBD_CCMD_KBD_DISABLE = 0xAD
KBD_CCMD_KBD_ENABLE = 0xAE
KBD_CCMD_READ_INPORT = 0xC0
KBD_CCMD_READ_OUTPORT = 0xD0
KBD_CCMD_WRITE_OUTPORT = 0xD1
KBD_CCMD_WRITE_OBUF = 0xD2
KBD_CCMD_DISABLE_A20 = 0xDD
KBD_CCMD_ENABLE_A20 = 0xDF
KBD_CCMD_PULSE_BITS_3_0 = 0xF0
KBD_CCMD_RESET = 0xFE
KBD_CCMD_NO_OP = 0xFF

# Output port.
KBD_OUT_RESET = 0x01  # 0: CPU reset asserted
KBD_OUT_A20 = 0x02
KBD_OUT_ONES = 0xCC

# Keyboard commands and replies (the optional attached keyboard).
KBD_CMD_SET_LEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SCANCODE = 0xF0
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_RATE = 0xF3
KBD_CMD_RESET = 0xFF
KBD_REPLY_ACK = 0xFA
KBD_REPLY_POR = 0xAA  # power-on self-test passed
KBD_ID_MF2 = (0xAB, 0x83)
KBD_SCANCODE_SET_2 = 0x02

SELF_TEST_OK = 0x55
INTERFACE_TEST_OK = 0x00
INPORT_VALUE = 0x80  # keyboard not inhibited, as QEMU
OUTPUT_QUEUE_LIMIT = 16

# Reset state, as QEMU's kbd_reset.
MODE_DEFAULT = KBD_MODE_KBD_INT | KBD_MODE_MOUSE_INT
STATUS_DEFAULT = KBD_STAT_CMD | KBD_STAT_UNLOCKED
OUTPORT_DEFAULT = KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES


class _Port:
    """One of the controller's two ports, a one-byte BusDevice."""

    def __init__(self, read: Callable[[], int], write: Callable[[int], None]):
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        if offset != 0:
            return (1 << (8 * size)) - 1
        return self._read()

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._write(value & 0xFF)


class I8042:
    """The controller. Register :attr:`data_port` at :data:`I8042_DATA_PORT` and
    :attr:`command_port` at :data:`I8042_COMMAND_PORT`, each with length
    :data:`I8042_PORT_COUNT`. ``irq`` (optional) is IRQ 1."""

    def __init__(self, on_reset: Callable[[], None], irq: IrqLine | None = None, *,
                 keyboard: bool = False):
        self._on_reset = on_reset
        self._keyboard = keyboard
        self._keyboard_param: int | None = None  # the keyboard command awaiting its parameter
        self._irq = irq
        self._irq_level = False
        self._lock = threading.Lock()
        self._log_once = LogOnce(log)
        self.mode = MODE_DEFAULT
        self.outport = OUTPORT_DEFAULT
        self._status = STATUS_DEFAULT
        self._queue: collections.deque[int] = collections.deque()
        self._last = 0
        self._write_cmd: int | None = None  # the command waiting for its data-port byte
        self.data_port = _Port(self._read_data, self._write_data)
        self.command_port = _Port(self._read_status, self._write_command)

    # -- ports --------------------------------------------------------------------------------

    def _read_status(self) -> int:
        with self._lock:
            return self._status | (KBD_STAT_OBF if self._queue else 0)

    def _read_data(self) -> int:
        with self._lock:
            if self._queue:
                self._last = self._queue.popleft()
            self._update_irq()
            return self._last  # an empty buffer reads the last byte again, as QEMU

    def _write_command(self, value: int) -> None:
        reset = False
        with self._lock:
            self._status |= KBD_STAT_CMD
            self._write_cmd = None
            if value & KBD_CCMD_PULSE_BITS_3_0 == KBD_CCMD_PULSE_BITS_3_0:
                # 0xF0-0xFF pulse output port bits 0-3 low for those clear; bit 0 is reset.
                value = KBD_CCMD_RESET if not value & 1 else KBD_CCMD_NO_OP
            if value == KBD_CCMD_READ_MODE:
                self._queue_byte(self.mode)
            elif value in (KBD_CCMD_WRITE_MODE, KBD_CCMD_WRITE_OUTPORT, KBD_CCMD_WRITE_OBUF):
                self._write_cmd = value
            elif value == KBD_CCMD_MOUSE_DISABLE:
                self.mode |= KBD_MODE_DISABLE_MOUSE
            elif value == KBD_CCMD_MOUSE_ENABLE:
                self.mode &= ~KBD_MODE_DISABLE_MOUSE
            elif value == KBD_CCMD_SELF_TEST:
                self._status |= KBD_STAT_SELFTEST
                self._queue_byte(SELF_TEST_OK)
            elif value == KBD_CCMD_KBD_TEST:
                self._queue_byte(INTERFACE_TEST_OK)
            elif value == KBD_CCMD_KBD_DISABLE:
                self.mode |= KBD_MODE_DISABLE_KBD
            elif value == KBD_CCMD_KBD_ENABLE:
                self.mode &= ~KBD_MODE_DISABLE_KBD
            elif value == KBD_CCMD_READ_INPORT:
                self._queue_byte(INPORT_VALUE)
            elif value == KBD_CCMD_READ_OUTPORT:
                self._queue_byte(self.outport)
            elif value == KBD_CCMD_DISABLE_A20:
                self._set_outport(self.outport & ~KBD_OUT_A20)
            elif value == KBD_CCMD_ENABLE_A20:
                self._set_outport(self.outport | KBD_OUT_A20)
            elif value == KBD_CCMD_RESET:
                reset = True
            elif value != KBD_CCMD_NO_OP:
                self._log_once(f"cmd-{value:#x}", logging.INFO,
                               "i8042: unknown controller command %#x ignored",
                               value)
            self._update_irq()
        if reset:
            self._reset()

    def _write_data(self, value: int) -> None:
        reset = False
        with self._lock:
            self._status &= ~KBD_STAT_CMD
            command, self._write_cmd = self._write_cmd, None
            if command == KBD_CCMD_WRITE_MODE:
                self.mode = value
            elif command == KBD_CCMD_WRITE_OUTPORT:
                reset = self._set_outport(value)
            elif command == KBD_CCMD_WRITE_OBUF:
                self._queue_byte(value)
            elif self._keyboard:
                self._keyboard_byte(value)
            else:
                self._log_once("kbd-write", logging.INFO,
                               "i8042: no keyboard; byte %#x for it ignored", value)
            self._update_irq()
        if reset:
            self._reset()

    # -- internals ----------------------------------------------------------------------------

    def _keyboard_byte(self, value: int) -> None:
        """The attached keyboard's answer to a byte for it (lock held)."""
        command, self._keyboard_param = self._keyboard_param, None
        if command is not None:  # the parameter of 0xED, 0xF0 or 0xF3
            self._queue_byte(KBD_REPLY_ACK)
            if command == KBD_CMD_SCANCODE and value == 0:
                self._queue_byte(KBD_SCANCODE_SET_2)
            return
        if value == KBD_CMD_ECHO:
            self._queue_byte(KBD_CMD_ECHO)
            return
        self._queue_byte(KBD_REPLY_ACK)
        if value == KBD_CMD_RESET:
            self._queue_byte(KBD_REPLY_POR)
        elif value == KBD_CMD_GET_ID:
            self._queue_byte(KBD_ID_MF2[0])
            self._queue_byte(KBD_ID_MF2[1])
        elif value in (KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE, KBD_CMD_SET_RATE):
            self._keyboard_param = value

    def _set_outport(self, value: int) -> bool:
        """Store the output port; True when it asserts CPU reset (bit 0 clear)."""
        if not value & KBD_OUT_A20:
            self._log_once("a20", logging.INFO,
                           "i8042: guest disabled A20; not emulated (A20 stays enabled)")
        if not value & KBD_OUT_RESET:
            self.outport = value | KBD_OUT_RESET  # the reset pulse ends with the reset
            return True
        self.outport = value
        return False

    def _reset(self) -> None:
        # Outside the lock: the callback may stop vCPUs that are waiting on this device.
        self._log_once("reset", logging.INFO, "i8042: guest reset the machine")
        self._on_reset()

    def _queue_byte(self, value: int) -> None:
        if len(self._queue) < OUTPUT_QUEUE_LIMIT:
            self._queue.append(value & 0xFF)
        else:
            self._log_once("queue-full", logging.INFO,
                           "i8042: output buffer overflow; reply dropped")

    def _update_irq(self) -> None:
        level = bool(self._queue) and bool(self.mode & KBD_MODE_KBD_INT)
        if self._irq is not None and level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

