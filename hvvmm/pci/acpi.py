"""PCI bus 0 in the DSDT: the host bridge ``\\_SB.PCI0`` and its interrupt links.

``PCI0`` (``PNP0A03``, ACPI 6.5 §6.1.5 and PCI Firmware Specification 3.2 §4.1) decodes bus
numbers 0-255, the I/O ports other than the configuration ports, the VGA window and the PCI
memory windows of the layout table (:meth:`hvvmm.layout.PcLayout.pci_mmio_window`, the hole the
e820 map leaves out below 4 GiB, and the 64-bit one above RAM). Its ``_PRT`` (§6.2.13) routes
each slot's INTA-INTD to the link devices ``LNKA``-``LNKD`` with the PIIX3's swizzle, and each
link (``PNP0C0F``) reports the
one ISA IRQ that PIRQ is routed to (the layout's ``pci_irqs``, as firmware programs it) as a
level-triggered, active-high, shared interrupt: KVM drives the line high while a device asserts
INTx, as QEMU's links describe it. ``_SRS`` accepts the only choice and changes nothing.
"""

from __future__ import annotations

from ..acpi import aml
from ..layout import PcLayout
from .i440fx import Piix3IsaBridge

LINK_NAMES = ("LNKA", "LNKB", "LNKC", "LNKD")


def link_devices(layout: PcLayout) -> list[aml.Term]:
    links: list[aml.Term] = []
    for index, irq in enumerate(layout.pci_irqs):
        resources = aml.ResourceTemplate(aml.Interrupt(irq, level=True, active_low=False,
                                                       shared=True))
        links.append(aml.Device(
            LINK_NAMES[index], aml.Name("_HID", aml.EisaId("PNP0C0F")), aml.Name("_UID", index),
            aml.Name("_PRS", resources), aml.Name("_CRS", resources),
            aml.Method("_SRS", 1), aml.Method("_DIS", 0)))
    return links


def routing_table() -> aml.Package:
    """``_PRT``: {address (slot << 16 | 0xFFFF: any function), pin (0 = INTA), source, 0}."""
    entries = []
    for slot in range(1, 32):
        for pin in range(4):
            pirq = Piix3IsaBridge.pirq_of(slot << 3, pin + 1)
            entries.append(aml.Package(aml.DWord(slot << 16 | 0xFFFF), pin,
                                       aml.NameString(LINK_NAMES[pirq]), 0))
    return aml.Package(*entries)


def host_bridge(layout: PcLayout, memory_size: int) -> aml.Device:
    start, end = layout.pci_mmio_window(memory_size)
    start64, end64 = layout.pci_mmio64_window(memory_size)
    config = layout.device("pci-config")
    resources = aml.ResourceTemplate(
        aml.WordBusNumber(0x00, 0xFF),
        aml.IO(config.port, config.port, 1, config.ports),
        aml.WordIO(0x0000, config.port - 1),
        aml.WordIO(config.port + config.ports, 0xFFFF),
        aml.DWordMemory(layout.legacy_hole[0], 0xB_FFFF, cacheability=aml.MEM_CACHEABLE),
        aml.DWordMemory(start, end - 1),
        aml.QWordMemory(start64, end64 - 1, cacheability=aml.MEM_PREFETCHABLE))
    return aml.Device("PCI0", aml.Name("_HID", aml.EisaId("PNP0A03")), aml.Name("_ADR", 0),
                      aml.Name("_UID", 0), aml.Name("_CRS", resources),
                      aml.Name("_PRT", routing_table()))


def pci_dsdt_devices(layout: PcLayout, memory_size: int) -> list[aml.Term]:
    """The devices to add under ``\\_SB`` for PCI bus 0."""
    return [host_bridge(layout, memory_size), *link_devices(layout)]
