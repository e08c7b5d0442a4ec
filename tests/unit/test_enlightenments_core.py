"""hv-core: GUEST_OS_ID, the HYPERCALL MSR and the hypercall page lifecycle (TLFS
"Establishing the Hypercall Interface"; the page is a read-only overlay)."""

from __future__ import annotations

import logging

import pytest

from hvvmm.enlightenments.core import HYPERCALL_PAGE, HYPERCALL_PORT, hypercall_page_bytes
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FakePlatform
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform

GUEST_OS_ID = hvdef.HV_X64_MSR_GUEST_OS_ID
HYPERCALL = hvdef.HV_X64_MSR_HYPERCALL
ENABLE, LOCKED = 1, 2
WINDOWS_2016 = 0x0001040A00003839
LINUX = hvdef.linux_guest_os_id(6, 1, 192)
PAGE = 0x5000
RAM_CONTENT = b"the guest's own page" + bytes(4076)


@pytest.fixture
def vm():
    platform = FakePlatform(max_gpa=1 << 40)
    platform.memory.write(PAGE, RAM_CONTENT)
    partition = Partition(parse_hyperv_spec("minimal"), platform)
    return partition, platform


def test_page_contents():
    assert HYPERCALL_PAGE == hypercall_page_bytes(HYPERCALL_PORT)
    assert HYPERCALL_PAGE[:7] == bytes([0xF3, 0x0F, 0x1E, 0xFA, 0xE6, HYPERCALL_PORT, 0xC3])
    assert HYPERCALL_PAGE[7:] == b"\xcc" * (4096 - 7)
    # The port avoids every device and guest-driver port listed in hvvmm/enlightenments/core.py.
    assert HYPERCALL_PORT not in {0x20, 0x21, *range(0x40, 0x44), 0x60, 0x61, 0x64, 0x70, 0x71,
                                  0x7E, 0x80, 0x92, 0xA0, 0xA1, 0xB2, 0xB3, 0xE9, 0xED, 0xF0,
                                  0xF1, 0xF4}
    with pytest.raises(ValueError):
        hypercall_page_bytes(0x100)


def test_enable_without_guest_os_id_leaves_enable_clear(vm):
    partition, platform = vm
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    assert partition.msr_read(0, HYPERCALL) == PAGE  # GPFN kept, Enable 0 (TLFS)
    assert not partition.hypercall_port_active()
    assert platform.overlays == {}
    assert platform.memory.read(PAGE, len(RAM_CONTENT)) == RAM_CONTENT


def test_enable_maps_a_read_only_overlay(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    assert partition.msr_read(1, GUEST_OS_ID) == LINUX  # partition-wide
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    assert partition.msr_read(1, HYPERCALL) == PAGE | ENABLE
    assert partition.hypercall_port_active()
    overlay = platform.overlays[PAGE]
    assert overlay.readonly and overlay.name == "hypercall page"
    assert platform.guest_read(PAGE, 4096) == HYPERCALL_PAGE
    with pytest.raises(PermissionError, match="#GP"):
        platform.guest_write(PAGE + 16, b"\x90")  # TLFS: writes to the page -> #GP


def test_linux_enable_sequence_keeps_rsvdp_bits(vm):
    partition, _ = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    old = partition.msr_read(0, HYPERCALL)
    partition.msr_write(0, HYPERCALL, (old & 0xFFE) | PAGE | ENABLE)  # hv_init.c
    partition.msr_write(0, HYPERCALL, 0xFF8 | PAGE | ENABLE)  # RsvdP bits as written
    assert partition.msr_read(0, HYPERCALL) == 0xFF8 | PAGE | ENABLE
    assert partition.hypercall_page_gpa == PAGE


def test_disable_restores_the_ram_below(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    partition.msr_write(0, HYPERCALL, PAGE)
    assert not partition.hypercall_port_active()
    assert platform.overlays == {}
    assert platform.memory.read(PAGE, len(RAM_CONTENT)) == RAM_CONTENT


def test_guest_os_id_zero_removes_the_page(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    partition.msr_write(1, GUEST_OS_ID, 0)
    assert partition.msr_read(0, HYPERCALL) == PAGE  # Enable cleared
    assert not partition.hypercall_port_active()
    assert platform.memory.read(PAGE, len(RAM_CONTENT)) == RAM_CONTENT
    # Writing a new identity does not re-enable it by itself.
    partition.msr_write(1, GUEST_OS_ID, LINUX)
    assert not partition.hypercall_port_active()


def test_relocation(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, WINDOWS_2016)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    partition.msr_write(0, HYPERCALL, 0x9000 | ENABLE)
    assert list(platform.overlays) == [0x9000]
    assert platform.memory.read(PAGE, len(RAM_CONTENT)) == RAM_CONTENT
    assert platform.guest_read(0x9000, 4096) == HYPERCALL_PAGE
    # Rewriting the same value does not remap (the page never changes under the guest).
    log_length = len(platform.overlay_log)
    partition.msr_write(0, HYPERCALL, 0x9000 | ENABLE)
    assert len(platform.overlay_log) == log_length


def test_page_outside_ram_but_inside_the_gpa_space(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, 0xFEE0_1000 | ENABLE)
    assert platform.guest_read(0xFEE0_1000, 7) == HYPERCALL_PAGE[:7]


def test_page_beyond_the_gpa_space_is_gp(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    with pytest.raises(MsrAccessFault, match="cannot be placed"):
        partition.msr_write(0, HYPERCALL, (1 << 40) | ENABLE)
    assert partition.msr_read(0, HYPERCALL) == PAGE | ENABLE  # unchanged
    assert partition.hypercall_page_gpa == PAGE


def test_lock(vm):
    partition, platform = vm
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE | LOCKED)
    assert partition.msr_read(0, HYPERCALL) == PAGE | ENABLE | LOCKED
    partition.msr_write(0, HYPERCALL, 0x9000 | ENABLE)  # ignored: immutable once locked
    partition.msr_write(0, HYPERCALL, 0)  # ignored
    assert partition.msr_read(0, HYPERCALL) == PAGE | ENABLE | LOCKED
    assert partition.hypercall_page_gpa == PAGE
    # GUEST_OS_ID = 0 still disables the page (TLFS states it unconditionally); Locked stays.
    partition.msr_write(0, GUEST_OS_ID, 0)
    assert partition.msr_read(0, HYPERCALL) == PAGE | LOCKED
    assert not partition.hypercall_port_active()
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    assert not partition.hypercall_port_active()  # only a reset clears Locked
    partition.reset()
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    partition.msr_write(0, HYPERCALL, PAGE | ENABLE)
    assert partition.hypercall_port_active()


def test_page_cannot_sit_on_another_overlay():
    platform = FakePlatform()
    partition = Partition(parse_hyperv_spec("minimal,hv-time"), platform)
    partition.msr_write(0, hvdef.HV_X64_MSR_REFERENCE_TSC, PAGE | 1)
    partition.msr_write(0, GUEST_OS_ID, LINUX)
    with pytest.raises(MsrAccessFault, match="cannot be placed"):
        partition.msr_write(0, HYPERCALL, PAGE | ENABLE)


def test_guest_os_id_is_decoded_and_logged_once(vm, caplog):
    partition, _ = vm
    with caplog.at_level(logging.INFO):
        partition.msr_write(0, GUEST_OS_ID, WINDOWS_2016)
        partition.msr_write(1, GUEST_OS_ID, WINDOWS_2016)
        partition.msr_write(0, GUEST_OS_ID, LINUX)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and "guest OS identity" in r.getMessage()]
    assert len(infos) == 2
    assert "Windows NT 10.0 build 14393 (Microsoft)" in infos[0]
    assert "Linux 6.1.192" in infos[1]
    assert partition.guest_os_id == LINUX


def test_vp_assist_page_is_accepted_per_vp_without_an_overlay(vm):
    partition, platform = vm
    partition.msr_write(0, hvdef.HV_X64_MSR_VP_ASSIST_PAGE, 0x3001)
    partition.msr_write(1, hvdef.HV_X64_MSR_VP_ASSIST_PAGE, 0x4001)
    assert partition.msr_read(0, hvdef.HV_X64_MSR_VP_ASSIST_PAGE) == 0x3001
    assert partition.msr_read(1, hvdef.HV_X64_MSR_VP_ASSIST_PAGE) == 0x4001
    assert platform.overlays == {}


def test_a_guest_writing_many_identities_logs_a_bounded_number(vm, caplog):
    from hvvmm.enlightenments.core import MAX_IDENTITIES_LOGGED

    partition, _ = vm
    with caplog.at_level(logging.INFO):
        for value in range(1, 3000):
            partition.msr_write(0, GUEST_OS_ID, value)
    infos = [r for r in caplog.records if "guest OS identity" in r.getMessage()]
    assert len(infos) == MAX_IDENTITIES_LOGGED
    assert len(partition.log_once._seen) < 10
