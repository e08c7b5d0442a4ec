"""The exit decoder against hand-filled kvm_run pages (no /dev/kvm; needs the built bindings)."""

import pytest

from hvvmm.kvm import (FailEntryExit, HltExit, InternalErrorExit, IoExit, MmioExit, MsrExit,
                       ShutdownExit, SystemEventExit, UnknownExit, decode_exit)
from hvvmm.kvm import constants as c
from hvvmm.kvm._kvm import ffi, lib

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

def _loop(run, port=-1):
    loop = ffi.new("struct hvvmm_vcpu_loop *")
    loop.fd, loop.run, loop.run_size, loop.hypercall_port = -1, run, PAGE_BYTES, port
    return loop


def _pack(run, port=-1, loop=None):
    from hvvmm.kvm._kvm import lib

    return lib.hvvmm_pack_exit(loop if loop is not None else _loop(run, port))


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


# -- the hypercall decoded in C (hvvmm_pack_hypercall) -------------------------------------------

def _hypercall_page(run, view, *, long_mode, compat=False, control, first, second,
                    cpl=0, protected=True, synced=True):
    """The stub's `out 0x79, al` exit with the caller's registers in the sync-regs area; the
    32-bit registers carry junk in their upper halves, which the convention ignores."""
    _io(run, view, c.KVM_EXIT_IO_OUT, 1, 0x79, data=b"\xAB")
    sync = ffi.cast("struct kvm_sync_regs *", ffi.cast("char *", run) + lib.HVVMM_SYNC_REGS_OFFSET)
    regs, sregs = sync.regs, sync.sregs
    junk = 0xDEAD_BEEF << 32
    if long_mode:
        regs.rcx, regs.rdx, regs.r8 = control, first, second
        regs.rax = regs.rbx = regs.rsi = regs.rdi = junk
    else:
        regs.rdx, regs.rax = junk | control >> 32, junk | control & 0xFFFF_FFFF
        regs.rbx, regs.rcx = junk | first >> 32, junk | first & 0xFFFF_FFFF
        regs.rdi, regs.rsi = junk | second >> 32, junk | second & 0xFFFF_FFFF
        regs.r8 = junk
    sregs.cr0 = 0x8000_0011 if protected else 0x10
    sregs.efer = 0x500 if long_mode or compat else 0
    sregs.cs.l = 1 if long_mode else 0
    sregs.ss.dpl = cpl
    run.kvm_valid_regs = (c.KVM_SYNC_X86_REGS | c.KVM_SYNC_X86_SREGS) if synced else 0


@pytest.mark.parametrize("long_mode, compat", [(True, False), (False, False), (False, True)],
                         ids=["64-bit", "32-bit", "compatibility-mode"])
@pytest.mark.parametrize("control", [0x8001, 0x1_0008, 0x0, 0x1_FFFF])
def test_packed_hypercall_carries_the_decoded_simple_call(run_page, long_mode, compat, control):
    from hvvmm.kvm.exits import PACKED_HC_LONG, PACKED_HC_SIMPLE, PACKED_HYPERCALL

    run, view, _ = run_page
    first, second = 0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321
    _hypercall_page(run, view, long_mode=long_mode, compat=compat, control=control,
                    first=first, second=second)
    loop = _loop(run, 0x79)
    packed = _pack(run, loop=loop)
    assert packed & PACKED_HYPERCALL and packed & PACKED_HC_SIMPLE
    assert bool(packed & PACKED_HC_LONG) is long_mode
    assert packed >> 8 & 0x1FFFF == control and packed & 0xFF == 0xAB
    assert (loop.hc_input, loop.hc_output) == (first, second)


@pytest.mark.parametrize("how", ["cpl3", "cpl1", "real-mode", "rep-count", "variable-header",
                                 "reserved", "no-sync-regs", "other-port"])
@pytest.mark.parametrize("long_mode", [True, False], ids=["64-bit", "32-bit"])
def test_packed_hypercall_leaves_every_other_call_to_python(run_page, how, long_mode):
    """Outside the legal environment (#UD) and for any other call shape the registers are not
    decoded: Python reads them and answers through the general path."""
    from hvvmm.kvm.exits import PACKED_HC_SIMPLE, PACKED_HYPERCALL

    run, view, _ = run_page
    control = {"rep-count": 0x8001 | 1 << 32, "variable-header": 0x8001 | 1 << 17,
               "reserved": 0x8001 | 1 << 31}.get(how, 0x8001)
    _hypercall_page(run, view, long_mode=long_mode, control=control, first=0x10, second=0x20,
                    cpl={"cpl3": 3, "cpl1": 1}.get(how, 0), protected=how != "real-mode",
                    synced=how != "no-sync-regs")
    loop = _loop(run, 0x80 if how == "other-port" else 0x79)
    loop.hc_input = loop.hc_output = 0x5555
    packed = _pack(run, loop=loop)
    assert not packed & PACKED_HC_SIMPLE
    assert bool(packed & PACKED_HYPERCALL) is (how != "other-port")
    assert (loop.hc_input, loop.hc_output) == (0x5555, 0x5555)


def test_constant_msr_slots_are_kept_disabled_and_counted():
    """The C side of the constant-MSR answers (the answering itself needs KVM_RUN: see
    tests/guest/test_constant_msrs.py): slots are appended, updated in place, disabled, and
    refuse a ninth MSR."""
    loop = _loop(ffi.NULL)
    assert lib.hvvmm_set_constant_msr(loop, 0x4000_0002, 3) == 0
    assert lib.hvvmm_set_constant_msr(loop, 0x4000_0002, 4) == 0  # same slot
    assert loop.msr_slots == 1 and loop.msr[0].value == 4 and loop.msr[0].enabled
    for index in range(1, lib.HVVMM_CONSTANT_MSR_SLOTS):
        assert lib.hvvmm_set_constant_msr(loop, 0x4000_0100 + index, index) == 0
    assert lib.hvvmm_set_constant_msr(loop, 0x4000_0200, 1) < 0  # every slot taken
    loop.msr[0].hits = 7
    lib.hvvmm_disable_constant_msrs(loop)
    assert not any(loop.msr[i].enabled for i in range(loop.msr_slots))
    assert lib.hvvmm_constant_msr_hits(loop, 0) == 7  # kept
    assert lib.hvvmm_constant_msr_hits(loop, 99) == 0  # no such slot
