"""Fakes for the hvvmm.x86 tests: a register file in each paging mode and hand-built page
tables in bytearray guest memory."""

from __future__ import annotations

from hvvmm.memory import GuestMemory
from hvvmm.x86.paging import PS, RW, US, P
from hvvmm.x86.state import (CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_OSFXSR, CR4_PAE,
                             CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE, CpuState, Segment)

MEMORY_SIZE = 4 << 20
TABLES = 0x100000  # page tables are allocated from here up


def long_mode_state(**overrides) -> CpuState:
    """64-bit mode, 4-level paging, CPL 0, CR0.WP, EFER.NXE."""
    segments = {name: Segment() for name in ("es", "ss", "ds", "fs", "gs")}
    segments["cs"] = Segment(db=False, long=True, type=0xB)
    state = CpuState(segments=segments)
    for name, value in overrides.items():
        setattr(state, name, value)
    return state


def protected_state(pae: bool = False, paging: bool = True, **overrides) -> CpuState:
    """32-bit protected mode, flat segments; non-PAE (with PSE), PAE, or paging off."""
    segments = {name: Segment() for name in ("es", "cs", "ss", "ds", "fs", "gs")}
    state = CpuState(segments=segments, efer=0,
                     cr0=CR0_PE | CR0_NE | CR0_WP | (CR0_PG if paging else 0),
                     cr4=CR4_OSFXSR | (CR4_PAE if pae else CR4_PSE))
    for name, value in overrides.items():
        setattr(state, name, value)
    return state


class PageTables:
    """Builds page tables in ``memory`` for ``mode``: "long4", "long5", "pae" or "legacy32"."""

    def __init__(self, memory: GuestMemory, mode: str = "long4"):
        self.memory = memory
        self.mode = mode
        self.next_free = TABLES
        self.root = self._alloc()

    def _alloc(self) -> int:
        page = self.next_free
        self.next_free += 4096
        self.memory.fill(page, 4096)
        return page

    @property
    def cr3(self) -> int:
        return self.root

    def _entry_size(self) -> int:
        return 4 if self.mode == "legacy32" else 8

    def _get(self, gpa: int) -> int:
        return int.from_bytes(self.memory.read(gpa, self._entry_size()), "little")

    def _set(self, gpa: int, value: int) -> None:
        self.memory.write(gpa, value.to_bytes(self._entry_size(), "little"))

    def _next(self, table: int, index: int, flags: int = P | RW | US) -> int:
        slot = table + index * self._entry_size()
        entry = self._get(slot)
        if not entry & P:
            entry = self._alloc() | flags
            self._set(slot, entry)
        return entry & ~0xFFF & ((1 << 52) - 1)

    def slot(self, linear: int, level: int) -> int:
        """GPA of the entry that maps ``linear`` at ``level`` (1 = PTE), creating tables."""
        if self.mode == "legacy32":
            if level == 2:
                return self.root + (linear >> 22) * 4
            return self._next(self.root, linear >> 22) + ((linear >> 12) & 0x3FF) * 4
        if self.mode == "pae":
            directory = self._next(self.root, (linear >> 30) & 3, P)
            if level == 2:
                return directory + ((linear >> 21) & 0x1FF) * 8
            return self._next(directory, (linear >> 21) & 0x1FF) + ((linear >> 12) & 0x1FF) * 8
        levels = 5 if self.mode == "long5" else 4
        table = self.root
        for current in range(levels, level, -1):
            table = self._next(table, (linear >> (12 + 9 * (current - 1))) & 0x1FF)
        return table + ((linear >> (12 + 9 * (level - 1))) & 0x1FF) * 8

    def map(self, linear: int, physical: int, flags: int = P | RW, level: int = 1) -> int:
        """Map one page (level 1: 4 KiB; 2: 2 MiB/4 MiB; 3: 1 GiB) and return the entry's GPA."""
        slot = self.slot(linear, level)
        self._set(slot, physical | flags | (PS if level > 1 else 0))
        return slot

    def entry(self, slot: int) -> int:
        return self._get(slot)


def paged_memory(mode: str = "long4") -> tuple[GuestMemory, PageTables]:
    memory = GuestMemory.from_bytes(MEMORY_SIZE)
    return memory, PageTables(memory, mode)


def state_for(tables: PageTables, **overrides) -> CpuState:
    if tables.mode in ("long4", "long5"):
        state = long_mode_state(**overrides)
        if tables.mode == "long5":
            state.cr4 |= CR4_LA57
    else:
        state = protected_state(pae=tables.mode == "pae", **overrides)
    state.cr3 = tables.cr3
    return state


__all__ = ["long_mode_state", "protected_state", "PageTables", "paged_memory", "state_for",
           "EFER_LMA", "EFER_LME", "EFER_NXE", "P", "RW", "US"]
