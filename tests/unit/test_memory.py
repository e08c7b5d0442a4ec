import pytest
from hypothesis import given, strategies as st

from hvvmm.memory import GuestMemory, GuestMemoryError, MemoryRegion


def two_regions():
    return GuestMemory([MemoryRegion(0, bytearray(0x2000)),
                        MemoryRegion(0x10000, bytearray(0x1000))])


def test_reads_and_writes_round_trip():
    mem = two_regions()
    mem.write_u64(0x1FF8, 0x0123456789ABCDEF)
    assert mem.read_u64(0x1FF8) == 0x0123456789ABCDEF
    assert mem.read_u32(0x1FFC) == 0x01234567
    mem.write(0x10010, b"hello")
    assert mem.read(0x10010, 5) == b"hello"
    mem.write_u16(0x10FFE, 0xBEEF)
    assert mem.read_u8(0x10FFF) == 0xBE


@pytest.mark.parametrize("gpa,size", [
    (0x1FFC, 8),        # runs off the end of region 0
    (0x2000, 1),        # the gap
    (0xFFFF, 2),        # starts in the gap, ends in region 1
    (0x11000, 1),       # past the last region
    (-1, 1),
    (0, -1),
    (1 << 64, 1),       # no wrap-around
    ((1 << 64) - 1, 2),
])
def test_accesses_outside_ram_raise(gpa, size):
    mem = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, size)
    assert not mem.contains(gpa, size)


def test_error_names_the_access():
    with pytest.raises(GuestMemoryError, match=r"0x2000\+0x8"):
        two_regions().read(0x2000, 8)


def test_write_helpers_truncate_to_width():
    mem = GuestMemory.from_bytes(0x1000)
    mem.write_u8(0, 0x1FF)
    mem.write_u32(4, -1)
    assert mem.read_u8(0) == 0xFF
    assert mem.read_u32(4) == 0xFFFF_FFFF


@pytest.mark.parametrize("gpa,size", [(0x1000, 0x1000), (0x2000, 0x2000), (0, 0x3000)])
def test_overlapping_regions_are_refused(gpa, size):
    mem = GuestMemory([MemoryRegion(0x1000, bytearray(0x2000))])
    with pytest.raises(ValueError, match="overlaps"):
        mem.add_region(MemoryRegion(gpa, bytearray(size)))


def test_unaligned_region_is_refused():
    with pytest.raises(ValueError, match="page aligned"):
        GuestMemory([MemoryRegion(0x10, bytearray(0x1000))])


def test_anonymous_memory_is_unmapped_on_close():
    mem = GuestMemory.anonymous([(0, 0x4000), (0x100000, 0x1000)])
    mem.write_u32(0x100FFC, 7)
    assert mem.size == 0x5000
    mem.close()
    assert not mem.contains(0, 1)


@given(st.integers(-(1 << 65), 1 << 65), st.integers(-8, 0x3000))
def test_view_never_escapes_ram(gpa, size):
    mem = two_regions()
    try:
        view = mem.view(gpa, size)
    except GuestMemoryError:
        return
    assert len(view) == size
    assert (0 <= gpa and gpa + size <= 0x2000) or (0x10000 <= gpa and gpa + size <= 0x11000)
