"""The PC layout table: the devices' own constants agree with it, and the e820 map it derives."""

from hvvmm.devices.acpi_pm import ACPI_PM1A_CNT_PORT, ACPI_PM_BASE, ACPI_PM_BLOCK_LENGTH
from hvvmm.devices.cmos import CMOS_BASE, CMOS_PORT_COUNT
from hvvmm.devices.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_PORT_COUNT
from hvvmm.devices.fw_cfg import FW_CFG_DMA_PORT_COUNT, FW_CFG_IO_BASE, FW_CFG_PORT_COUNT
from hvvmm.devices.i8042 import I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_PORT_COUNT
from hvvmm.devices.port80 import POST_CODE_PORT, POST_CODE_PORT_COUNT
from hvvmm.devices.reset_control import RESET_CONTROL_PORT, RESET_CONTROL_PORT_COUNT
from hvvmm.devices.serial import COM1_IRQ, SERIAL_COM1_BASE, SERIAL_PORT_COUNT
from hvvmm.pci.host import CONFIG_ADDRESS_PORT, CONFIG_PORT_COUNT
from hvvmm.devices.port92 import PORT92
from hvvmm.layout import E820_ACPI, E820_RAM, E820_RESERVED, GiB, MiB, PC, MemoryMapEntry


def test_pci_window_lies_between_low_ram_and_the_ioapic():
    for size in (256 * MiB, 2 * 1024 * MiB, 3 * 1024 * MiB, 8 * 1024 * MiB):
        start, end = PC.pci_mmio_window(size)
        assert min(size, PC.low_ram_limit) <= start < end == PC.ioapic_base
        assert all(e.end <= start or e.base >= end for e in PC.memory_map(size))


def test_pci_window_starts_where_seabios_puts_it():
    # SeaBIOS src/fw/pciinit.c, i440fx_mem_addr_setup: at 2 GiB for up to 2 GiB of low RAM
    # (2 GiB itself included), else at 3 GiB.
    expected = {256 * MiB: 2 * GiB, 2 * GiB: 2 * GiB, 2 * GiB + 4096: 3 * GiB,
                3 * GiB: 3 * GiB, 8 * GiB: 3 * GiB}
    assert {size: PC.pci_mmio_window(size)[0] for size in expected} == expected


def test_firmware_fits_above_kvm_pages():
    assert PC.firmware_end - PC.firmware_max_size >= PC.kvm_tss + 3 * 4096


def test_device_modules_agree_with_the_layout_table():
    expected = {
        "serial0": (SERIAL_COM1_BASE, SERIAL_PORT_COUNT, COM1_IRQ),
        "isa-debug-exit": (DEBUG_EXIT_BASE, DEBUG_EXIT_PORT_COUNT, None),
        "fw_cfg": (FW_CFG_IO_BASE, FW_CFG_PORT_COUNT, None),
        "cmos": (CMOS_BASE, CMOS_PORT_COUNT, 8),
        "i8042-data": (I8042_DATA_PORT, I8042_PORT_COUNT, 1),
        "i8042-command": (I8042_COMMAND_PORT, I8042_PORT_COUNT, None),
        "post-code": (POST_CODE_PORT, POST_CODE_PORT_COUNT, None),
        "acpi-pm": (ACPI_PM_BASE, ACPI_PM_BLOCK_LENGTH, PC.sci_irq),
        "pci-config": (CONFIG_ADDRESS_PORT, CONFIG_PORT_COUNT, None),
        "fw_cfg-dma": (FW_CFG_IO_BASE + 4, FW_CFG_DMA_PORT_COUNT, None),
        "debugcon": (0x402, 1, None),
        "port92": (PORT92, 1, None),
    }
    assert {d.name: (d.port, d.ports, d.irq) for d in PC.isa_devices} == expected
    assert ACPI_PM_BASE == PC.acpi_pm_base and ACPI_PM1A_CNT_PORT == PC.acpi_pm_base + 4
    # The reset control register is decoded inside the PCI configuration ports.
    assert RESET_CONTROL_PORT_COUNT == 1
    assert CONFIG_ADDRESS_PORT < RESET_CONTROL_PORT < CONFIG_ADDRESS_PORT + CONFIG_PORT_COUNT


def test_isa_devices_do_not_overlap():
    spans = sorted((d.port, d.port + d.ports) for d in PC.isa_devices)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))


def test_memory_map_small_guest():
    assert PC.memory_map(256 * MiB) == [
        MemoryMapEntry(0, 0x9FC00, E820_RAM),
        MemoryMapEntry(0x9FC00, 0xA0000 - 0x9FC00, E820_RESERVED),
        MemoryMapEntry(0xE0000, 0x10000, E820_ACPI),
        MemoryMapEntry(0xF0000, 0x10000, E820_RESERVED),
        MemoryMapEntry(MiB, 255 * MiB, E820_RAM),
    ]


def test_memory_map_splits_ram_around_the_32bit_hole():
    entries = PC.memory_map(5 * GiB)
    ram = [(e.base, e.length) for e in entries if e.type == E820_RAM]
    assert ram[-2:] == [(MiB, 3 * GiB - MiB), (4 * GiB, 2 * GiB)]
    assert PC.memory_layout(5 * GiB) == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]
    for entry in entries:  # nothing the guest may use lies in the interrupt controllers' hole
        assert entry.end <= PC.reserved_hole[0] or entry.base >= PC.reserved_hole[1]
