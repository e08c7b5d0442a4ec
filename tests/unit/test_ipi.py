"""hv-ipi: HvCallSendSyntheticClusterIpi (0x000B) and HvCallSendSyntheticClusterIpiEx (0x0015),
through the real dispatcher with FakeRegisters and FakePlatform (interrupts are recorded in
``platform.interrupts``)."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments import AttachError
from hvvmm.enlightenments.ipi import ENLIGHTENMENT, IpiState
from hvvmm.hv import hvdef
from hvvmm.hv.features import HyperVConfigError, parse_hyperv_spec
from hvvmm.hv.hvdef import HvEnlightenmentInformation as Hint, HvStatus, HypercallCode
from hvvmm.hv.partition import Partition
from hvvmm.hv.vpset import HV_GENERIC_SET_ALL, encode_vp_set

try:
    from hvfakes import FakePlatform, FakeRegisters, linux_partition
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform, FakeRegisters, linux_partition

S = HvStatus
FAST = hvdef.HV_HYPERCALL_FAST_BIT
IPI = HypercallCode.HvCallSendSyntheticClusterIpi
IPI_EX = HypercallCode.HvCallSendSyntheticClusterIpiEx
IN_GPA = 0x2000
VECTOR = 0xF7  # Linux's platform IPI vector (used as the qspinlock kick)


def make(spec: str = "minimal,hv-ipi", vp_count: int = 4, **platform_args):
    return linux_partition(spec, vp_count, **platform_args)


def var(n: int) -> int:
    return n << hvdef.HV_HYPERCALL_VARHEAD_OFFSET


def call(partition, vp, control, in_gpa=0, out_gpa=0, *, long_mode=True):
    io = FakeRegisters(long_mode=long_mode)
    io.set_call(control, in_gpa, out_gpa)
    return partition.hypercall(vp, io), io


def fast_ipi(partition, vp, vector, mask, *, vtl_and_pad=0):
    return call(partition, vp, IPI | FAST, vector | vtl_and_pad << 32, mask)[0].status


def ipi_input(vector, mask, vtl=0, pad=b"\0\0\0"):
    return struct.pack("<IB3sQ", vector, vtl, pad, mask)


def ipi_ex_input(vector, vps, vtl=0):
    """(input bytes, variable-header size): Vector/TargetVtl/pad, then HV_VP_SET."""
    vp_set = encode_vp_set(vps)
    return struct.pack("<IB3x", vector, vtl) + vp_set, (len(vp_set) - 16) // 8


def memory_ipi_ex(partition, platform, vp, vector, vps, *, var_size=None):
    data, banks = ipi_ex_input(vector, vps)
    platform.memory.write(IN_GPA, data)
    control = IPI_EX | var(banks if var_size is None else var_size)
    return call(partition, vp, control, IN_GPA)[0].status


# -- declaration and CPUID ------------------------------------------------------------------------


def test_cpuid_hints_and_requirement():
    partition, _ = make()
    hints = [e for e in partition.cpuid_leaves() if e.function == 0x40000004][0]
    assert hints.eax & Hint.HV_X64_CLUSTER_IPI_RECOMMENDED
    assert hints.eax & Hint.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED
    assert isinstance(partition.state["hv-ipi"], IpiState)
    plain, _ = make("minimal")
    hints = [e for e in plain.cpuid_leaves() if e.function == 0x40000004][0]
    assert not hints.eax & (Hint.HV_X64_CLUSTER_IPI_RECOMMENDED
                            | Hint.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED)
    with pytest.raises(HyperVConfigError, match="hv-ipi needs hv-vpindex"):
        parse_hyperv_spec("hv-ipi")
    assert ENLIGHTENMENT.denied_when_off and ENLIGHTENMENT.requires == ("hv-vpindex",)


def test_off_means_access_denied():
    partition, platform = make("minimal")
    assert fast_ipi(partition, 0, VECTOR, 0b10) == S.HV_STATUS_ACCESS_DENIED
    assert memory_ipi_ex(partition, platform, 0, VECTOR, [1]) == S.HV_STATUS_ACCESS_DENIED
    assert platform.interrupts == []


def test_attach_needs_signal_interrupt():
    class NoInterrupts(FakePlatform):
        signal_interrupt = None

    with pytest.raises(AttachError, match="hv-ipi needs a platform that can raise"):
        Partition(parse_hyperv_spec("minimal,hv-ipi"), NoInterrupts())


# -- HvCallSendSyntheticClusterIpi ----------------------------------------------------------------


def test_fast_ipi_as_linux_sends_it():
    # Linux: hv_do_fast_hypercall16(HVCALL_SEND_IPI, vector, mask): RCX = 0x1000B.
    partition, platform = make()
    assert IPI | FAST == 0x1000B
    assert fast_ipi(partition, 0, VECTOR, 0b0110) == S.HV_STATUS_SUCCESS
    assert platform.interrupts == [(1, VECTOR), (2, VECTOR)]
    assert fast_ipi(partition, 3, 0x10, 0b1000) == 0  # to itself (hv_send_ipi_self)
    assert fast_ipi(partition, 0, 0xFF, 0b1111) == 0
    assert platform.interrupts[2:] == [(3, 0x10), (0, 0xFF), (1, 0xFF), (2, 0xFF), (3, 0xFF)]
    assert partition.state["hv-ipi"].sent == 7
    assert partition.vps[0].hypercalls[(IPI, 0)] == 2


def test_memory_form_and_32_bit_caller():
    partition, platform = make()
    platform.memory.write(IN_GPA, ipi_input(0x40, 0b1001))
    outcome, io = call(partition, 1, IPI, IN_GPA)
    assert outcome.status == 0 and io.result() == 0
    assert platform.interrupts == [(0, 0x40), (3, 0x40)]
    # 32-bit fast: EDX:EAX control, EBX:ECX = vector/VTL, EDI:ESI = mask.
    outcome, io = call(partition, 1, IPI | FAST, 0x41, 0b10, long_mode=False)
    assert outcome.status == 0 and not outcome.long_mode
    assert platform.interrupts[2:] == [(1, 0x41)]


@pytest.mark.parametrize("vector", [0, 2, 0x0F, 0x100, 0x1F0, 0xFFFF_FFFF])
def test_vector_outside_0x10_0xff_is_invalid_parameter(vector):
    partition, platform = make()
    assert fast_ipi(partition, 0, vector, 0b10) == S.HV_STATUS_INVALID_PARAMETER
    platform.memory.write(IN_GPA, ipi_input(vector, 0b10))
    assert call(partition, 0, IPI, IN_GPA)[0].status == S.HV_STATUS_INVALID_PARAMETER
    assert memory_ipi_ex(partition, platform, 0, vector, [1]) == S.HV_STATUS_INVALID_PARAMETER
    assert platform.interrupts == []


@pytest.mark.parametrize("vtl, pad, status", [
    (0x00, b"\0\0\0", S.HV_STATUS_SUCCESS),
    (0x10, b"\0\0\0", S.HV_STATUS_SUCCESS),           # UseTargetVtl with VTL 0: its own VTL
    (0x11, b"\0\0\0", S.HV_STATUS_INVALID_PARAMETER),  # VTL 1 does not exist
    (0x01, b"\0\0\0", S.HV_STATUS_INVALID_PARAMETER),  # TargetVtl without UseTargetVtl
    (0x20, b"\0\0\0", S.HV_STATUS_INVALID_PARAMETER),  # reserved bits 7:5
    (0x00, b"\0\x01\0", S.HV_STATUS_INVALID_PARAMETER),  # padding is RsvdZ
])
def test_target_vtl_and_padding(vtl, pad, status):
    partition, platform = make()
    platform.memory.write(IN_GPA, ipi_input(VECTOR, 0b10, vtl, pad))
    assert call(partition, 0, IPI, IN_GPA)[0].status == status
    vtl_and_pad = vtl | int.from_bytes(pad, "little") << 8
    assert fast_ipi(partition, 0, VECTOR, 0b10, vtl_and_pad=vtl_and_pad) == status
    assert platform.interrupts == ([(1, VECTOR)] * 2 if status == 0 else [])


def test_mask_naming_a_missing_vp_is_invalid_parameter():
    partition, platform = make(vp_count=2)
    assert fast_ipi(partition, 0, VECTOR, 0b100) == S.HV_STATUS_INVALID_PARAMETER
    assert fast_ipi(partition, 0, VECTOR, 1 << 63) == S.HV_STATUS_INVALID_PARAMETER
    assert platform.interrupts == []
    assert fast_ipi(partition, 0, VECTOR, 0) == S.HV_STATUS_SUCCESS  # nobody: nothing sent
    assert platform.interrupts == []


def test_a_refused_interrupt_is_dropped_and_the_call_succeeds(caplog):
    partition, platform = make()
    platform.accept_interrupts = False
    with caplog.at_level(logging.INFO):
        assert fast_ipi(partition, 0, VECTOR, 0b10) == 0
        assert fast_ipi(partition, 0, VECTOR, 0b10) == 0
    assert platform.refused_interrupts == [(1, VECTOR)] * 2
    assert partition.state["hv-ipi"].refused == 2
    assert caplog.text.count("not accepted") == 1  # once per target


def test_shape_errors():
    partition, platform = make()
    rep = 1 << hvdef.HV_HYPERCALL_REP_COMP_OFFSET
    # A variable header on the non-Ex call, rep fields on either: INVALID_HYPERCALL_INPUT.
    assert call(partition, 0, IPI | FAST | var(1), VECTOR, 2)[0].status == \
        S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert call(partition, 0, IPI | FAST | rep, VECTOR, 2)[0].status == \
        S.HV_STATUS_INVALID_HYPERCALL_INPUT
    data, banks = ipi_ex_input(VECTOR, [1])
    platform.memory.write(IN_GPA, data)
    assert call(partition, 0, IPI_EX | var(banks) | rep, IN_GPA)[0].status == \
        S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert platform.interrupts == []


# -- HvCallSendSyntheticClusterIpiEx --------------------------------------------------------------


def test_ex_sparse_set_and_all():
    partition, platform = make()
    assert memory_ipi_ex(partition, platform, 0, VECTOR, [1, 3]) == 0
    assert platform.interrupts == [(1, VECTOR), (3, VECTOR)]
    # Linux for "every present CPU": HV_GENERIC_SET_ALL, no banks, var-header size 0.
    assert memory_ipi_ex(partition, platform, 2, 0x30, None) == 0
    assert platform.interrupts[2:] == [(vp, 0x30) for vp in range(4)]
    # A sparse set with no VP: success, nothing sent (KVM).
    assert memory_ipi_ex(partition, platform, 0, VECTOR, []) == 0
    assert len(platform.interrupts) == 6


def test_ex_as_linux_builds_it():
    # Linux cpumask_to_vpset(): banks 0..nr_bank-1 all present, some possibly empty.
    partition, platform = make(vp_count=130)
    data = struct.pack("<IB3xQQ3Q", VECTOR, 0, 0, 0b111, 0b10, 0, 1 << 1)
    platform.memory.write(IN_GPA, data)
    assert call(partition, 5, IPI_EX | var(3), IN_GPA)[0].status == 0
    assert platform.interrupts == [(1, VECTOR), (129, VECTOR)]


@pytest.mark.parametrize("var_size", [0, 2, 5])
def test_ex_bank_count_must_match_the_variable_header(var_size):
    partition, platform = make()
    assert memory_ipi_ex(partition, platform, 0, VECTOR, [1], var_size=var_size) == \
        S.HV_STATUS_INVALID_HYPERCALL_INPUT
    # The size is checked before the vector.
    assert memory_ipi_ex(partition, platform, 0, 0x05, [1], var_size=var_size) == \
        S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert platform.interrupts == []


def test_ex_bad_format_or_missing_vp_is_invalid_parameter():
    partition, platform = make(vp_count=2)
    assert memory_ipi_ex(partition, platform, 0, VECTOR, [2]) == S.HV_STATUS_INVALID_PARAMETER
    assert memory_ipi_ex(partition, platform, 0, VECTOR, [64]) == S.HV_STATUS_INVALID_PARAMETER
    platform.memory.write(IN_GPA, struct.pack("<IB3xQQQ", VECTOR, 0, 2, 1, 1))
    assert call(partition, 0, IPI_EX | var(1), IN_GPA)[0].status == S.HV_STATUS_INVALID_PARAMETER
    assert platform.interrupts == []


def test_ex_input_list_must_stay_in_one_page():
    partition, platform = make()
    data, banks = ipi_ex_input(VECTOR, [1])
    platform.memory.write(0x2FF0, data[:16])
    assert call(partition, 0, IPI_EX | var(banks), 0x2FF0)[0].status == \
        S.HV_STATUS_INVALID_ALIGNMENT
    assert platform.interrupts == []


def test_ex_fast_needs_xmm_input():
    partition, platform = make()
    data, banks = ipi_ex_input(VECTOR, [1, 2])
    io = FakeRegisters()
    io.set_call(IPI_EX | FAST | var(banks))
    io.set_fast_block(data)
    before = io.snapshot()
    outcome = partition.hypercall(0, io)
    assert outcome.inject_ud and io.snapshot() == before  # TLFS: XMM input not advertised
    assert platform.interrupts == []

    partition, platform = make("minimal,hv-ipi,hv-xmm-input")
    io = FakeRegisters()
    io.set_call(IPI_EX | FAST | var(banks))
    io.set_fast_block(data)  # RDX = vector, R8 = format, XMM0 = mask | bank 0, ...
    outcome = partition.hypercall(0, io)
    assert outcome.status == 0 and io.xmm_reads and not io.xmm_writes
    assert platform.interrupts == [(1, VECTOR), (2, VECTOR)]
    # HV_GENERIC_SET_ALL in registers only (24 bytes: RDX, R8, XMM0 low).
    io = FakeRegisters()
    io.set_call(IPI_EX | FAST)
    io.set_fast_block(struct.pack("<QQQ", 0x50, HV_GENERIC_SET_ALL, 0))
    assert partition.hypercall(3, io).status == 0
    assert platform.interrupts[2:] == [(vp, 0x50) for vp in range(4)]


def test_no_state_to_reset():
    partition, platform = make()
    fast_ipi(partition, 0, VECTOR, 0b10)
    partition.reset()
    assert fast_ipi(partition, 0, VECTOR, 0b10) == 0
    assert platform.interrupts == [(1, VECTOR)] * 2


# -- fuzz: whatever the guest passes, a TLFS status (or #UD), never a handler failure -----------

FUZZ_STATUSES = {S.HV_STATUS_SUCCESS, S.HV_STATUS_INVALID_HYPERCALL_INPUT,
                 S.HV_STATUS_INVALID_ALIGNMENT, S.HV_STATUS_INVALID_PARAMETER}


# Random bytes almost never make a valid call (a vector in 0x10..0xFF with zero reserved
# bytes), so well-formed inputs of both layouts, near the edges, are drawn too.
_IPI_INPUTS = st.one_of(
    st.binary(min_size=16, max_size=64),
    st.builds(lambda vector, vtl, mask: ipi_input(vector, mask, vtl), st.integers(0, 0x10F),
              st.sampled_from([0, 0, 1]), st.integers(0, 0x1F)),
    st.builds(lambda vector, vps: ipi_ex_input(vector, vps)[0].ljust(16, b"\0"),
              st.integers(0, 0x10F), st.sets(st.integers(0, 5), max_size=4)))


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from([IPI, IPI_EX]), fast=st.booleans(), xmm=st.booleans(),
       var_size=st.sampled_from([0, 0, 1, 2, 3, 64]), vp=st.integers(0, 3),
       data=_IPI_INPUTS, regs_from_data=st.booleans(), regs=st.tuples(
           st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1)),
       xmm_values=st.lists(st.integers(0, (1 << 128) - 1), min_size=6, max_size=6))
def test_fuzzed_ipi_calls(code, fast, xmm, var_size, vp, data, regs_from_data, regs, xmm_values):
    partition, platform = make("minimal,hv-ipi" + (",hv-xmm-input" if xmm else ""))
    platform.memory.write(IN_GPA, data)
    if regs_from_data:  # the fast form of the same input
        regs = struct.unpack_from("<QQ", data)
        xmm_values = [int.from_bytes(data[16:32].ljust(16, b"\0"), "little")] + xmm_values[1:]
    io = FakeRegisters(xmm=xmm_values + [0] * 10)
    ctl = code | (FAST if fast else 0) | var(var_size)
    io.set_call(ctl, *(regs if fast else (IN_GPA, 0)))
    outcome = partition.hypercall(vp, io)
    assert outcome.reason != "handler failed"
    assert outcome.inject_ud or outcome.status in FUZZ_STATUSES
    if outcome.status != S.HV_STATUS_SUCCESS:
        assert platform.interrupts == []
    assert all(0 <= target < 4 and 0x10 <= vector <= 0xFF
               for target, vector in platform.interrupts)


def test_a_platform_failure_loses_that_ipi_only():
    # KVM_SIGNAL_MSI failing for one target must not fail the call after the others got it
    # (the guest would fall back to native IPIs and send them twice).
    partition, platform = make()
    real = platform.signal_interrupt

    def flaky(vp, vector):
        if vp == 1:
            raise OSError(5, "Input/output error")
        return real(vp, vector)

    platform.signal_interrupt = flaky
    assert fast_ipi(partition, 0, 0x40, 0b111) == hvdef.HvStatus.HV_STATUS_SUCCESS
    assert sorted(vp for vp, _ in platform.interrupts) == [0, 2]
