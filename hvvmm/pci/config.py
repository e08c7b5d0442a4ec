"""One PCI function's type-0 configuration space (PCI Local Bus Specification 3.0, §6.1).

Every write goes through a mask of writable bits, so read-only fields (IDs, class, BAR type bits,
capability lists) cannot be changed by the guest, and a BAR reads back its size mask after the
guest writes all ones (§6.2.5.1). Subclasses react to writes in :meth:`PciFunction.config_written`.
"""

from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..bus import BusDevice

if TYPE_CHECKING:
    from .host import PciBus

CONFIG_SPACE_SIZE = 256

# Header offsets (§6.1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010

HEADER_MULTIFUNCTION = 0x80

BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_MEM_PREFETCH = 0x8


class BarKind(str, enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass
class Bar:
    """A base address register: ``size`` bytes (a power of two) decoded by ``device``."""

    index: int
    kind: BarKind
    size: int
    device: BusDevice
    prefetchable: bool = False
    mapped_at: int | None = None  # where the PCI bus placed it, None when not decoded
    # Called (old address, new address) when the bus moves it: for ioeventfds at fixed offsets.
    on_move: Callable[[int | None, int | None], None] | None = None


class PciFunction:
    """A PCI function's configuration space. ``devfn`` is set when it is plugged into a bus."""

    def __init__(self, name: str, vendor: int, device: int, class_code: int, *,
                 revision: int = 0, subsystem_vendor: int = 0, subsystem: int = 0,
                 interrupt_pin: int = 0, multifunction: bool = False):
        self.name = name
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self.bus: PciBus | None = None
        self.devfn: int | None = None
        self.lock = threading.RLock()
        self._next_capability = FIRST_CAPABILITY
        self._intx_level = False
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        self.config[REVISION_ID] = revision
        self.config[CLASS_PROG:CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.config[HEADER_TYPE] = HEADER_MULTIFUNCTION if multifunction else 0
        struct.pack_into("<HH", self.config, SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self.set_writable(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER
                          | COMMAND_SERR | COMMAND_INTX_DISABLE)
        self.set_writable(0x0C, 1, 0xFF)  # cache line size
        self.set_writable(0x0D, 1, 0xFF)  # latency timer
        self.set_writable(INTERRUPT_LINE, 1, 0xFF)

    # -- construction -------------------------------------------------------------------------

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def add_bar(self, index: int, kind: BarKind, size: int, device: BusDevice, *,
                prefetchable: bool = False) -> Bar:
        """Declare BAR ``index``: its type bits are read-only, its address bits above the size
        are writable (§6.2.5.1). A 64-bit BAR uses the next register too."""
        minimum = 4 if kind is BarKind.IO else 16
        if size < minimum or size & (size - 1):
            raise ValueError(f"{self.name}: BAR{index} size {size:#x} is not a power of two "
                             f">= {minimum}")
        last = index + (1 if kind is BarKind.MEM64 else 0)
        if not 0 <= index <= last <= 5 or any(self.bars[i] for i in range(index, last + 1)):
            raise ValueError(f"{self.name}: BAR{index} is taken or out of range")
        offset = BAR0 + 4 * index
        if kind is BarKind.IO:
            flags, mask = BAR_IO, ~(size - 1) & 0xFFFF_FFFC
        else:
            flags = (BAR_MEM_64 if kind is BarKind.MEM64 else 0) | \
                    (BAR_MEM_PREFETCH if prefetchable else 0)
            mask = ~(size - 1) & 0xFFFF_FFF0
        struct.pack_into("<I", self.config, offset, flags)
        self.set_writable(offset, 4, mask)
        if kind is BarKind.MEM64:
            self.set_writable(offset + 4, 4, (~(size - 1) >> 32) & 0xFFFF_FFFF)
        bar = Bar(index, kind, size, device, prefetchable)
        self.bars[index] = bar
        return bar

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (ID, next pointer, ``body``) to the list; returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SPACE_SIZE:
            raise ValueError(f"{self.name}: no room for capability {cap_id:#x}")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2:offset + length] = body
        if writable is not None:
            self.wmask[offset + 2:offset + 2 + len(writable)] = writable
        # Link it at the end of the list.
        if not self.config[STATUS] & STATUS_CAP_LIST:
            self.config[STATUS] |= STATUS_CAP_LIST
            self.config[CAPABILITY_LIST] = offset
        else:
            link = self.config[CAPABILITY_LIST]
            while self.config[link + 1]:
                link = self.config[link + 1]
            self.config[link + 1] = offset
        self._next_capability = (offset + length + 3) & ~3
        return offset

    # -- configuration access (from the bus) --------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1
        with self.lock:
            return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        with self.lock:
            old = bytes(self.config[offset:offset + size])
            for i in range(size):
                byte = (value >> (8 * i)) & 0xFF
                mask = self.wmask[offset + i]
                self.config[offset + i] = (old[i] & ~mask) | (byte & mask)
            self.config_written(offset, size, old)
        touches = lambda start, length: offset < start + length and start < offset + size  # noqa
        if self.bus is not None and (touches(COMMAND, 2) or touches(BAR0, 24)):
            self.bus.update_mappings(self)
        if touches(COMMAND, 2) and self.bus is not None:
            self.bus.update_intx(self)  # INTx disable may have changed

    def config_written(self, offset: int, size: int, old: bytes) -> None:
        """Called (with the lock held) after a guest write changed configuration space."""

    # -- state ---------------------------------------------------------------------------------

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, COMMAND)[0]

    def bar_address(self, bar: Bar) -> int:
        """The address the guest programmed into ``bar`` (type bits cleared)."""
        offset = BAR0 + 4 * bar.index
        low = struct.unpack_from("<I", self.config, offset)[0]
        if bar.kind is BarKind.IO:
            return low & ~0x3
        address = low & ~0xF
        if bar.kind is BarKind.MEM64:
            address |= struct.unpack_from("<I", self.config, offset + 4)[0] << 32
        return address

    def bar_enabled(self, bar: Bar) -> bool:
        return bool(self.command & (COMMAND_IO if bar.kind is BarKind.IO else COMMAND_MEMORY))

    def reset(self) -> None:
        """Power-on state of the writable registers: BAR addresses, command, interrupt line."""
        with self.lock:
            for offset in range(CONFIG_SPACE_SIZE):
                if self.wmask[offset] and offset not in range(BAR0, BAR0 + 24):
                    self.config[offset] &= ~self.wmask[offset]
            for bar in self.bars:
                if bar is not None:
                    offset = BAR0 + 4 * bar.index
                    struct.pack_into("<I", self.config, offset,
                                     struct.unpack_from("<I", self.config, offset)[0]
                                     & ~struct.unpack_from("<I", self.wmask, offset)[0])
                    if bar.kind is BarKind.MEM64:
                        struct.pack_into("<I", self.config, offset + 4, 0)
            self._intx_level = False
            self.config[STATUS] &= ~STATUS_INTERRUPT
        if self.bus is not None:
            self.bus.update_mappings(self)
            self.bus.update_intx(self)

    # -- INTx ---------------------------------------------------------------------------------

    def set_intx(self, level: bool) -> None:
        """Drive this function's INTx pin; the status register's interrupt bit follows it."""
        with self.lock:
            self._intx_level = level
            if level:
                self.config[STATUS] |= STATUS_INTERRUPT
            else:
                self.config[STATUS] &= ~STATUS_INTERRUPT
        if self.bus is not None:
            self.bus.update_intx(self)

    @property
    def intx_asserted(self) -> bool:
        """The pin's level as the bus sees it (the command register can mask it)."""
        return (self._intx_level and self.config[INTERRUPT_PIN] != 0
                and not self.command & COMMAND_INTX_DISABLE)
