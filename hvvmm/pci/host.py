"""PCI bus 0 and configuration mechanism #1 (PCI Local Bus Specification 3.0, §3.2.2.3.2).

The guest writes ``0x80000000 | bus << 16 | device << 11 | function << 8 | register`` to
CONFIG_ADDRESS (port 0xCF8, dword writes only) and then accesses CONFIG_DATA (0xCFC-0xCFF, byte,
word or dword; the low two address bits come from the port). A function that is absent reads as
all ones. Port 0xCF9, inside the window, is the PIIX3's reset control register: the ports pass
byte accesses there to it (:mod:`hvvmm.devices.reset_control`), since configuration mechanism #1
decodes only dword accesses at 0xCF8.

The bus places each function's BARs on the port-I/O or MMIO bus while the command register enables
decoding and the address is a valid one (not zero, no wrap, inside a memory window for memory BARs;
QEMU ``pci_bar_address``), and routes INTx through ``route_intx`` (the PIIX3's PIRQ routing).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..bus import Bus, BusDevice, BusError
from ..logonce import LogOnce
from .config import BarKind, PciFunction

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORT_COUNT = 8
CONFIG_ENABLE = 0x8000_0000
RESET_CONTROL_OFFSET = 1  # 0xCF9


class PciBus:
    """Bus 0: up to 32 devices of 8 functions each, addressed by ``devfn`` (device << 3 | fn)."""

    def __init__(self, pio: Bus, mmio: Bus, *, mmio_window: tuple[int, int],
                 mmio64_window: tuple[int, int] | None = None,
                 route_intx: Callable[[int, int, bool], None] | None = None):
        """``mmio_window`` is ``(start, end)`` of the addresses memory BARs may decode (and
        ``mmio64_window`` another one for 64-bit BARs);
        ``route_intx(devfn, pin, level)`` delivers a function's INTx pin (1 = INTA#)."""
        self.functions: dict[int, PciFunction] = {}
        self._pio = pio
        self._mmio = mmio
        self._mmio_window = mmio_window
        self._mmio64_window = mmio64_window
        self.route_intx = route_intx
        self._lock = threading.RLock()
        self._log_once = LogOnce(log)

    def plug(self, devfn: int, function: PciFunction) -> None:
        if not 0 <= devfn < 256 or devfn in self.functions:
            raise ValueError(f"PCI slot {devfn >> 3}.{devfn & 7} is taken or invalid")
        function.bus, function.devfn = self, devfn
        self.functions[devfn] = function

    def read(self, bus: int, devfn: int, register: int, size: int) -> int:
        function = self.functions.get(devfn) if bus == 0 else None
        if function is None:
            return (1 << (8 * size)) - 1
        return function.config_read(register, size)

    def write(self, bus: int, devfn: int, register: int, size: int, value: int) -> None:
        function = self.functions.get(devfn) if bus == 0 else None
        if function is not None:
            function.config_write(register, size, value)

    # -- BAR placement ------------------------------------------------------------------------

    def _valid(self, kind: BarKind, address: int, size: int) -> bool:
        if address == 0:
            return False
        if kind is BarKind.IO:
            return address + size <= 0x10000
        windows = [self._mmio_window]
        if kind is BarKind.MEM64 and self._mmio64_window is not None:
            windows.append(self._mmio64_window)
        return any(start <= address and address + size <= end for start, end in windows)

    def update_mappings(self, function: PciFunction) -> None:
        """Put ``function``'s BARs where its configuration space says, or take them off."""
        with self._lock:
            for bar in function.bars:
                if bar is None:
                    continue
                address = function.bar_address(bar)
                wanted = address if (function.bar_enabled(bar)
                                     and self._valid(bar.kind, address, bar.size)) else None
                if wanted == bar.mapped_at:
                    continue
                old = bar.mapped_at
                target = self._pio if bar.kind is BarKind.IO else self._mmio
                if bar.mapped_at is not None:
                    target.unregister(bar.mapped_at)
                    bar.mapped_at = None
                if wanted is not None:
                    try:
                        target.register(wanted, bar.size, bar.device,
                                        f"{function.name}-bar{bar.index}")
                    except BusError as exc:  # the guest placed two BARs on each other
                        self._log_once(("overlap", function.name, bar.index), logging.WARNING,
                                       "PCI %s BAR%d not decoded: %s", function.name, bar.index,
                                       exc)
                    else:
                        bar.mapped_at = wanted
                if bar.on_move is not None and bar.mapped_at != old:
                    bar.on_move(old, bar.mapped_at)

    def update_intx(self, function: PciFunction) -> None:
        if self.route_intx is None or function.devfn is None:
            return
        pin = function.config[0x3D]
        if pin:
            self.route_intx(function.devfn, pin, function.intx_asserted)

    def reset(self) -> None:
        for function in self.functions.values():
            function.reset()


class PciConfigPorts:
    """The BusDevice at 0xCF8-0xCFF: CONFIG_ADDRESS, the reset control byte, CONFIG_DATA."""

    def __init__(self, bus: PciBus, reset_control: BusDevice | None = None):
        self._bus = bus
        self._address = 0
        self._reset_control = reset_control
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self._address
        if offset == RESET_CONTROL_OFFSET and size == 1 and self._reset_control is not None:
            return self._reset_control.read(0, 1)
        if offset >= 4:
            with self._lock:
                address = self._address
            if not address & CONFIG_ENABLE:
                return (1 << (8 * size)) - 1
            register = (address & 0xFC) + (offset - 4)
            return self._bus.read((address >> 16) & 0xFF, (address >> 8) & 0xFF, register, size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            with self._lock:
                self._address = value & 0x80FF_FFFC
        elif offset == RESET_CONTROL_OFFSET and size == 1:
            if self._reset_control is not None:
                self._reset_control.write(0, 1, value)
        elif offset >= 4:
            with self._lock:
                address = self._address
            if address & CONFIG_ENABLE:
                register = (address & 0xFC) + (offset - 4)
                self._bus.write((address >> 16) & 0xFF, (address >> 8) & 0xFF, register, size,
                                value)
