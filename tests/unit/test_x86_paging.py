"""Guest page walks (hvvmm/x86/paging.py) on hand-built page tables in bytearray memory."""

import pytest
from x86fakes import P, RW, US, paged_memory, protected_state, state_for

from hvvmm.memory import GuestMemory
from hvvmm.x86.paging import A, D, XD, GuestMemoryAccess, translate
from hvvmm.x86.state import (AC, CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE, GP_VECTOR, PF_VECTOR,
                             SS_VECTOR, CannotComplete, GuestFault)

LINEAR = 0x7F12_3456_7000


@pytest.mark.parametrize("mode", ["long4", "long5", "pae", "legacy32"])
def test_4k_page_translates_and_sets_accessed_and_dirty(mode):
    memory, tables = paged_memory(mode)
    linear = LINEAR if mode.startswith("long") else 0x8765_4000
    pte = tables.map(linear, 0x30_0000, P | RW)
    state = state_for(tables)
    assert translate(state, memory, linear + 0x123) == 0x30_0123
    assert tables.entry(pte) & A and not tables.entry(pte) & D
    assert translate(state, memory, linear + 8, write=True) == 0x30_0008
    assert tables.entry(pte) & D


@pytest.mark.parametrize("mode, level, size", [
    ("long4", 2, 2 << 20), ("long4", 3, 1 << 30), ("long5", 2, 2 << 20), ("pae", 2, 2 << 20),
    ("legacy32", 2, 4 << 20)])
def test_large_pages(mode, level, size):
    memory, tables = paged_memory(mode)
    linear = (0x7F00_0000_0000 if mode.startswith("long") else 0x8000_0000)
    physical = size * 3 if size < (1 << 30) else 1 << 30
    tables.map(linear, physical, P | RW, level=level)
    state = state_for(tables)
    assert translate(state, memory, linear + size - 4) == physical + size - 4


def test_pse36_high_bits_of_a_4m_page():
    memory, tables = paged_memory("legacy32")
    # PDE bits 20:13 give physical bits 39:32 (SDM vol. 3A table 4-4).
    tables.map(0x4000_0000, 0x80_0000 | (0x5 << 13), P | RW, level=2)
    assert translate(state_for(tables), memory, 0x4000_0010) == (5 << 32) | 0x80_0010


def test_paging_off_is_identity():
    memory = GuestMemory.from_bytes(1 << 20)
    state = protected_state(paging=False)
    assert translate(state, memory, 0x1234_5678) == 0x1234_5678


def test_not_present_page_faults_with_error_code_and_address():
    memory, tables = paged_memory()
    state = state_for(tables)
    with pytest.raises(GuestFault) as info:
        translate(state, memory, LINEAR + 0x10, write=True)
    fault = info.value
    assert (fault.vector, fault.error_code, fault.cr2) == (PF_VECTOR, 0x2, LINEAR + 0x10)


def test_write_to_read_only_page_honours_cr0_wp():
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x30_0000, P)
    state = state_for(tables)
    with pytest.raises(GuestFault) as info:
        translate(state, memory, LINEAR, write=True)
    assert info.value.error_code == 0x3  # present | write
    state.cr0 &= ~CR0_WP
    assert translate(state, memory, LINEAR, write=True) == 0x30_0000


def test_user_access_needs_us_on_every_level():
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x30_0000, P | RW)  # leaf supervisor-only
    state = state_for(tables)
    with pytest.raises(GuestFault) as info:
        translate(state, memory, LINEAR, user=True)
    assert info.value.error_code == 0x5  # present | user


def test_smap_blocks_supervisor_data_access_to_user_pages_unless_ac():
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x30_0000, P | RW | US)
    state = state_for(tables)
    state.cr4 |= CR4_SMAP
    with pytest.raises(GuestFault):
        translate(state, memory, LINEAR)
    state.rflags |= AC
    assert translate(state, memory, LINEAR) == 0x30_0000
    with pytest.raises(GuestFault):  # implicit accesses ignore AC
        translate(state, memory, LINEAR, implicit=True)


def test_smep_and_nx_block_fetches():
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x30_0000, P | RW | US)
    tables.map(LINEAR + 0x1000, 0x31_0000, P | RW | XD)
    state = state_for(tables)
    state.cr4 |= CR4_SMEP
    with pytest.raises(GuestFault) as info:
        translate(state, memory, LINEAR, fetch=True)
    assert info.value.error_code == 0x11  # present | fetch
    with pytest.raises(GuestFault):
        translate(state, memory, LINEAR + 0x1000, fetch=True)
    assert translate(state, memory, LINEAR + 0x1000) == 0x31_0000  # data reads are fine


def test_reserved_bits_fault_with_rsvd():
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x30_0000, P | RW | XD)
    state = state_for(tables)
    state.efer &= ~EFER_NXE  # XD is reserved without EFER.NXE
    with pytest.raises(GuestFault) as info:
        translate(state, memory, LINEAR)
    assert info.value.error_code & 0x8
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x20_0000 | (1 << 13), P | RW, level=2)  # bit 13 of a 2 MiB PDE
    with pytest.raises(GuestFault) as info:
        translate(state_for(tables), memory, LINEAR)
    assert info.value.error_code == 0x9


def test_page_table_outside_ram_cannot_complete():
    memory, tables = paged_memory()
    slot = tables.slot(LINEAR, 2)
    tables._set(slot, 0x7000_0000 | P | RW)  # the page table would be at 1.75 GiB: no RAM
    with pytest.raises(CannotComplete):
        translate(state_for(tables), memory, LINEAR)


def test_access_across_a_page_boundary_translates_both_pages_first():
    memory, tables = paged_memory()
    tables.map(LINEAR, 0x30_0000, P | RW)
    state = state_for(tables)
    access = GuestMemoryAccess(state, memory)
    with pytest.raises(GuestFault) as info:  # the second page is not mapped
        access.write(LINEAR + 0xFFC, b"\x11" * 8)
    assert info.value.cr2 == LINEAR + 0x1000
    assert memory.read(0x30_0FFC, 4) == b"\0" * 4  # nothing written
    tables.map(LINEAR + 0x1000, 0x38_0000, P | RW)
    access.write(LINEAR + 0xFFC, bytes(range(8)))
    assert memory.read(0x30_0FFC, 4) == bytes(range(4))
    assert memory.read(0x38_0000, 4) == bytes(range(4, 8))
    assert access.read(LINEAR + 0xFFC, 8) == bytes(range(8))


def test_non_canonical_addresses_fault_gp_or_ss():
    memory, tables = paged_memory()
    access = GuestMemoryAccess(state_for(tables), memory)
    with pytest.raises(GuestFault) as info:
        access.linear_address("ds", 0x8000_0000_0000, 4, 8)
    assert (info.value.vector, info.value.error_code) == (GP_VECTOR, 0)
    with pytest.raises(GuestFault) as info:
        access.linear_address("ss", 0x8000_0000_0000, 4, 8)
    assert info.value.vector == SS_VECTOR


def test_segment_bases_apply_to_fs_and_gs_only_in_64_bit_mode():
    memory, tables = paged_memory()
    state = state_for(tables)
    state.segments["fs"].base = 0x1000
    state.segments["ds"].base = 0x5000  # ignored in 64-bit mode
    access = GuestMemoryAccess(state, memory)
    assert access.linear_address("fs", 0x10, 4, 8) == 0x1010
    assert access.linear_address("ds", 0x10, 4, 8) == 0x10
    legacy = protected_state(paging=False)
    legacy.segments["ds"].base = 0x5000
    assert GuestMemoryAccess(legacy, memory).linear_address("ds", 0xFFFF_FFF0 + 0x20, 4, 4) \
        == (0x5000 + 0x10) & 0xFFFF_FFFF
