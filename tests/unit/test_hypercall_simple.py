"""The compact hypercall path (``Partition.hypercall_simple`` / ``dispatch_simple``) against the
general one (``Partition.hypercall`` / ``dispatch``): the same guest-visible result for every input.

Two identical partitions (or dispatchers) get the same random call: one through the general path
only, the other the way the vCPU exit does it (``HyperV._hypercall_exit``: the compact path when
the mode allows, the general path when it declines). Every register (and the order of register
writes), every byte of guest memory, every counter, every trace event, what each handler was
handed and whether #UD is due must match.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.hvdef import (HV_HYPERCALL_FAST_BIT, HV_HYPERCALL_NESTED,
                            HV_HYPERCALL_REP_COMP_OFFSET, HV_HYPERCALL_REP_START_OFFSET,
                            HV_HYPERCALL_VARHEAD_OFFSET, HypercallCode, HvStatus)
from hvvmm.hv.hypercall import (HypercallDispatcher, HypercallError, HypercallKind,
                                HypercallResult, HypercallSpec, HypercallTable)
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FakePlatform, FakeRegisters, filled_memory
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform, FakeRegisters, filled_memory

U32 = 0xFFFF_FFFF
RAM = 0x40000
PAGE = 0x1000

# Test calls of every shape the compact path must take or decline (codes no feature claims).
ECHO = 0x7F00           # 16 B in, 16 B out: echoes, or fails as the input says
NO_INPUT = 0x7F01       # 8 B out
FAST_IN = 0x7F02        # 16 B in, no output, fast form allowed
FAST_NONE = 0x7F03      # no input, no output, fast form allowed
BIG_FAST = 0x7F04       # 24 B in, fast form allowed (needs XMM: never compact)
DYNAMIC = 0x7F05        # available / access_allowed are callables that change with the input
REP = 0x7F06            # a rep call: never compact
NOT_AVAILABLE = 0x7F07  # available=False
BAD = 0x7F08            # a handler that breaks its contract in various ways
SUBPAGE = 0x7F09        # 0x800 B in, 0x800 B out (lists that can cross a page)

MODES = {  # what the handler of ECHO/FAST_IN/BAD does, chosen by the first input byte
    0: "ok", 1: "none", 2: "status", 3: "error", 4: "error_output", 5: "raise", 6: "time_out",
    7: "long_output", 8: "bytearray", 9: "wrong_type", 10: "reps", 11: "status_enum",
    12: "bad_status", 13: "short_output",
}


def _answer(request, output_size: int):
    mode = MODES.get(request.header[0] if request.header else 0, "ok")
    echo = (request.header * 2)[:output_size]
    if mode == "ok":
        return HypercallResult(output=echo)
    if mode == "none":
        return None
    if mode == "status":
        return HypercallResult(status=HvStatus.HV_STATUS_INVALID_PARAMETER, output=echo)
    if mode == "error":
        raise HypercallError(HvStatus.HV_STATUS_INSUFFICIENT_MEMORY)
    if mode == "error_output":
        raise HypercallError(HvStatus.HV_STATUS_SUCCESS, output=echo)
    if mode == "raise":
        raise RuntimeError("handler bug")
    if mode == "time_out":
        return HypercallResult(status=HvStatus.HV_STATUS_TIME_OUT)
    if mode == "long_output":
        return HypercallResult(output=echo + b"x" * 9)
    if mode == "bytearray":
        return HypercallResult(output=bytearray(echo))
    if mode == "wrong_type":
        return b"not a result"
    if mode == "reps":
        return HypercallResult(reps_completed=1)
    if mode == "status_enum":
        return HypercallResult(status=HvStatus.HV_STATUS_SUCCESS, output=echo)
    if mode == "bad_status":
        return HypercallResult(status=0x1_0000)
    return HypercallResult(output=echo[:3])  # short_output


class Recorder:
    """Handlers that note what they were handed; one per partition."""

    def __init__(self):
        self.seen: list[tuple] = []
        self.allow = True

    def note(self, request):
        self.seen.append((request.vp_index, request.code, request.name, request.fast,
                          request.long_mode, request.header, request.variable_header,
                          request.input, request.rep_count, request.rep_start, request.rep_end,
                          request.rep_input_size, request.rep_output_size, request.deadline,
                          request.progress, request.budget_exhausted()))

    def handler(self, output_size: int):
        def handle(request):
            self.note(request)
            return _answer(request, output_size)
        return handle

    def rep_handler(self, request):
        self.note(request)
        out = b""
        for _, element in request.rep_inputs():
            out += element
        return HypercallResult(output=out)

    def specs(self) -> list[HypercallSpec]:
        return [
            HypercallSpec(code=ECHO, name="Echo", handler=self.handler(16), input_size=16,
                          output_size=16),
            HypercallSpec(code=NO_INPUT, name="NoInput", handler=self.handler(8),
                          output_size=8),
            HypercallSpec(code=FAST_IN, name="FastIn", handler=self.handler(0), input_size=16,
                          fast_allowed=True),
            HypercallSpec(code=FAST_NONE, name="FastNone", handler=self.handler(0),
                          fast_allowed=True),
            HypercallSpec(code=BIG_FAST, name="BigFast", handler=self.handler(0),
                          input_size=24, fast_allowed=True),
            HypercallSpec(code=DYNAMIC, name="Dynamic", handler=self.handler(8), input_size=8,
                          output_size=8, available=lambda: self.allow,
                          access_allowed=lambda: self.allow),
            HypercallSpec(code=REP, name="Rep", handler=self.rep_handler,
                          kind=HypercallKind.REP, rep_input_size=8, rep_output_size=8,
                          fast_allowed=True),
            HypercallSpec(code=NOT_AVAILABLE, name="NotAvailable", handler=self.handler(0),
                          available=False),
            HypercallSpec(code=BAD, name="Bad", handler=self.handler(8), input_size=8,
                          output_size=8, fast_allowed=True, variable_header_allowed=True),
            HypercallSpec(code=SUBPAGE, name="Subpage", handler=self.handler(0x800),
                          input_size=0x800, output_size=0x800),
        ]


CODES = [ECHO, NO_INPUT, FAST_IN, FAST_NONE, BIG_FAST, DYNAMIC, REP, NOT_AVAILABLE, BAD, SUBPAGE,
         int(HypercallCode.HvExtCallQueryCapabilities),
         int(HypercallCode.HvExtCallGetBootZeroedMemory),
         int(HypercallCode.HvCallNotifyLongSpinWait), int(HypercallCode.HvCallPostMessage),
         int(HypercallCode.HvCallSignalEvent), int(HypercallCode.HvCallFlushVirtualAddressSpace),
         int(HypercallCode.HvCallSendSyntheticClusterIpi), 0x7FFF, 0x0000, 0xFFFF]

gpas = st.one_of(
    st.sampled_from([0x1000, 0x2000, 0x2FF8, 0x2FF0, 0x3008, RAM - 8, RAM - 16, RAM, 0x3804]),
    st.integers(0, RAM + PAGE).map(lambda gpa: gpa & ~7),      # aligned, mostly in RAM
    st.integers(0, RAM + PAGE),                                 # any alignment
    st.integers(0, (1 << 64) - 1),                              # anything
)


good_gpas = st.integers(0, RAM // 8 - 1).map(lambda n: n * 8)


@st.composite
def calls(draw):
    # Half the calls well-formed (a table code, a clean input value, GPAs in RAM), so the
    # compact path runs often; the rest anything.
    clean = draw(st.booleans())
    code = draw(st.sampled_from(CODES) if clean
                else st.sampled_from(CODES) | st.integers(0, 0xFFFF))
    control = code
    if draw(st.booleans()):
        control |= HV_HYPERCALL_FAST_BIT
    if clean:
        return dict(control=control, long_mode=draw(st.booleans()), protected=True, cpl=0,
                    input_gpa=draw(good_gpas), output_gpa=draw(good_gpas),
                    first_byte=draw(st.sampled_from(sorted(MODES))), allow=draw(st.booleans()),
                    junk=draw(st.integers(0, (1 << 64) - 1)), vp=draw(st.integers(0, 1)))
    if draw(st.integers(0, 5)) == 0:
        control |= draw(st.integers(1, 3)) << HV_HYPERCALL_VARHEAD_OFFSET
    if draw(st.integers(0, 3)) == 0:
        count = draw(st.integers(0, 4))
        control |= count << HV_HYPERCALL_REP_COMP_OFFSET
        control |= draw(st.integers(0, count + 1)) << HV_HYPERCALL_REP_START_OFFSET
    if draw(st.integers(0, 7)) == 0:
        control |= draw(st.sampled_from([HV_HYPERCALL_NESTED, 1 << 27, 1 << 44, 1 << 60,
                                         1 << 63]))
    long_mode = draw(st.booleans())
    protected = draw(st.integers(0, 15)) != 0
    cpl = draw(st.sampled_from([0] * 12 + [1, 2, 3]))
    return dict(control=control, long_mode=long_mode, protected=protected, cpl=cpl,
                input_gpa=draw(gpas), output_gpa=draw(gpas),
                first_byte=draw(st.sampled_from(sorted(MODES))), allow=draw(st.booleans()),
                junk=draw(st.integers(0, (1 << 64) - 1)), vp=draw(st.integers(0, 1)))


class Side:
    """One partition, its memory, its events and its handlers' notes."""

    def __init__(self, traced: bool):
        self.platform = FakePlatform(vp_count=2, mem_size=RAM)
        memory = self.platform.memory
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(256))
        memory.write(0, pattern * (RAM // 256))
        self.events: list[dict] = []
        self.partition = Partition(parse_hyperv_spec("all"), self.platform,
                                   on_event=self._event if traced else None)
        self.recorder = Recorder()
        for spec in self.recorder.specs():
            self.partition.add_test_hypercall(spec)
        from hvvmm.hv import hvdef
        self.partition.msr_write(0, hvdef.HV_X64_MSR_GUEST_OS_ID,
                                 hvdef.linux_guest_os_id(6, 1, 192))
        self.partition.msr_write(0, hvdef.HV_X64_MSR_HYPERCALL, 0x5000 | 1)

    def _event(self, event) -> None:
        record = event.to_dict()
        del record["time"]
        self.events.append(record)

    def registers(self, call: dict) -> FakeRegisters:
        regs = FakeRegisters(long_mode=call["long_mode"], protected=call["protected"],
                             cpl=call["cpl"])
        # Junk in the high halves: 32-bit callers must not see it.
        for i, name in enumerate(regs.gprs):
            regs.gprs[name] = (call["junk"] ^ (i * 0x0101_0101)) & ((1 << 64) - 1)
        regs.set_call(call["control"], call["input_gpa"], call["output_gpa"])
        if not call["long_mode"]:
            for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi"):
                regs.gprs[name] |= call["junk"] & (U32 << 32)
        if 0 <= call["input_gpa"] < RAM:
            self.platform.memory.write(call["input_gpa"], bytes([call["first_byte"]]))
        return regs

    def state(self, regs: FakeRegisters, ud: bool) -> tuple:
        return (regs.snapshot(), regs.retries, regs.gpr_writes, regs.xmm_reads, regs.xmm_writes,
                ud, bytes(self.platform.memory.read(0, RAM)), self.partition.counters(),
                self.events, self.recorder.seen, self.platform.interrupts)


def general(side: Side, call: dict) -> tuple:
    side.recorder.allow = call["allow"]
    regs = side.registers(call)
    outcome = side.partition.hypercall(call["vp"], regs)
    return side.state(regs, outcome.inject_ud)


def as_the_vcpu_does(side: Side, call: dict) -> tuple:
    """What ``HyperV._hypercall_exit`` does, over the fake register file."""
    side.recorder.allow = call["allow"]
    regs = side.registers(call)
    partition, vp = side.partition, call["vp"]
    if regs.is_protected_mode() and regs.cpl() == 0:
        g = regs.gprs
        if regs.is_long_mode():
            handled = partition.hypercall_simple(vp, regs, True, g["rcx"], g["rdx"], g["r8"])
        else:
            handled = partition.hypercall_simple(
                vp, regs, False, (g["rdx"] & U32) << 32 | g["rax"] & U32,
                (g["rbx"] & U32) << 32 | g["rcx"] & U32, (g["rdi"] & U32) << 32 | g["rsi"] & U32)
        event("compact path" if handled else "declined")
        if handled:
            return side.state(regs, False)
    outcome = partition.hypercall(vp, regs)
    return side.state(regs, outcome.inject_ud)


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(calls(), min_size=1, max_size=6))
def test_compact_path_matches_general_path(traced, sequence):
    one, two = Side(traced), Side(traced)
    for call in sequence:
        assert as_the_vcpu_does(two, call) == general(one, call), call


def test_compact_path_is_taken_for_the_common_shapes():
    """The parity test would pass if the compact path never ran: check it does run (and
    declines what it must)."""
    side = Side(traced=False)
    partition = side.partition

    def simple(control, first=0, second=0, long_mode=True):
        regs = FakeRegisters(long_mode=long_mode)
        return partition.hypercall_simple(0, regs, long_mode, control, first, second), regs

    handled, regs = simple(int(HypercallCode.HvExtCallQueryCapabilities), 0, 0x3000)
    assert handled and regs.gprs["rax"] == 0 and regs.gpr_writes == ["rax"]
    assert side.platform.memory.read(0x3000, 8) == struct.pack("<Q", 1)
    handled, regs = simple(int(HypercallCode.HvExtCallQueryCapabilities), 0, 0x3000, False)
    assert handled and regs.gpr_writes == ["rdx", "rax"]
    assert simple(FAST_IN | HV_HYPERCALL_FAST_BIT, 0x1122, 0x3344)[0]
    assert side.recorder.seen[-1][5] == struct.pack("<QQ", 0x1122, 0x3344)
    assert simple(FAST_NONE | HV_HYPERCALL_FAST_BIT)[0]
    assert simple(ECHO, 0x2000, 0x3000)[0]
    # Declined, with nothing written: rep fields, variable header, reserved bits, unknown code,
    # unavailable, XMM-sized fast input, fast without a register form, bad lists.
    for control, first, second in [
            (REP | 1 << HV_HYPERCALL_REP_COMP_OFFSET, 0x2000, 0x3000),
            (BAD | 1 << HV_HYPERCALL_VARHEAD_OFFSET, 0x2000, 0x3000),
            (ECHO | HV_HYPERCALL_NESTED, 0x2000, 0x3000), (0x7FFF, 0, 0), (NOT_AVAILABLE, 0, 0),
            (BIG_FAST | HV_HYPERCALL_FAST_BIT, 0, 0), (ECHO | HV_HYPERCALL_FAST_BIT, 0, 0),
            (ECHO, 0x2004, 0x3000), (ECHO, 0x2000, 0x2FF8), (ECHO, RAM, 0x3000),
            (ECHO, 0x2000, RAM - 8)]:
        handled, regs = simple(control, first, second)
        assert not handled and regs.gpr_writes == [], hex(control)
    side.recorder.allow = False
    assert not simple(DYNAMIC, 0x2000, 0x3000)[0]
    side.recorder.allow = True
    assert simple(DYNAMIC, 0x2000, 0x3000)[0]
    counters = partition.counters()["vp0"]["hypercalls"]
    assert counters["HvExtCallQueryCapabilities/HV_STATUS_SUCCESS"] == 2
    # With a trace listener the compact path steps aside (events come from one place).
    partition.on_event = lambda event: None
    assert not simple(int(HypercallCode.HvExtCallQueryCapabilities), 0, 0x3000)[0]


@settings(max_examples=200, deadline=None)
@given(sequence=st.lists(calls(), min_size=1, max_size=4), budget=st.sampled_from([None, 5.0]))
def test_dispatcher_parity_with_a_time_budget(sequence, budget):
    """The dispatchers alone, with a rep budget and a time budget on a fake clock: the deadline
    a simple call's handler sees is the same on both paths."""
    sides = []
    for _ in range(2):
        recorder = Recorder()
        ticks = iter(range(10_000))
        dispatcher = HypercallDispatcher(HypercallTable(recorder.specs()),
                                         filled_memory(RAM), max_reps_per_entry=2,
                                         time_budget=budget,
                                         clock=lambda ticks=ticks: float(next(ticks)))
        sides.append((recorder, dispatcher))
    for call in sequence:
        results = []
        for which, (recorder, dispatcher) in enumerate(sides):
            recorder.allow = call["allow"]
            regs = FakeRegisters(long_mode=call["long_mode"])
            regs.set_call(call["control"], call["input_gpa"], call["output_gpa"])
            status = None
            if which:
                status = dispatcher.dispatch_simple(
                    regs, call["vp"], call["long_mode"], regs.control(),
                    *((regs.gprs["rdx"], regs.gprs["r8"]) if call["long_mode"] else
                      ((regs.gprs["rbx"] << 32) | regs.gprs["rcx"],
                       (regs.gprs["rdi"] << 32) | regs.gprs["rsi"])))
            if status is None:
                outcome = dispatcher.dispatch(regs, call["vp"])
                status = -1 if outcome.status is None else outcome.status
            results.append((status, regs.snapshot(), regs.gpr_writes, regs.retries,
                            bytes(dispatcher.memory.read(0, RAM)), recorder.seen))
        assert results[0] == results[1], call


# -- the vCPU exit itself (HyperV._hypercall_exit) over a kvm_run page -------------------------
# ``as_the_vcpu_does`` above mirrors the exit over the fake register file; this drives the real
# closure, with the caller's registers in the sync-regs area at the compiler's offsets, so a
# wrong register index or mode bit in the exit shows up here and not only in a guest.

class PageVcpu:
    """A ``Vcpu`` without an fd: its kvm_run page is plain memory; the ioctls it would make for
    an XMM fast call or a #UD are recorded instead."""

    def __new__(cls, call: dict):
        from hvvmm.kvm import Vcpu
        from hvvmm.kvm._kvm import ffi, lib

        vcpu = object.__new__(Vcpu)
        vcpu._storage = storage = ffi.new("char[]", 3 * 4096)
        vcpu._run_size = 3 * 4096
        vcpu.run_struct = ffi.cast("struct kvm_run *", storage)
        vcpu._run_view = memoryview(ffi.buffer(storage))
        vcpu._init_loop()
        vcpu.index = call["vp"]
        # The exit: the stub's `out 0x79, al` (AL = 0x5A), as KVM leaves it in the page.
        run = vcpu.run_struct
        run.exit_reason, run.io.direction, run.io.size, run.io.port, run.io.count = (
            lib.KVM_EXIT_IO, lib.KVM_EXIT_IO_OUT, 1, 0x79, 1)
        run.io.data_offset = 4096
        vcpu._run_view[4096] = 0x5A
        run.kvm_valid_regs = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS
        sync = ffi.cast("struct kvm_sync_regs *", storage + lib.HVVMM_SYNC_REGS_OFFSET)
        regs = FakeRegisters(long_mode=call["long_mode"])  # the values Side.registers loads
        for i, name in enumerate(regs.gprs):
            regs.gprs[name] = (call["junk"] ^ (i * 0x0101_0101)) & ((1 << 64) - 1)
        regs.long_mode = call["long_mode"]
        regs.set_call(call["control"], call["input_gpa"], call["output_gpa"])
        if not call["long_mode"]:
            for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi"):
                regs.gprs[name] |= call["junk"] & (U32 << 32)
        for name, value in regs.gprs.items():
            setattr(sync.regs, name, value)
        sync.regs.rip = 0x5002  # past the stub's OUT in the hypercall page at 0x5000
        sregs = sync.sregs
        sregs.cr0 = 0x8000_0011 if call["protected"] else 0x10
        # Compatibility mode (EFER.LMA, CS.L = 0) for half the 32-bit calls: still x86 rules.
        sregs.efer = 0x500 if call["long_mode"] or call["junk"] & 1 else 0
        sregs.cs.l = 1 if call["long_mode"] else 0
        sregs.ss.dpl = call["cpl"]
        vcpu.notes = []
        vcpu.inject_exception = lambda vector, error_code=None: vcpu.notes.append(("#", vector))
        vcpu.get_fpu = lambda: PageVcpu._fpu(ffi)
        vcpu.set_fpu = lambda fpu: vcpu.notes.append(("fpu", bytes(ffi.buffer(fpu))))
        return vcpu

    @staticmethod
    def _fpu(ffi):
        fpu = ffi.new("struct kvm_fpu *")
        for i in range(16):
            fpu.xmm[i] = list(((0xC3C3 << 112) | i).to_bytes(16, "little"))
        return fpu


def _page_state(side: Side, vcpu) -> tuple:
    from hvvmm.kvm._kvm import lib

    offset = lib.HVVMM_SYNC_REGS_OFFSET
    return (bytes(vcpu._run_view[offset:offset + 8 * 18]), vcpu.run_struct.kvm_dirty_regs,
            vcpu.notes, bytes(side.platform.memory.read(0, RAM)), side.partition.counters(),
            side.recorder.seen)


def _hyperv_over(side: Side):
    from types import SimpleNamespace

    from hvvmm.hyperv import HyperV

    hyperv = object.__new__(HyperV)
    hyperv.partition, hyperv.port, hyperv.use_sync_regs = side.partition, 0x79, True
    written = []
    pio = SimpleNamespace(write=lambda port, size, value: written.append((port, size, value)))
    return hyperv, pio, written


# (protected mode, CPL) for the exit test: mostly the legal environment, and the #UD ones with
# calls the compact path would otherwise take (``calls()`` pairs those with malformed calls).
environments = st.sampled_from([(True, 0)] * 4 + [(True, 3), (True, 1), (False, 0)])


@settings(max_examples=200, deadline=None)
@given(sequence=st.lists(st.tuples(calls(), environments), min_size=1, max_size=4))
def test_the_vcpu_exit_matches_the_general_path(sequence):
    """``HyperV._hypercall_exit`` (compact path over the page, general when it declines) against
    ``HyperV._dispatch`` over ``VcpuRegisters``: same page, same RAM, counters and handlers."""
    from types import SimpleNamespace

    from hvvmm.hyperv import VcpuRegisters

    one, two = Side(False), Side(False)
    for call, (protected, cpl) in sequence:
        call = dict(call, protected=protected, cpl=cpl)
        results = []
        for side, compact in ((one, False), (two, True)):
            side.recorder.allow = call["allow"]
            if 0 <= call["input_gpa"] < RAM:
                side.platform.memory.write(call["input_gpa"], bytes([call["first_byte"]]))
            vcpu = PageVcpu(call)
            hyperv, pio, written = _hyperv_over(side)
            thread = SimpleNamespace(vcpu=vcpu, index=call["vp"], pio_bus=pio)
            if compact:
                # As the run loop does it: the exit packed (and the call decoded) in C, then
                # the closure with the packed value.
                from hvvmm.kvm._kvm import lib

                vcpu.set_hypercall_port(0x79)
                packed = lib.hvvmm_pack_exit(vcpu._loop)
                loop = vcpu._loop
                answer = hyperv._hypercall_exit(thread)(packed, loop.hc_input, loop.hc_output)
                if answer:  # what run_exits and then the next KVM_RUN do with it
                    loop.hc_success = answer
                    lib.hvvmm_apply_hypercall_success(loop)
            else:
                hyperv._dispatch(thread, VcpuRegisters(vcpu, True))
            results.append((_page_state(side, vcpu), written))
        assert results[0] == results[1], call


def test_a_vp_index_out_of_range_is_refused_before_the_handler_on_both_paths():
    """A VMM bug, not guest input: both paths raise before any handler runs or register moves."""
    side = Side(traced=False)
    partition = side.partition
    regs = FakeRegisters()
    regs.set_call(FAST_IN | HV_HYPERCALL_FAST_BIT, 0x11, 0x22)
    with pytest.raises(ValueError, match="VP index 5"):
        partition.hypercall_simple(5, regs, True, regs.control(), 0x11, 0x22)
    with pytest.raises(ValueError, match="VP index 5"):
        partition.hypercall(5, regs)
    assert side.recorder.seen == [] and regs.gpr_writes == []


def test_compact_path_counts_survive_a_table_change_and_the_calls_are_prepared_again():
    """Successes are counted in the compact path's own cells: a change of the table (a code
    registered later) drops the prepared calls but not their counts."""
    side = Side(traced=False)
    partition = side.partition
    query = int(HypercallCode.HvExtCallQueryCapabilities)

    def call():
        regs = FakeRegisters(long_mode=True)
        assert partition.hypercall_simple(0, regs, True, query, 0, 0x3000)

    call()
    call()
    prepared = partition.simple_hypercalls(0)
    first = prepared[query]
    counters = partition.counters()["vp0"]["hypercalls"]
    assert counters["HvExtCallQueryCapabilities/HV_STATUS_SUCCESS"] == 2
    partition.add_test_hypercall(HypercallSpec(code=0x7F7F, name="Late", handler=lambda r: None))
    assert query not in prepared  # dropped with the change
    counters = partition.counters()["vp0"]["hypercalls"]
    assert counters["HvExtCallQueryCapabilities/HV_STATUS_SUCCESS"] == 2  # not lost
    call()
    assert prepared[query] is not first  # prepared again, from the table as it is now
    counters = partition.counters()["vp0"]["hypercalls"]
    assert counters["HvExtCallQueryCapabilities/HV_STATUS_SUCCESS"] == 3
