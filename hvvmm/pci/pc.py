"""PCI bus 0 of a PC, placed from the layout table: configuration ports, the i440FX host bridge,
the PIIX3 and its PIRQ routing, and free slots for devices."""

from __future__ import annotations

from typing import Callable

from ..bus import Bus, BusDevice, IrqLine
from ..layout import PC
from .config import PciFunction
from .host import PciBus, PciConfigPorts
from .i440fx import PAM0, PAM_REGISTERS, I440fxHostBridge, PamSegment, Piix3IsaBridge


class PcPci:
    def __init__(self, pio: Bus, mmio: Bus, memory_size: int, isa_irq: Callable[[int], IrqLine],
                 *, reset_control: BusDevice | None = None,
                 on_pam_change: Callable[[list[PamSegment]], None] | None = None,
                 pam_ram: bool = True):
        """``pam_ram``: start with 0xC0000-0xFFFFF decoded as RAM (a direct kernel boot, where no
        firmware shadows itself); False gives the power-on state a BIOS expects."""
        self.isa_bridge = Piix3IsaBridge(isa_irq)
        self.bus = PciBus(pio, mmio, mmio_window=PC.pci_mmio_window(memory_size),
                          mmio64_window=PC.pci_mmio64_window(memory_size),
                          route_intx=self.isa_bridge.route_intx)
        self.host_bridge = I440fxHostBridge(on_pam_change)
        if pam_ram:
            self.host_bridge.config[PAM0] = 0x30
            self.host_bridge.config[PAM0 + 1:PAM0 + PAM_REGISTERS] = b"\x33" * (PAM_REGISTERS - 1)
        self.bus.plug(PC.pci_host_bridge_devfn, self.host_bridge)
        self.bus.plug(PC.pci_isa_bridge_devfn, self.isa_bridge)
        self.config_ports = PciConfigPorts(self.bus, reset_control)
        slot = PC.device("pci-config")
        pio.register(slot.port, slot.ports, self.config_ports, slot.name)
        self._next_slot = PC.pci_first_free_slot

    def add(self, function: PciFunction) -> int:
        """Plug ``function`` into the next free slot; returns the slot number."""
        slot = self._next_slot
        if slot > 31:
            raise ValueError("no free PCI slot")
        self.bus.plug(slot << 3, function)
        self._next_slot += 1
        return slot

    def route_pirqs_as_firmware_would(self) -> None:
        """For a boot without firmware: program PIRQA-D as SeaBIOS does (``pci_irqs``)."""
        for pirq, irq in enumerate(PC.pci_irqs):
            self.isa_bridge.config_write(0x60 + pirq, 1, irq)

    def reset(self) -> None:
        self.bus.reset()
