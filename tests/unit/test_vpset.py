"""hvvmm.hv.vpset: ProcessorMask and HV_VP_SET decoding (TLFS datatypes/hv_vp_set.md)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.hv.hvdef import HvStatus
from hvvmm.hv.hypercall import HypercallError
from hvvmm.hv.vpset import (
    HV_GENERIC_SET_ALL,
    HV_GENERIC_SET_SPARSE_4K,
    HV_VP_SET_MAX_VPS,
    VpSet,
    check_vp_set_size,
    decode_vp_set,
    encode_vp_set,
    processor_mask_vps,
)

S = HvStatus


def vp_set(fmt: int, valid: int, *banks: int) -> bytes:
    return struct.pack(f"<QQ{len(banks)}Q", fmt, valid, *banks)


def status_of(call) -> int:
    with pytest.raises(HypercallError) as info:
        call()
    return info.value.status


def test_the_tlfs_example():
    # "Suppose a partition has 200 VPs, and we wish to specify the following set: { 0,5,130 }
    # ... ValidBanksMask is 0x05 ... BankContents is: { 0x21,0x04 }."
    data = vp_set(HV_GENERIC_SET_SPARSE_4K, 0x05, 0x21, 0x04)
    decoded = decode_vp_set(data, 200)
    assert decoded == VpSet(all=False, vps=frozenset({0, 5, 130}))
    assert decoded.members(200) == (0, 5, 130)
    assert encode_vp_set([130, 5, 0]) == data


def test_all_format():
    assert decode_vp_set(vp_set(HV_GENERIC_SET_ALL, 0), 3).members(3) == (0, 1, 2)
    # Banks that fit the mask are allowed with "all" and ignored (KVM does the same).
    assert decode_vp_set(vp_set(HV_GENERIC_SET_ALL, 0b11, 1 << 63, 7), 2).all
    assert encode_vp_set(None) == vp_set(HV_GENERIC_SET_ALL, 0)


def test_empty_and_zero_banks():
    assert decode_vp_set(vp_set(0, 0), 4).members(4) == ()
    # "it is valid state for the corresponding element in BanksContents can be all 0s"
    assert decode_vp_set(vp_set(0, 0b101, 0, 0), 4).members(4) == ()
    # A zero bank beyond the partition is not a VP outside it.
    assert decode_vp_set(vp_set(0, 0b110, 0b10, 0), 66).members(66) == (65,)


@pytest.mark.parametrize("data", [
    b"",
    struct.pack("<Q", 0),                          # no ValidBanksMask
    vp_set(0, 0) + b"\0\0\0\0",                    # not whole QWORDs
    vp_set(0, 0b1),                                # one bank named, none present
    vp_set(0, 0b11, 1),                            # two named, one present
    vp_set(0, 0b1, 1, 2),                          # one named, two present
    vp_set(HV_GENERIC_SET_ALL, 0, 1),              # "all" with a stray bank
    vp_set(HV_GENERIC_SET_ALL, 1 << 63),           # "all" naming a bank it does not carry
    vp_set(7, 0b1),                                # the size is checked before the format
])
def test_size_mismatch_is_invalid_hypercall_input(data):
    assert status_of(lambda: decode_vp_set(data, 4)) == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert status_of(lambda: check_vp_set_size(data)) == S.HV_STATUS_INVALID_HYPERCALL_INPUT


@pytest.mark.parametrize("fmt", [2, 3, 0xFFFF_FFFF_FFFF_FFFF])
def test_unknown_format_is_invalid_parameter(fmt):
    assert status_of(lambda: decode_vp_set(vp_set(fmt, 0b1, 1), 4)) == \
        S.HV_STATUS_INVALID_PARAMETER
    assert check_vp_set_size(vp_set(fmt, 0b1, 1)) == (fmt, 1)


@pytest.mark.parametrize("vp_count, data", [
    (4, vp_set(0, 0b1, 1 << 4)),
    (4, vp_set(0, 0b1, 1 << 63)),
    (64, vp_set(0, 0b10, 1)),                      # VP 64
    (130, vp_set(0, 0b101, 1, 0b100)),             # VP 130 (bank 2), VPs 0..129 exist
    (4095, vp_set(0, 1 << 63, 1 << 63)),           # VP 4095, VPs 0..4094 exist
])
def test_vp_outside_the_partition_is_invalid_parameter(vp_count, data):
    with pytest.raises(HypercallError) as info:
        decode_vp_set(data, vp_count)
    assert info.value.status == S.HV_STATUS_INVALID_PARAMETER
    assert "the partition has VPs 0.." in str(info.value)


def test_the_last_possible_vp():
    assert decode_vp_set(vp_set(0, 1 << 63, 1 << 63), HV_VP_SET_MAX_VPS).members(4096) == \
        (4095,)


def test_processor_mask():
    assert processor_mask_vps(0b1011, 4) == {0, 1, 3}
    assert processor_mask_vps(0, 1) == frozenset()
    assert processor_mask_vps(1 << 63, 200) == {63}
    assert status_of(lambda: processor_mask_vps(0b10000, 4)) == S.HV_STATUS_INVALID_PARAMETER
    assert status_of(lambda: processor_mask_vps(1 << 63, 63)) == S.HV_STATUS_INVALID_PARAMETER


@pytest.mark.parametrize("vp_count", [0, -1, HV_VP_SET_MAX_VPS + 1])
def test_a_bad_vp_count_is_a_vmm_bug(vp_count):
    with pytest.raises(ValueError, match="a VMM bug"):
        decode_vp_set(vp_set(0, 0), vp_count)
    with pytest.raises(ValueError, match="a VMM bug"):
        processor_mask_vps(0, vp_count)


def test_encode_refuses_what_does_not_fit():
    with pytest.raises(ValueError):
        encode_vp_set([HV_VP_SET_MAX_VPS])
    with pytest.raises(ValueError):
        encode_vp_set([-1])


# -- properties ---------------------------------------------------------------------------------

TLFS_STATUSES = {S.HV_STATUS_INVALID_HYPERCALL_INPUT, S.HV_STATUS_INVALID_PARAMETER}


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=8 * 70), vp_count=st.integers(1, HV_VP_SET_MAX_VPS))
def test_random_bytes_only_ever_give_a_tlfs_status(data, vp_count):
    try:
        result = decode_vp_set(data, vp_count)
    except HypercallError as error:
        assert error.status in TLFS_STATUSES
        return
    assert all(0 <= vp < vp_count for vp in result.members(vp_count))


# Structured inputs reach the deeper checks far more often than random bytes.
@st.composite
def structured_sets(draw):
    fmt = draw(st.sampled_from([0, 0, 0, 1, 2, draw(st.integers(0, (1 << 64) - 1))]))
    valid = draw(st.integers(0, (1 << 64) - 1) | st.integers(0, 0xFF))
    count = valid.bit_count() + draw(st.sampled_from([0, 0, 0, -1, 1]))
    banks = draw(st.lists(st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1, 1 << 63]),
                          min_size=max(count, 0), max_size=max(count, 0)))
    return vp_set(fmt, valid, *banks)


@settings(max_examples=500, deadline=None)
@given(data=structured_sets(), vp_count=st.integers(1, HV_VP_SET_MAX_VPS))
def test_structured_sets_only_ever_give_a_tlfs_status(data, vp_count):
    try:
        result = decode_vp_set(data, vp_count)
    except HypercallError as error:
        assert error.status in TLFS_STATUSES
        return
    members = result.members(vp_count)
    assert all(0 <= vp < vp_count for vp in members)
    assert list(members) == sorted(set(members))


@settings(max_examples=300, deadline=None)
@given(vps=st.sets(st.integers(0, HV_VP_SET_MAX_VPS - 1), max_size=40))
def test_encode_decode_round_trip(vps):
    data = encode_vp_set(vps)
    assert (len(data) - 16) // 8 == struct.unpack_from("<Q", data, 8)[0].bit_count()
    assert decode_vp_set(data, HV_VP_SET_MAX_VPS) == VpSet(all=False, vps=frozenset(vps))
    if vps and max(vps) > 0:
        assert status_of(lambda: decode_vp_set(data, max(vps))) == S.HV_STATUS_INVALID_PARAMETER


@settings(max_examples=200, deadline=None)
@given(mask=st.integers(0, (1 << 64) - 1), vp_count=st.integers(1, 200))
def test_processor_mask_property(mask, vp_count):
    try:
        vps = processor_mask_vps(mask, vp_count)
    except HypercallError as error:
        assert error.status == S.HV_STATUS_INVALID_PARAMETER
        assert mask.bit_length() > vp_count
        return
    assert sum(1 << vp for vp in vps) == mask
    assert all(vp < vp_count for vp in vps)
