"""hv-time: TIME_REF_COUNT and the reference TSC page (TLFS timers.md).

The arithmetic is checked against exact rationals; the page clock is checked against the MSR the
way kvm-unit-tests ``hyperv_clock`` and KVM's ``hyperv_clock.c`` selftest do."""

from __future__ import annotations

import logging
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments.reference_time import (
    TSC_SEQUENCE_RESERVED,
    ReferenceTimeError,
    decode_reference_tsc_page,
    next_sequence,
    reference_time,
    reference_tsc_page,
    tsc_offset,
    tsc_scale,
)
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FAKE_TSC_HZ, FakePlatform
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FAKE_TSC_HZ, FakePlatform

TIME_REF_COUNT = hvdef.HV_X64_MSR_TIME_REF_COUNT
REFERENCE_TSC = hvdef.HV_X64_MSR_REFERENCE_TSC
PAGE = 0x6000
TEN_MHZ = 10_000_000
U64 = (1 << 64) - 1


def exact_reference_time(tsc: int, tsc0: int, hz: int) -> Fraction:
    return Fraction((tsc - tsc0) * TEN_MHZ, hz)


def make(tsc0: int = 0, hz: int = FAKE_TSC_HZ, spec: str = "minimal,hv-time"):
    platform = FakePlatform(tsc_frequency_hz=hz, guest_tsc_at_reference_zero=tsc0,
                            max_gpa=1 << 40)
    return Partition(parse_hyperv_spec(spec), platform), platform


def page_time(platform: FakePlatform, gpa: int = PAGE) -> int | None:
    """What a guest computes from the page at the current TSC (None: sequence invalid)."""
    sequence, scale, offset = decode_reference_tsc_page(platform.guest_read(gpa, 24))
    if sequence == 0:
        return None
    return ((platform.tsc * scale >> 64) + offset) & U64


# -- arithmetic ----------------------------------------------------------------------------------


@given(hz=st.integers(TEN_MHZ + 1, 10**11))
def test_scale_is_the_exact_floor(hz):
    scale = tsc_scale(hz)
    exact = Fraction(TEN_MHZ << 64, hz)
    assert scale <= exact < scale + 1
    assert 0 < scale < 1 << 64


@settings(max_examples=300)
@given(hz=st.integers(TEN_MHZ + 1, 10**11), tsc0=st.integers(0, 1 << 50),
       elapsed=st.integers(0, 1 << 52))
def test_reference_time_matches_exact_rational(hz, tsc0, elapsed):
    scale = tsc_scale(hz)
    offset = tsc_offset(tsc0, scale)
    tsc = tsc0 + elapsed
    computed = reference_time(tsc, scale, offset)
    exact = exact_reference_time(tsc, tsc0, hz)
    # Three floors (scale, product, offset), each loses less than one unit.
    assert abs(computed - exact) <= 2
    assert reference_time(tsc0, scale, offset) == 0


@given(hz=st.integers(TEN_MHZ + 1, 10**11), tsc0=st.integers(0, 1 << 50),
       steps=st.lists(st.integers(0, 1 << 40), max_size=20))
def test_reference_time_is_monotonic(hz, tsc0, steps):
    scale, offset = tsc_scale(hz), tsc_offset(tsc0, tsc_scale(hz))
    tsc, last = tsc0, 0
    for step in steps:
        tsc += step
        now = reference_time(tsc, scale, offset)
        assert now >= last
        last = now


def test_known_values():
    # OpenVMM's formula (10^7 << 64) / tsc_freq; a 1 GHz TSC gives 2^64 / 100.
    assert tsc_scale(10**9) == (1 << 64) // 100
    assert reference_time(10**9, tsc_scale(10**9), 0) == 10**7 - 1  # floor of scale
    assert tsc_offset(0, tsc_scale(10**9)) == 0
    with pytest.raises(ReferenceTimeError, match="not faster than the 10000000 Hz"):
        tsc_scale(TEN_MHZ)


def test_sequence_never_publishes_invalid_values():
    assert next_sequence(0) == 1
    assert next_sequence(41) == 42
    assert next_sequence(0xFFFF_FFFE) == 1
    assert next_sequence(TSC_SEQUENCE_RESERVED) == 1


def test_page_layout():
    page = reference_tsc_page(7, 0x1234, -5)
    assert len(page) == 4096 and page[24:] == bytes(4072)
    assert decode_reference_tsc_page(page) == (7, 0x1234, -5)
    assert page[4:8] == bytes(4)  # Reserved1


# -- the MSRs and the page -----------------------------------------------------------------------


def test_time_ref_count_counts_100ns_since_creation():
    partition, platform = make(tsc0=123_456_789)
    assert partition.msr_read(0, TIME_REF_COUNT) == 0
    platform.advance(seconds=2.5)
    assert abs(partition.msr_read(1, TIME_REF_COUNT) - 25_000_000) <= 2
    assert platform.tsc_reads[-1] == 1  # read on the calling VP


def test_page_is_filled_synchronously_and_agrees_with_the_msr():
    partition, platform = make(tsc0=10**12)
    platform.advance(seconds=3)
    partition.msr_write(0, REFERENCE_TSC, PAGE | 1)  # before GUEST_OS_ID, as Linux does
    assert partition.msr_read(0, REFERENCE_TSC) == PAGE | 1
    overlay = platform.overlays[PAGE]
    assert overlay.readonly and overlay.name == "reference TSC page"
    sequence, scale, offset = decode_reference_tsc_page(platform.guest_read(PAGE, 24))
    assert sequence not in (0, 0xFFFF_FFFF)
    assert scale == tsc_scale(FAKE_TSC_HZ)
    assert offset == tsc_offset(10**12, scale)
    for step in (0, 1, 997, 10**6, 10**9, 10**11):
        platform.advance(ticks=step)
        t1 = page_time(platform)
        msr = partition.msr_read(1, TIME_REF_COUNT)
        platform.advance(ticks=1000)
        t2 = page_time(platform)
        assert t1 <= msr <= t2  # kvm-unit-tests hyperv_clock
        assert abs(msr - t1) <= 1000  # within 100 us (KVM selftest hyperv_clock.c)
        assert msr == t1  # the same formula: exact agreement


def test_rsvdp_bits_read_back_and_disable_restores_ram():
    partition, platform = make()
    platform.memory.write(PAGE, b"guest data")
    partition.msr_write(0, REFERENCE_TSC, PAGE | 0xFFE | 1)
    assert partition.msr_read(0, REFERENCE_TSC) == PAGE | 0xFFF
    assert platform.memory.read(PAGE, 10) != b"guest data"
    partition.msr_write(0, REFERENCE_TSC, PAGE | 0xFFE)
    assert partition.msr_read(0, REFERENCE_TSC) == PAGE | 0xFFE
    assert platform.overlays == {}
    assert platform.memory.read(PAGE, 10) == b"guest data"


def test_every_publication_gets_a_new_sequence():
    partition, platform = make()
    partition.msr_write(0, REFERENCE_TSC, PAGE | 1)
    first = decode_reference_tsc_page(platform.guest_read(PAGE, 24))[0]
    partition.msr_write(0, REFERENCE_TSC, 0)
    partition.msr_write(0, REFERENCE_TSC, 0x9000 | 1)
    second = decode_reference_tsc_page(platform.guest_read(0x9000, 24))[0]
    assert second == next_sequence(first)
    assert list(platform.overlays) == [0x9000]
    # The same value again: nothing remapped, nothing renumbered.
    log_length = len(platform.overlay_log)
    partition.msr_write(0, REFERENCE_TSC, 0x9000 | 1)
    assert len(platform.overlay_log) == log_length


def test_republish_invalidates_first(monkeypatch):
    partition, platform = make()
    partition.msr_write(0, REFERENCE_TSC, PAGE | 1)
    overlay = platform.overlays[PAGE]
    writes = []
    original = overlay.write
    monkeypatch.setattr(overlay, "write",
                        lambda offset, data: (writes.append((offset, bytes(data))),
                                              original(offset, data)))
    before = decode_reference_tsc_page(platform.guest_read(PAGE, 24))[0]
    partition.state["hv-time"].republish()
    assert writes[0] == (0, bytes(4))  # sequence 0 first: readers fall back to the MSR
    assert writes[-1][0] == 0 and writes[-1][1] != bytes(4)  # new sequence last
    assert decode_reference_tsc_page(platform.guest_read(PAGE, 24))[0] == next_sequence(before)


def test_page_beyond_the_gpa_space_is_not_a_fault(caplog):
    partition, platform = make()
    with caplog.at_level(logging.WARNING):
        partition.msr_write(0, REFERENCE_TSC, (1 << 40) | 1)
    assert partition.msr_read(0, REFERENCE_TSC) == (1 << 40) | 1  # TLFS: the write succeeds
    assert platform.overlays == {}
    assert "reference TSC page not placed" in caplog.text


def test_msr_never_goes_backwards():
    partition, platform = make(tsc0=1000)
    platform.advance(seconds=1)
    high = partition.msr_read(0, TIME_REF_COUNT)
    platform.tsc -= 10_000  # a skewed vCPU TSC
    assert partition.msr_read(1, TIME_REF_COUNT) == high


def test_before_reference_zero_reads_zero():
    partition, platform = make(tsc0=10**9)
    platform.tsc = 5
    assert partition.msr_read(0, TIME_REF_COUNT) == 0


def test_reset_rebases_on_the_platform():
    partition, platform = make()
    platform.advance(seconds=100)
    partition.msr_write(0, REFERENCE_TSC, PAGE | 1)
    assert partition.msr_read(0, TIME_REF_COUNT) > 999_000_000
    platform.guest_tsc_at_reference_zero = platform.tsc  # the VMM reset the guest TSC here
    partition.reset()
    assert partition.msr_read(0, REFERENCE_TSC) == 0
    assert platform.overlays == {}
    assert partition.msr_read(0, TIME_REF_COUNT) == 0
    platform.advance(seconds=1)
    assert abs(partition.msr_read(0, TIME_REF_COUNT) - TEN_MHZ) <= 2
    assert partition.reference_time_100ns(0) == partition.msr_read(0, TIME_REF_COUNT)


def test_reference_time_helper_without_hv_time():
    partition, _ = make(spec="minimal")
    assert partition.reference_clock is None
    assert partition.reference_time_100ns(0) is None
