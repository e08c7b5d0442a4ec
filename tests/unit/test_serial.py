"""16550A UART register behaviour (PC16550D datasheet), without KVM."""

from __future__ import annotations

import io
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.devices.serial import (
    COM1_IRQ,
    SERIAL_COM1_BASE,
    SERIAL_PORT_COUNT,
    Serial,
)

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40


class RecordingIrq:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def level(self) -> bool:
        return bool(self.levels) and self.levels[-1]


class FlushCountingBytesIO(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def make(out=None):
    irq = RecordingIrq()
    return Serial(irq, out), irq


def rd(dev: Serial, reg: int) -> int:
    return dev.read(reg, 1)


def wr(dev: Serial, reg: int, value: int) -> None:
    dev.write(reg, 1, value)


def test_constants() -> None:
    assert (SERIAL_COM1_BASE, SERIAL_PORT_COUNT, COM1_IRQ) == (0x3F8, 8, 4)


def test_reset_values() -> None:
    dev, irq = make()
    assert rd(dev, IER) == 0
    assert rd(dev, IIR) == 0x01
    assert rd(dev, LCR) == 0
    assert rd(dev, MCR) == 0
    assert rd(dev, LSR) == LSR_THRE | LSR_TEMT
    assert rd(dev, MSR) == 0xB0  # DCD, DSR, CTS; no deltas
    assert rd(dev, SCR) == 0
    wr(dev, LCR, 0x80)
    assert (rd(dev, DLL), rd(dev, DLM)) == (12, 0)  # 9600 baud
    assert irq.levels == []


def test_scratch_register() -> None:
    dev, _ = make()
    wr(dev, SCR, 0x5A)
    assert rd(dev, SCR) == 0x5A


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch() -> None:
    out = io.BytesIO()
    dev, _ = make(out)
    wr(dev, IER, 0x05)
    wr(dev, LCR, 0x83)  # DLAB + 8N1
    wr(dev, DLL, 0x01)
    wr(dev, DLM, 0x02)
    assert out.getvalue() == b""  # the DLL write is not a THR write
    assert rd(dev, DLL) == 0x01
    assert rd(dev, DLM) == 0x02
    assert dev.read(0, 2) == 0x0201  # a 16-bit access is two byte accesses
    wr(dev, LCR, 0x03)
    assert rd(dev, LCR) == 0x03
    assert rd(dev, IER) == 0x05  # IER kept its value
    wr(dev, THR, ord("x"))
    assert out.getvalue() == b"x"
    wr(dev, LCR, 0x83)
    dev.write(0, 2, 0xBEEF)
    assert (rd(dev, DLL), rd(dev, DLM)) == (0xEF, 0xBE)


def test_transmit_writes_and_flushes() -> None:
    out = FlushCountingBytesIO()
    dev, _ = make(out)
    for byte in b"hello\n":
        wr(dev, THR, byte)
    assert out.getvalue() == b"hello\n"
    assert out.flushes == 6
    assert rd(dev, LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_transmit_without_output_is_discarded() -> None:
    dev, _ = make(None)
    wr(dev, THR, 0x41)
    assert rd(dev, LSR) == LSR_THRE | LSR_TEMT


def test_output_errors_do_not_propagate() -> None:
    out = io.BytesIO()
    dev, _ = make(out)
    out.close()
    wr(dev, THR, 0x41)  # ValueError on a closed file: logged, output discarded
    wr(dev, THR, 0x42)
    assert rd(dev, LSR) == LSR_THRE | LSR_TEMT  # the UART keeps working for the guest


def test_ier_and_mcr_reserved_bits_read_zero() -> None:
    dev, _ = make()
    wr(dev, IER, 0xFF)
    assert rd(dev, IER) == 0x0F
    wr(dev, MCR, 0xEF)
    assert rd(dev, MCR) == 0x0F


def test_receive_without_fifo() -> None:
    dev, _ = make()
    dev.enqueue_input(b"abc")
    got = []
    while rd(dev, LSR) & LSR_DR:
        got.append(rd(dev, RBR))
    assert bytes(got) == b"abc"  # held back, not overrun, while the guest is slow
    assert rd(dev, LSR) & LSR_OE == 0
    assert rd(dev, IIR) == 0x01


def test_rda_interrupt_without_fifo() -> None:
    dev, irq = make()
    wr(dev, MCR, MCR_OUT2)
    wr(dev, IER, IER_RDI)
    assert irq.levels == []
    dev.enqueue_input(b"k")
    assert irq.levels == [True]
    assert rd(dev, IIR) == 0x04
    assert rd(dev, RBR) == ord("k")
    assert irq.levels == [True, False]
    assert rd(dev, IIR) == 0x01


def test_thre_interrupt_cleared_by_iir_read_and_rearmed() -> None:
    dev, irq = make(io.BytesIO())
    wr(dev, MCR, MCR_OUT2)
    wr(dev, IER, IER_THRI)  # enabling ETBEI while THR is empty raises THRE
    assert irq.levels == [True]
    assert rd(dev, LSR) & LSR_THRE
    assert rd(dev, IIR) == 0x02
    assert irq.levels == [True, False]  # reading IIR cleared it
    assert rd(dev, IIR) == 0x01
    rd(dev, LSR)  # an LSR read does not re-arm it
    assert rd(dev, IIR) == 0x01
    wr(dev, THR, ord("a"))  # THR write: empties again at once
    assert irq.levels == [True, False, True]
    assert rd(dev, IIR) == 0x02
    wr(dev, IER, 0)
    wr(dev, IER, IER_THRI)  # rising edge of ETBEI re-arms (as QEMU; Linux's THRE test)
    assert rd(dev, IIR) == 0x02
    assert irq.levels == [True, False, True, False, True, False]


def test_thre_pending_is_forgotten_when_etbei_is_disabled() -> None:
    dev, _ = make(io.BytesIO())
    wr(dev, IER, IER_THRI)
    wr(dev, IER, 0)
    assert rd(dev, IIR) == 0x01
    wr(dev, IER, IER_RDI)  # ETBEI unchanged (off): nothing
    assert rd(dev, IIR) == 0x01


def test_interrupt_priorities() -> None:
    dev, _ = make()
    wr(dev, MCR, MCR_LOOP)  # modem inputs change from DCD/DSR/CTS to all clear: deltas
    wr(dev, THR, ord("a"))
    wr(dev, THR, ord("b"))  # 16450 mode: overrun, the new byte overwrites
    wr(dev, IER, 0x0F)
    assert rd(dev, IIR) == 0x06  # receiver line status first
    assert rd(dev, IIR) == 0x06  # not cleared by IIR reads
    assert rd(dev, LSR) == LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT
    assert rd(dev, LSR) & LSR_OE == 0  # cleared by the read
    assert rd(dev, IIR) == 0x04  # then received data
    assert rd(dev, RBR) == ord("b")
    assert rd(dev, IIR) == 0x02  # then THR empty, cleared by this read
    assert rd(dev, IIR) == 0x00  # then modem status
    assert rd(dev, MSR) == 0x0B  # DDCD, DDSR, DCTS; loopback lines all clear
    assert rd(dev, MSR) == 0x00
    assert rd(dev, IIR) == 0x01


def test_interrupt_enable_masks_sources() -> None:
    dev, irq = make()
    wr(dev, MCR, MCR_OUT2 | MCR_LOOP)
    wr(dev, MCR, MCR_OUT2)
    dev.enqueue_input(b"x")
    assert rd(dev, IIR) == 0x01  # everything pending, nothing enabled
    wr(dev, IER, IER_MSI)
    assert rd(dev, IIR) == 0x00
    rd(dev, MSR)
    assert rd(dev, IIR) == 0x01
    assert irq.levels == [True, False]


def test_out2_gates_the_irq_line() -> None:
    dev, irq = make()
    wr(dev, IER, IER_RDI)
    dev.enqueue_input(b"x")
    assert rd(dev, IIR) == 0x04  # pending in the UART...
    assert irq.levels == []  # ...but the PC's IRQ driver is off without OUT2
    wr(dev, MCR, MCR_OUT2 | MCR_DTR | MCR_RTS)
    assert irq.levels == [True]
    wr(dev, MCR, MCR_DTR | MCR_RTS)
    assert irq.levels == [True, False]
    wr(dev, MCR, MCR_OUT2)
    assert irq.levels == [True, False, True]
    rd(dev, RBR)
    assert irq.levels == [True, False, True, False]


def test_irq_line_only_called_on_level_changes() -> None:
    dev, irq = make()
    wr(dev, MCR, MCR_OUT2)
    wr(dev, IER, IER_RDI)
    for _ in range(3):
        dev.enqueue_input(b"abc")
    assert irq.levels == [True]
    while rd(dev, LSR) & LSR_DR:
        rd(dev, RBR)
    assert irq.levels == [True, False]


def test_fifo_enable_shows_in_iir_and_trigger_level() -> None:
    dev, irq = make()
    wr(dev, MCR, MCR_OUT2)
    wr(dev, FCR, 0x01 | 0x40)  # FIFO on, trigger level 4
    assert rd(dev, IIR) == 0xC1
    wr(dev, IER, IER_RDI)
    dev.enqueue_input(b"ab")
    assert rd(dev, IIR) == 0xCC  # below the trigger level: character timeout
    dev.enqueue_input(b"cd")
    assert rd(dev, IIR) == 0xC4  # at the trigger level: received data available
    assert rd(dev, RBR) == ord("a")
    assert rd(dev, IIR) == 0xCC
    assert bytes(rd(dev, RBR) for _ in range(3)) == b"bcd"
    assert rd(dev, IIR) == 0xC1
    assert irq.levels == [True, False]
    wr(dev, FCR, 0x00)
    assert rd(dev, IIR) == 0x01


@pytest.mark.parametrize("fcr, level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_fifo_trigger_levels(fcr: int, level: int) -> None:
    dev, _ = make()
    wr(dev, FCR, fcr)
    wr(dev, IER, IER_RDI)
    dev.enqueue_input(bytes(level - 1))
    assert rd(dev, IIR) == (0xCC if level > 1 else 0xC1)
    dev.enqueue_input(b"\0")
    assert rd(dev, IIR) == 0xC4


def test_fifo_holds_16_and_refills_from_host_queue() -> None:
    dev, _ = make()
    wr(dev, FCR, 0x01)
    data = bytes(range(40))
    dev.enqueue_input(data)
    got = bytearray()
    while rd(dev, LSR) & LSR_DR:
        got.append(rd(dev, RBR))
    assert bytes(got) == data
    assert rd(dev, LSR) & LSR_OE == 0


def test_fcr_receiver_reset_clears_the_fifo() -> None:
    dev, _ = make()
    wr(dev, FCR, 0x01)
    wr(dev, MCR, MCR_LOOP)
    for byte in b"abc":
        wr(dev, THR, byte)
    assert rd(dev, LSR) & LSR_DR
    wr(dev, FCR, 0x03)  # RX FIFO reset
    assert rd(dev, LSR) & LSR_DR == 0
    wr(dev, THR, ord("z"))
    wr(dev, FCR, 0x00)  # turning FIFOs off clears them too
    assert rd(dev, LSR) & LSR_DR == 0


def test_fifo_overrun_in_loopback_keeps_the_fifo() -> None:
    out = io.BytesIO()
    dev, _ = make(out)
    wr(dev, FCR, 0x07)
    wr(dev, MCR, MCR_LOOP)
    for byte in range(17):
        wr(dev, THR, byte)
    assert out.getvalue() == b""  # loopback: nothing leaves the UART
    lsr = rd(dev, LSR)
    assert lsr & (LSR_DR | LSR_OE) == LSR_DR | LSR_OE
    assert bytes(rd(dev, RBR) for _ in range(16)) == bytes(range(16))
    assert rd(dev, LSR) & (LSR_DR | LSR_OE) == 0


def test_loopback_modem_status_reflects_mcr() -> None:
    dev, _ = make()
    wr(dev, MCR, MCR_LOOP | 0x0A)  # RTS + OUT2, as Linux's autoconfig loopback test
    assert rd(dev, MSR) & 0xF0 == 0x90  # CTS + DCD
    wr(dev, MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert rd(dev, MSR) == 0x20 | 0x40 | 0x01 | 0x02 | 0x08  # DSR, RI; DCTS, DDSR, DDCD
    wr(dev, MCR, MCR_LOOP)
    assert rd(dev, MSR) == 0x02 | 0x04  # DDSR, TERI (RI's trailing edge)
    wr(dev, MCR, MCR_LOOP | MCR_OUT1)
    assert rd(dev, MSR) == 0x40  # RI's leading edge sets no delta
    wr(dev, MCR, 0)
    assert rd(dev, MSR) & 0xF0 == 0xB0


def test_loopback_disconnects_host_input_and_irq() -> None:
    out = io.BytesIO()
    dev, irq = make(out)
    wr(dev, IER, IER_RDI)
    wr(dev, MCR, MCR_LOOP | MCR_OUT2)
    dev.enqueue_input(b"host")
    assert rd(dev, LSR) & LSR_DR == 0
    wr(dev, THR, ord("L"))
    assert rd(dev, IIR) == 0x04  # interrupts work inside the UART...
    assert irq.levels == []  # ...but OUT2 is forced inactive on the pin
    assert rd(dev, RBR) == ord("L")
    wr(dev, MCR, MCR_OUT2)
    assert irq.levels == [True]
    assert bytes(rd(dev, RBR) for _ in range(4)) == b"host"
    assert out.getvalue() == b""


def test_input_queue_is_bounded() -> None:
    irq = RecordingIrq()
    dev = Serial(irq, None, input_limit=100)
    dev.enqueue_input(bytes(range(150)))
    assert dev.dropped_input == 50
    assert rd(dev, LSR) & LSR_OE  # the loss is visible as an overrun
    got = bytearray()
    while rd(dev, LSR) & LSR_DR:
        got.append(rd(dev, RBR))
    assert bytes(got) == bytes(range(100))
    dev.enqueue_input(b"ok")
    assert dev.dropped_input == 50
    assert bytes(rd(dev, RBR) for _ in range(2)) == b"ok"


def test_default_input_limit_is_64k() -> None:
    dev, _ = make()
    dev.enqueue_input(bytes(70000))
    assert dev.dropped_input == 70000 - 64 * 1024


def test_enqueue_from_another_thread() -> None:
    dev, irq = make()
    wr(dev, FCR, 0x01)
    wr(dev, IER, IER_RDI)
    wr(dev, MCR, MCR_OUT2)
    data = bytes(i % 251 for i in range(3000))

    def feed() -> None:
        for i in range(0, len(data), 7):
            dev.enqueue_input(data[i:i + 7])

    thread = threading.Thread(target=feed)
    thread.start()
    got = bytearray()
    while len(got) < len(data):
        if rd(dev, LSR) & LSR_DR:
            got.append(rd(dev, RBR))
    thread.join()
    assert bytes(got) == data
    assert all(a != b for a, b in zip(irq.levels, irq.levels[1:]))
    assert irq.levels[-1] is False


def test_writes_to_lsr_and_msr_are_ignored() -> None:
    dev, _ = make()
    wr(dev, LSR, 0xFF)
    wr(dev, MSR, 0x00)
    assert rd(dev, LSR) == LSR_THRE | LSR_TEMT
    assert rd(dev, MSR) == 0xB0


accesses = st.lists(
    st.tuples(st.booleans(), st.sampled_from([1, 2, 4]), st.integers(0, 7),
              st.integers(0, 0xFFFFFFFF), st.binary(max_size=20)),
    max_size=60)


@settings(max_examples=100, deadline=None)
@given(accesses)
def test_random_accesses_never_raise_or_widen(ops) -> None:
    dev, irq = make(io.BytesIO())
    for is_write, size, offset, value, data in ops:
        offset = min(offset, SERIAL_PORT_COUNT - size)
        if data and value & 0x10:
            dev.enqueue_input(data)
        if is_write:
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            result = dev.read(offset, size)
            assert 0 <= result < 1 << (8 * size)
    # The line is driven only on changes, starting from low.
    assert all(a != b for a, b in zip(irq.levels, irq.levels[1:]))
    assert not irq.levels or irq.levels[0] is True
    # And it is at the level the registers say: an interrupt pending, OUT2 set, not in loopback.
    level = irq.level
    mcr = rd(dev, MCR)
    iir = rd(dev, IIR)
    assert level == (iir & 0x01 == 0 and mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2)
