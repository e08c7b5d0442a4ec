"""hv-tlbflush / hv-tlbflush-ext: HvCallFlushVirtualAddressSpace/List (0x0002/0x0003) and the Ex
forms (0x0013/0x0014), through the real dispatcher with FakeRegisters and FakePlatform (flushes
are recorded in ``platform.tlb_flushes`` as ``(caller, targets)``)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments import AttachError
from hvvmm.enlightenments.tlbflush import (
    ENLIGHTENMENT,
    EXT_ENLIGHTENMENT,
    HV_FLUSH_ALL_PROCESSORS,
    HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES,
    HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY,
    HV_FLUSH_USE_EXTENDED_RANGE_FORMAT,
    TlbFlushState,
)
from hvvmm.hv import hvdef
from hvvmm.hv.features import HyperVConfigError, parse_hyperv_spec
from hvvmm.hv.hvdef import HvEnlightenmentInformation as Hint, HvFeatures, HvStatus
from hvvmm.hv.hvdef import HypercallCode as C
from hvvmm.hv.partition import Partition
from hvvmm.hv.vpset import HV_GENERIC_SET_ALL, encode_vp_set

try:
    from hvfakes import FakePlatform, FakeRegisters, linux_partition
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform, FakeRegisters, linux_partition

S = HvStatus
FAST = hvdef.HV_HYPERCALL_FAST_BIT
IN_GPA = 0x2000
CR3 = 0x1234_5000
LINUX_KERNEL = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES  # Linux: flags for a kernel-range flush


def make(spec: str = "minimal,hv-tlbflush", vp_count: int = 4, **platform_args):
    return linux_partition(spec, vp_count, **platform_args)


def control(code, *, var=0, reps=0, start=0, fast=False):
    return (code | (FAST if fast else 0) | var << hvdef.HV_HYPERCALL_VARHEAD_OFFSET
            | reps << hvdef.HV_HYPERCALL_REP_COMP_OFFSET
            | start << hvdef.HV_HYPERCALL_REP_START_OFFSET)


def run(partition, platform, vp, ctl, data: bytes):
    platform.memory.write(IN_GPA, data)
    io = FakeRegisters()
    io.set_call(ctl, IN_GPA)
    return partition.hypercall(vp, io)


def space(flags, mask, space_id=CR3):
    return struct.pack("<QQQ", space_id, flags, mask)


def space_ex(flags, vps, space_id=CR3):
    vp_set = encode_vp_set(vps)
    return struct.pack("<QQ", space_id, flags) + vp_set, (len(vp_set) - 16) // 8


def gvas(count):
    # HV_GVA: page number 63:12, additional pages 11:0 (1-4096 pages per entry).
    return b"".join(struct.pack("<Q", 0x7F00_0000_0000 + n * 0x10_000 | n % 16)
                    for n in range(count))


# -- declarations and CPUID ---------------------------------------------------------------------


def test_cpuid_and_requirements():
    partition, _ = make("minimal,hv-tlbflush,hv-tlbflush-ext")
    leaves = {e.function: e for e in partition.cpuid_leaves()}
    assert leaves[0x40000004].eax & Hint.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED
    assert leaves[0x40000004].eax & Hint.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED
    assert leaves[0x40000003].edx & HvFeatures.HV_FEATURE_EXT_GVA_RANGES_FLUSH
    assert isinstance(partition.state["hv-tlbflush"], TlbFlushState)
    assert partition.state["hv-tlbflush"].extended_ranges
    plain, _ = make("minimal,hv-tlbflush")
    leaves = {e.function: e for e in plain.cpuid_leaves()}
    assert not leaves[0x40000003].edx & HvFeatures.HV_FEATURE_EXT_GVA_RANGES_FLUSH
    assert not plain.state["hv-tlbflush"].extended_ranges
    with pytest.raises(HyperVConfigError, match="hv-tlbflush needs hv-vpindex"):
        parse_hyperv_spec("hv-tlbflush")
    with pytest.raises(HyperVConfigError, match="hv-tlbflush-ext needs hv-tlbflush"):
        parse_hyperv_spec("minimal,hv-tlbflush-ext")
    assert ENLIGHTENMENT.denied_when_off and EXT_ENLIGHTENMENT.requires == ("hv-tlbflush",)


def test_attach_needs_a_platform_that_flushes():
    class NoFlush(FakePlatform):
        flush_guest_tlbs = None

    with pytest.raises(AttachError, match="hv-tlbflush needs a platform that can flush"):
        Partition(parse_hyperv_spec("minimal,hv-tlbflush"), NoFlush())


@pytest.mark.parametrize("code", [C.HvCallFlushVirtualAddressSpace,
                                  C.HvCallFlushVirtualAddressSpaceEx])
def test_off_means_access_denied(code):
    partition, platform = make("minimal,hv-ipi")
    outcome = run(partition, platform, 0, control(code), space(0, 0b10))
    assert outcome.status == S.HV_STATUS_ACCESS_DENIED
    assert platform.tlb_flushes == []


# -- HvCallFlushVirtualAddressSpace (0x0002) ---------------------------------------------------


def test_space_flushes_the_masked_vps():
    partition, platform = make()
    assert run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpace),
               space(0, 0b1010)).status == 0
    assert platform.tlb_flushes == [(0, (1, 3))]
    # The caller may be a target; AddressSpace is ignored (everything is flushed).
    assert run(partition, platform, 2, control(C.HvCallFlushVirtualAddressSpace),
               space(LINUX_KERNEL | HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY, 0b0100, 0)).status == 0
    assert platform.tlb_flushes[1] == (2, (2,))
    assert partition.state["hv-tlbflush"].flushes == 2


def test_all_processors_flag_and_mask_zero_mean_every_vp():
    partition, platform = make()
    # Linux sets HV_FLUSH_ALL_PROCESSORS when the mask is every present CPU; the mask is then
    # ignored, even bits for VPs that do not exist.
    assert run(partition, platform, 1, control(C.HvCallFlushVirtualAddressSpace),
               space(HV_FLUSH_ALL_PROCESSORS, ~0 & (1 << 64) - 1)).status == 0
    # WS2012: ProcessorMask 0 without the flag, expecting a flush (KVM's workaround).
    assert run(partition, platform, 1, control(C.HvCallFlushVirtualAddressSpace),
               space(0, 0)).status == 0
    assert platform.tlb_flushes == [(1, (0, 1, 2, 3))] * 2


def test_mask_naming_a_missing_vp_is_invalid_parameter():
    partition, platform = make(vp_count=3)
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpace),
                  space(0, 0b1001))
    assert outcome.status == S.HV_STATUS_INVALID_PARAMETER
    assert platform.tlb_flushes == []


@pytest.mark.parametrize("flags", [HV_FLUSH_USE_EXTENDED_RANGE_FORMAT, 1 << 4, 1 << 63])
def test_reserved_flags_are_invalid_parameter(flags):
    partition, platform = make()
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpace),
                  space(flags, 0b10))
    assert outcome.status == S.HV_STATUS_INVALID_PARAMETER
    assert platform.tlb_flushes == []


def test_fast_form_needs_xmm_input():
    partition, platform = make()
    io = FakeRegisters()
    io.set_call(control(C.HvCallFlushVirtualAddressSpace, fast=True))
    io.set_fast_block(space(0, 0b10))
    assert partition.hypercall(0, io).inject_ud  # 24 bytes: RDX, R8 and XMM0
    assert platform.tlb_flushes == []
    partition, platform = make("minimal,hv-tlbflush,hv-xmm-input")
    io = FakeRegisters()
    io.set_call(control(C.HvCallFlushVirtualAddressSpace, fast=True))
    io.set_fast_block(space(0, 0b10))
    assert partition.hypercall(0, io).status == 0
    assert platform.tlb_flushes == [(0, (1,))]
    assert io.xmm_reads == [0] and not io.xmm_writes


# -- HvCallFlushVirtualAddressList (0x0003, rep) -----------------------------------------------


def test_list_completes_every_rep_with_one_full_flush():
    partition, platform = make()
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList, reps=5),
                  space(0, 0b110) + gvas(5))
    assert (outcome.status, outcome.reps_completed, outcome.retried) == (0, 5, False)
    assert platform.tlb_flushes == [(0, (1, 2))]
    # Continuing from rep 3 (a guest re-issuing the call) flushes again and finishes.
    outcome = run(partition, platform, 0,
                  control(C.HvCallFlushVirtualAddressList, reps=5, start=3),
                  space(0, 0b110) + gvas(5))
    assert (outcome.status, outcome.reps_completed) == (0, 5)
    assert len(platform.tlb_flushes) == 2


def test_list_ignores_the_per_entry_rep_budget():
    partition, platform = make()
    partition.dispatcher.max_reps_per_entry = 2
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList, reps=9),
                  space(HV_FLUSH_ALL_PROCESSORS, 0) + gvas(9))
    assert (outcome.status, outcome.reps_completed, outcome.retried) == (0, 9, False)
    assert platform.tlb_flushes == [(0, (0, 1, 2, 3))]


def test_list_flags():
    partition, platform = make()
    # "HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY ... is treated as an invalid option" (TLFS).
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList, reps=1),
                  space(HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY, 0b10) + gvas(1))
    assert (outcome.status, outcome.reps_completed) == (S.HV_STATUS_INVALID_PARAMETER, 0)
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList, reps=1),
                  space(HV_FLUSH_USE_EXTENDED_RANGE_FORMAT, 0b10) + gvas(1))
    assert outcome.status == S.HV_STATUS_INVALID_PARAMETER  # needs hv-tlbflush-ext
    assert platform.tlb_flushes == []
    partition, platform = make("minimal,hv-tlbflush,hv-tlbflush-ext")
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList, reps=2),
                  space(HV_FLUSH_USE_EXTENDED_RANGE_FORMAT | LINUX_KERNEL, 0b10) + gvas(2))
    assert (outcome.status, outcome.reps_completed) == (0, 2)
    assert platform.tlb_flushes == [(0, (1,))]


def test_list_shape_is_the_dispatchers():
    partition, platform = make()
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList),
                  space(0, 0b10))
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_INPUT  # rep count 0
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressList, reps=1,
                                                  var=1), space(0, 0b10) + gvas(2))
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_INPUT  # no variable header here
    # Header plus list must stay in one page.
    platform.memory.write(0x2FF0, space(0, 0b10)[:16])
    io = FakeRegisters()
    io.set_call(control(C.HvCallFlushVirtualAddressList, reps=2), 0x2FF0)
    assert partition.hypercall(0, io).status == S.HV_STATUS_INVALID_ALIGNMENT
    assert platform.tlb_flushes == []


# -- Ex forms (0x0013, 0x0014) -------------------------------------------------------------------


def test_space_ex_sparse_and_all():
    partition, platform = make(vp_count=130)
    data, banks = space_ex(0, [0, 65, 129])
    assert run(partition, platform, 7, control(C.HvCallFlushVirtualAddressSpaceEx, var=banks),
               data).status == 0
    data, banks = space_ex(LINUX_KERNEL, None)
    assert run(partition, platform, 7, control(C.HvCallFlushVirtualAddressSpaceEx, var=banks),
               data).status == 0
    assert platform.tlb_flushes == [(7, (0, 65, 129)), (7, tuple(range(130)))]


def test_list_ex_as_linux_builds_it():
    # Linux hyperv_flush_tlb_others_ex(): sparse set, banks 0..nr_bank-1, the GVA list after
    # the banks (flush->gva_list + nr_bank), rep count = number of GVAs.
    partition, platform = make(vp_count=70)
    data = struct.pack("<QQQQ2Q", CR3, 0, 0, 0b11, 0b1000, 1 << 5) + gvas(3)
    outcome = run(partition, platform, 1,
                  control(C.HvCallFlushVirtualAddressListEx, var=2, reps=3), data)
    assert (outcome.status, outcome.reps_completed) == (0, 3)
    assert platform.tlb_flushes == [(1, (3, 69))]


def test_ex_empty_set_flushes_nothing():
    partition, platform = make()
    data, banks = space_ex(0, [])
    assert run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpaceEx, var=banks),
               data).status == 0
    data = struct.pack("<QQQQQ", CR3, 0, 0, 0b1, 0) + gvas(2)  # one bank, no VP in it
    outcome = run(partition, platform, 0,
                  control(C.HvCallFlushVirtualAddressListEx, var=1, reps=2), data)
    assert (outcome.status, outcome.reps_completed) == (0, 2)
    assert platform.tlb_flushes == []


@pytest.mark.parametrize("var_size", [0, 2])
def test_ex_bank_count_must_match_the_variable_header(var_size):
    partition, platform = make()
    data, _ = space_ex(0, [1])
    outcome = run(partition, platform, 0,
                  control(C.HvCallFlushVirtualAddressSpaceEx, var=var_size), data + bytes(8))
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    # Checked before the flags, and even with HV_FLUSH_ALL_PROCESSORS.
    data, _ = space_ex(HV_FLUSH_ALL_PROCESSORS | 1 << 9, [1])
    outcome = run(partition, platform, 0,
                  control(C.HvCallFlushVirtualAddressSpaceEx, var=var_size), data + bytes(8))
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert platform.tlb_flushes == []


def test_ex_contents_checked_unless_all_processors():
    partition, platform = make(vp_count=2)
    bad_format = struct.pack("<QQQQQ", CR3, 0, 5, 0b1, 0b1)
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpaceEx, var=1),
                  bad_format)
    assert outcome.status == S.HV_STATUS_INVALID_PARAMETER
    data, banks = space_ex(0, [2])
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpaceEx,
                                                  var=banks), data)
    assert outcome.status == S.HV_STATUS_INVALID_PARAMETER
    assert platform.tlb_flushes == []
    # HV_FLUSH_ALL_PROCESSORS: the set is ignored once its size is right.
    all_flag = struct.pack("<QQQQQ", CR3, HV_FLUSH_ALL_PROCESSORS, 5, 0b1, 1 << 40)
    outcome = run(partition, platform, 1, control(C.HvCallFlushVirtualAddressSpaceEx, var=1),
                  all_flag)
    assert outcome.status == 0 and platform.tlb_flushes == [(1, (0, 1))]


def test_ex_fast_with_xmm():
    partition, platform = make("minimal,hv-tlbflush,hv-xmm-input", vp_count=70)
    data, banks = space_ex(0, [2, 66])  # 32 + 16 bytes: RDX, R8, XMM0, XMM1 low
    io = FakeRegisters()
    io.set_call(control(C.HvCallFlushVirtualAddressSpaceEx, var=banks, fast=True))
    io.set_fast_block(data)
    assert partition.hypercall(0, io).status == 0
    io = FakeRegisters()
    io.set_call(control(C.HvCallFlushVirtualAddressListEx, var=0, reps=3, fast=True))
    io.set_fast_block(struct.pack("<QQQQ", CR3, 0, HV_GENERIC_SET_ALL, 0) + gvas(3))
    outcome = partition.hypercall(5, io)
    assert (outcome.status, outcome.reps_completed) == (0, 3)
    assert platform.tlb_flushes == [(0, (2, 66)), (5, tuple(range(70)))]


# -- the platform failing -----------------------------------------------------------------------


def test_a_platform_failure_is_a_failed_call_not_a_crash(caplog):
    partition, platform = make()

    def broken(vp_index, vps):
        raise OSError(22, "KVM_SET_SREGS failed")

    platform.flush_guest_tlbs = broken
    outcome = run(partition, platform, 0, control(C.HvCallFlushVirtualAddressSpace),
                  space(0, 0b10))
    # The dispatcher's answer for a handler that raised; Linux then flushes with IPIs
    # (hyperv_flush_tlb_multi: "goto do_native" on any failure).
    assert outcome.status == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert "KVM_SET_SREGS failed" in caplog.text


# -- fuzz: whatever the guest passes, a TLFS status (or #UD), never a handler failure -----------

FUZZ_STATUSES = {S.HV_STATUS_SUCCESS, S.HV_STATUS_INVALID_HYPERCALL_INPUT,
                 S.HV_STATUS_INVALID_ALIGNMENT, S.HV_STATUS_INVALID_PARAMETER}
CODES = [C.HvCallFlushVirtualAddressSpace, C.HvCallFlushVirtualAddressList,
         C.HvCallFlushVirtualAddressSpaceEx, C.HvCallFlushVirtualAddressListEx]


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(CODES), fast=st.booleans(), ext=st.booleans(), xmm=st.booleans(),
       var_size=st.sampled_from([0, 0, 1, 2, 5]), reps=st.sampled_from([0, 1, 3, 40]),
       start=st.sampled_from([0, 0, 2]), vp=st.integers(0, 2),
       words=st.lists(st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1, 2, 3, 4, 7, 0xF]),
                      min_size=4, max_size=12),
       xmm_values=st.lists(st.integers(0, (1 << 128) - 1), min_size=6, max_size=6))
def test_fuzzed_flush_calls(code, fast, ext, xmm, var_size, reps, start, vp, words,
                            xmm_values):
    spec = "minimal,hv-tlbflush" + (",hv-tlbflush-ext" if ext else "") + \
        (",hv-xmm-input" if xmm else "")
    partition, platform = make(spec, vp_count=3)
    data = struct.pack(f"<{len(words)}Q", *words)
    platform.memory.write(IN_GPA, data)
    io = FakeRegisters(xmm=xmm_values + [0] * 10)
    ctl = control(code, var=var_size, reps=reps, start=start, fast=fast)
    if fast:
        io.set_call(ctl)
        io.set_fast_block(data[:16])
    else:
        io.set_call(ctl, IN_GPA)
    outcome = partition.hypercall(vp, io)
    assert outcome.reason != "handler failed"
    assert outcome.inject_ud or outcome.status in FUZZ_STATUSES
    if outcome.status == S.HV_STATUS_SUCCESS and reps:
        assert outcome.reps_completed == reps and not outcome.retried
    if outcome.status != S.HV_STATUS_SUCCESS:
        assert platform.tlb_flushes == []
