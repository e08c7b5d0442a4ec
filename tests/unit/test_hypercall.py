"""hvvmm.hv.hypercall: the ABI, validation order, dispatch, continuation.

Every dispatcher path runs for both calling conventions (x64: RCX/RDX/R8/RAX; x86: EDX:EAX,
EBX:ECX, EDI:ESI). Guest memory is filled with FILL_PATTERN so that over-reads show up as wrong
handler input and over-writes as changed bytes outside the output list (OpenVMM tests.rs style).
"""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.hv.hvdef import HV_HYPERCALL_RSVD_MASK, HvStatus
from hvvmm.hv.hypercall import (
    HypercallDispatcher,
    HypercallError,
    HypercallInput,
    HypercallKind,
    HypercallOutcome,
    HypercallRequest,
    HypercallResult,
    HypercallSpec,
    HypercallTable,
    HypercallTableError,
    compose_result,
    decode_result,
)
from hvvmm.memory import GuestMemory

try:
    from hvfakes import PAGE_BASE, STUB_RIP, FakeRegisters, filled_memory
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import PAGE_BASE, STUB_RIP, FakeRegisters, filled_memory

S = HvStatus
IN_GPA = 0x1000
OUT_GPA = 0x2000
MEM_SIZE = 0x10000

# Sample call codes (not real TLFS calls).
SIMPLE = 0x0801  # 16 B in -> 16 B out (halves swapped)
NO_INPUT = 0x0802  # nothing in -> 8 B out
FAST = 0x0803  # 16 B in, no out, fast allowed (like HvCallSendSyntheticClusterIpi)
XMM = 0x0804  # 16 B header + var header, no out, fast allowed (like the Ex calls)
FAST_OUT = 0x0805  # 8 B in -> 24 B out, fast allowed
REP = 0x0806  # rep: 8 B key, 8 B elements in, 8 B elements out (element ^ key)
REP_FAST = 0x0807  # rep: 8 B header, 8 B elements in, no out, fast allowed (like flush list)
REP_FAST_OUT = 0x0808  # rep: 8 B header, 8 B elements out only, fast allowed
UNAVAILABLE = 0x0809
DENIED = 0x080A
CRASH = 0x080B  # handler raises RuntimeError
ERROR = 0x080C  # handler raises HypercallError(INVALID_PARAMETER)
BAD_OUTPUT = 0x080D  # handler returns too much output
SLOW = 0x080E  # simple: TIME_OUT on the first entry, then SUCCESS
NO_PROGRESS = 0x080F  # rep: SUCCESS without progress (a handler bug)
REP_VAR = 0x0810  # rep with a variable header (like HvCallFlushVirtualAddressListEx)
MEMORY_ONLY = 0x0811  # 16 B in, no out, memory only (like HvCallPostMessage)
NONE_RESULT = 0x0812  # handler returns None
BAD_RETURN = 0x0813  # handler returns a non-HypercallResult

BAD_ELEMENT = 0xBAD0_0000_0000_0BAD


def u64(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def ctl(code: int, *, fast: bool = False, var: int = 0, rep_count: int = 0, rep_start: int = 0,
        extra: int = 0) -> int:
    return HypercallInput(code, fast=fast, variable_header_size=var, rep_count=rep_count,
                          rep_start=rep_start).to_value() | extra


class Env:
    """One VM's worth of hypercall state: memory, a table of sample specs, a dispatcher."""

    def __init__(self, long_mode: bool, memory: GuestMemory | None = None, **dispatcher_kwargs):
        self.long_mode = long_mode
        self.memory = memory if memory is not None else filled_memory(MEM_SIZE)
        self.requests: list[HypercallRequest] = []
        self.available = True
        self.slow_entries = 0
        self.table = HypercallTable()
        for spec in self.specs():
            self.table.register(spec)
        # (vp, code, status, reps) of every outcome: what the partition counts calls by.
        self.notified: list[tuple] = []
        self.dispatcher = HypercallDispatcher(self.table, self.memory, **dispatcher_kwargs)
        dispatch = self.dispatcher.dispatch

        def recording_dispatch(io, vp_index):
            outcome = dispatch(io, vp_index)
            self.notified.append((outcome.vp_index, outcome.code, outcome.status,
                                  outcome.reps_completed))
            return outcome

        self.dispatcher.dispatch = recording_dispatch

    def record(self, request: HypercallRequest) -> None:
        self.requests.append(request)

    def specs(self) -> list[HypercallSpec]:
        def simple(req):
            self.record(req)
            return HypercallResult(output=req.header[8:] + req.header[:8])

        def no_input(req):
            self.record(req)
            return HypercallResult(output=u64(0x1122334455667788))

        def record_only(req):
            self.record(req)
            return HypercallResult()

        def fast_out(req):
            self.record(req)
            return HypercallResult(output=req.header * 3)

        def rep_xor(req):
            self.record(req)
            (key,) = struct.unpack("<Q", req.header)
            out = b""
            for _index, element in req.rep_inputs():
                (value,) = struct.unpack("<Q", element)
                if value == BAD_ELEMENT:
                    raise HypercallError(S.HV_STATUS_INVALID_PARAMETER, output=out)
                out += u64(value ^ key)
            return HypercallResult(output=out)

        def rep_fast(req):
            self.record(req)
            for _index, _element in req.rep_inputs():
                pass
            return None

        def rep_fast_out(req):
            self.record(req)
            out = b""
            for index, _element in req.rep_inputs():
                out += u64(0x0101_0101_0101_0101 * (index + 1))
            return HypercallResult(output=out)

        def crash(req):
            raise RuntimeError("handler bug")

        def error(req):
            raise HypercallError(S.HV_STATUS_INVALID_PARAMETER)

        def slow(req):
            self.record(req)
            self.slow_entries += 1
            if self.slow_entries == 1:
                return HypercallResult(status=S.HV_STATUS_TIME_OUT)
            return HypercallResult(output=u64(self.slow_entries))

        return [
            HypercallSpec(code=SIMPLE, name="TestSimple", handler=simple, input_size=16,
                          output_size=16),
            HypercallSpec(code=NO_INPUT, name="TestNoInput", handler=no_input, output_size=8),
            HypercallSpec(code=FAST, name="TestFast", handler=record_only, input_size=16,
                          fast_allowed=True),
            HypercallSpec(code=XMM, name="TestXmm", handler=record_only, input_size=16,
                          fast_allowed=True, variable_header_allowed=True),
            HypercallSpec(code=FAST_OUT, name="TestFastOut", handler=fast_out, input_size=8,
                          output_size=24, fast_allowed=True),
            HypercallSpec(code=REP, name="TestRep", handler=rep_xor, kind=HypercallKind.REP,
                          input_size=8, rep_input_size=8, rep_output_size=8),
            HypercallSpec(code=REP_FAST, name="TestRepFast", handler=rep_fast,
                          kind=HypercallKind.REP, input_size=8, rep_input_size=8,
                          fast_allowed=True),
            HypercallSpec(code=REP_FAST_OUT, name="TestRepFastOut", handler=rep_fast_out,
                          kind=HypercallKind.REP, input_size=8, rep_output_size=8,
                          fast_allowed=True),
            HypercallSpec(code=UNAVAILABLE, name="TestUnavailable", handler=record_only,
                          available=lambda: not self.available),
            HypercallSpec(code=DENIED, name="TestDenied", handler=record_only, input_size=8,
                          access_allowed=False),
            HypercallSpec(code=CRASH, name="TestCrash", handler=crash, kind=HypercallKind.REP,
                          rep_input_size=8),
            HypercallSpec(code=ERROR, name="TestError", handler=error, input_size=8),
            HypercallSpec(code=BAD_OUTPUT, name="TestBadOutput",
                          handler=lambda req: HypercallResult(output=b"x" * 16), output_size=8),
            HypercallSpec(code=SLOW, name="TestSlow", handler=slow, output_size=8),
            HypercallSpec(code=NO_PROGRESS, name="TestNoProgress", handler=record_only,
                          kind=HypercallKind.REP, rep_input_size=8),
            HypercallSpec(code=REP_VAR, name="TestRepVar", handler=rep_xor,
                          kind=HypercallKind.REP, input_size=8, rep_input_size=8,
                          rep_output_size=8, variable_header_allowed=True),
            HypercallSpec(code=MEMORY_ONLY, name="TestMemoryOnly", handler=record_only,
                          input_size=16),
            HypercallSpec(code=NONE_RESULT, name="TestNoneResult", handler=lambda req: None,
                          output_size=8),
            HypercallSpec(code=BAD_RETURN, name="TestBadReturn", handler=lambda req: 5),
        ]

    def regs(self, **kwargs) -> FakeRegisters:
        return FakeRegisters(long_mode=self.long_mode, **kwargs)

    def call(self, control: int, input_gpa: int = IN_GPA, output_gpa: int = OUT_GPA,
             regs: FakeRegisters | None = None, vp_index: int = 0):
        regs = regs if regs is not None else self.regs()
        regs.set_call(control, input_gpa, output_gpa)
        return self.dispatcher.dispatch(regs, vp_index), regs

    def fast_call(self, control: int, block: bytes, regs: FakeRegisters | None = None):
        regs = regs if regs is not None else self.regs()
        regs.set_call(control)
        regs.set_fast_block(block)
        return self.dispatcher.dispatch(regs, 0), regs

    def snapshot(self) -> bytes:
        return self.memory.read(0, MEM_SIZE)


RESULT_REGS = {True: ["rax"], False: ["rdx", "rax"]}


@pytest.fixture(params=[True, False], ids=["x64", "x86"])
def long_mode(request) -> bool:
    return request.param


@pytest.fixture
def env(long_mode) -> Env:
    return Env(long_mode)


def assert_memory_changed_only(before: bytes, after: bytes, gpa: int = 0, size: int = 0):
    assert after[:gpa] == before[:gpa], "write before the output list"
    assert after[gpa + size:] == before[gpa + size:], "write after the output list"


def assert_result(outcome: HypercallOutcome, regs: FakeRegisters, status: int, reps: int = 0):
    assert outcome.status == status, (str(outcome), outcome.reason)
    assert not outcome.inject_ud and not outcome.retried
    assert outcome.reps_completed == reps
    assert regs.result() == compose_result(status, reps) == outcome.result_value
    assert decode_result(regs.result()) == (status, reps)
    assert regs.gpr_writes == RESULT_REGS[regs.long_mode]
    assert regs.xmm_writes == [] or outcome.fast
    assert regs.rip == STUB_RIP and regs.retries == 0  # completion never touches RIP


def assert_ud(outcome: HypercallOutcome, regs: FakeRegisters, before: tuple):
    assert outcome.inject_ud and outcome.status is None and outcome.result_value is None
    assert regs.snapshot() == before
    assert regs.gpr_writes == [] and regs.xmm_writes == [] and regs.retries == 0


# -- input value / result value -------------------------------------------------------------

def test_input_value_round_trip_and_fields():
    value = ctl(0x0014, fast=True, var=3, rep_count=10, rep_start=4)
    assert value == 0x0014 | 1 << 16 | 3 << 17 | 10 << 32 | 4 << 48
    hc = HypercallInput.from_value(value)
    assert (hc.code, hc.fast, hc.variable_header_size, hc.rep_count, hc.rep_start) == (
        0x14, True, 3, 10, 4)
    assert not hc.has_reserved_bits and not hc.is_nested
    assert hc.with_rep_start(7).to_value() == ctl(0x0014, fast=True, var=3, rep_count=10,
                                                  rep_start=7)
    nested = HypercallInput.from_value(1 << 31)
    assert nested.is_nested and nested.has_reserved_bits and nested.to_value() == 1 << 31
    assert HypercallInput.from_value(-1).to_value() == (1 << 64) - 1
    assert HypercallInput.from_value(1 << 64).to_value() == 0


@pytest.mark.parametrize("kwargs", [
    {"code": 0x10000}, {"code": -1}, {"code": 1, "rep_count": 0x1000}, {"code": 1, "rep_start": -1},
    {"code": 1, "variable_header_size": 0x400}, {"code": 1, "reserved": 1}])
def test_input_value_rejects_out_of_range_fields(kwargs):
    with pytest.raises(ValueError):
        HypercallInput(**kwargs)


def test_result_value():
    assert compose_result(S.HV_STATUS_SUCCESS, 10) == 10 << 32
    assert compose_result(S.HV_STATUS_INVALID_ALIGNMENT) == 4
    assert decode_result(0xFFFF_FFFF_FFFF_FFFF) == (0xFFFF, 0xFFF)


# -- table and specs ------------------------------------------------------------------------

def test_table_refuses_duplicate_codes():
    table = HypercallTable()
    spec = HypercallSpec(code=0x5C, handler=lambda req: None, input_size=256)
    assert table.register(spec) is spec
    assert spec.name == "HvCallPostMessage"  # default name from hvdef
    with pytest.raises(HypercallTableError, match="already registered"):
        table.register(HypercallSpec(code=0x5C, name="Other", handler=lambda req: None))
    assert 0x5C in table and len(table) == 1 and list(table) == [spec]
    assert table.get(0x5D) is None


@pytest.mark.parametrize("kwargs", [
    {"code": 0x10000},
    {"code": 1, "input_size": 12},  # not a multiple of 8
    {"code": 1, "output_size": -8},
    {"code": 1, "input_size": 8192},
    {"code": 1, "rep_input_size": 8},  # rep elements on a simple call
    {"code": 1, "kind": HypercallKind.REP},  # rep call without elements
    {"code": 1, "kind": HypercallKind.REP, "rep_input_size": 8, "output_size": 8},
    {"code": 1, "kind": "rep", "rep_input_size": 8},
    {"code": 1, "handler": None},
])
def test_spec_validation(kwargs):
    kwargs.setdefault("handler", lambda req: None)
    with pytest.raises(ValueError):
        HypercallSpec(**kwargs)


def test_dispatcher_arguments():
    with pytest.raises(ValueError):
        HypercallDispatcher(HypercallTable(), GuestMemory.from_bytes(4096), max_reps_per_entry=0)
    with pytest.raises(ValueError):
        HypercallDispatcher(HypercallTable(), GuestMemory.from_bytes(4096), time_budget=0)


# -- the simple memory path -----------------------------------------------------------------

def test_simple_call(env):
    env.memory.write(IN_GPA, u64(0xAAAA, 0xBBBB))
    before = env.snapshot()
    outcome, regs = env.call(ctl(SIMPLE), vp_index=3)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    (request,) = env.requests
    assert request.header == u64(0xAAAA, 0xBBBB)  # exactly 16 bytes: no over-read
    assert request.variable_header == b"" and request.input == request.header
    assert (request.vp_index, request.code, request.name, request.fast, request.long_mode) == (
        3, SIMPLE, "TestSimple", False, env.long_mode)
    assert env.memory.read(OUT_GPA, 16) == u64(0xBBBB, 0xAAAA)
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA, 16)
    assert (outcome.input_gpa, outcome.output_gpa) == (IN_GPA, OUT_GPA)
    assert env.notified == [(3, SIMPLE, 0, 0)]
    assert str(outcome) == (f"vp3 TestSimple(0x0801) {'x64' if env.long_mode else 'x86'} "
                            "in=0x1000 out=0x2000 -> HV_STATUS_SUCCESS")
    assert regs.xmm_reads == []  # XMM untouched by an ordinary call


def test_gpa_of_an_empty_list_is_ignored(env):
    # TLFS: "If the hypercall involves no input or output parameters, the hypervisor ignores the
    # corresponding GPA pointer."
    outcome, regs = env.call(ctl(NO_INPUT), input_gpa=0xDEAD_BEEF_0003, output_gpa=OUT_GPA)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert env.memory.read(OUT_GPA, 8) == u64(0x1122334455667788)
    outcome, regs = env.call(ctl(MEMORY_ONLY), output_gpa=0xFFFF_FFFF_FFFF_FFFF)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)


def test_32bit_convention_uses_the_high_halves():
    base = 0x1_0000_0000
    env = Env(False, memory=filled_memory(MEM_SIZE, gpa=base))
    env.memory.write(base + IN_GPA, u64(1, 2))
    outcome, regs = env.call(ctl(SIMPLE), base + IN_GPA, base + OUT_GPA)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert (regs.gprs["rbx"], regs.gprs["rcx"]) == (1, IN_GPA)
    assert env.memory.read(base + OUT_GPA, 16) == u64(2, 1)


def test_32bit_caller_upper_register_halves_are_ignored():
    env = Env(False)
    env.memory.write(IN_GPA, u64(5, 6))
    regs = env.regs()
    regs.set_call(ctl(SIMPLE), IN_GPA, OUT_GPA)
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi"):
        regs.gprs[name] |= 0xFFFF_FFFF_0000_0000  # junk in the upper halves
    outcome = env.dispatcher.dispatch(regs, 0)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert regs.gprs["rax"] == 0 and regs.gprs["rdx"] == 0  # zero-extended EDX:EAX


# -- mode checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("protected, cpl, reason", [(False, 0, "real mode"), (True, 3, "CPL 3"),
                                                    (True, 1, "CPL 1")])
def test_real_mode_and_cpl_above_zero_inject_ud(env, protected, cpl, reason):
    env.memory.write(IN_GPA, u64(1, 2))
    before_memory = env.snapshot()
    regs = env.regs(protected=protected, cpl=cpl)
    regs.set_call(ctl(SIMPLE), IN_GPA, OUT_GPA)
    before = regs.snapshot()
    outcome = env.dispatcher.dispatch(regs, 1)
    assert_ud(outcome, regs, before)
    assert outcome.reason == reason and outcome.code == SIMPLE
    assert env.requests == [] and env.snapshot() == before_memory
    assert env.notified == [(1, SIMPLE, None, 0)]
    assert str(outcome).endswith(f"-> #UD ({reason})")


# -- code checks ----------------------------------------------------------------------------

def test_unknown_code(env, caplog):
    before = env.snapshot()
    with caplog.at_level(logging.WARNING, logger="hvvmm.hv.hypercall"):
        outcome, regs = env.call(ctl(0x0F00))
        env.call(ctl(0x0F00))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_CODE)
    assert outcome.name == "HvCall(0x0f00)" and outcome.reason == "unknown code"
    assert env.snapshot() == before
    assert len([r for r in caplog.records if "not implemented" in r.getMessage()]) == 1  # once/code


def test_known_tlfs_code_without_handler(env):
    outcome, regs = env.call(ctl(0x005C))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_CODE)
    assert outcome.name == "HvCallPostMessage"


def test_unavailable_code(env):
    env.available = True  # the spec's available() is `not env.available`
    outcome, regs = env.call(ctl(UNAVAILABLE))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_CODE)
    assert outcome.reason == "not available" and env.requests == []
    env.available = False  # evaluated on every call
    outcome, regs = env.call(ctl(UNAVAILABLE))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)


def test_access_denied_comes_before_input_errors(env):
    # TLFS: ACCESS_DENIED is preferred over status that depends on the input.
    outcome, regs = env.call(ctl(DENIED, rep_count=3, extra=1 << 63), input_gpa=3)
    assert_result(outcome, regs, S.HV_STATUS_ACCESS_DENIED)


def test_unknown_code_comes_before_reserved_bits(env):
    outcome, regs = env.call(ctl(0x0F00, extra=1 << 63))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_CODE)


# -- input value checks ---------------------------------------------------------------------

RESERVED_BITS = [bit for bit in range(64) if HV_HYPERCALL_RSVD_MASK >> bit & 1]


def test_reserved_bit_list():
    assert RESERVED_BITS == [27, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63]


@pytest.mark.parametrize("bit", RESERVED_BITS)
def test_reserved_bits(env, bit):
    env.memory.write(IN_GPA, u64(1, 2))
    before = env.snapshot()
    outcome, regs = env.call(ctl(SIMPLE, extra=1 << bit))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert env.requests == [] and env.snapshot() == before


@pytest.mark.parametrize("fields", [{"rep_count": 1}, {"rep_start": 1},
                                    {"rep_count": 5, "rep_start": 2}])
def test_rep_fields_on_a_simple_call(env, fields):
    outcome, regs = env.call(ctl(SIMPLE, **fields))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert outcome.reason == "rep fields on a simple call" and env.requests == []


@pytest.mark.parametrize("rep_count, rep_start", [(0, 0), (0, 1), (4, 4), (4, 5), (1, 0xFFF)])
def test_bad_rep_count_or_start_on_a_rep_call(env, rep_count, rep_start):
    before = env.snapshot()
    outcome, regs = env.call(ctl(REP, rep_count=rep_count, rep_start=rep_start))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert env.requests == [] and env.snapshot() == before


def test_variable_header_where_not_allowed(env):
    for code in (SIMPLE, REP):
        outcome, regs = env.call(ctl(code, var=1, rep_count=1 if code == REP else 0))
        assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
        assert outcome.reason == "variable header on a call without one"
    assert env.requests == []


def test_variable_header_on_a_rep_call(env):
    # header (key) | 2 QWORDs of variable header | 3 rep elements
    env.memory.write(IN_GPA, u64(0xFF, 0xA1, 0xA2, 1, 2, 3))
    before = env.snapshot()
    outcome, regs = env.call(ctl(REP_VAR, var=2, rep_count=3))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS, reps=3)
    (request,) = env.requests
    assert request.header == u64(0xFF) and request.variable_header == u64(0xA1, 0xA2)
    assert [request.rep_input(i) for i in range(3)] == [u64(1), u64(2), u64(3)]
    assert env.memory.read(OUT_GPA, 24) == u64(1 ^ 0xFF, 2 ^ 0xFF, 3 ^ 0xFF)
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA, 24)
    with pytest.raises(IndexError):
        request.rep_input(3)


# -- GPA checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("input_gpa, output_gpa, reason", [
    (IN_GPA + 4, OUT_GPA, "input GPA 0x1004 not 8-aligned"),
    (IN_GPA + 1, OUT_GPA, "input GPA 0x1001 not 8-aligned"),
    (IN_GPA, OUT_GPA + 2, "output GPA 0x2002 not 8-aligned"),
    (IN_GPA + 0xFF8, OUT_GPA, "input list 0x1ff8+0x10 crosses a page"),
    (IN_GPA, OUT_GPA + 0xFF8, "output list 0x2ff8+0x10 crosses a page"),
    (MEM_SIZE, OUT_GPA, "input list 0x10000+0x10 not in guest RAM"),
    (IN_GPA, MEM_SIZE + 0x1000, "output list 0x11000+0x10 not in guest RAM"),
    (0xFFFF_FFFF_FFFF_F000, OUT_GPA, "not in guest RAM"),
])
def test_bad_gpas(env, input_gpa, output_gpa, reason):
    before = env.snapshot()
    outcome, regs = env.call(ctl(SIMPLE), input_gpa, output_gpa)
    assert_result(outcome, regs, S.HV_STATUS_INVALID_ALIGNMENT)
    assert reason in outcome.reason
    assert env.requests == [] and env.snapshot() == before


def test_list_ending_exactly_at_a_page_boundary_is_fine(env):
    outcome, regs = env.call(ctl(SIMPLE), IN_GPA + 0xFF0, OUT_GPA + 0xFF0)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)


def test_rep_list_length_counts_all_elements(env):
    # 8 B header + 511 elements = 4096 B fits; 512 elements cross the page.
    outcome, regs = env.call(ctl(REP_FAST, rep_count=511))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS, reps=511)
    outcome, regs = env.call(ctl(REP_FAST, rep_count=512))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_ALIGNMENT)
    # output list: 8 B per element from the output GPA
    outcome, regs = env.call(ctl(REP, rep_count=2), output_gpa=OUT_GPA + 0xFF8)
    assert_result(outcome, regs, S.HV_STATUS_INVALID_ALIGNMENT)
    assert "output list" in outcome.reason


# -- fast calls -----------------------------------------------------------------------------

def test_fast_on_a_memory_only_call(env):
    outcome, regs = env.fast_call(ctl(MEMORY_ONLY, fast=True), u64(1, 2))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert outcome.reason == "no fast form" and env.requests == []


def test_fast_call(env):
    before = env.snapshot()
    outcome, regs = env.fast_call(ctl(FAST, fast=True), u64(0x30, 0xFFFF_0000_0001))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    (request,) = env.requests
    assert request.fast and request.header == u64(0x30, 0xFFFF_0000_0001)
    assert regs.xmm_reads == []  # XMM is only touched when the input needs it
    assert env.snapshot() == before
    assert outcome.input_gpa is None and " fast " in str(outcome)
    if env.long_mode:
        assert (regs.gprs["rdx"], regs.gprs["r8"]) == (0x30, 0xFFFF_0000_0001)  # not modified
    else:
        assert (regs.gprs["rbx"], regs.gprs["rcx"]) == (0, 0x30)
        assert (regs.gprs["rdi"], regs.gprs["rsi"]) == (0xFFFF, 1)


def test_xmm_fast_input_without_the_feature_is_ud(env):
    regs = env.regs()
    regs.set_call(ctl(XMM, fast=True, var=1))
    before = regs.snapshot()
    outcome = env.dispatcher.dispatch(regs, 0)
    assert_ud(outcome, regs, before)
    assert outcome.reason == "XMM fast input not available" and env.requests == []
    assert regs.xmm_reads == []


def test_xmm_fast_input_with_the_feature(long_mode):
    env = Env(long_mode, xmm_fast_input=True)
    block = u64(*range(1, 15))  # 112 bytes: RDX, R8, XMM0..XMM5
    outcome, regs = env.fast_call(ctl(XMM, fast=True, var=12), block)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert " fast var=12 -> " in str(outcome)
    (request,) = env.requests
    assert request.header == u64(1, 2) and request.variable_header == u64(*range(3, 15))
    assert regs.xmm_reads == [0, 1, 2, 3, 4, 5] and regs.xmm_writes == []


def test_xmm_fast_input_reads_only_the_registers_it_needs(long_mode):
    env = Env(long_mode, xmm_fast_input=True)
    outcome, regs = env.fast_call(ctl(XMM, fast=True, var=1), u64(7, 8, 9))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert regs.xmm_reads == [0]
    assert env.requests[0].variable_header == u64(9)  # not the high half of XMM0


def test_fast_input_larger_than_the_registers(long_mode):
    env = Env(long_mode, xmm_fast_input=True)
    outcome, regs = env.fast_call(ctl(XMM, fast=True, var=13), b"")
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert "exceed the fast registers" in outcome.reason


def test_xmm_fast_form_refused_by_the_spec(long_mode):
    env = Env(long_mode, xmm_fast_input=True)
    env.table._specs[XMM] = HypercallSpec(code=XMM, handler=lambda req: None, input_size=16,
                                          fast_allowed=True, xmm_fast_allowed=False,
                                          variable_header_allowed=True)
    outcome, regs = env.fast_call(ctl(XMM, fast=True, var=1), b"")
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert outcome.reason == "no XMM fast form"
    outcome, regs = env.fast_call(ctl(XMM, fast=True), u64(1, 2))  # fits RDX/R8: fine
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)


def test_fast_output_without_the_feature_is_ud(env):
    regs = env.regs()
    regs.set_call(ctl(FAST_OUT, fast=True))
    before = regs.snapshot()
    outcome = env.dispatcher.dispatch(regs, 0)
    assert_ud(outcome, regs, before)
    assert outcome.reason == "XMM fast output not available"


def test_fast_output(long_mode):
    env = Env(long_mode, xmm_fast_output=True)
    outcome, regs = env.fast_call(ctl(FAST_OUT, fast=True), u64(0x5A))
    if not long_mode:
        # TLFS: fast output is x64 only.
        assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
        assert outcome.reason == "fast output from 32-bit mode"
        return
    assert outcome.status == S.HV_STATUS_SUCCESS and regs.result() == 0
    # Input takes pair 0 (RDX, R8); the 24-byte output fills XMM0 and XMM1 (zero padded).
    assert regs.gprs["rdx"] == 0x5A
    assert regs.xmm_bytes(0) == u64(0x5A, 0x5A) and regs.xmm_bytes(1) == u64(0x5A, 0)
    assert regs.xmm_writes == [0, 1] and sorted(regs.gpr_writes) == ["rax"]


def test_fast_output_without_input_uses_rdx_and_r8():
    env = Env(True, xmm_fast_output=True)
    env.table._specs[NO_INPUT] = HypercallSpec(
        code=NO_INPUT, handler=lambda req: HypercallResult(output=u64(0xAB, 0xCD)),
        output_size=16, fast_allowed=True)
    outcome, regs = env.fast_call(ctl(NO_INPUT, fast=True), b"")
    assert outcome.status == S.HV_STATUS_SUCCESS
    assert (regs.gprs["rdx"], regs.gprs["r8"]) == (0xAB, 0xCD) and regs.xmm_writes == []


def test_fast_output_not_written_on_failure():
    env = Env(True, xmm_fast_output=True)
    env.table._specs[FAST_OUT] = HypercallSpec(
        code=FAST_OUT, input_size=8, output_size=24, fast_allowed=True,
        handler=lambda req: HypercallResult(status=S.HV_STATUS_INVALID_PARAMETER, output=b"z" * 24))
    outcome, regs = env.fast_call(ctl(FAST_OUT, fast=True), u64(1))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_PARAMETER)
    assert regs.xmm_writes == []


# -- handler results ------------------------------------------------------------------------

def test_handler_hypercall_error(env):
    outcome, regs = env.call(ctl(ERROR))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_PARAMETER)


def test_failed_simple_call_writes_no_output(env):
    env.table._specs[SIMPLE] = HypercallSpec(
        code=SIMPLE, input_size=16, output_size=16,
        handler=lambda req: HypercallResult(status=S.HV_STATUS_INVALID_PARAMETER, output=b"q" * 16))
    before = env.snapshot()
    outcome, regs = env.call(ctl(SIMPLE))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_PARAMETER)
    assert env.snapshot() == before


def test_short_output_is_zero_padded_and_none_means_success(env):
    env.table._specs[SIMPLE] = HypercallSpec(code=SIMPLE, input_size=16, output_size=16,
                                             handler=lambda req: HypercallResult(output=b"\x01"))
    before = env.snapshot()
    outcome, regs = env.call(ctl(SIMPLE))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert env.memory.read(OUT_GPA, 16) == b"\x01" + bytes(15)
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA, 16)
    outcome, regs = env.call(ctl(NONE_RESULT))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert env.memory.read(OUT_GPA, 8) == bytes(8)


@pytest.mark.parametrize("code, reps", [(CRASH, 2), (BAD_OUTPUT, 0), (BAD_RETURN, 0),
                                        (NO_PROGRESS, 2)])
def test_handler_failures_become_invalid_hypercall_input(env, caplog, code, reps):
    rep_fields = {"rep_count": 4, "rep_start": 2} if reps else {}
    before = env.snapshot()
    with caplog.at_level(logging.DEBUG, logger="hvvmm.hv.hypercall"):
        outcome, regs = env.call(ctl(code, **rep_fields))
        env.call(ctl(code, **rep_fields))
    # reps completed = rep start: nothing of this entry is reported as done
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT, reps=reps)
    assert outcome.reason == "handler failed"
    assert env.snapshot() == before
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # once per code, with traceback
    assert "(logged once)" in errors[0].getMessage()


def test_simple_call_continuation(env):
    outcome, regs = env.call(ctl(SLOW))
    assert outcome.retried and outcome.status is None and regs.retries == 1
    assert regs.rip == PAGE_BASE and regs.control() == ctl(SLOW)
    assert env.notified[-1] == (0, SLOW, None, 0)
    assert "-> continue at rep 0" in str(outcome)
    regs.rip, regs.retries = STUB_RIP, 0  # the guest re-executes the stub
    regs.gpr_writes.clear()
    outcome = env.dispatcher.dispatch(regs, 0)
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS)
    assert env.memory.read(OUT_GPA, 8) == u64(2)


# -- rep calls ------------------------------------------------------------------------------

def write_rep_input(env: Env, key: int, elements: list[int]) -> None:
    env.memory.write(IN_GPA, u64(key, *elements))


def test_rep_call_completes(env):
    elements = [10 * i for i in range(6)]
    write_rep_input(env, 0xF0F0, elements)
    before = env.snapshot()
    outcome, regs = env.call(ctl(REP, rep_count=6))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS, reps=6)
    assert env.memory.read(OUT_GPA, 48) == u64(*(e ^ 0xF0F0 for e in elements))
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA, 48)
    assert env.notified == [(0, REP, 0, 6)]
    assert str(outcome).endswith("-> HV_STATUS_SUCCESS reps=6")


def test_rep_call_starting_in_the_middle(env):
    write_rep_input(env, 1, list(range(10)))
    before = env.snapshot()
    outcome, regs = env.call(ctl(REP, rep_count=10, rep_start=5))
    # TLFS: reps completed is the total, not relative to the start index.
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS, reps=10)
    assert env.memory.read(OUT_GPA + 40, 40) == u64(*(i ^ 1 for i in range(5, 10)))
    # elements 0..4 of the output list are untouched
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA + 40, 40)


def test_rep_error_reports_the_elements_completed_before_it(env):
    write_rep_input(env, 0, [1, 2, 3, BAD_ELEMENT, 5])
    before = env.snapshot()
    outcome, regs = env.call(ctl(REP, rep_count=5, rep_start=1))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_PARAMETER, reps=3)
    assert env.memory.read(OUT_GPA + 8, 16) == u64(2, 3)  # elements 1 and 2 written
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA + 8, 16)


def run_until_complete(env: Env, regs: FakeRegisters, limit: int = 100) -> list[HypercallOutcome]:
    """Dispatch, and re-dispatch while the call is continued (what the guest's re-executed
    stub does)."""
    outcomes = []
    for _ in range(limit):
        regs.gpr_writes.clear()
        outcome = env.dispatcher.dispatch(regs, 0)
        outcomes.append(outcome)
        if not outcome.retried:
            return outcomes
        assert regs.rip == PAGE_BASE and regs.retries == 1
        regs.rip, regs.retries = STUB_RIP, 0
    raise AssertionError("call never completed")


def test_rep_continuation_across_entries(long_mode):
    env = Env(long_mode, max_reps_per_entry=3)
    elements = [0x100 + i for i in range(10)]
    write_rep_input(env, 0xFF, elements)
    before = env.snapshot()
    regs = env.regs()
    regs.set_call(ctl(REP, rep_count=10), IN_GPA, OUT_GPA)
    result_before = regs.result()
    outcomes = run_until_complete(env, regs)
    assert [o.retried for o in outcomes] == [True, True, True, False]
    assert [o.rep_start for o in outcomes] == [0, 3, 6, 9]
    assert [o.reps_completed for o in outcomes] == [3, 6, 9, 10]
    assert [(r.rep_start, r.rep_end) for r in env.requests] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert_result(outcomes[-1], regs, S.HV_STATUS_SUCCESS, reps=10)
    assert env.memory.read(OUT_GPA, 80) == u64(*(e ^ 0xFF for e in elements))
    assert_memory_changed_only(before, env.snapshot(), OUT_GPA, 80)
    # The guest-visible input value after the last continuation holds rep start 9.
    assert HypercallInput.from_value(regs.control()).rep_start == (9 if long_mode else 0)
    if long_mode:
        assert result_before != regs.result()
    assert [n[2] for n in env.notified] == [None, None, None, 0]


def test_continuation_rewrites_only_the_input_value(long_mode):
    env = Env(long_mode, max_reps_per_entry=2)
    write_rep_input(env, 0, [1, 2, 3])
    regs = env.regs()
    regs.set_call(ctl(REP, rep_count=3), IN_GPA, OUT_GPA)
    before = regs.snapshot()
    outcome = env.dispatcher.dispatch(regs, 0)
    assert outcome.retried and outcome.result_value is None
    expected_control = ctl(REP, rep_count=3, rep_start=2)
    assert regs.control() == expected_control
    assert set(regs.gpr_writes) == ({"rcx"} if long_mode else {"rax", "rdx"})  # no RAX in x64
    gprs, xmm, _rip = regs.snapshot()
    assert xmm == before[1]
    assert {n for n in gprs if gprs[n] != before[0][n]} <= {"rcx", "rax", "rdx"}


def test_time_budget_continues_after_at_least_one_rep(long_mode):
    now = [0.0]

    def clock():
        now[0] += 1.0  # every look at the clock costs a second
        return now[0]

    env = Env(long_mode, time_budget=2.5, clock=clock)
    write_rep_input(env, 0, list(range(8)))
    regs = env.regs()
    regs.set_call(ctl(REP, rep_count=8), IN_GPA, OUT_GPA)
    outcomes = run_until_complete(env, regs)
    assert len(outcomes) > 1 and all(o.retried for o in outcomes[:-1])
    assert all(b.reps_completed > a.reps_completed for a, b in zip(outcomes, outcomes[1:]))
    assert_result(outcomes[-1], regs, S.HV_STATUS_SUCCESS, reps=8)
    assert env.memory.read(OUT_GPA, 64) == u64(*range(8))


def test_tiny_time_budget_still_makes_progress(long_mode):
    env = Env(long_mode, time_budget=1e-12)
    write_rep_input(env, 0, list(range(4)))
    regs = env.regs()
    regs.set_call(ctl(REP, rep_count=4), IN_GPA, OUT_GPA)
    outcomes = run_until_complete(env, regs)
    assert [o.reps_completed for o in outcomes] == [1, 2, 3, 4]


def test_rep_timeout_status_without_progress_retries(env):
    entries = []

    def waiter(req):
        entries.append(req.rep_start)
        if len(entries) < 3:
            return HypercallResult(status=S.HV_STATUS_TIME_OUT)  # e.g. waiting for another VP
        return HypercallResult(reps_completed=req.rep_count)

    env.table._specs[REP_FAST] = HypercallSpec(code=REP_FAST, kind=HypercallKind.REP,
                                               input_size=8, rep_input_size=8, handler=waiter)
    regs = env.regs()
    regs.set_call(ctl(REP_FAST, rep_count=2), IN_GPA, OUT_GPA)
    outcomes = run_until_complete(env, regs)
    assert [o.retried for o in outcomes] == [True, True, False]
    assert entries == [0, 0, 0]
    assert_result(outcomes[-1], regs, S.HV_STATUS_SUCCESS, reps=2)


def test_rep_timeout_with_everything_done_completes(env):
    env.table._specs[REP_FAST] = HypercallSpec(
        code=REP_FAST, kind=HypercallKind.REP, rep_input_size=8,
        handler=lambda req: HypercallResult(status=S.HV_STATUS_TIME_OUT, reps_completed=2))
    outcome, regs = env.call(ctl(REP_FAST, rep_count=2))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS, reps=2)


def test_rep_handler_reporting_impossible_progress(env):
    env.table._specs[REP_FAST] = HypercallSpec(
        code=REP_FAST, kind=HypercallKind.REP, rep_input_size=8,
        handler=lambda req: HypercallResult(reps_completed=req.rep_count + 1))
    outcome, regs = env.call(ctl(REP_FAST, rep_count=2))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)


def test_fast_rep_call_with_xmm_input(long_mode):
    env = Env(long_mode, xmm_fast_input=True, max_reps_per_entry=4)
    block = u64(0xC3, *range(100, 111))  # header + 11 elements = 96 bytes
    regs = env.regs()
    regs.set_call(ctl(REP_FAST, fast=True, rep_count=11))
    regs.set_fast_block(block)
    outcomes = run_until_complete(env, regs)
    assert [o.reps_completed for o in outcomes] == [4, 8, 11]
    assert_result(outcomes[-1], regs, S.HV_STATUS_SUCCESS, reps=11)
    request = env.requests[-1]
    assert request.header == u64(0xC3)
    assert [request.rep_input(i) for i in range(11)] == [u64(v) for v in range(100, 111)]
    assert regs.xmm_writes == []


def test_fast_rep_output_across_continuations_keeps_earlier_elements():
    # 8 B header in RDX (pair 0 is RDX:R8), 5 output elements of 8 B in XMM0..XMM2: pairs
    # are split by element boundaries, so each entry must merge with the pair's current value.
    env = Env(True, xmm_fast_output=True, max_reps_per_entry=1)
    regs = env.regs()
    regs.set_call(ctl(REP_FAST_OUT, fast=True, rep_count=5))
    regs.set_fast_block(u64(0x77))
    outcomes = run_until_complete(env, regs)
    assert [o.reps_completed for o in outcomes] == [1, 2, 3, 4, 5]
    expected = u64(*(0x0101_0101_0101_0101 * (i + 1) for i in range(5)))
    got = regs.xmm_bytes(0) + regs.xmm_bytes(1) + regs.xmm_bytes(2)
    assert got[:40] == expected
    assert regs.gprs["rdx"] == 0x77  # input register not modified
    assert regs.xmm[3] == FakeRegisters().xmm[3]  # beyond the output block: untouched


def test_rep_counter_progress_without_the_iterator(env):
    write_rep_input(env, 0, [1, 2, 3])

    def manual(req):
        out = b"".join(u64(int.from_bytes(req.rep_input(i), "little") + 1)
                       for i in range(req.rep_start, req.rep_count))
        return HypercallResult(output=out, reps_completed=req.rep_count)

    env.table._specs[REP] = HypercallSpec(code=REP, kind=HypercallKind.REP, input_size=8,
                                          rep_input_size=8, rep_output_size=8, handler=manual)
    outcome, regs = env.call(ctl(REP, rep_count=3))
    assert_result(outcome, regs, S.HV_STATUS_SUCCESS, reps=3)
    assert env.memory.read(OUT_GPA, 24) == u64(2, 3, 4)


def test_hypercall_error_with_explicit_reps(env):
    def failing(req):
        raise HypercallError(S.HV_STATUS_INSUFFICIENT_BUFFERS, reps_completed=req.rep_start)

    env.table._specs[REP_FAST] = HypercallSpec(code=REP_FAST, kind=HypercallKind.REP,
                                               rep_input_size=8, handler=failing)
    outcome, regs = env.call(ctl(REP_FAST, rep_count=4, rep_start=1))
    assert_result(outcome, regs, S.HV_STATUS_INSUFFICIENT_BUFFERS, reps=1)


# -- observability --------------------------------------------------------------------------

def test_request_repr_and_outcome_properties(env):
    write_rep_input(env, 0, [1, 2])
    outcome, _regs = env.call(ctl(REP, rep_count=2))
    assert outcome.completed and outcome.status_name == "HV_STATUS_SUCCESS"
    assert repr(env.requests[0]) == (
        "<HypercallRequest vp0 TestRep(0x0806) reps 0..2/2 header=8B var=0B>")


# -- property-based: nothing the guest does makes the dispatcher raise ------------------------

U64_VALUES = st.integers(min_value=0, max_value=(1 << 64) - 1)
GPAS = st.one_of(
    st.sampled_from([IN_GPA, OUT_GPA, IN_GPA + 8, OUT_GPA + 0xFF0, IN_GPA + 4, OUT_GPA + 0xFF8,
                     0, MEM_SIZE - 8, MEM_SIZE, 0xFFFF_FFFF_FFFF_FFF8]),
    st.integers(min_value=0, max_value=MEM_SIZE + 0x1000),
    U64_VALUES)
SAMPLE_CODES = [SIMPLE, NO_INPUT, FAST, XMM, FAST_OUT, REP, REP_FAST, REP_FAST_OUT, UNAVAILABLE,
                DENIED, CRASH, ERROR, BAD_OUTPUT, SLOW, NO_PROGRESS, REP_VAR, MEMORY_ONLY,
                NONE_RESULT, BAD_RETURN, 0x0F00, 0x005C]


@st.composite
def controls(draw) -> int:
    if draw(st.booleans()):
        return draw(U64_VALUES)  # anything at all
    value = ctl(draw(st.sampled_from(SAMPLE_CODES)), fast=draw(st.booleans()),
                var=draw(st.sampled_from([0, 0, 1, 2, 13, 0x3FF])),
                rep_count=draw(st.sampled_from([0, 1, 2, 5, 11, 0xFFF])),
                rep_start=draw(st.sampled_from([0, 0, 1, 3, 0xFFF])))
    if draw(st.integers(0, 9)) == 0:
        value |= 1 << draw(st.sampled_from(RESERVED_BITS))
    return value


ALLOWED_STATUSES = {S.HV_STATUS_SUCCESS, S.HV_STATUS_INVALID_HYPERCALL_CODE,
                    S.HV_STATUS_INVALID_HYPERCALL_INPUT, S.HV_STATUS_INVALID_ALIGNMENT,
                    S.HV_STATUS_INVALID_PARAMETER, S.HV_STATUS_ACCESS_DENIED}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_mode=st.booleans(), protected=st.booleans(), cpl=st.sampled_from([0, 0, 0, 3]),
       control=controls(), input_gpa=GPAS, output_gpa=GPAS,
       gprs=st.dictionaries(st.sampled_from(["rax", "rbx", "rsi", "rdi", "r9"]), U64_VALUES),
       xmm=st.lists(st.integers(min_value=0, max_value=(1 << 128) - 1), min_size=16, max_size=16),
       ram=st.binary(min_size=0, max_size=256),
       xmm_in=st.booleans(), xmm_out=st.booleans(),
       max_reps=st.sampled_from([None, 1, 2, 5]))
def test_dispatch_never_raises(long_mode, protected, cpl, control, input_gpa, output_gpa, gprs,
                               xmm, ram, xmm_in, xmm_out, max_reps):
    env = Env(long_mode, xmm_fast_input=xmm_in, xmm_fast_output=xmm_out,
              max_reps_per_entry=max_reps)
    env.memory.write(IN_GPA, ram)  # random input list contents
    regs = env.regs(protected=protected, cpl=cpl, gprs=gprs, xmm=xmm)
    regs.set_call(control, input_gpa, output_gpa)
    if not long_mode:  # EDX:EAX/EBX:ECX/EDI:ESI: only the low halves count
        control = HypercallInput.from_value(regs.control()).to_value()
    before_regs = regs.snapshot()
    before_memory = env.snapshot()

    outcome = env.dispatcher.dispatch(regs, 5)

    assert outcome.control == control and outcome.vp_index == 5
    assert isinstance(str(outcome), str)
    spec = env.table.get(outcome.code)
    if outcome.inject_ud:
        assert regs.snapshot() == before_regs and env.snapshot() == before_memory
        assert outcome.reason in ("real mode", f"CPL {cpl}", "XMM fast input not available",
                                  "XMM fast output not available")
        return
    assert protected and cpl == 0
    if outcome.retried:
        assert regs.rip == PAGE_BASE and set(regs.gpr_writes) <= {"rcx", "rdx", "rax"}
        assert HypercallInput.from_value(regs.control()).rep_start == outcome.reps_completed
    else:
        assert outcome.status in ALLOWED_STATUSES, outcome
        assert regs.result() == compose_result(outcome.status, outcome.reps_completed)
        assert regs.rip == STUB_RIP
        extra = {"rdx", "r8"} if outcome.fast and long_mode else set()
        assert set(regs.gpr_writes) <= set(RESULT_REGS[long_mode]) | extra
    if outcome.status != S.HV_STATUS_SUCCESS and not outcome.retried:
        assert outcome.reps_completed <= max(outcome.rep_start, outcome.rep_count)
    # Guest memory changes only inside the output list.
    after = env.snapshot()
    if after != before_memory:
        assert spec is not None and not outcome.fast and outcome.output_gpa is not None
        length = spec.output_size or spec.rep_output_size * outcome.rep_count
        assert_memory_changed_only(before_memory, after, outcome.output_gpa, length)
    if outcome.fast and not (xmm_in or xmm_out):
        assert regs.xmm_reads == [] and regs.xmm_writes == []


@settings(max_examples=200, deadline=None)
@given(U64_VALUES)
def test_input_value_round_trips(value):
    hc = HypercallInput.from_value(value)
    assert hc.to_value() == value
    assert hc.has_reserved_bits == bool(value & HV_HYPERCALL_RSVD_MASK)


@pytest.mark.parametrize("kind, result", [
    (HypercallKind.SIMPLE, HypercallResult(status=0x10000)),  # status out of range
    (HypercallKind.SIMPLE, HypercallResult(status=-1)),
    (HypercallKind.SIMPLE, HypercallResult(reps_completed=1)),  # reps on a simple call
    (HypercallKind.REP, HypercallResult(reps_completed=2)),  # no output for 2 reps
    (HypercallKind.REP, HypercallResult(reps_completed=1, output=b"x" * 16)),  # too much
])
def test_handler_contract_violations(long_mode, kind, result):
    env = Env(long_mode)
    rep = kind is HypercallKind.REP
    env.table._specs[REP] = HypercallSpec(
        code=REP, kind=kind, handler=lambda req: result,
        **({"rep_input_size": 8, "rep_output_size": 8} if rep else {"output_size": 8}))
    before = env.snapshot()
    outcome, regs = env.call(ctl(REP, rep_count=2 if rep else 0))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_HYPERCALL_INPUT)
    assert outcome.reason == "handler failed" and env.snapshot() == before


def test_output_list_vanishing_under_the_handler(long_mode):
    from hvvmm.memory import GuestMemoryError

    class ShrinkingMemory(GuestMemory):
        def write(self, gpa, data):
            raise GuestMemoryError(gpa, len(data))

    memory = ShrinkingMemory.from_bytes(MEM_SIZE)
    env = Env(long_mode, memory=memory)
    outcome, regs = env.call(ctl(SIMPLE))
    assert_result(outcome, regs, S.HV_STATUS_INVALID_ALIGNMENT)
    assert "not backed by guest RAM" in outcome.reason
