"""Memslot layout around overlay pages, against a fake KVM (records set_user_memory_region)."""

import contextlib

import pytest

from hvvmm.memory import GuestMemory, MemoryRegion
from hvvmm.memslots import MemslotManager, OverlayError

PAGE = 4096


class FakeKvmSlots:
    def __init__(self):
        self.slots = {}
        self.calls = 0

    def set_slot(self, slot, gpa, size, host, readonly):
        self.calls += 1
        if size == 0:
            assert slot in self.slots, "deleting a slot that does not exist"
            del self.slots[slot]
            return
        assert slot not in self.slots, "KVM cannot resize a slot in place"
        for other in self.slots.values():
            assert gpa + size <= other[0] or other[0] + other[1] <= gpa, "overlapping memslots"
        self.slots[slot] = (gpa, size, host, readonly)

    def layout(self):
        return sorted(self.slots.values())


@pytest.fixture
def setup():
    memory = GuestMemory([MemoryRegion(0, bytearray(16 * PAGE)),
                          MemoryRegion(1 << 32, bytearray(4 * PAGE))])
    kvm = FakeKvmSlots()
    exclusive_entries = []

    @contextlib.contextmanager
    def exclusive():
        exclusive_entries.append(1)
        yield

    manager = MemslotManager(kvm.set_slot, memory, [0x7000_0000, 0x9000_0000], exclusive)
    yield manager, kvm, exclusive_entries
    manager.close()


def test_initial_slots_are_the_ram_regions(setup):
    _, kvm, _ = setup
    assert kvm.layout() == [(0, 16 * PAGE, 0x7000_0000, False),
                            (1 << 32, 4 * PAGE, 0x9000_0000, False)]


def test_overlay_splits_ram_and_removal_restores_it(setup):
    manager, kvm, exclusive = setup
    before = kvm.layout()
    overlay = manager.map_overlay(5 * PAGE, bytes(PAGE), readonly=True, name="hypercall")
    layout = kvm.layout()
    assert (0, 5 * PAGE, 0x7000_0000, False) in layout
    assert (5 * PAGE, PAGE, overlay.host_address, True) in layout
    assert (6 * PAGE, 10 * PAGE, 0x7000_0000 + 6 * PAGE, False) in layout
    assert exclusive, "slots changed outside the exclusive section"
    manager.unmap_overlay(overlay)
    assert kvm.layout() == before


def test_overlays_at_region_edges_and_adjacent(setup):
    manager, kvm, _ = setup
    a = manager.map_overlay(0, bytes(PAGE), readonly=True, name="a")
    b = manager.map_overlay(PAGE, bytes(PAGE), readonly=False, name="b")
    c = manager.map_overlay(15 * PAGE, bytes(PAGE), readonly=True, name="c")
    ram = [s for s in kvm.layout() if s[2] == 0x7000_0000 + s[0]]
    assert ram == [(2 * PAGE, 13 * PAGE, 0x7000_0000 + 2 * PAGE, False)]
    for overlay in (b, a, c):
        manager.unmap_overlay(overlay)
    assert kvm.layout()[0] == (0, 16 * PAGE, 0x7000_0000, False)


def test_overlay_outside_ram_gets_its_own_slot(setup):
    manager, kvm, _ = setup
    overlay = manager.map_overlay(0x8000_0000, bytes(PAGE), readonly=True, name="tsc")
    assert (0x8000_0000, PAGE, overlay.host_address, True) in kvm.layout()


@pytest.mark.parametrize("gpa", [0x123, -PAGE, 0xFEE0_0000, 0xFFFB_D000, 1 << 60])
def test_bad_overlay_addresses_are_refused(setup, gpa):
    manager, kvm, _ = setup
    before = kvm.layout()
    with pytest.raises(OverlayError):
        manager.map_overlay(gpa, bytes(PAGE), readonly=True, name="x page")
    assert kvm.layout() == before


def test_two_overlays_on_one_page_are_refused(setup):
    manager, _, _ = setup
    manager.map_overlay(3 * PAGE, bytes(PAGE), readonly=True, name="hypercall page")
    with pytest.raises(OverlayError, match="hypercall"):
        manager.map_overlay(3 * PAGE, bytes(PAGE), readonly=True, name="tsc")


def test_overlay_content_is_host_writable(setup):
    manager, _, _ = setup
    overlay = manager.map_overlay(2 * PAGE, b"\xcc" * PAGE, readonly=True, name="tsc")
    overlay.write(8, b"\x01\x02")
    assert overlay.read(6, 4) == b"\xcc\xcc\x01\x02"
    with pytest.raises(ValueError):
        overlay.write(4095, b"ab")


def test_writes_to_an_overlay_are_taken_and_logged_once(setup, caplog):
    manager, _, _ = setup
    overlay = manager.map_overlay(5 * PAGE, bytes(PAGE), readonly=True, name="hypercall page")
    assert not manager.take_overlay_write(0, 4 * PAGE + 8, 4)  # RAM: the bus's
    with caplog.at_level("WARNING", logger="hvvmm.memslots"):
        assert manager.take_overlay_write(1, 5 * PAGE + 16, 8)
        assert manager.take_overlay_write(1, 5 * PAGE + 24, 8)
    warnings = [r.getMessage() for r in caplog.records
                if "read-only" in r.getMessage() and r.levelname == "WARNING"]
    assert warnings == ["vCPU 1 wrote 8 byte(s) to the read-only hypercall page at 0x5010; "
                        "the write was dropped (logged once)"]
    manager.unmap_overlay(overlay)
    assert not manager.take_overlay_write(0, 5 * PAGE + 16, 8)


def test_windows_hide_ram_and_holes_leave_no_slot(setup):
    from hvvmm.memslots import Window

    manager, kvm, _ = setup
    manager.set_windows("rom", [Window(4 * PAGE, 2 * PAGE, 0x5000_0000, readonly=True),
                                Window(8 * PAGE, PAGE, None)])
    assert kvm.layout() == [
        (0, 4 * PAGE, 0x7000_0000, False),
        (4 * PAGE, 2 * PAGE, 0x5000_0000, True),
        (6 * PAGE, 2 * PAGE, 0x7000_0000 + 6 * PAGE, False),
        (9 * PAGE, 7 * PAGE, 0x7000_0000 + 9 * PAGE, False),
        (1 << 32, 4 * PAGE, 0x9000_0000, False),
    ]
    # An overlay wins over a window; removing the windows restores plain RAM.
    manager.map_overlay(5 * PAGE, bytes(PAGE), readonly=False, name="hypercall page")
    assert (5 * PAGE, PAGE, manager.overlay_at(5 * PAGE).host_address, False) in kvm.layout()
    assert (4 * PAGE, PAGE, 0x5000_0000, True) in kvm.layout()
    manager.unmap_overlay(manager.overlay_at(5 * PAGE))
    manager.set_windows("rom", [])
    assert kvm.layout() == [(0, 16 * PAGE, 0x7000_0000, False), (1 << 32, 4 * PAGE, 0x9000_0000,
                                                                 False)]


def test_window_outside_ram_gets_its_own_slot(setup):
    from hvvmm.memslots import Window

    manager, kvm, _ = setup
    manager.set_windows("firmware", [Window(0xFFFC_0000, 0x4_0000, 0x6000_0000)])
    assert (0xFFFC_0000, 0x4_0000, 0x6000_0000, True) in kvm.layout()
    calls = kvm.calls
    manager.set_windows("firmware", [Window(0xFFFC_0000, 0x4_0000, 0x6000_0000)])
    assert kvm.calls == calls  # unchanged windows touch no slot
