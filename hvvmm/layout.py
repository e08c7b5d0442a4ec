"""The PC layout: one table of data that every part of the machine reads.

Where RAM, the firmware areas, the interrupt controllers and the legacy devices lie in a guest's
physical address space and port space, and which interrupt each device raises. The e820 memory
map (:func:`memory_map`), the RAM regions (:func:`memory_layout`), device placement in
``hvvmm.machine``, the ACPI tables, CPUID topology limits and the QEMU front end all derive from
:data:`PC`, so a change of layout is made here once.

The values follow a PC as QEMU's ``pc`` machine and SeaBIOS lay it out (QEMU ``hw/i386/pc.c``,
``hw/i386/fw_cfg.c``; Linux ``arch/x86/include/asm/e820/types.h`` for the e820 types).
"""

from __future__ import annotations

from dataclasses import dataclass

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# e820 entry types (ACPI 6.4 §15, "Address Range Types"; Linux asm/e820/types.h).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4


@dataclass(frozen=True)
class MemoryMapEntry:
    """One entry of the firmware memory map (e820): ``type`` is one of the ``E820_*`` values."""

    base: int
    length: int
    type: int

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass(frozen=True)
class IsaDevice:
    """A legacy device: its first port, how many ports, and its ISA IRQ (None: raises none)."""

    name: str
    port: int
    ports: int
    irq: int | None = None


@dataclass(frozen=True)
class PcLayout:
    # RAM: from 0 up to the 32-bit hole, the rest from 4 GiB.
    low_ram_limit: int = 3 * GiB
    high_ram_base: int = 4 * GiB
    min_memory: int = 4 * MiB
    # Below 1 MiB: conventional memory ends at the EBDA; 0xA0000-0xE0000 is VGA and option ROMs
    # (not RAM a guest may use); 0xE0000-0xF0000 holds the ACPI tables of a direct kernel boot
    # (where the ACPI spec lets an OS find the RSDP, §5.2.5.1); 0xF0000-0x100000 is the BIOS.
    ebda_start: int = 0x9_FC00
    legacy_hole: tuple[int, int] = (0xA_0000, 0xE_0000)
    acpi_tables: tuple[int, int] = (0xE_0000, 0xF_0000)
    bios_area: tuple[int, int] = (0xF_0000, 0x10_0000)
    # What a direct Linux boot writes for the kernel in conventional memory (boot GDT, page
    # tables, zero page or PVH start info, command line); the kernel copies it out early.
    boot_data: tuple[int, int] = (0x1000, 0x9_0000)
    # The 32-bit hole above low RAM: the IOAPIC, the LAPICs and the pages KVM needs on Intel.
    ioapic_base: int = 0xFEC0_0000
    ioapic_size: int = 0x1000
    lapic_base: int = 0xFEE0_0000
    lapic_size: int = 0x1000
    reserved_hole: tuple[int, int] = (0xFEC0_0000, 0x1_0000_0000)
    kvm_identity_map: int = 0xFFFB_C000  # one page, below the TSS (QEMU's choice)
    kvm_tss: int = 0xFFFB_D000           # three pages
    # Interrupt routing: ISA IRQ0 (the PIT) arrives at IOAPIC pin 2; every other ISA IRQ at the
    # pin of its number (the MADT's interrupt source override says so).
    ioapic_pins: int = 24
    pit_gsi: int = 2
    sci_irq: int = 9
    # The ACPI PM register block (PM1a event, control, timer) at q35's ICH9 PM base; its SCI is
    # ISA IRQ 9 (the "acpi-pm" device below), level-triggered (the MADT says so).
    acpi_pm_base: int = 0x600
    # APIC ID 0xFF is the xAPIC broadcast ID, so an xAPIC machine has at most 255 vCPUs.
    max_vcpus: int = 255
    isa_devices: tuple[IsaDevice, ...] = (
        IsaDevice("serial0", 0x3F8, 8, irq=4),
        IsaDevice("isa-debug-exit", 0xF4, 4),
        IsaDevice("fw_cfg", 0x510, 2),
        IsaDevice("cmos", 0x70, 2, irq=8),
        IsaDevice("i8042-data", 0x60, 1, irq=1),
        IsaDevice("i8042-command", 0x64, 1),
        IsaDevice("post-code", 0x80, 1),
        IsaDevice("port92", 0x92, 1),
        IsaDevice("acpi-pm", 0x600, 12, irq=9),
        # PCI configuration mechanism #1: 0xCF8 CONFIG_ADDRESS, 0xCFC-0xCFF CONFIG_DATA, and in
        # between, at 0xCF9, the PIIX3's reset control register (hvvmm.devices.reset_control),
        # which the configuration ports hand byte accesses at 0xCF9 to (ranges on a bus never
        # overlap). Then fw_cfg's DMA address register (QEMU docs/specs/fw_cfg.rst) and the
        # firmware debug console QEMU calls isa-debugcon (SeaBIOS writes its log there).
        IsaDevice("pci-config", 0xCF8, 8),
        IsaDevice("fw_cfg-dma", 0x514, 8),
        IsaDevice("debugcon", 0x402, 1),
    )
    # PCI bus 0 as QEMU's pc machine has it: the i440FX host bridge at 00.0, the PIIX3 at 01.0,
    # other devices from slot 2 up. PIRQA-D go to these ISA IRQs (SeaBIOS ``pci_irqs``), so a
    # device's INTx reaches the in-kernel PIC and the IOAPIC pin of that number.
    pci_host_bridge_devfn: int = 0x00
    pci_isa_bridge_devfn: int = 0x08
    pci_first_free_slot: int = 2
    pci_irqs: tuple[int, int, int, int] = (10, 10, 11, 11)
    # The firmware image ends at 4 GiB (the reset vector is 16 bytes below), at most 256 KiB so
    # it stays above KVM's TSS; its last 128 KiB also appear at 0xE0000 until the firmware
    # shadows itself into RAM through the PAM registers.
    firmware_end: int = 4 * GiB
    firmware_max_size: int = 256 * KiB
    firmware_low_alias: tuple[int, int] = (0xE_0000, 0x10_0000)
    # The legacy window whose decoding the PAM registers switch between RAM and ROM.
    pam_window: tuple[int, int] = (0xC_0000, 0x10_0000)
    # 64-bit memory BARs may also go above RAM, up to 512 GiB: 39 address bits, which every
    # x86-64 CPU hvvmm runs on has (Intel client parts have exactly 39).
    pci_mmio64_end: int = 1 << 39

    def device(self, name: str) -> IsaDevice:
        for device in self.isa_devices:
            if device.name == name:
                return device
        raise KeyError(name)

    def memory_layout(self, size: int) -> list[tuple[int, int]]:
        """The RAM regions ``(gpa, size)`` for ``size`` bytes of guest memory."""
        low = min(size, self.low_ram_limit)
        regions = [(0, low)]
        if size > low:
            regions.append((self.high_ram_base, size - low))
        return regions

    def pci_mmio_window(self, size: int) -> tuple[int, int]:
        """Where 32-bit memory BARs go for ``size`` bytes of RAM: from the end of low RAM
        (rounded up as SeaBIOS does, ``i440fx_mem_addr_setup``) to the IOAPIC. The e820 map leaves
        this range out, as a PC's does, which tells an OS it is free for devices."""
        low = min(size, self.low_ram_limit)
        start = 2 * GiB if low <= 2 * GiB else self.low_ram_limit
        return start, self.reserved_hole[0]

    def pci_mmio64_window(self, size: int) -> tuple[int, int]:
        """Where 64-bit memory BARs may also go: from the first GiB boundary above RAM (and
        above 4 GiB) to :attr:`pci_mmio64_end`."""
        ram_end = max(gpa + length for gpa, length in self.memory_layout(size))
        start = max(self.high_ram_base, -(-ram_end // GiB) * GiB)
        return start, self.pci_mmio64_end

    def memory_map(self, size: int) -> list[MemoryMapEntry]:
        """The e820 map a PC reports for ``size`` bytes of RAM: the RAM of
        :meth:`memory_layout`, less the EBDA, the legacy hole, the ACPI tables and the BIOS area
        below 1 MiB, and with the interrupt controllers' hole reserved."""
        (_, low), *high = self.memory_layout(size)
        entries = [
            MemoryMapEntry(0, self.ebda_start, E820_RAM),
            MemoryMapEntry(self.ebda_start, self.legacy_hole[0] - self.ebda_start, E820_RESERVED),
            MemoryMapEntry(self.acpi_tables[0], self.acpi_tables[1] - self.acpi_tables[0],
                           E820_ACPI),
            MemoryMapEntry(self.bios_area[0], self.bios_area[1] - self.bios_area[0],
                           E820_RESERVED),
            MemoryMapEntry(1 * MiB, low - 1 * MiB, E820_RAM),
        ]
        entries += [MemoryMapEntry(gpa, length, E820_RAM) for gpa, length in high]
        return entries


PC = PcLayout()
