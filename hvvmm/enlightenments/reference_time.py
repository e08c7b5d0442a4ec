"""hv-time: partition reference time -- HV_X64_MSR_TIME_REF_COUNT and the reference TSC page.

TLFS ``timers.md`` "Reference Counter" and "Partition Reference Time Enlightenment"; the guest side
is Linux ``drivers/clocksource/hyperv_timer.c``. (The module is not called
``time`` so that it never shadows the standard library module.)

* Partition reference time counts 100 ns units from partition creation, "strictly monotonically
  increasing ... as seen by any and all virtual processors" and at a constant rate.
* HV_X64_MSR_TIME_REF_COUNT (0x40000020): read-only ("Any attempt to write to it results in a #GP
  fault"), partition-wide.
* HV_X64_MSR_REFERENCE_TSC (0x40000021): bit 0 Enable, 11:1 RsvdP, 63:12 GPA page number; starts
  at 0. A read returns exactly the value written (kvm-unit-tests ``hyperv_clock``). Writable before
  GUEST_OS_ID (Linux enables the page first). A page number outside the GPA space does not fault:
  "the reference TSC page will not be accessible to the guest".
* The TSC page (``HV_REFERENCE_TSC_PAGE``) is a read-only overlay: u32 TscSequence @0, u64 TscScale
  @8, s64 TscOffset @16, and ``ReferenceTime = ((VirtualTsc * TscScale) >> 64) + TscOffset``.
  TscSequence 0 means "not a reliable source: read the MSR"; 0xFFFFFFFF was the invalid value in
  older TLFS text and KVM and kvm-unit-tests reject it too, so hvvmm never publishes either.

One clock, exactly: reference time *is* the page formula applied to the guest TSC,

    TscScale  = floor(10**7 * 2**64 / tsc_hz)            (OpenVMM: (10^7 << 64) / tsc_freq)
    TscOffset = -((tsc_at_reference_zero * TscScale) >> 64)
    TIME_REF_COUNT = ((guest_tsc_now * TscScale) >> 64) + TscOffset

so the MSR and the page can never disagree (KVM likewise derives the MSR from the TSC-page
parameters when they are valid); kvm-unit-tests' ``t1 <= rdmsr(TIME_REF_COUNT) <= t2`` between two
page reads holds by construction. The scale is exact integer arithmetic; its error is below one
unit per 2**64 TSC ticks. The page is filled synchronously inside the REFERENCE_TSC write exit,
because Linux reads it immediately after the WRMSR (``hv_init_tsc_clocksource()`` in
``drivers/clocksource/hyperv_timer.c``).
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING

from hvvmm.enlightenments import AttachError, Enlightenment, privileges
from hvvmm.hv.hvdef import (
    HV_CLOCK_HZ,
    HV_PAGE_MASK,
    HV_PAGE_SIZE,
    HV_REFERENCE_TSC_OFFSET_OFFSET,
    HV_REFERENCE_TSC_SCALE_OFFSET,
    HV_REFERENCE_TSC_SEQUENCE_INVALID,
    HV_REFERENCE_TSC_SEQUENCE_OFFSET,
    HV_U64_MASK,
    HV_X64_MSR_REFERENCE_TSC,
    HV_X64_MSR_TIME_REF_COUNT,
    HV_X64_MSR_TSC_REFERENCE_ENABLE,
    HvPartitionPrivilege,
)
from hvvmm.hv.platform import OverlayError, OverlayPage, OverlaySlot

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition
    from hvvmm.hv.platform import HvPlatform

log = logging.getLogger(__name__)

NAME = "hv-time"

_PAGE_HEADER = struct.Struct("<IIQq")  # TscSequence, Reserved1, TscScale, TscOffset
_U32 = struct.Struct("<I")
# Invalid in older TLFS text; KVM skips it too (Linux arch/x86/kvm/hyperv.c).
TSC_SEQUENCE_RESERVED = 0xFFFF_FFFF


class ReferenceTimeError(ValueError):
    """Reference TSC parameters cannot be computed (TSC slower than the 10 MHz reference)."""


def tsc_scale(tsc_hz: int) -> int:
    """TscScale for a TSC running at ``tsc_hz``: ``floor(10**7 * 2**64 / tsc_hz)``.

    It must fit in 64 bits, so the TSC must run faster than the 10 MHz reference clock."""
    if tsc_hz <= HV_CLOCK_HZ:
        raise ReferenceTimeError(f"a {tsc_hz} Hz TSC is not faster than the {HV_CLOCK_HZ} Hz "
                                 "reference clock; TscScale would not fit in 64 bits")
    return (HV_CLOCK_HZ << 64) // tsc_hz


def tsc_offset(tsc_at_reference_zero: int, scale: int) -> int:
    """TscOffset (signed) that makes reference time 0 at guest TSC ``tsc_at_reference_zero``."""
    return -((tsc_at_reference_zero * scale) >> 64)


def reference_time(tsc: int, scale: int, offset: int) -> int:
    """``((tsc * scale) >> 64) + offset`` as the guest computes it: 64x64 -> 128-bit multiply,
    high half, plus the signed offset, modulo 2**64 (TLFS ``timers.md``)."""
    return (((tsc & HV_U64_MASK) * scale >> 64) + offset) & HV_U64_MASK


def next_sequence(sequence: int) -> int:
    """The TscSequence after ``sequence``: +1, skipping 0 (invalid) and 0xFFFFFFFF (reserved)."""
    sequence = (sequence + 1) & 0xFFFF_FFFF
    while sequence in (HV_REFERENCE_TSC_SEQUENCE_INVALID, TSC_SEQUENCE_RESERVED):
        sequence = (sequence + 1) & 0xFFFF_FFFF
    return sequence


def reference_tsc_page(sequence: int, scale: int, offset: int) -> bytes:
    """A 4096-byte ``HV_REFERENCE_TSC_PAGE`` (reserved fields zero)."""
    header = _PAGE_HEADER.pack(sequence & 0xFFFF_FFFF, 0, scale, offset)
    return header + bytes(HV_PAGE_SIZE - len(header))


def decode_reference_tsc_page(page: bytes) -> tuple[int, int, int]:
    """``(sequence, scale, offset)`` from the first bytes of a TSC page."""
    sequence, _reserved, scale, offset = _PAGE_HEADER.unpack_from(page, 0)
    return sequence, scale, offset


class ReferenceClock:
    """Partition reference time from the guest TSC (see the module docstring)."""

    def __init__(self, platform: "HvPlatform"):
        self._platform = platform
        self.scale = tsc_scale(int(platform.tsc_frequency_hz))
        self.offset = 0
        self._last = 0
        self._lock = threading.Lock()
        self.rebase()

    def rebase(self) -> None:
        """Take ``platform.guest_tsc_at_reference_zero`` as reference time 0 (creation, reset)."""
        offset = tsc_offset(int(self._platform.guest_tsc_at_reference_zero), self.scale)
        with self._lock:
            self.offset = offset
            self._last = 0

    def now(self, vp_index: int) -> int:
        """Reference time now, as VP ``vp_index`` sees it. Never goes backwards across VPs (a
        guard against TSC skew between vCPUs; with synchronized TSCs it never engages)."""
        raw = ((int(self._platform.read_guest_tsc(vp_index)) & HV_U64_MASK) * self.scale >> 64) \
            + self.offset
        value = min(max(raw, 0), HV_U64_MASK)  # before reference zero: 0, not a wrapped value
        with self._lock:
            if value < self._last:
                value = self._last
            self._last = value
        return value


class ReferenceTimeState:
    """The REFERENCE_TSC MSR, the TSC page overlay and its sequence number.

    ``lock`` guards the MSR value and the sequence; the page is placed through an
    :class:`~hvvmm.hv.platform.OverlaySlot`, never with the lock held across the platform call.
    """

    def __init__(self, partition: "Partition", clock: ReferenceClock):
        self._log_once = partition.log_once
        self.lock = threading.Lock()
        self.slot = OverlaySlot(partition.platform, "reference TSC page", readonly=True,
                                lock=self.lock)
        self.clock = clock
        self.msr_value = 0
        # Never reset, so a sequence value is never reused for different parameters.
        self.sequence = HV_REFERENCE_TSC_SEQUENCE_INVALID

    @property
    def page(self) -> OverlayPage | None:
        return self.slot.page

    def read_time_ref_count(self, vp_index: int) -> int:
        return self.clock.now(vp_index)

    def read_reference_tsc(self, vp_index: int) -> int:
        return self.msr_value

    def write_reference_tsc(self, vp_index: int, value: int) -> None:
        with self.lock:
            self.msr_value = value  # RsvdP 11:1 kept: a read returns exactly the value written
            gpa = value & HV_PAGE_MASK
            if not value & HV_X64_MSR_TSC_REFERENCE_ENABLE or self.slot.gpa == gpa:
                content = None
            else:
                self.sequence = next_sequence(self.sequence)
                content = reference_tsc_page(self.sequence, self.clock.scale, self.clock.offset)
        if not value & HV_X64_MSR_TSC_REFERENCE_ENABLE:
            self.slot.remove()
        elif content is not None:
            try:
                self.slot.place(gpa, content)
            except OverlayError as error:
                # TLFS: an unusable page number is not a fault; the page is just not there. The
                # guest still reads the MSR value it wrote and falls back to TIME_REF_COUNT.
                self._log_once("tsc_page_unplaceable", logging.WARNING,
                               "vp%d: reference TSC page not placed at %#x: %s", vp_index, gpa,
                               error)
                self.slot.remove()
                return
            log.debug("vp%d: reference TSC page at %#x (sequence %#x, scale %#x, offset %d)",
                      vp_index, gpa, self.sequence, self.clock.scale, self.clock.offset)

    def republish(self) -> None:
        """Publish new scale/offset (after a restore or a TSC change) without a torn read: the
        sequence goes to 0 first, so a reader that sees the new values also sees the sequence
        change and retries or falls back to the MSR (TLFS ``timers.md`` reader loop). Writes the
        overlay's memory only; no memslot changes."""
        with self.lock:
            page = self.slot.page
            if page is None:
                return
            page.write(HV_REFERENCE_TSC_SEQUENCE_OFFSET,
                       _U32.pack(HV_REFERENCE_TSC_SEQUENCE_INVALID))
            self.sequence = next_sequence(self.sequence)
            content = reference_tsc_page(self.sequence, self.clock.scale, self.clock.offset)
            parameters_end = HV_REFERENCE_TSC_OFFSET_OFFSET + 8  # TscScale and TscOffset
            page.write(HV_REFERENCE_TSC_SCALE_OFFSET,
                       content[HV_REFERENCE_TSC_SCALE_OFFSET:parameters_end])
            page.write(HV_REFERENCE_TSC_SEQUENCE_OFFSET, content[:4])

    def reset(self) -> None:
        """VM reset: the MSR back to 0, the page removed, time re-based from the platform."""

        def commit() -> None:
            self.msr_value = 0

        self.slot.remove(commit=commit)
        self.clock.rebase()


def attach(partition: "Partition") -> ReferenceTimeState:
    try:
        clock = ReferenceClock(partition.platform)
    except ReferenceTimeError as error:
        raise AttachError(f"{NAME} cannot work on this platform: {error}") from error
    state = ReferenceTimeState(partition, clock)
    partition.reference_clock = clock
    partition.register_msr(HV_X64_MSR_TIME_REF_COUNT, read=state.read_time_ref_count,
                           scope="partition")
    partition.register_msr(HV_X64_MSR_REFERENCE_TSC, read=state.read_reference_tsc,
                           write=state.write_reference_tsc, scope="partition")
    return state


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="TIME_REF_COUNT MSR and the reference TSC page (exit-less guest clock)",
    tlfs="timers.md: Reference Counter; Partition Reference Time Enlightenment",
    attach=attach,
    cpuid=privileges(HvPartitionPrivilege.AccessPartitionReferenceCounter
                     | HvPartitionPrivilege.AccessPartitionReferenceTsc),
    msrs=(HV_X64_MSR_TIME_REF_COUNT, HV_X64_MSR_REFERENCE_TSC),
    advice=(("hv-vpindex", "Windows ignores the reference TSC page unless AccessVpIndex is "
                           "advertised too (cloud-hypervisor PR #8380)"),),
)
