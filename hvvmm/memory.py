"""Guest-physical memory: RAM regions, every access bounds-checked.

This module knows nothing about KVM. A region is any writable buffer (an anonymous ``mmap`` for a
real VM, a ``bytearray`` in unit tests) placed at a guest-physical address. The KVM layer registers
the same buffers as memslots, so a host write here is immediately visible to the guest.

Every guest-supplied address goes through :meth:`GuestMemory.view`: an access that is not wholly
inside one region raises :class:`GuestMemoryError` (never a segfault, never a silent wrap).
"""

from __future__ import annotations

import bisect
import mmap
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

PAGE_SIZE = 4096
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAX_GPA = 1 << 52  # x86-64 MAXPHYADDR architectural limit
_FILL_CHUNK = 1 << 20


class GuestMemoryError(Exception):
    """A guest-physical access that is not wholly backed by RAM."""

    def __init__(self, gpa: int, size: int, reason: str = "not backed by guest RAM"):
        self.gpa = gpa
        self.size = size
        super().__init__(f"guest-physical access {gpa:#x}+{size:#x}: {reason}")


@dataclass(frozen=True)
class MemoryRegion:
    """``size`` bytes of guest RAM at guest-physical ``gpa``, backed by ``buffer``."""

    gpa: int
    buffer: bytearray | mmap.mmap
    name: str = "ram"

    @property
    def size(self) -> int:
        return len(self.buffer)

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.gpa + len(self.buffer)


class GuestMemory:
    """The guest's RAM as a set of non-overlapping regions."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()):
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._views: list[memoryview] = []
        for region in regions:
            self.add_region(region)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]]) -> "GuestMemory":
        """RAM from anonymous private mappings, one per ``(gpa, size)`` in ``layout``."""
        memory = cls()
        try:
            for index, (gpa, size) in enumerate(layout):
                buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
                if hasattr(buffer, "madvise") and hasattr(mmap, "MADV_DONTFORK"):
                    # A fork (e.g. subprocess) must not copy or share guest RAM.
                    buffer.madvise(mmap.MADV_DONTFORK)
                memory.add_region(MemoryRegion(gpa, buffer, f"ram{index}"))
        except BaseException:
            memory.close()
            raise
        return memory

    @classmethod
    def from_bytes(cls, size: int, gpa: int = 0) -> "GuestMemory":
        """A single zeroed ``bytearray`` region: the fake guest memory of unit tests."""
        return cls([MemoryRegion(gpa, bytearray(size))])

    def add_region(self, region: MemoryRegion) -> None:
        if region.size <= 0 or region.gpa < 0 or region.end > _MAX_GPA:
            raise ValueError(f"bad memory region {region.gpa:#x}+{region.size:#x}")
        if region.gpa % PAGE_SIZE or region.size % PAGE_SIZE:
            raise ValueError(f"memory region {region.gpa:#x}+{region.size:#x} is not page aligned")
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise ValueError(f"memory region {region.gpa:#x}+{region.size:#x} overlaps "
                                 f"{other.name} at {other.gpa:#x}+{other.size:#x}")
        index = bisect.bisect(self._starts, region.gpa)
        self._regions.insert(index, region)
        self._starts.insert(index, region.gpa)
        self._views.insert(index, memoryview(region.buffer))

    def close(self) -> None:
        """Release the views and unmap anonymous regions. The object is empty afterwards."""
        for view in self._views:
            view.release()
        for region in self._regions:
            if isinstance(region.buffer, mmap.mmap):
                region.buffer.close()
        self._regions.clear()
        self._starts.clear()
        self._views.clear()

    # -- queries ------------------------------------------------------------------------------

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(region.size for region in self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def _find(self, gpa: int, size: int) -> tuple[int, int]:
        """Index of the region holding ``[gpa, gpa+size)`` and the offset of ``gpa`` in it."""
        if size < 0 or gpa < 0:
            raise GuestMemoryError(gpa, size, "negative address or length")
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0:
            region = self._regions[index]
            offset = gpa - region.gpa
            if offset + size <= region.size:
                return index, offset
        raise GuestMemoryError(gpa, size)

    def window_at_zero(self) -> tuple[memoryview | None, int]:
        """The region that starts at GPA 0 as ``(view, size)``, for a hot path that checks
        ``gpa + length <= size`` itself (gpa >= 0) and falls back to :meth:`view` beyond it;
        ``(None, 0)`` when no region starts there. The view is released by :meth:`close`."""
        if self._starts and self._starts[0] == 0:
            return self._views[0], self._regions[0].size
        return None, 0

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Whether ``[gpa, gpa+size)`` lies wholly inside one RAM region."""
        try:
            self._find(gpa, size)
        except GuestMemoryError:
            return False
        return True

    # -- access -------------------------------------------------------------------------------

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``gpa``; raises unless wholly backed."""
        index, offset = self._find(gpa, size)
        return self._views[index][offset:offset + size]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        view = self.view(gpa, size)
        # In slices: a guest-given size may be gigabytes, which must not become a host buffer.
        pattern = bytes([byte]) * min(size, _FILL_CHUNK)
        for start in range(0, size, _FILL_CHUNK):
            end = min(start + _FILL_CHUNK, size)
            view[start:end] = pattern[:end - start]

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self.view(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value & 0xFFFF_FFFF_FFFF_FFFF)
