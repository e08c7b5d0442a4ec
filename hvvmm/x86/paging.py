"""Guest linear-to-physical translation and guest memory access through it.

Paging modes (SDM vol. 3A chapter 4): paging off (CR0.PG = 0), 32-bit paging (4 KiB pages and,
with CR4.PSE, 4 MiB pages with PSE-36 high bits), PAE paging (CR4.PAE, the four PDPTEs read from
memory at CR3 -- the CPU caches them at CR3 load, and guests do not change them behind a CR3
write), 4-level and 5-level paging (EFER.LMA, CR4.LA57) with 2 MiB and 1 GiB pages.

Access rights are checked as the CPU does (SDM vol. 3A 4.6): R/W and U/S of every level, CR0.WP
for supervisor writes, SMAP (CR4.SMAP, unless RFLAGS.AC for an explicit supervisor access),
SMEP and NX for fetches, reserved bits (XD without EFER.NXE, PS in a PML4E/PML5E, the reserved
low bits of large pages). A failed walk is a :class:`~hvvmm.x86.state.GuestFault` #PF with the
architectural error code (SDM vol. 3A 4.7) and CR2. A successful walk sets the accessed bits and,
for a write, the dirty bit, as the CPU would. Protection keys are not checked.

Memory that is not guest RAM (MMIO, a hole) -- for page tables or for the operand -- raises
:class:`~hvvmm.x86.state.CannotComplete`: hvvmm does not route completed instructions' accesses
to devices.
"""

from __future__ import annotations

from typing import Protocol

from .state import (AC, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMAP, CR4_SMEP,
                    EFER_NXE, GP_VECTOR, PF_VECTOR, SS_VECTOR, CannotComplete, CpuState,
                    GuestFault)

PAGE_SIZE = 4096

# Page-table entry bits.
P, RW, US, PWT, PCD, A, D, PS = (1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7)
XD = 1 << 63
_ADDRESS_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12

# #PF error code bits (SDM vol. 3A figure 4-12).
PFEC_PRESENT, PFEC_WRITE, PFEC_USER, PFEC_RSVD, PFEC_FETCH = 1, 2, 4, 8, 16


class PhysicalMemory(Protocol):
    """What the walk needs from guest RAM (:class:`hvvmm.memory.GuestMemory` fits)."""

    def view(self, gpa: int, size: int) -> memoryview: ...


def _read_entry(memory: PhysicalMemory, gpa: int, size: int) -> int:
    try:
        return int.from_bytes(memory.view(gpa, size), "little")
    except Exception as exc:  # GuestMemoryError or any bounds error of a fake
        raise CannotComplete(f"a guest page-table entry at {gpa:#x} is not in RAM") from exc


def _write_entry(memory: PhysicalMemory, gpa: int, size: int, value: int) -> None:
    memory.view(gpa, size)[:] = value.to_bytes(size, "little")


def canonical(address: int, bits: int = 48) -> bool:
    top = address >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def translate(state: CpuState, memory: PhysicalMemory, linear: int, *, write: bool = False,
              fetch: bool = False, user: bool | None = None, implicit: bool = False) -> int:
    """The guest-physical address of ``linear`` for this access. ``user`` defaults to CPL 3;
    ``implicit`` marks supervisor accesses to system structures (SMAP ignores RFLAGS.AC)."""
    if user is None:
        user = state.cpl == 3
    if not state.cr0 & CR0_PG:
        return linear if state.long_mode else linear & 0xFFFF_FFFF
    walk = _Walk(state, memory, linear, write, fetch, user, implicit)
    if state.long_mode:
        return walk.long_mode(5 if state.cr4 & CR4_LA57 else 4)
    if state.cr4 & CR4_PAE:
        return walk.pae()
    return walk.legacy32()


class _Walk:
    def __init__(self, state: CpuState, memory: PhysicalMemory, linear: int, write: bool,
                 fetch: bool, user: bool, implicit: bool):
        self.state = state
        self.memory = memory
        self.linear = linear
        self.write = write
        self.fetch = fetch
        self.user = user
        self.implicit = implicit
        self.nxe = bool(state.efer & EFER_NXE)
        self.entries: list[tuple[int, int, int]] = []  # (gpa, size, value) of each level

    def fault(self, present: bool, reserved: bool = False) -> GuestFault:
        code = (PFEC_PRESENT if present else 0) | (PFEC_WRITE if self.write else 0) | \
            (PFEC_USER if self.user else 0) | (PFEC_RSVD if reserved else 0)
        if self.fetch and (self.nxe or self.state.cr4 & CR4_SMEP):
            code |= PFEC_FETCH
        kind = "reserved bit set" if reserved else "protection" if present else "not present"
        return GuestFault(PF_VECTOR, code, self.linear,
                          f"page fault at {self.linear:#x} ({kind}, error code {code:#x})")

    def entry(self, gpa: int, size: int = 8) -> int:
        value = _read_entry(self.memory, gpa, size)
        if not value & P:
            raise self.fault(False)
        if size == 8 and value & XD and not self.nxe:
            raise self.fault(True, reserved=True)
        self.entries.append((gpa, size, value))
        return value

    def finish(self, physical: int) -> int:
        """Check the rights accumulated over the levels, then set the A/D bits."""
        rw = all(value & RW for _, _, value in self.entries)
        us = all(value & US for _, _, value in self.entries)
        xd = any(value & XD for _, size, value in self.entries if size == 8) and self.nxe
        state = self.state
        if self.user:
            if not us or (self.write and not rw):
                raise self.fault(True)
            if self.fetch and xd:
                raise self.fault(True)
        else:
            if self.write and not rw and state.cr0 & CR0_WP:
                raise self.fault(True)
            if us:
                if self.fetch and state.cr4 & CR4_SMEP:
                    raise self.fault(True)
                if (not self.fetch and state.cr4 & CR4_SMAP
                        and (self.implicit or not state.rflags & AC)):
                    raise self.fault(True)
            if self.fetch and xd:
                raise self.fault(True)
        last = len(self.entries) - 1
        for level, (gpa, size, value) in enumerate(self.entries):
            new = value | A | (D if self.write and level == last else 0)
            if new != value:
                _write_entry(self.memory, gpa, size, new)
        return physical

    def long_mode(self, levels: int) -> int:
        linear = self.linear
        table = self.state.cr3 & _ADDRESS_MASK
        for level in range(levels, 0, -1):  # 5/4 = PML5/PML4, 3 = PDPT, 2 = PD, 1 = PT
            shift = 12 + 9 * (level - 1)
            value = self.entry(table + ((linear >> shift) & 0x1FF) * 8)
            if level >= 4 and value & PS:
                raise self.fault(True, reserved=True)
            if level in (2, 3) and value & PS:
                size = 1 << shift
                if value & ((size - 1) & ~0x1FFF):  # bits shift-1:13 are reserved (12 is PAT)
                    raise self.fault(True, reserved=True)
                return self.finish((value & _ADDRESS_MASK & ~(size - 1)) | (linear & (size - 1)))
            table = value & _ADDRESS_MASK
        return self.finish(table | (linear & 0xFFF))

    def pae(self) -> int:
        linear = self.linear & 0xFFFF_FFFF
        pdpte = _read_entry(self.memory, (self.state.cr3 & 0xFFFF_FFE0) + (linear >> 30) * 8, 8)
        if not pdpte & P:
            raise self.fault(False)
        # PDPTEs carry no R/W, U/S or XD (SDM vol. 3A 4.4.1): not part of the rights check.
        directory = pdpte & _ADDRESS_MASK
        pde = self.entry(directory + ((linear >> 21) & 0x1FF) * 8)
        if pde & PS:
            if pde & 0x1FE000:
                raise self.fault(True, reserved=True)
            return self.finish((pde & _ADDRESS_MASK & ~0x1FFFFF) | (linear & 0x1FFFFF))
        pte = self.entry((pde & _ADDRESS_MASK) + ((linear >> 12) & 0x1FF) * 8)
        return self.finish((pte & _ADDRESS_MASK) | (linear & 0xFFF))

    def legacy32(self) -> int:
        linear = self.linear & 0xFFFF_FFFF
        pde = self.entry((self.state.cr3 & 0xFFFF_F000) + (linear >> 22) * 4, 4)
        if pde & PS and self.state.cr4 & CR4_PSE:
            # 4 MiB page; PDE bits 20:13 are physical-address bits 39:32 (PSE-36).
            high = ((pde >> 13) & 0xFF) << 32
            return self.finish(high | (pde & 0xFFC0_0000) | (linear & 0x3F_FFFF))
        pte = self.entry((pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4, 4)
        return self.finish((pte & 0xFFFF_F000) | (linear & 0xFFF))


class GuestMemoryAccess:
    """Reads and writes of guest *linear* memory for one completion: segmentation, the
    canonical check, the walk for each page touched, and RAM bounds."""

    def __init__(self, state: CpuState, memory: PhysicalMemory):
        self.state = state
        self.memory = memory

    def linear_address(self, segment: str, offset: int, size: int, address_size: int) -> int:
        """``segment:offset`` as a linear address; #GP(0) (#SS(0) for SS) if not canonical in
        64-bit mode. In 64-bit mode only FS and GS have a base (SDM vol. 3A 3.2.4). Segment
        limits are not checked outside 64-bit mode (flat segments are what guests use)."""
        state = self.state
        offset &= (1 << (8 * address_size)) - 1
        if state.mode.long64:
            base = state.segments[segment].base if segment in ("fs", "gs") else 0
            linear = (base + offset) & ((1 << 64) - 1)
            bits = 57 if state.cr4 & CR4_LA57 else 48
            last = (linear + size - 1) & ((1 << 64) - 1)
            if not canonical(linear, bits) or not canonical(last, bits):
                vector = SS_VECTOR if segment == "ss" else GP_VECTOR
                raise GuestFault(vector, 0, why=f"non-canonical address {linear:#x}")
            return linear
        return (state.segments[segment].base + offset) & 0xFFFF_FFFF

    def _pieces(self, linear: int, size: int, write: bool) -> list[tuple[int, int]]:
        """(gpa, length) of each page the access touches; all translated before any byte moves,
        so a fault on the second page leaves memory untouched."""
        pieces = []
        while size:
            length = min(size, PAGE_SIZE - (linear & 0xFFF))
            gpa = translate(self.state, self.memory, linear, write=write)
            pieces.append((gpa, length))
            linear += length
            size -= length
        return pieces

    def check_writable(self, linear: int, size: int) -> None:
        """Fault now (#PF) if ``size`` bytes at ``linear`` could not be written."""
        for gpa, length in self._pieces(linear, size, True):
            self._view(gpa, length)

    def _view(self, gpa: int, length: int) -> memoryview:
        try:
            return self.memory.view(gpa, length)
        except Exception as exc:
            raise CannotComplete(f"the operand at guest-physical {gpa:#x} is not RAM") from exc

    def read(self, linear: int, size: int) -> bytes:
        return b"".join(bytes(self._view(gpa, length))
                        for gpa, length in self._pieces(linear, size, False))

    def write(self, linear: int, data: bytes) -> None:
        views = [self._view(gpa, length) for gpa, length in self._pieces(linear, len(data), True)]
        position = 0
        for view in views:
            view[:] = data[position:position + len(view)]
            position += len(view)

    def fetch(self, linear: int, size: int) -> bytes:
        """Up to ``size`` instruction bytes at ``linear``: stops early at a page that cannot be
        fetched (the decoder then reports the instruction truncated)."""
        out = b""
        while len(out) < size:
            length = min(size - len(out), PAGE_SIZE - (linear & 0xFFF))
            try:
                gpa = translate(self.state, self.memory, linear, fetch=True)
                out += bytes(self.memory.view(gpa, length))
            except Exception:
                break
            linear += length
        return out
