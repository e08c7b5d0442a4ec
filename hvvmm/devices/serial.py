"""A 16550A UART, as the PC's COM ports.

Emulates every register of the National Semiconductor PC16550D (RBR/THR, IER, IIR/FCR, LCR, MCR,
LSR, MSR, SCR, and DLL/DLM behind LCR.DLAB), the 16-byte receive FIFO with its trigger levels,
interrupt identification by priority (receiver line status > received data / character timeout >
THR empty > modem status), loopback, and overrun. Transmission is instantaneous, so THR and the
transmitter are always empty. Host input waits in a bounded queue until the receive FIFO (or, with
FIFOs off, the single receive buffer) has room, like a backend under flow control; the receiver's
4-character timeout elapses at once, because host input arrives in bursts: fewer bytes than the
trigger level raise a character-timeout interrupt immediately.

As on PCs, the interrupt reaches the IRQ line only while MCR.OUT2 is set (the OUT2 pin enables the
IRQ driver on the board); in loopback the modem-control pins are forced inactive, so the line is
then off too. QEMU's serial.c does not gate on OUT2; Linux and other PC drivers always set it.

Sources: National Semiconductor "PC16550D UART with FIFOs" datasheet (registers, reset values,
interrupt priorities, loopback); QEMU ``hw/char/serial.c`` (THRE re-arm on IER writes, default
modem status); rust-vmm vm-superio ``serial.rs`` (device shape).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import BinaryIO

from hvvmm.bus import IrqLine
from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

SERIAL_COM1_BASE = 0x3F8
SERIAL_COM2_BASE = 0x2F8
SERIAL_COM3_BASE = 0x3E8
SERIAL_COM4_BASE = 0x2E8
SERIAL_PORT_COUNT = 8
COM1_IRQ = 4
COM2_IRQ = 3

# Register offsets (DLAB selects DLL/DLM at 0/1).
UART_RX = 0   # RBR, read, DLAB=0
UART_TX = 0   # THR, write, DLAB=0
UART_DLL = 0  # divisor latch LSB, DLAB=1
UART_IER = 1  # DLAB=0
UART_DLM = 1  # divisor latch MSB, DLAB=1
UART_IIR = 2  # read
UART_FCR = 2  # write
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

# IER
UART_IER_RDI = 0x01   # ERBFI: received data available (and character timeout)
UART_IER_THRI = 0x02  # ETBEI: transmitter holding register empty
UART_IER_RLSI = 0x04  # ELSI: receiver line status
UART_IER_MSI = 0x08   # EDSSI: modem status
UART_IER_MASK = 0x0F  # bits 4-7 are always 0 on the 16550A

# IIR: bit 0 is 0 while an interrupt is pending; bits 1-3 identify it; bits 6-7 say FIFOs are on.
UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_CTI = 0x0C
UART_IIR_FIFO_ENABLED = 0xC0

# FCR
UART_FCR_FE = 0x01    # FIFO enable
UART_FCR_RFR = 0x02   # receiver FIFO reset
UART_FCR_XFR = 0x04   # transmitter FIFO reset
UART_FCR_DMS = 0x08   # DMA mode select
UART_FCR_ITL_MASK = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 7:6

# LCR
UART_LCR_DLAB = 0x80

# MCR
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_MCR_MASK = 0x1F  # bits 5-7 are always 0 on the 16550A

# LSR
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_FIFOE = 0x80
UART_LSR_INT_ANY = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI

# MSR
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_ANY_DELTA = 0x0F
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

UART_FIFO_SIZE = 16
# Reset values. The divisor is the usual 9600 baud (115200 / 12), as QEMU and vm-superio start.
DEFAULT_BAUD_DIVISOR = 12
# The modem lines a connected terminal presents when not in loopback (as QEMU and vm-superio).
DEFAULT_MODEM_STATUS = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
# Host input queued beyond this is dropped (and counted), so a stalled guest cannot grow it.
DEFAULT_INPUT_LIMIT = 64 * 1024


class Serial:
    """A 16550A UART. ``irq`` is its interrupt line; transmitted bytes go to ``out`` (``None``:
    discarded) and are flushed at once. :meth:`enqueue_input` may be called from any thread."""

    def __init__(self, irq: IrqLine, out: BinaryIO | None, *,
                 input_limit: int = DEFAULT_INPUT_LIMIT):
        self._irq = irq
        self._out = out
        self._input_limit = input_limit
        self._lock = threading.Lock()
        self._log_once = LogOnce(log)
        self.dropped_input = 0  # host bytes dropped because the input queue was full
        self._dll = DEFAULT_BAUD_DIVISOR & 0xFF
        self._dlm = DEFAULT_BAUD_DIVISOR >> 8
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._fifo_enabled = False
        self._rx_trigger = 1
        self._lsr_errors = 0      # the LSR bits cleared by reading LSR (OE; PE/FE/BI never happen)
        self._msr_lines = DEFAULT_MODEM_STATUS
        self._msr_delta = 0
        self._thr_ipending = False
        self._rx: collections.deque[int] = collections.deque()   # receive FIFO or holding register
        self._rbr_last = 0
        self._pending: collections.deque[int] = collections.deque()  # host input not yet received
        self._irq_level = False

    # -- BusDevice ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        # An 8-bit ISA device: wider accesses are split into byte accesses, as the bus would.
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
            self._update_irq()

    # -- host side ----------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        """Bytes arriving on the serial line from the host; thread-safe."""
        if not data:
            return
        with self._lock:
            room = max(self._input_limit - len(self._pending), 0)
            self._pending.extend(data[:room])
            dropped = len(data) - min(room, len(data))
            if dropped:
                self.dropped_input += dropped
                self._lsr_errors |= UART_LSR_OE
                self._log_once("input-dropped", logging.INFO,
                               "serial: guest is not reading input; dropping host "
                               "bytes beyond %d queued (counted in dropped_input)",
                               self._input_limit)
            self._fill_rx()
            self._update_irq()

    @property
    def irq_level(self) -> bool:
        return self._irq_level

    # -- registers ----------------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        dlab = self._lcr & UART_LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self._dll
            if self._rx:
                self._rbr_last = self._rx.popleft()
                self._fill_rx()
            return self._rbr_last
        if offset == UART_IER:
            return self._dlm if dlab else self._ier
        if offset == UART_IIR:
            iir = self._interrupt_id()
            if iir == UART_IIR_THRI:
                # Reading IIR clears a THRE interrupt when it is the one identified.
                self._thr_ipending = False
            return iir | (UART_IIR_FIFO_ENABLED if self._fifo_enabled else 0)
        if offset == UART_LCR:
            return self._lcr
        if offset == UART_MCR:
            return self._mcr
        if offset == UART_LSR:
            lsr = UART_LSR_THRE | UART_LSR_TEMT | self._lsr_errors
            if self._rx:
                lsr |= UART_LSR_DR
            self._lsr_errors = 0
            return lsr
        if offset == UART_MSR:
            msr = self._msr_lines | self._msr_delta
            self._msr_delta = 0
            return msr
        if offset == UART_SCR:
            return self._scr
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        dlab = self._lcr & UART_LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self._dll = value
                return
            self._thr_ipending = False
            if self._mcr & UART_MCR_LOOP:
                self._receive(value)
            else:
                self._transmit(value)
            # The byte left THR at once, so THR is empty again: THRE interrupt re-armed.
            self._thr_ipending = True
        elif offset == UART_IER:
            if dlab:
                self._dlm = value
                return
            new = value & UART_IER_MASK
            changed = self._ier ^ new
            self._ier = new
            if changed & UART_IER_THRI:
                # As QEMU: enabling ETBEI while THR is empty raises THRE again even if an IIR read
                # cleared it (Windows and Linux's THRE test rely on this); disabling forgets it.
                self._thr_ipending = bool(new & UART_IER_THRI)
        elif offset == UART_FCR:
            self._write_fcr(value)
        elif offset == UART_LCR:
            self._lcr = value
        elif offset == UART_MCR:
            self._write_mcr(value & UART_MCR_MASK)
        elif offset == UART_SCR:
            self._scr = value
        elif offset in (UART_LSR, UART_MSR):
            self._log_once(f"ro-{offset}", logging.INFO,
                           "serial: write to read-only register %d ignored", offset)

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & UART_FCR_FE)
        if enable != self._fifo_enabled:
            # Changing FCR0 clears both FIFOs.
            value |= UART_FCR_RFR | UART_FCR_XFR
            self._fifo_enabled = enable
        if value & UART_FCR_RFR:
            self._rx.clear()
        if enable:
            # The other FCR bits are only programmed while FCR0 is (being) set.
            self._rx_trigger = RX_TRIGGER_LEVELS[(value & UART_FCR_ITL_MASK) >> 6]
        self._fill_rx()

    def _write_mcr(self, value: int) -> None:
        was_loop = self._mcr & UART_MCR_LOOP
        self._mcr = value
        if value & UART_MCR_LOOP:
            # Modem outputs drive the modem inputs: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
            lines = (((value & UART_MCR_DTR) and UART_MSR_DSR)
                     | ((value & UART_MCR_RTS) and UART_MSR_CTS)
                     | ((value & UART_MCR_OUT1) and UART_MSR_RI)
                     | ((value & UART_MCR_OUT2) and UART_MSR_DCD))
        else:
            lines = DEFAULT_MODEM_STATUS
        self._set_modem_lines(lines)
        if was_loop and not value & UART_MCR_LOOP:
            self._fill_rx()  # the serial input is connected again

    def _set_modem_lines(self, lines: int) -> None:
        changed = self._msr_lines ^ lines
        if changed & UART_MSR_CTS:
            self._msr_delta |= UART_MSR_DCTS
        if changed & UART_MSR_DSR:
            self._msr_delta |= UART_MSR_DDSR
        if changed & UART_MSR_DCD:
            self._msr_delta |= UART_MSR_DDCD
        if self._msr_lines & UART_MSR_RI and not lines & UART_MSR_RI:
            self._msr_delta |= UART_MSR_TERI  # trailing edge of RI
        self._msr_lines = lines

    # -- data paths ---------------------------------------------------------------------------

    def _rx_capacity(self) -> int:
        return UART_FIFO_SIZE if self._fifo_enabled else 1

    def _receive(self, byte: int) -> None:
        """A character completed in the receive shift register."""
        if len(self._rx) < self._rx_capacity():
            self._rx.append(byte)
            return
        self._lsr_errors |= UART_LSR_OE
        if not self._fifo_enabled:
            # 16450 mode: the new character overwrites the unread one.
            self._rx[-1] = byte
        # FIFO mode: the character in the shift register is lost; the FIFO keeps its contents.

    def _fill_rx(self) -> None:
        """Move queued host input into the receiver while it has room (not while in loopback,
        where the serial input is disconnected)."""
        if self._mcr & UART_MCR_LOOP:
            return
        capacity = self._rx_capacity()
        while self._pending and len(self._rx) < capacity:
            self._rx.append(self._pending.popleft())

    def _transmit(self, byte: int) -> None:
        if self._out is None:
            return
        try:
            self._out.write(bytes((byte,)))
            self._out.flush()
        except (OSError, ValueError) as exc:
            log.warning("serial: output failed (%s); discarding output from now on", exc)
            self._out = None

    # -- interrupts ---------------------------------------------------------------------------

    def _interrupt_id(self) -> int:
        """IIR bits 0-3 for the highest-priority pending interrupt."""
        ier = self._ier
        if ier & UART_IER_RLSI and self._lsr_errors & UART_LSR_INT_ANY:
            return UART_IIR_RLSI
        if ier & UART_IER_RDI and self._rx:
            if not self._fifo_enabled or len(self._rx) >= self._rx_trigger:
                return UART_IIR_RDI
            return UART_IIR_CTI  # below the trigger level: the character timeout has elapsed
        if ier & UART_IER_THRI and self._thr_ipending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self._msr_delta:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = (self._interrupt_id() != UART_IIR_NO_INT
                 and (self._mcr & (UART_MCR_OUT2 | UART_MCR_LOOP)) == UART_MCR_OUT2)
        if level != self._irq_level:
            self._irq_level = level
            # Under the lock, so the line always ends at the level of the latest state.
            self._irq.set_level(level)

