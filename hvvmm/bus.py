"""Port-I/O and MMIO buses: devices claim address ranges, accesses are routed by address.

A device is a plain object with ``read(offset, size) -> int`` and ``write(offset, size, value)``
(:class:`BusDevice`); ``offset`` is relative to the base it was registered at, so a device never
needs to know where it sits. The whole access must fit inside one device's range (as vm-device's
``check_access``); ranges never overlap. An access nobody claims reads as all ones and is logged once
per address, because the guest decides how often it happens.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from .logonce import LogOnce

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """What a bus needs from a device. ``size`` is 1, 2, 4 or 8 bytes; values are little-endian."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine(Protocol):
    """An interrupt line a device drives; the VM wires it to the in-kernel PIC/IOAPIC."""

    def set_level(self, level: bool) -> None: ...


class BusError(Exception):
    pass


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.length


class Bus:
    """A set of non-overlapping address ranges, each owned by one device."""

    def __init__(self, name: str, address_limit: int):
        self.name = name
        self.address_limit = address_limit
        self._log_once = LogOnce(log)  # the guest picks the addresses: bounded memory
        # One snapshot (sorted bases, their ranges, a cache address -> range), replaced whole
        # when a device is added or removed: vCPU threads route accesses while the host may
        # register devices, and a lookup must never mix two versions. The cache is filled on
        # first use; a guest hits few distinct addresses, so most accesses cost one dict lookup.
        self._table: tuple[list[int], list[BusRange], dict[int, BusRange | None]] = ([], [], {})
        self._lock = threading.Lock()  # serializes writers only
        self._route_caches: list[dict] = []  # route_cache(): emptied by every change

    def register(self, base: int, length: int, device: BusDevice, name: str | None = None) -> None:
        """Give ``device`` the addresses ``[base, base+length)``; overlaps are refused."""
        name = name or type(device).__name__
        if length <= 0 or base < 0 or base + length > self.address_limit:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x} for {name}")
        with self._lock:
            ranges = self._table[1]
            for other in ranges:
                if base < other.end and other.base < base + length:
                    raise BusError(f"{self.name}: {name} at {base:#x}+{length:#x} overlaps "
                                   f"{other.name} at {other.base:#x}+{other.length:#x}")
            self._publish(sorted([*ranges, BusRange(base, length, device, name)],
                                 key=lambda r: r.base))

    def unregister(self, base: int) -> None:
        with self._lock:
            ranges = [r for r in self._table[1] if r.base != base]
            if len(ranges) == len(self._table[1]):
                raise BusError(f"{self.name}: nothing registered at {base:#x}")
            self._publish(ranges)

    def _publish(self, ranges: list[BusRange]) -> None:
        self._table = ([r.base for r in ranges], ranges, {})
        for cache in self._route_caches:
            cache.clear()

    # -- routes: a run loop's shortcut past find() for the accesses it sees often -------------

    def route_cache(self) -> dict:
        """An empty dict for :meth:`cache_route`, emptied whenever a device is added or
        removed. One per thread that fills it."""
        cache: dict = {}
        self._route_caches.append(cache)
        return cache

    def cache_route(self, cache: dict, key, address: int, size: int, write: bool) -> None:
        """Put the device access ``[address, address+size)`` in ``cache`` under ``key``:
        ``route(value)`` for a write, ``route()`` for a read, the device's own method with its
        offset bound (no bus frames). An access no device holds gets None: its caller answers
        it as :meth:`read`/:meth:`write` do (all ones, or nothing) without calling Python
        (call this after :meth:`read`/:meth:`write` have logged it: they log an address once).
        At most 4096 routes (the guest picks the addresses)."""
        if len(cache) >= 4096:
            return
        table = self._table
        entry = self.find(address, size)
        if entry is None:
            cache[key] = None
        else:
            device = entry.device
            cache[key] = functools.partial(device.write if write else device.read,
                                           address - entry.base, size)
        if self._table is not table:  # a device changed meanwhile: it may have been cleared
            cache.pop(key, None)

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return tuple(self._table[1])

    def find(self, address: int, size: int = 1) -> BusRange | None:
        """The range that holds the whole access ``[address, address+size)``, if any."""
        bases, ranges, cache = self._table
        try:
            entry = cache[address]
        except KeyError:
            index = bisect.bisect(bases, address) - 1
            entry = ranges[index] if index >= 0 and address < ranges[index].end else None
            if len(cache) < 4096:  # bounded: the guest chooses the addresses
                cache[address] = entry
        if entry is not None and address + size <= entry.end:
            return entry
        return None

    def read(self, address: int, size: int) -> int:
        entry = self.find(address, size)
        if entry is None:
            self._log_unhandled("read", address, size)
            return (1 << (8 * size)) - 1
        return entry.device.read(address - entry.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        entry = self.find(address, size)
        if entry is None:
            self._log_unhandled("write", address, size, value)
            return
        entry.device.write(address - entry.base, size, value)

    def _log_unhandled(self, kind: str, address: int, size: int, value: int | None = None) -> None:
        detail = "" if value is None else f" value {value:#x}"
        self._log_once((kind, address), logging.INFO, "%s: unhandled %s of %d byte(s) at %#x%s",
                       self.name, kind, size, address, detail)


def pio_bus() -> Bus:
    return Bus("pio", 0x10000)


def mmio_bus() -> Bus:
    return Bus("mmio", 1 << 52)
