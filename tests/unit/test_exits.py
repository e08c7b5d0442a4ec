"""The exit decoder against hand-filled kvm_run pages (no /dev/kvm; needs the built bindings)."""

import pytest

from hvvmm.kvm import (FailEntryExit, HltExit, InternalErrorExit, IoExit, MmioExit, MsrExit,
                       ShutdownExit, SystemEventExit, UnknownExit, decode_exit)
from hvvmm.kvm import constants as c
from hvvmm.kvm._kvm import ffi

PAGE_BYTES = 3 * 4096


@pytest.fixture
def run_page():
    storage = ffi.new("char[]", PAGE_BYTES)
    run = ffi.cast("struct kvm_run *", storage)
    view = memoryview(ffi.buffer(storage))
    yield run, view, storage


def test_io_out_exposes_the_written_bytes(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port, run.io.count = c.KVM_EXIT_IO_OUT, 2, 0x3F8, 1
    run.io.data_offset = 4096
    view[4096:4098] = b"\x34\x12"
    exit = decode_exit(run, view)
    assert isinstance(exit, IoExit)
    assert (exit.port, exit.size, exit.count, exit.is_write) == (0x3F8, 2, 1, True)
    assert int.from_bytes(exit.data, "little") == 0x1234


def test_io_in_data_is_written_into_the_run_page(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port, run.io.count = c.KVM_EXIT_IO_IN, 1, 0x60, 3
    run.io.data_offset = 4096
    exit = decode_exit(run, view)
    assert not exit.is_write and len(exit.data) == 3
    exit.data[:] = b"abc"
    assert bytes(view[4096:4099]) == b"abc"


def test_io_with_an_offset_outside_the_page_is_not_trusted(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_IO
    run.io.size, run.io.count, run.io.data_offset = 4, 3000, 4096  # 4096 + 12000 > 3 pages
    assert isinstance(decode_exit(run, view), UnknownExit)


def test_mmio_read_and_write(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEC00010, 4, 1
    for i, b in enumerate(b"\x01\x02\x03\x04"):
        run.mmio.data[i] = b
    exit = decode_exit(run, view)
    assert isinstance(exit, MmioExit) and exit.is_write
    assert (exit.address, exit.size, bytes(exit.data)) == (0xFEC00010, 4, b"\x01\x02\x03\x04")
    run.mmio.is_write = 0
    exit = decode_exit(run, view)
    exit.data[:] = b"\xaa\xbb\xcc\xdd"
    assert bytes(run.mmio.data[0:4]) == b"\xaa\xbb\xcc\xdd"


def test_msr_exits_complete_and_fail(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_X86_RDMSR
    run.msr.index, run.msr.reason = 0x40000000, c.KVM_MSR_EXIT_REASON_FILTER
    exit = decode_exit(run, view)
    assert isinstance(exit, MsrExit) and not exit.is_write and exit.index == 0x40000000
    exit.complete(0x1234_5678_9ABC)
    assert run.msr.data == 0x1234_5678_9ABC and run.msr.error == 0
    run.exit_reason = c.KVM_EXIT_X86_WRMSR
    run.msr.data = 77
    exit = decode_exit(run, view)
    assert exit.is_write and exit.value == 77
    exit.fail()
    assert run.msr.error == 1


def test_internal_error_is_readable(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = c.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 2
    run.internal.data[0], run.internal.data[1] = 0x0F, 0xC7
    exit = decode_exit(run, view)
    assert isinstance(exit, InternalErrorExit)
    assert exit.describe() == "KVM internal error: instruction emulation failed (data 0xf 0xc7)"


def test_internal_error_ndata_is_bounded(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_INTERNAL_ERROR
    run.internal.ndata = 0xFFFF_FFFF
    assert len(decode_exit(run, view).data) == 16


@pytest.mark.parametrize("reason,cls", [
    ("KVM_EXIT_HLT", HltExit), ("KVM_EXIT_SHUTDOWN", ShutdownExit),
    ("KVM_EXIT_FAIL_ENTRY", FailEntryExit), ("KVM_EXIT_SYSTEM_EVENT", SystemEventExit),
])
def test_simple_exits(run_page, reason, cls):
    run, view, _ = run_page
    run.exit_reason = getattr(c, reason)
    assert isinstance(decode_exit(run, view), cls)


def test_system_event_names_its_type(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type = c.KVM_SYSTEM_EVENT_RESET
    assert decode_exit(run, view).type_name == "reset"


def test_unknown_exit_is_a_value_not_an_exception(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_DEBUG
    exit = decode_exit(run, view)
    assert isinstance(exit, UnknownExit)
    assert "debug" in exit.describe()
    run.exit_reason = 0xDEAD
    assert "not known" in decode_exit(run, view).describe()


def test_emulation_failure_carries_the_instruction_bytes(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = c.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 4
    # emulation_failure: flags, then u8 insn_size + u8 insn_bytes[15] (api.rst)
    raw = bytes([5]) + bytes.fromhex("f3480fb8db") + b"\x90" * 10
    run.internal.data[0] = c.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    run.internal.data[1] = int.from_bytes(raw[:8], "little")
    run.internal.data[2] = int.from_bytes(raw[8:], "little")
    exit = decode_exit(run, view)
    assert isinstance(exit, InternalErrorExit) and exit.is_emulation_failure
    assert exit.instruction_bytes == bytes.fromhex("f3480fb8db")
    assert "instruction bytes f3 48 0f b8 db" in exit.describe()
    run.internal.data[0] = 0  # no flag: no bytes
    assert decode_exit(run, view).instruction_bytes is None
    run.internal.suberror = c.KVM_INTERNAL_ERROR_DELIVERY_EV
    assert not decode_exit(run, view).is_emulation_failure


# -- the packed path's completions (Vcpu.packed_runner's exits are answered in the page) -----------

def _vcpu_over(run, view):
    from hvvmm.kvm import Vcpu

    vcpu = object.__new__(Vcpu)  # no fd: only the kvm_run page is used
    vcpu.run_struct, vcpu._run_view = run, view
    return vcpu


def test_packed_msr_completion_touches_only_error_and_data(run_page):
    run, view, _ = run_page
    run.exit_reason = c.KVM_EXIT_X86_WRMSR
    run.msr.index, run.msr.reason, run.msr.data, run.msr.error = 0x40000070, 4, 0xAB_CDEF, 7
    vcpu = _vcpu_over(run, view)
    assert vcpu.msr_value() == 0xAB_CDEF
    vcpu.complete_msr(True)
    assert (run.msr.error, run.msr.index, run.msr.reason, run.msr.data) == \
        (0, 0x40000070, 4, 0xAB_CDEF)
    vcpu.complete_msr(False)
    assert run.msr.error == 1
    vcpu.complete_rdmsr((1 << 64) + 0x1234)  # a u64, as MsrExit.complete answers
    assert (run.msr.error, run.msr.index, run.msr.reason, run.msr.data) == \
        (0, 0x40000070, 4, 0x1234)


def test_packed_in_completion_writes_the_answer_at_the_offset(run_page):
    run, view, _ = run_page
    vcpu = _vcpu_over(run, view)
    vcpu.complete_in(4096, 2, 0xBEEF)
    assert bytes(view[4096:4099]) == b"\xef\xbe\x00"



# -- the C decoding of the packed path (hvvmm_pack_exit, which hvvmm_run_packed returns) --------

def _pack(run, port=-1):
    from hvvmm.kvm._kvm import lib

    return lib.hvvmm_pack_exit(run, PAGE_BYTES, port)


def _io(run, view, direction, size, port, count=1, offset=4096, data=b""):
    run.exit_reason = c.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port, run.io.count = direction, size, port, count
    run.io.data_offset = offset
    view[offset:offset + len(data)] = data


def test_packed_exit_carries_single_port_accesses_and_msr_exits(run_page):
    from hvvmm.kvm.exits import PACKED_HYPERCALL, PACKED_IO, PACKED_MSR, PACKED_OUT, PACKED_WRMSR

    run, view, _ = run_page
    _io(run, view, c.KVM_EXIT_IO_OUT, 4, 0x5E0, data=b"\x78\x56\x34\x12")
    assert _pack(run) == PACKED_IO | PACKED_OUT | 4 << 48 | 0x5E0 << 32 | 0x12345678
    _io(run, view, c.KVM_EXIT_IO_IN, 2, 0x60, offset=PAGE_BYTES - 2)
    assert _pack(run) == PACKED_IO | 2 << 48 | 0x60 << 32 | (PAGE_BYTES - 2)
    _io(run, view, c.KVM_EXIT_IO_OUT, 1, 0x79, data=b"\xAB")
    assert _pack(run) == PACKED_IO | PACKED_OUT | 1 << 48 | 0x79 << 32 | 0xAB  # no port given
    assert _pack(run, 0x79) & PACKED_HYPERCALL
    _io(run, view, c.KVM_EXIT_IO_IN, 1, 0x79)
    assert not _pack(run, 0x79) & PACKED_HYPERCALL  # an IN is never a hypercall
    run.exit_reason = c.KVM_EXIT_X86_WRMSR
    run.msr.index = 0x4000_0093
    assert _pack(run) == PACKED_MSR | PACKED_WRMSR | 0x4000_0093
    run.exit_reason = c.KVM_EXIT_X86_RDMSR
    assert _pack(run) == PACKED_MSR | 0x4000_0093


@pytest.mark.parametrize("size, count, offset", [
    (1, 2, 4096),                   # rep outs/ins: the general decoder
    (1, 0, 4096),
    (3, 1, 4096), (8, 1, 4096), (0, 1, 4096),
    (4, 1, PAGE_BYTES - 3),         # data would end past the page
    (1, 1, PAGE_BYTES),
    (2, 1, (1 << 64) - 1),          # an offset that wraps
])
def test_packed_exit_leaves_odd_port_accesses_to_the_decoder(run_page, size, count, offset):
    run, view, _ = run_page
    for direction in (c.KVM_EXIT_IO_IN, c.KVM_EXIT_IO_OUT):
        _io(run, view, direction, size, 0x79, count=count, offset=offset)
        assert _pack(run, 0x79) == 0


@pytest.mark.parametrize("reason", ["KVM_EXIT_MMIO", "KVM_EXIT_HLT", "KVM_EXIT_SHUTDOWN",
                                    "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT",
                                    "KVM_EXIT_INTR", "KVM_EXIT_UNKNOWN", "KVM_EXIT_FAIL_ENTRY"])
def test_packed_exit_leaves_every_other_exit_to_the_decoder(run_page, reason):
    run, view, _ = run_page
    _io(run, view, c.KVM_EXIT_IO_OUT, 1, 0x79, data=b"\x01")  # stale I/O fields in the union
    run.exit_reason = getattr(c, reason)
    assert _pack(run, 0x79) == 0
