"""PCI configuration space, configuration mechanism #1, BAR sizing and placement, PAM decoding
and PIIX3 PIRQ routing."""

import pytest
from hypothesis import given, strategies as st

from hvvmm.bus import mmio_bus, pio_bus
from hvvmm.layout import PC, MiB
from hvvmm.pci import BarKind, PciFunction
from hvvmm.pci.config import COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY
from hvvmm.pci.i440fx import (PAM_PCI, PAM_RAM, PAM_READ_ONLY, Piix3IsaBridge,
                              pam_segments)
from hvvmm.pci.pc import PcPci


class Regs:
    def __init__(self):
        self.accesses = []

    def read(self, offset, size):
        self.accesses.append(("r", offset, size))
        return 0x1234 & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        self.accesses.append(("w", offset, size, value))


class Line:
    def __init__(self, log, irq):
        self.log, self.irq = log, irq

    def set_level(self, level):
        self.log.append((self.irq, level))


def make_pc(memory=256 * MiB):
    pio, mmio, lines = pio_bus(), mmio_bus(), []
    pam_changes = []
    pc = PcPci(pio, mmio, memory, lambda irq: Line(lines, irq), on_pam_change=pam_changes.append,
               pam_ram=False)
    return pc, pio, mmio, lines, pam_changes


def cfg_read(pio, devfn, register, size):
    pio.write(0xCF8, 4, 0x8000_0000 | devfn << 8 | (register & 0xFC))
    return pio.read(0xCFC + (register & 3), size)


def cfg_write(pio, devfn, register, size, value):
    pio.write(0xCF8, 4, 0x8000_0000 | devfn << 8 | (register & 0xFC))
    pio.write(0xCFC + (register & 3), size, value)


def test_host_bridge_and_isa_bridge_ids_as_qemu():
    pc, pio, *_ = make_pc()
    assert cfg_read(pio, 0x00, 0, 4) == 0x1237_8086
    assert cfg_read(pio, 0x00, 0x2C, 4) == 0x1100_1AF4  # SeaBIOS's QEMU check
    assert cfg_read(pio, 0x08, 0, 4) == 0x7000_8086
    assert cfg_read(pio, 0x08, 0x0A, 2) == 0x0601  # ISA bridge class
    assert cfg_read(pio, 0x08, 0x0E, 1) & 0x80  # multi-function


def test_absent_function_and_disabled_address_read_all_ones():
    pc, pio, *_ = make_pc()
    assert cfg_read(pio, 5 << 3, 0, 4) == 0xFFFF_FFFF
    pio.write(0xCF8, 4, 0)  # enable bit clear
    assert pio.read(0xCFC, 2) == 0xFFFF
    cfg_write(pio, 5 << 3, 0x04, 2, 0xFFFF)  # ignored, no crash


def test_byte_and_word_access_at_cfc_to_cff():
    pc, pio, *_ = make_pc()
    assert cfg_read(pio, 0, 0, 1) == 0x86
    assert cfg_read(pio, 0, 1, 1) == 0x80
    assert cfg_read(pio, 0, 2, 2) == 0x1237
    assert cfg_read(pio, 0, 3, 1) == 0x12


def test_read_only_fields_ignore_writes():
    pc, pio, *_ = make_pc()
    cfg_write(pio, 0, 0, 4, 0)
    assert cfg_read(pio, 0, 0, 4) == 0x1237_8086
    cfg_write(pio, 0, 0x3C, 1, 0x5A)  # interrupt line is writable
    assert cfg_read(pio, 0, 0x3C, 1) == 0x5A


@pytest.mark.parametrize("kind,size,flags", [(BarKind.IO, 0x40, 0x1),
                                             (BarKind.MEM32, 0x1000, 0x0),
                                             (BarKind.MEM64, 0x4000, 0x4)])
def test_bar_sizing_reads_back_the_size_mask(kind, size, flags):
    pc, pio, *_ = make_pc()
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000)
    fn.add_bar(0, kind, size, Regs())
    slot = pc.add(fn)
    devfn = slot << 3
    assert cfg_read(pio, devfn, 0x10, 4) == flags
    cfg_write(pio, devfn, 0x10, 4, 0xFFFF_FFFF)
    low_mask = 0xFFFF_FFFC if kind is BarKind.IO else 0xFFFF_FFF0
    assert cfg_read(pio, devfn, 0x10, 4) == (~(size - 1) & low_mask) | flags
    if kind is BarKind.MEM64:
        cfg_write(pio, devfn, 0x14, 4, 0xFFFF_FFFF)
        assert cfg_read(pio, devfn, 0x14, 4) == 0xFFFF_FFFF


def test_bar_is_decoded_only_while_enabled_and_valid():
    pc, pio, mmio, *_ = make_pc()
    regs, io = Regs(), Regs()
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000)
    fn.add_bar(0, BarKind.IO, 0x40, io)
    fn.add_bar(1, BarKind.MEM32, 0x1000, regs)
    devfn = pc.add(fn) << 3
    cfg_write(pio, devfn, 0x10, 4, 0xC000)
    cfg_write(pio, devfn, 0x14, 4, 0x8000_1000)
    assert mmio.find(0x8000_1000) is None and pio.find(0xC000) is None
    cfg_write(pio, devfn, 0x04, 2, COMMAND_IO | COMMAND_MEMORY)
    assert mmio.read(0x8000_1004, 4) == 0x1234
    assert regs.accesses[-1] == ("r", 4, 4)
    pio.write(0xC010, 2, 7)
    assert io.accesses[-1] == ("w", 0x10, 2, 7)
    # Moving the BAR moves the decode; the sizing value (all ones) is never decoded.
    cfg_write(pio, devfn, 0x14, 4, 0xFFFF_FFFF)
    assert fn.bars[1].mapped_at is None
    cfg_write(pio, devfn, 0x14, 4, 0x9000_0000)
    assert mmio.find(0x9000_0000) is not None and mmio.find(0x8000_1000) is None
    cfg_write(pio, devfn, 0x04, 2, 0)
    assert mmio.find(0x9000_0000) is None and pio.find(0xC000) is None


def test_memory_bar_outside_the_pci_window_is_not_decoded():
    pc, pio, mmio, *_ = make_pc(memory=256 * MiB)
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000)
    fn.add_bar(0, BarKind.MEM32, 0x1000, Regs())
    devfn = pc.add(fn) << 3
    start, end = PC.pci_mmio_window(256 * MiB)
    cfg_write(pio, devfn, 0x04, 2, COMMAND_MEMORY)
    for address in (0x1000, end, start - 0x1000):  # RAM, the IOAPIC, below the window
        cfg_write(pio, devfn, 0x10, 4, address)
        assert fn.bars[0].mapped_at is None


def test_overlapping_bars_leave_the_second_undecoded():
    pc, pio, mmio, *_ = make_pc()
    fns = []
    for _ in range(2):
        fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000)
        fn.add_bar(0, BarKind.MEM32, 0x1000, Regs())
        devfn = pc.add(fn) << 3
        cfg_write(pio, devfn, 0x10, 4, 0x8000_0000)
        cfg_write(pio, devfn, 0x04, 2, COMMAND_MEMORY)
        fns.append(fn)
    assert fns[0].bars[0].mapped_at == 0x8000_0000 and fns[1].bars[0].mapped_at is None


def test_pam_registers_decode_to_segments():
    pc, pio, mmio, lines, changes = make_pc()
    assert all(s.mode == PAM_PCI for s in pc.host_bridge.pam)
    cfg_write(pio, 0, 0x58, 4, 0x0000_3000)  # PAM0 (0x59) high nibble: 0xF0000 RAM
    cfg_write(pio, 0, 0x5C, 4, 0x1133_3333)  # PAM3-6 (0x5C-0x5F)
    segments = {s.base: s.mode for s in changes[-1]}
    assert segments[0xF_0000] == PAM_RAM
    assert segments[0xD_0000] == PAM_RAM  # PAM3 low nibble
    assert segments[0xE_C000] == PAM_READ_ONLY  # PAM6 high nibble
    assert segments[0xC_0000] == PAM_PCI
    # PAM0's low nibble is reserved: not writable.
    cfg_write(pio, 0, 0x59, 1, 0xFF)
    assert cfg_read(pio, 0, 0x59, 1) == 0x30


@given(st.binary(min_size=7, max_size=7))
def test_pam_segments_cover_the_window_exactly(registers):
    segments = pam_segments(registers)
    assert segments[0].base == 0xC_0000
    for a, b in zip(segments, segments[1:]):
        assert a.base + a.size == b.base
    assert segments[-1].base + segments[-1].size == 0x10_0000


def test_pirq_routing_reaches_the_routed_isa_irq_and_follows_reroutes():
    pc, pio, mmio, lines, _ = make_pc()
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000, interrupt_pin=1)
    slot = pc.add(fn)  # slot 2, INTA -> PIRQ (2-1+0)&3 = B
    pirq = Piix3IsaBridge.pirq_of(slot << 3, 1)
    assert pirq == 1
    fn.set_intx(True)
    assert lines == []  # routes start disabled (0x80)
    cfg_write(pio, 0x08, 0x60 + pirq, 1, 11)
    assert lines == [(11, True)]
    assert cfg_read(pio, slot << 3, 0x06, 2) & 0x08  # interrupt status
    cfg_write(pio, 0x08, 0x60 + pirq, 1, 10)  # moved: 11 drops, 10 rises
    assert lines[-2:] == [(11, False), (10, True)] or lines[-2:] == [(10, True), (11, False)]
    fn.set_intx(False)
    assert lines[-1] == (10, False)
    # Bit 7 (IRQEN#) disables the route whatever the IRQ bits hold (82371SB PIRQRC[A:D]).
    cfg_write(pio, 0x08, 0x60 + pirq, 1, 0x80 | 11)
    fn.set_intx(True)
    assert lines[-1] == (10, False)  # no line rose


def test_shared_irq_stays_high_while_any_device_asserts():
    pc, pio, mmio, lines, _ = make_pc()
    a = PciFunction("a", 0x1AF4, 0x1001, 0x010000, interrupt_pin=1)
    b = PciFunction("b", 0x1AF4, 0x1001, 0x010000, interrupt_pin=1)
    pc.add(a), pc.add(b)
    for pirq in range(4):
        cfg_write(pio, 0x08, 0x60 + pirq, 1, 10)
    a.set_intx(True)
    b.set_intx(True)
    a.set_intx(False)
    assert lines[-1] == (10, True)
    b.set_intx(False)
    assert lines[-1] == (10, False)


def test_intx_disable_masks_the_pin():
    pc, pio, mmio, lines, _ = make_pc()
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000, interrupt_pin=1)
    devfn = pc.add(fn) << 3
    pc.route_pirqs_as_firmware_would()
    fn.set_intx(True)
    assert lines[-1][1] is True
    cfg_write(pio, devfn, 0x04, 2, COMMAND_INTX_DISABLE)
    assert lines[-1][1] is False


def test_reserved_isa_irqs_are_not_routed():
    pc, pio, mmio, lines, _ = make_pc()
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000, interrupt_pin=1)
    slot = pc.add(fn)
    cfg_write(pio, 0x08, 0x60 + Piix3IsaBridge.pirq_of(slot << 3, 1), 1, 2)
    fn.set_intx(True)
    assert lines == []


def test_reset_control_byte_inside_the_ports_and_config_reset():
    from hvvmm.devices.reset_control import ResetControl

    resets = []
    pio, mmio = pio_bus(), mmio_bus()
    pc = PcPci(pio, mmio, 256 * MiB, lambda irq: Line([], irq),
               reset_control=ResetControl(lambda: resets.append(1)))
    pio.write(0xCF9, 1, 0x02)
    assert resets == [] and pio.read(0xCF9, 1) == 0x02
    pio.write(0xCF9, 1, 0x06)
    assert resets == [1]
    pio.write(0xCF8, 4, 0x8000_0000)
    assert pio.read(0xCF8, 4) == 0x8000_0000  # CONFIG_ADDRESS unaffected
    cfg_write(pio, 0x08, 0x60, 1, 10)
    pc.reset()
    assert cfg_read(pio, 0x08, 0x60, 1) == 0x80


def test_capability_list_is_linked():
    fn = PciFunction("dev", 0x1AF4, 0x1001, 0x010000)
    first = fn.add_capability(0x11, bytes(10))
    second = fn.add_capability(0x09, bytes(14))
    assert fn.config_read(0x06, 2) & 0x10
    assert fn.config_read(0x34, 1) == first
    assert fn.config_read(first + 1, 1) == second
    assert fn.config_read(second + 1, 1) == 0


@given(st.integers(0, 255), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF))
def test_config_access_anywhere_never_raises(register, size, value):
    pc, pio, *_ = make_pc()
    for devfn in (0, 8, 16):
        cfg_write(pio, devfn, register, size, value & ((1 << (8 * size)) - 1))
        cfg_read(pio, devfn, register, size)


def test_64_bit_bar_above_ram_is_decoded_a_32_bit_one_is_not():
    pc, pio, mmio, *_ = make_pc(memory=5 * 1024 * MiB)
    start, end = PC.pci_mmio64_window(5 * 1024 * MiB)
    assert start == 6 * 1024 * MiB  # 3 GiB low RAM, 2 GiB from 4 GiB: high RAM ends at 6 GiB
    wide = PciFunction("wide", 0x1AF4, 0x1001, 0x010000)
    wide.add_bar(0, BarKind.MEM64, 0x4000, Regs())
    devfn = pc.add(wide) << 3
    cfg_write(pio, devfn, 0x04, 2, COMMAND_MEMORY)
    cfg_write(pio, devfn, 0x10, 4, 0x0000_0000 | 0x4)
    cfg_write(pio, devfn, 0x14, 4, 0x8)  # 32 GiB
    assert wide.bars[0].mapped_at == 32 << 30
    cfg_write(pio, devfn, 0x14, 4, 0x1)  # 4 GiB: high RAM
    assert wide.bars[0].mapped_at is None
    cfg_write(pio, devfn, 0x14, 4, end >> 32)  # at the end of the window
    assert wide.bars[0].mapped_at is None
