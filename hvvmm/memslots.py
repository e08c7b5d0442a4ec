"""KVM memslots for guest RAM and overlay pages.

An overlay is a hypervisor-owned page shown at a guest-physical address, hiding the RAM below it
(TLFS: the hypercall page, the reference TSC page, the SynIC pages; "Establishing the Hypercall
Interface", ``timers.md``, ``inter-partition-communication.md``). KVM memslots may not overlap, so
the RAM slot under an overlay is split around it, and merged back when the overlay goes. Read-only
overlays use ``KVM_MEM_READONLY``: guest reads and instruction fetches work, a guest write exits as
MMIO and is not applied.

Changing slots while other vCPUs run would open a window in which their RAM accesses find no
slot, so :class:`MemslotManager` changes slots only inside the machine's exclusive section (all
other vCPUs parked outside ``KVM_RUN``); the caller provides it.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

from .hv.platform import OverlayError
from .kvm import PinnedBuffer, atomic_fetch_or_u8
from .layout import PC
from .logonce import LogOnce
from .memory import PAGE_SIZE, GuestMemory

log = logging.getLogger(__name__)

# Guest-physical ranges no overlay may cover: the IOAPIC, the LAPIC and the pages KVM itself
# uses (TSS, identity map) all sit in the top 20 MiB of the 32-bit space.
RESERVED_RANGES = (PC.reserved_hole,)


@dataclass(frozen=True)
class _Slot:
    gpa: int
    size: int
    host_address: int
    readonly: bool


class Overlay:
    """One overlay page: 4096 bytes of host memory the guest sees at ``gpa``."""

    def __init__(self, gpa: int, content: bytes, readonly: bool, name: str):
        if len(content) != PAGE_SIZE:
            raise ValueError("an overlay page is exactly 4096 bytes")
        self._gpa = gpa
        self.readonly = readonly
        self.name = name
        self._buffer = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buffer[:] = content
        self._pinned = PinnedBuffer(self._buffer)
        self.host_address = self._pinned.address

    @property
    def gpa(self) -> int:
        return self._gpa

    def write(self, offset: int, data: bytes) -> None:
        """Change the page from the host; the guest sees it at once."""
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            raise ValueError(f"overlay write {offset:#x}+{len(data):#x} outside the page")
        self._buffer[offset:offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > PAGE_SIZE:
            raise ValueError(f"overlay read {offset:#x}+{size:#x} outside the page")
        return self._buffer[offset:offset + size]

    def fetch_or_u8(self, offset: int, mask: int) -> int:
        """Atomically OR ``mask`` into one byte; returns the old byte (``OverlayPage``). A locked
        instruction on the page's host address, so a guest clearing other bits of the byte
        meanwhile (the SynIC event flags) keeps its change."""
        if not 0 <= offset < PAGE_SIZE or not 0 <= mask <= 0xFF:
            raise ValueError(f"overlay fetch-or at {offset:#x} with {mask:#x}")
        if self._buffer.closed:
            raise ValueError(f"the {self.name} overlay is closed")
        return atomic_fetch_or_u8(self.host_address + offset, mask)

    def close(self) -> None:
        self._pinned.release()
        self._buffer.close()


@dataclass(frozen=True)
class Window:
    """A host-placed range that hides the RAM under it (firmware ROM, the PAM segments):
    ``host_address`` None leaves a hole there (accesses exit as MMIO), otherwise that host memory
    is shown, read-only if ``readonly`` (guest writes exit as MMIO)."""

    gpa: int
    size: int
    host_address: int | None
    readonly: bool = True


class MemslotManager:
    """Keeps KVM's memslots equal to RAM, covered by windows, covered by overlays."""

    def __init__(self, set_slot: Callable[[int, int, int, int, bool], None], memory: GuestMemory,
                 host_addresses: Iterable[int], exclusive: Callable[[], ContextManager],
                 physical_address_bits: int = 52):
        """``set_slot(slot, gpa, size, host_address, readonly)`` is ``Vm.set_user_memory_region``
        (size 0 deletes); ``host_addresses`` are the host addresses of ``memory``'s regions, in
        order; ``exclusive()`` parks the other vCPUs while slots change."""
        self._set_slot = set_slot
        self._exclusive = exclusive
        self._gpa_limit = 1 << physical_address_bits  # the guest's MAXPHYADDR
        self._ram = [(region.gpa, region.size, host)
                     for region, host in zip(memory.regions, host_addresses)]
        self._overlays: dict[int, Overlay] = {}
        self._windows: dict[str, tuple[Window, ...]] = {}
        self._slots: dict[int, _Slot] = {}
        self._log_once = LogOnce(log)
        self._apply()

    @property
    def overlays(self) -> tuple[Overlay, ...]:
        return tuple(self._overlays.values())

    def overlay_at(self, gpa: int) -> Overlay | None:
        return self._overlays.get(gpa & ~(PAGE_SIZE - 1))

    def take_overlay_write(self, vcpu_index: int, gpa: int, size: int) -> bool:
        """The vCPU loop's MMIO-write hook: a write exit inside a read-only overlay comes from
        that overlay's slot, whatever the bus has below it (the guest places overlays), and is
        not applied. The TLFS says such a write raises #GP; KVM reports it only after its
        emulator retired the instruction (RIP already past it), so a #GP injected now would point
        at the wrong instruction and break fault fix-ups: hvvmm drops the write and logs it."""
        overlay = self._overlays.get(gpa & ~(PAGE_SIZE - 1))
        if overlay is None:
            return False
        self._log_once(("overlay write", overlay.gpa), logging.WARNING,
                       "vCPU %d wrote %d byte(s) to the read-only %s at %#x; the write was "
                       "dropped", vcpu_index, size, overlay.name, gpa)
        return True

    def map_overlay(self, gpa: int, content: bytes, *, readonly: bool, name: str) -> Overlay:
        if gpa % PAGE_SIZE:
            raise OverlayError(f"{name} at {gpa:#x}: not page-aligned")
        if not 0 <= gpa <= self._gpa_limit - PAGE_SIZE:
            raise OverlayError(f"{name} at {gpa:#x}: beyond the guest's physical address width "
                               f"({self._gpa_limit.bit_length() - 1} bits)")
        for start, end in RESERVED_RANGES:
            if start <= gpa < end:
                raise OverlayError(f"{name} at {gpa:#x} would cover the APIC/KVM area")
        if gpa in self._overlays:
            raise OverlayError(f"{name} at {gpa:#x} would cover the {self._overlays[gpa].name}")
        overlay = Overlay(gpa, content, readonly, name)
        self._overlays[gpa] = overlay
        try:
            with self._exclusive():
                self._apply()
        except BaseException:
            del self._overlays[gpa]
            overlay.close()
            raise
        log.debug("%s mapped at %#x%s", name, gpa, " (read-only)" if readonly else "")
        return overlay

    def unmap_overlay(self, overlay: Overlay) -> None:
        if self._overlays.get(overlay.gpa) is not overlay:
            return  # already gone (e.g. removed by a reset)
        del self._overlays[overlay.gpa]
        with self._exclusive():
            self._apply()
        overlay.close()
        log.debug("%s at %#x removed", overlay.name, overlay.gpa)

    def set_windows(self, name: str, windows: Iterable[Window]) -> None:
        """Replace the windows called ``name`` (e.g. the firmware ROM, the PAM segments)."""
        windows = tuple(windows)
        if self._windows.get(name, ()) == windows:
            return
        self._windows[name] = windows
        with self._exclusive():
            self._apply()

    def close(self) -> None:
        for overlay in self._overlays.values():
            overlay.close()
        self._overlays.clear()

    def desired_slots(self) -> set[_Slot]:
        """What the guest sees at each address: an overlay over a window over RAM; ranges where
        the topmost is a hole get no slot. Pieces of one source that touch are merged."""
        # (priority, gpa, size, host address or None, readonly)
        sources = [(0, gpa, size, host, False) for gpa, size, host in self._ram]
        sources += [(1, w.gpa, w.size, w.host_address, w.readonly)
                    for windows in self._windows.values() for w in windows]
        sources += [(2, o.gpa, PAGE_SIZE, o.host_address, o.readonly)
                    for o in self._overlays.values()]
        edges = sorted({gpa for _, gpa, _, _, _ in sources}
                       | {gpa + size for _, gpa, size, _, _ in sources})
        slots: set[_Slot] = set()
        current: list | None = None  # [source, start, end] of the slot being grown
        for start, end in zip(edges, edges[1:]):
            top = max((s for s in sources if s[1] <= start and end <= s[1] + s[2]),
                      key=lambda s: s[0], default=None)
            if top is not None and top[3] is None:
                top = None
            if current is not None and top is current[0] and current[2] == start:
                current[2] = end
                continue
            if current is not None:
                slots.add(self._piece(*current))
            current = [top, start, end] if top is not None else None
        if current is not None:
            slots.add(self._piece(*current))
        return slots

    @staticmethod
    def _piece(source, start: int, end: int) -> _Slot:
        _, gpa, _, host, readonly = source
        return _Slot(start, end - start, host + start - gpa, readonly)

    def _apply(self) -> None:
        desired = self.desired_slots()
        current = set(self._slots.values())
        # Deletions first: KVM refuses a new slot that overlaps an existing one.
        for slot_id, slot in list(self._slots.items()):
            if slot not in desired:
                self._set_slot(slot_id, slot.gpa, 0, slot.host_address, slot.readonly)
                del self._slots[slot_id]
        for slot in sorted(desired - current, key=lambda s: s.gpa):
            slot_id = next(i for i in range(len(self._slots) + 1) if i not in self._slots)
            self._set_slot(slot_id, slot.gpa, slot.size, slot.host_address, slot.readonly)
            self._slots[slot_id] = slot
