"""hv-stimer / hv-stimer-direct: the four synthetic timers of every VP.

TLFS ``timers.md`` "Synthetic Timers" (cited below as [T]) and
``datatypes/hv_timer_message_payload.md`` ([P]); kvm-unit-tests ``x86/hyperv_stimer.c``; KVM's
in-kernel emulation ``arch/x86/kvm/hyperv.c`` (Linux 6.16: ``stimer_set_config``,
``stimer_set_count``, ``stimer_start``, ``stimer_expiration``, ``stimer_send_msg``) where the TLFS
leaves a choice ([K]).

Registers (per VP, n = 0..3; CPUID 0x40000003 EAX bit 3, AccessSyntheticTimerRegs):

* ``STIMERn_CONFIG`` (0x400000B0 + 2n): bit 0 Enable, 1 Periodic, 2 Lazy, 3 AutoEnable, 11:4
  ApicVector, 12 DirectMode, 19:16 SINTx; 15:13 and 63:20 RsvdZ (a write setting them raises
  #GP). DirectMode is only available with hv-stimer-direct (CPUID 0x40000003 EDX bit 19); without
  it bit 12 is treated as reserved (#GP) -- [K] faults only under enforce-CPUID, hvvmm always
  enforces the CPUID gates (``hvvmm.hv.msr``). Reset value 0 [T].
* ``STIMERn_COUNT`` (0x400000B1 + 2n): 100 ns units; the absolute expiration time of a one-shot,
  the period of a periodic timer [T].

Semantics, as implemented:

* Writing COUNT = 0 disables the timer, "independent of the setting of AutoEnable"; writing a
  non-zero COUNT with AutoEnable set sets Enable [T].
* "It is not permitted to set the SINTx field to zero for an enabled timer (that is not in direct
  mode). If attempted, the timer will be marked disabled (that is, bit 0 cleared) immediately."
  [T] -- applied to every write that leaves such a timer enabled. ([K] applies it only when the
  timer was already enabled before the CONFIG write; hvvmm follows the TLFS.)
* Any CONFIG or COUNT write stops the timer and starts it again from its new values if it is
  enabled with a non-zero COUNT; an expiry not yet delivered is dropped ([K] ``stimer_cleanup``;
  the TLFS calls changing an enabled timer undefined).
* One-shot: expires when reference time >= COUNT; "If a one-shot is enabled and the specified count
  is in the past, it will expire immediately" [T] (handed to the timer thread at once, which also
  gives the few microseconds of delay that Windows' hibernation resume needs: a 2026 KVM patch by A.
  Graf, patchew 20260115141520.24176-1-graf@amazon.com, fires such timers after 10 µs). "When a
  one-shot timer expires, it is automatically marked as disabled" [T] (Enable reads 0 from then on,
  even if its message still waits for a free slot).
* Periodic: "The first period begins when the synthetic timer is enabled" [T]: expiries at
  ``t0 + k * COUNT`` where ``t0`` is the reference time of the enabling write. If one or more whole
  periods were missed (the host timer ran late), the timer signals once and the next expiry is the
  first point of the original grid after now ([K] ``stimer_start``:
  ``exp_time = time_now + (count - (time_now - exp_time) % count)``). The TLFS permits this ("some
  timer expiration signals may be skipped completely"); its optional "period modulation" is not
  done.
* Host work is bounded, whatever the guest writes (:data:`MIN_PERIOD_UNITS`,
  :data:`MIN_REARM_NS`; the reasons are at those constants): a periodic timer's effective period
  is at least 200 us (COUNT reads back as written; expiries fall on the grid of the effective
  period, so never before the guest's own); a timer's host timer is never due sooner than 50 us
  after that timer's previous expiry (a one-shot rewritten into the past in a loop); and a
  periodic message-mode timer whose message waits for its slot stops its host timer until the
  message is placed (EOM), then resumes on its grid (KVM ``kvm_hv_process_stimers`` restarts a
  timer only ``if (!stimer->msg_pending)``), so expiries the guest has not consumed coalesce into
  the one waiting message instead of waking the host. Direct-mode expiries the guest has not
  taken coalesce in the LAPIC's IRR (one bit per vector), which the host cannot see without a
  vCPU ioctl; the period floor bounds them.
* Lazy periodic: "the timer signal is deferred until this virtual processor is available. If it
  doesn't become available until shortly before the next timer is due to expire, it is skipped
  entirely" [T]. hvvmm skips a lazy timer's signal (at expiry, or when a deferred message is
  retried) once less than a quarter period is left before the next expiry. A non-lazy periodic
  timer always signals once per expiry processed.
* Never early: "The hypervisor guarantees that a timer expiration signal will never be delivered
  before the expiration time" [T]. Deadlines are computed in reference time and converted to the
  host clock conservatively (:class:`ReferenceHostMap`); the expiry handler checks again and
  re-arms if the bound says the time has not come yet.
* Message mode (DirectMode = 0): an ``HV_MESSAGE`` of type ``HVMSG_TIMER_EXPIRED`` (0x80000010),
  PayloadSize 24, flags/sender 0, payload ``{u32 TimerIndex, u32 Reserved, u64 ExpirationTime,
  u64 DeliveryTime}`` [P] to SIM slot SINTx via the SynIC
  (``partition.state["hv-synic"].synic(vp).deliver_message``).
  If the slot is busy (or the SIMP/SCONTROL is off, or the SINT masked) the message stays pending
  with the ExpirationTime of the expiry it reports ([T]; the SynIC sets MessagePending on a
  busy slot) and is retried from the SynIC's EOM listeners (the guest wrote EOM, or SCONTROL, SIMP
  or the SINT changed so it can take messages). A periodic timer is parked meanwhile (no host
  timer; the grid points it passes are counted as missed periods, the TLFS's skipped signals) and
  is restarted on its grid once the message is placed or dropped by the lazy rule above; one
  pending message per timer. [K] does likewise (``msg_pending`` holds the restart).
  DeliveryTime is the reference time when the message is placed [P]: read exactly on a vCPU
  thread (EOM retries), or on the timer thread the clock map's lower bound (at most a few
  microseconds under the true time, never under ExpirationTime).
* Direct mode (DirectMode = 1): ApicVector is raised as a fixed, edge-triggered interrupt on the
  VP (``platform.signal_interrupt``); no SynIC involvement ([T]). An interrupt the LAPIC
  refuses (software-disabled) is lost, as on hardware, and counted.

Threads: CONFIG/COUNT writes and EOM retries run on vCPU threads; expiries on the platform's one
timer thread (``platform.start_timer``: no thread per timer, nothing polls). Each VP's timers
share one lock. It is not held while calling the platform or the SynIC, with one exception:
a direct-mode interrupt is raised under it (``signal_interrupt`` is non-blocking), so that once
a CONFIG/COUNT write has returned no interrupt of the old setting follows. Host timers are
started with no lock held; every arm carries a token, and a callback whose token is no longer
current does nothing. Reference time is read only on vCPU threads (on KVM a vCPU ioctl from
another thread would wait for the vCPU to leave the guest): :class:`ReferenceHostMap`.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from hvvmm.enlightenments import AttachError, Enlightenment, features, privileges
from hvvmm.hv.hvdef import (
    HV_SYNIC_STIMER_COUNT,
    HV_U64_MASK,
    HV_X64_MSR_STIMER0_CONFIG,
    HvFeatures,
    HvPartitionPrivilege,
)
from hvvmm.enlightenments.synic import build_message, parse_message
from hvvmm.hv.platform import raise_interrupt

if TYPE_CHECKING:
    from hvvmm.enlightenments.reference_time import ReferenceClock
    from hvvmm.hv.partition import Partition
    from hvvmm.hv.platform import HvPlatform, TimerHandle

log = logging.getLogger(__name__)

NAME = "hv-stimer"
DIRECT_NAME = "hv-stimer-direct"

# STIMERn_CONFIG (TLFS timers.md "Synthetic Timer Configuration Register"; Linux hvgdk_mini.h)
STIMER_ENABLE = 1 << 0
STIMER_PERIODIC = 1 << 1
STIMER_LAZY = 1 << 2
STIMER_AUTO_ENABLE = 1 << 3
STIMER_APIC_VECTOR_SHIFT = 4
STIMER_APIC_VECTOR_MASK = 0xFF << STIMER_APIC_VECTOR_SHIFT
STIMER_DIRECT_MODE = 1 << 12
STIMER_SINTX_SHIFT = 16
STIMER_SINTX_MASK = 0xF << STIMER_SINTX_SHIFT
STIMER_CONFIG_RSVDZ = (0x7 << 13) | (HV_U64_MASK & ~((1 << 20) - 1))  # 15:13 and 63:20

# The message (TLFS datatypes/hv_message.md, hv_timer_message_payload.md; Linux hvgdk_mini.h)
HVMSG_TIMER_EXPIRED = 0x8000_0010
TIMER_PAYLOAD = struct.Struct("<IIQQ")  # TimerIndex, Reserved, ExpirationTime, DeliveryTime

# Host-side timing. Reference time counts 100 ns units.
NS_PER_UNIT = 100
RATE_MARGIN_PPM = 100  # how far host-clock and reference-clock rates are assumed to differ at most
MAX_RATE_MARGIN_PPM = 10_000
ROUND_UP_NS = 1_000  # added to every converted deadline
RESYNC_AFTER_NS = 100_000_000  # re-anchor the conversion when the anchor is older than this
FRESH_ANCHOR_NS = 20_000_000  # a one-shot COUNT/CONFIG write re-anchors only past this age
MAX_ARM_NS = 3_600 * 10**9  # host timers are armed at most this far ahead (then re-armed)

# Bounds on the host work a guest's timers can cause. Each host expiry costs the timer thread
# some tens of microseconds of Python and the GIL, so a guest arming STIMERs with a period of
# 100 ns would otherwise keep a host core busy for nothing (bench/stimer_cpu.py).
#
# * Periodic timers: KVM limits periodic LAPIC timers to ``min_timer_period_us`` (module
#   parameter, default 200 us; arch/x86/kvm/lapic.c ``limit_periodic_timer_frequency``: "Do not
#   allow the guest to program periodic timers with small interval, since the hrtimers are not
#   throttled by the host scheduler"), and its Hyper-V synthetic timers are throttled by
#   processing expiries on the vCPU itself (arch/x86/kvm/hyperv.c ``kvm_hv_process_stimers``) and
#   by clamping a deadline that is already past (Linux commit "KVM: x86: hyper-v: Clamp stimer
#   deadline to avoid livelock"). The TLFS (timers.md) states no minimum period, guarantees only
#   that an expiry is never early, and lets periodic signals be skipped; the guests that use
#   periodic STIMERs want at most a 0.5 ms clock tick (Windows' finest timer resolution) and
#   kvm-unit-tests 1 kHz. hvvmm takes KVM's LAPIC default: the effective period is at least
#   200 us (at most 5,000 host expiries per second per timer, 20,000 per VP).
# * Any timer (one-shot included): its host timer is due at least MIN_REARM_NS after its previous
#   expiry (at most 20,000 per second per timer). Re-arming a one-shot takes a COUNT/CONFIG write,
#   an exit the guest pays for; 50 us is also Linux's default timer slack (the lateness a Linux
#   task's timers are allowed; prctl(2) PR_SET_TIMERSLACK).
MIN_PERIOD_UNITS = 2_000  # 200 us in reference units
MIN_REARM_NS = 50_000


def timer_message(index: int, expiration_time: int, delivery_time: int) -> bytes:
    """The ``HV_MESSAGE`` header and ``HV_TIMER_MESSAGE_PAYLOAD`` of a timer expiry (40 bytes;
    the rest of the 256-byte slot is not part of the message, as KVM writes ``sizeof(header) +
    payload_size``)."""
    return build_message(HVMSG_TIMER_EXPIRED, TIMER_PAYLOAD.pack(
        index, 0, expiration_time & HV_U64_MASK, delivery_time & HV_U64_MASK))


def decode_timer_message(message: bytes) -> tuple[int, int, int, int, int]:
    """``(message_type, payload_size, timer_index, expiration_time, delivery_time)``."""
    message_type, size, _flags, _sender, payload = parse_message(message)
    index, _reserved, expiration, delivery = TIMER_PAYLOAD.unpack_from(
        payload.ljust(TIMER_PAYLOAD.size, b"\0"))
    return message_type, size, index, expiration, delivery


def next_periodic_expiration(expiration: int, period: int, now: int) -> int:
    """The expiry after ``expiration`` of a timer with ``period``, when it is processed at
    reference time ``now >= expiration``: ``expiration + period``, or, if whole periods were
    missed, the first point of the grid ``expiration + k * period`` after ``now`` (KVM
    ``stimer_start``)."""
    if now < expiration + period:
        return expiration + period
    return now + (period - (now - expiration) % period)


# --------------------------------------------------------------------------------------------
# Reference time <-> host time
# --------------------------------------------------------------------------------------------

class ReferenceHostMap:
    """Converts between partition reference time and the platform's host clock without touching
    a vCPU.

    Reference time is read from a VP's TSC, which only that VP's thread can do cheaply (on KVM a
    vCPU ioctl from another thread waits until the vCPU leaves the guest). So a vCPU thread takes
    an *anchor* -- host time before, reference time, host time after (:meth:`sample`) -- and the
    timer thread extrapolates from it at the nominal rate (100 ns per unit) with a margin of
    ``margin_ppm`` for rate differences (tsc_khz rounding, NTP slew of the host's monotonic
    clock): :meth:`lower_bound` is a reference time that has certainly been reached, and
    :meth:`host_deadline` the first host time at which it reaches a given value. Each new anchor
    checks the previous extrapolation; if it overshot (the clocks drift apart faster than the
    margin), the margin doubles and a warning is logged.
    """

    def __init__(self, platform: "HvPlatform", clock: "ReferenceClock", *,
                 margin_ppm: int = RATE_MARGIN_PPM):
        self._platform = platform
        self._clock = clock
        self._lock = threading.Lock()
        self.margin_ppm = margin_ppm
        self.anchor_host: int | None = None
        self.anchor_ref = 0
        self.samples = 0
        self.violations = 0
        self.resync_pending = False

    def sample(self, vp_index: int) -> int:
        """On VP ``vp_index``'s thread: read reference time and re-anchor; returns it."""
        before = self._platform.host_time_ns()
        ref = self._clock.now(vp_index)
        after = self._platform.host_time_ns()
        self.add_anchor(before, ref, after)
        return ref

    def add_anchor(self, host_before: int, ref: int, host_after: int) -> None:
        """Reference time ``ref`` was read between host times ``host_before`` and
        ``host_after``."""
        with self._lock:
            if self.anchor_host is not None:
                predicted = self._lower_bound_locked(host_before)
                if predicted > ref:  # the bound was not a bound: widen the margin
                    self.violations += 1
                    old = self.margin_ppm
                    self.margin_ppm = min(old * 2, MAX_RATE_MARGIN_PPM)
                    log.warning("reference time ran %d units slower than the host clock allows "
                                "at %d ppm; margin now %d ppm", predicted - ref, old,
                                self.margin_ppm)
            self.anchor_host = host_after
            self.anchor_ref = ref
            self.samples += 1
            self.resync_pending = False

    def clear(self) -> None:
        """Forget the anchor (reference time is re-based on a VM reset)."""
        with self._lock:
            self.anchor_host = None
            self.anchor_ref = 0
            self.resync_pending = False

    def lower_bound(self, host_ns: int) -> int | None:
        """A reference time already reached at host time ``host_ns`` (None: no anchor yet)."""
        with self._lock:
            if self.anchor_host is None:
                return None
            return self._lower_bound_locked(host_ns)

    def _lower_bound_locked(self, host_ns: int) -> int:
        assert self.anchor_host is not None
        elapsed = host_ns - self.anchor_host
        if elapsed >= 0:
            return self.anchor_ref + elapsed * (10**6 - self.margin_ppm) // (NS_PER_UNIT * 10**6)
        return self.anchor_ref - -(-(-elapsed) * (10**6 + self.margin_ppm)
                                   // (NS_PER_UNIT * 10**6))

    def host_deadline(self, ref: int) -> int | None:
        """The host time from which :meth:`lower_bound` is at least ``ref`` (None: no anchor)."""
        with self._lock:
            if self.anchor_host is None:
                return None
            if ref <= self.anchor_ref:
                return self.anchor_host
            units = ref - self.anchor_ref
            elapsed = -(-units * NS_PER_UNIT * 10**6 // (10**6 - self.margin_ppm))
            return self.anchor_host + elapsed + ROUND_UP_NS

    def age(self, host_ns: int) -> int | None:
        with self._lock:
            return None if self.anchor_host is None else host_ns - self.anchor_host

    def want_resync(self, host_ns: int) -> bool:
        """True (once, until the next anchor) if the anchor is older than
        :data:`RESYNC_AFTER_NS`."""
        with self._lock:
            if self.anchor_host is None or self.resync_pending:
                return False
            if host_ns - self.anchor_host < RESYNC_AFTER_NS:
                return False
            self.resync_pending = True
            return True


# --------------------------------------------------------------------------------------------
# Timer state
# --------------------------------------------------------------------------------------------

@dataclass
class PendingSignal:
    """An expiry not delivered yet (message mode: slot busy or SynIC not ready)."""

    expiration: int


@dataclass
class TimerCounters:
    expired: int = 0  # expiries processed (one per signal or skip)
    delivered: int = 0  # messages placed / interrupts accepted
    deferred: int = 0  # message deliveries that found the slot busy (or the SynIC off)
    retried: int = 0  # deferred messages delivered later
    missed_periods: int = 0  # whole periods skipped by the catch-up rule
    lazy_skipped: int = 0  # lazy signals skipped because the next expiry was close
    refused: int = 0  # direct-mode interrupts the LAPIC refused
    early_wakeups: int = 0  # host timer fired before the bound said the time had come


@dataclass
class SyntheticTimer:
    index: int
    config: int = 0
    count: int = 0
    expiration: int | None = None  # reference time of the next expiry while armed
    handle: "TimerHandle | None" = None
    token: int = 0  # bumped on every write and every arm; a callback with an old one is stale
    pending: PendingSignal | None = None
    parked: bool = False  # periodic, message waiting for its slot: no host timer until EOM
    last_expiry_ns: int | None = None  # host time of the last expiry processed (re-arm floor)
    counters: TimerCounters = field(default_factory=TimerCounters)

    @property
    def enabled(self) -> bool:
        return bool(self.config & STIMER_ENABLE)

    @property
    def periodic(self) -> bool:
        return bool(self.config & STIMER_PERIODIC)

    @property
    def period(self) -> int:
        """A periodic timer's effective period: COUNT, at least :data:`MIN_PERIOD_UNITS`."""
        return max(self.count, MIN_PERIOD_UNITS)

    @property
    def lazy(self) -> bool:
        return bool(self.config & STIMER_LAZY)

    @property
    def direct(self) -> bool:
        return bool(self.config & STIMER_DIRECT_MODE)

    @property
    def vector(self) -> int:
        return (self.config & STIMER_APIC_VECTOR_MASK) >> STIMER_APIC_VECTOR_SHIFT

    @property
    def sint(self) -> int:
        return (self.config & STIMER_SINTX_MASK) >> STIMER_SINTX_SHIFT


@dataclass
class _Arm:
    """A host timer to start once the lock is released."""

    timer: SyntheticTimer
    token: int
    deadline_ns: int


class VpTimers:
    """The four synthetic timers of one VP and the lock they share."""

    def __init__(self, vp_index: int):
        self.vp_index = vp_index
        self.lock = threading.Lock()
        self.timers = tuple(SyntheticTimer(n) for n in range(HV_SYNIC_STIMER_COUNT))


class SyntheticTimers:
    """hv-stimer state of a partition: every VP's timers, the reference/host clock map."""

    def __init__(self, partition: "Partition", clock: "ReferenceClock", *, direct_available: bool):
        self.partition = partition
        self.platform = partition.platform
        self.direct_available = direct_available
        self.map = ReferenceHostMap(self.platform, clock)
        self.vps = tuple(VpTimers(vp) for vp in range(partition.vp_count))
        self._log_once = partition.log_once
        # A VP's SynIC (hv-synic's state); EOM listeners are registered once, at attach.
        self._synic_of = partition.state["hv-synic"].synic
        # observer(vp_index, timer_index, expiration, reference_time_lower_bound): called for
        # every signal about to be raised or message about to be placed (benchmarks, tests).
        # Direct mode calls it with the VP lock held: keep it short, no emulator calls.
        self.observer: Callable[[int, int, int, int], None] | None = None

    # -- MSRs (vCPU threads) ------------------------------------------------------------------

    def read_config(self, vp_index: int, n: int) -> int:
        return self.vps[vp_index].timers[n].config

    def read_count(self, vp_index: int, n: int) -> int:
        return self.vps[vp_index].timers[n].count

    def write_config(self, vp_index: int, n: int, value: int) -> None:
        # Reserved bits (and DirectMode without hv-stimer-direct) were refused by the MSR
        # registry before this runs.
        now = self._now_for_write(vp_index, value)
        vp = self.vps[vp_index]
        with vp.lock:
            timer = vp.timers[n]
            stale = self._stop_locked(timer)
            timer.config = _sintx_rule(value)
            arm = self._start_locked(timer, now)
        self._after_write(vp_index, timer, stale, arm)

    def write_count(self, vp_index: int, n: int, value: int) -> None:
        # Only this VP's thread changes a timer's Periodic bit, so reading it unlocked is exact.
        now = self._now_for_write(vp_index, self.vps[vp_index].timers[n].config)
        vp = self.vps[vp_index]
        with vp.lock:
            timer = vp.timers[n]
            stale = self._stop_locked(timer)
            timer.count = value
            if value == 0:
                timer.config &= ~STIMER_ENABLE
            elif timer.config & STIMER_AUTO_ENABLE:
                timer.config = _sintx_rule(timer.config | STIMER_ENABLE)
            arm = self._start_locked(timer, now)
        self._after_write(vp_index, timer, stale, arm)

    def _now_for_write(self, vp_index: int, config: int) -> int | None:
        """Reference time for a CONFIG/COUNT write: read exactly (re-anchoring the clock map)
        when a periodic timer may start -- its first period begins at the write [T] -- or when the
        anchor is older than :data:`FRESH_ANCHOR_NS`; otherwise None: a one-shot's expiry is
        COUNT itself and the fresh anchor converts it (this halves the cost of the COUNT write
        Linux and Windows make for every tick)."""
        if not config & STIMER_PERIODIC:
            age = self.map.age(self.platform.host_time_ns())
            if age is not None and 0 <= age < FRESH_ANCHOR_NS:
                return None
        return self.map.sample(vp_index)

    def _after_write(self, vp_index: int, timer: SyntheticTimer, stale: "TimerHandle | None",
                     arm: _Arm | None) -> None:
        if stale is not None:
            stale.cancel()
        if arm is not None:
            self._arm(vp_index, arm)

    @staticmethod
    def _stop_locked(timer: SyntheticTimer) -> "TimerHandle | None":
        timer.token += 1
        stale, timer.handle = timer.handle, None
        timer.expiration = None
        timer.pending = None
        timer.parked = False
        return stale

    def _start_locked(self, timer: SyntheticTimer, now: int | None) -> _Arm | None:
        """Start an enabled timer with a non-zero COUNT (KVM: enabled with count 0 stays
        enabled and does nothing). ``now`` is only needed (and given) for a periodic timer."""
        if not timer.enabled or timer.count == 0:
            return None
        if timer.periodic:
            assert now is not None
            timer.expiration = now + timer.period
        else:
            timer.expiration = timer.count
        return self._arm_locked(timer, None)

    def _arm_locked(self, timer: SyntheticTimer, not_before_ns: int | None) -> _Arm:
        assert timer.expiration is not None
        deadline = self.map.host_deadline(timer.expiration)
        assert deadline is not None, "armed before any anchor"
        if not_before_ns is not None:
            deadline = max(deadline, not_before_ns)
        if timer.last_expiry_ns is not None:
            deadline = max(deadline, timer.last_expiry_ns + MIN_REARM_NS)
        timer.token += 1
        return _Arm(timer, timer.token, deadline)

    def _arm(self, vp_index: int, arm: _Arm) -> None:
        """Start the host timer (no lock held), then record it if it is still current."""
        now = self.platform.host_time_ns()
        # Due already (a one-shot in the past): as soon as possible. Far ahead: capped, and
        # the expiry handler re-arms for the rest.
        deadline = max(now, min(arm.deadline_ns, now + MAX_ARM_NS))
        handle = self.platform.start_timer(
            deadline, lambda: self._expire(vp_index, arm.timer, arm.token))
        vp = self.vps[vp_index]
        with vp.lock:
            if arm.timer.token == arm.token and arm.timer.handle is None:
                arm.timer.handle = handle
                return
        handle.cancel()  # superseded while it was being started (or it already ran)

    # -- expiry (timer thread) ------------------------------------------------------------------

    def _expire(self, vp_index: int, timer: SyntheticTimer, token: int) -> None:
        host_now = self.platform.host_time_ns()
        now = self.map.lower_bound(host_now)
        vp = self.vps[vp_index]
        arm = None
        with vp.lock:
            if timer.token != token or timer.expiration is None or not timer.enabled:
                return
            timer.handle = None
            expiration = timer.expiration
            if now is None or now < expiration:
                # Not provably due yet (the host clock ran ahead of reference time, or the arm
                # was capped at MAX_ARM_NS): wait for the rest.
                timer.counters.early_wakeups += now is not None
                arm = self._arm_locked(timer, host_now)
            else:
                timer.last_expiry_ns = host_now
                signal = self._expired_locked(timer, expiration, now, host_now)
                if signal is not None and self.observer is not None:
                    self.observer(vp_index, timer.index, signal.expiration, now)
                # Under the lock, in both modes: once a CONFIG/COUNT write has returned, no
                # interrupt or message of the old setting can follow it. Neither call blocks on
                # a vCPU (the SynIC takes its own VP lock, then at most a LAPIC edit of that VP;
                # lock order stimer -> SynIC -> LAPIC everywhere, nothing takes them reversed).
                if signal is not None and timer.direct:
                    self._signal_locked(vp_index, timer)
                elif signal is not None:
                    self._deliver_message_locked(vp_index, timer, signal, now)
                if timer.periodic and timer.pending is not None:
                    timer.parked = True  # restarted when the message is placed (on_eom)
                elif timer.expiration is not None:
                    arm = self._arm_locked(timer, None)
        if arm is not None:
            self._arm(vp_index, arm)
        if self.map.want_resync(host_now):
            self.platform.run_on_vp(vp_index, lambda: self.map.sample(vp_index))

    def _expired_locked(self, timer: SyntheticTimer, expiration: int, now: int,
                        host_now: int) -> PendingSignal | None:
        """Account for the expiry at ``expiration`` (reference time is ``now``), schedule the
        next one and return what to signal now (None: nothing). Everything from here to the
        delivery happens under the VP lock."""
        counters = timer.counters
        counters.expired += 1
        if timer.periodic:
            period = timer.period
            following = next_periodic_expiration(expiration, period, now)
            counters.missed_periods += max(0, (now - expiration) // period)
            timer.expiration = following
            if timer.lazy and _shortly_before(now, following, period):
                counters.lazy_skipped += 1
                return None
        else:
            timer.config &= ~STIMER_ENABLE  # TLFS: a one-shot is disabled when it expires
            timer.expiration = None
        # A timer whose message waits is parked (periodic) or spent (one-shot): it cannot expire.
        assert timer.pending is None, "an expiry behind a waiting message"
        signal = PendingSignal(expiration)
        if not timer.direct:
            timer.pending = signal
        return signal

    def _signal_locked(self, vp_index: int, timer: SyntheticTimer) -> bool:
        """Raise a direct-mode timer's vector (VP lock held; the platform call never blocks)."""
        ok = raise_interrupt(self.platform, vp_index, timer.vector, self._log_once,
                             f"stimer{timer.index}")
        if ok:
            timer.counters.delivered += 1
        else:
            timer.counters.refused += 1
            self._log_once(("stimer_direct_refused", vp_index), logging.INFO,
                           "vp%d: stimer%d: the LAPIC refused vector %#x (disabled?); the "
                           "expiry is lost", vp_index, timer.index, timer.vector)
        return ok

    def _deliver_message_locked(self, vp_index: int, timer: SyntheticTimer,
                                signal: PendingSignal, delivery_time: int) -> bool:
        """Place a timer message (VP lock held). Returns whether it was placed; if not, it
        stays pending for the next EOM or expiry."""
        message = timer_message(timer.index, signal.expiration,
                                max(delivery_time, signal.expiration))
        ok = self._deliver_message(vp_index, timer.sint, message)
        if timer.pending is signal:
            if ok:
                timer.pending = None
            else:
                timer.counters.deferred += 1
        if ok:
            timer.counters.delivered += 1
        return ok

    def _deliver_message(self, vp_index: int, sint: int, message: bytes) -> bool:
        try:
            return bool(self._synic_of(vp_index).deliver_message(sint, message))
        except Exception:  # noqa: BLE001 -- a SynIC bug must not stop the timer thread
            self._log_once(("stimer_deliver_failed", vp_index), logging.ERROR,
                           "vp%d: delivering a timer message to SINT%d failed", vp_index, sint,
                           exc_info=True)
            return False

    # -- EOM (vCPU thread): retry deferred messages ---------------------------------------------

    def on_eom(self, vp_index: int) -> None:
        """The guest wrote EOM on VP ``vp_index``: retry its timers' deferred messages, and
        restart the periodic timers that were parked behind them."""
        vp = self.vps[vp_index]
        with vp.lock:
            if not any(t.pending is not None for t in vp.timers):
                return
        now = self.map.sample(vp_index)
        arms = []
        with vp.lock:
            for timer in vp.timers:
                signal = timer.pending
                if signal is None:  # only message-mode timers keep a pending signal
                    continue
                if (timer.periodic and timer.lazy and timer.expiration is not None
                        and _shortly_before(now, self._coming_expiration(timer, now),
                                            timer.period)):
                    timer.pending = None
                    timer.counters.lazy_skipped += 1
                else:
                    if self.observer is not None:
                        self.observer(vp_index, timer.index, signal.expiration, now)
                    if self._deliver_message_locked(vp_index, timer, signal, now):
                        timer.counters.retried += 1
                if timer.parked and timer.pending is None:
                    arms.append(self._resume_locked(timer, now))
        for arm in arms:
            self._arm(vp_index, arm)

    @staticmethod
    def _coming_expiration(timer: SyntheticTimer, now: int) -> int:
        """A periodic timer's next expiry still to come at ``now``: a timer parked behind its
        message keeps the next expiration it had then, which may be periods in the past."""
        assert timer.expiration is not None
        if timer.expiration > now:
            return timer.expiration
        return next_periodic_expiration(timer.expiration, timer.period, now)

    def _resume_locked(self, timer: SyntheticTimer, now: int) -> _Arm:
        """Restart a parked periodic timer on its grid: the next expiry is the first grid point
        after ``now``; the ones it passed while parked were skipped."""
        timer.parked = False
        assert timer.expiration is not None
        if timer.expiration <= now:
            timer.counters.missed_periods += (now - timer.expiration) // timer.period + 1
            timer.expiration = self._coming_expiration(timer, now)
        return self._arm_locked(timer, None)

    # -- lifecycle -----------------------------------------------------------------------------

    def reset(self) -> None:
        """VM reset: every timer back to CONFIG = COUNT = 0, nothing armed or pending."""
        stale = []
        for vp in self.vps:
            with vp.lock:
                for timer in vp.timers:
                    handle = self._stop_locked(timer)
                    if handle is not None:
                        stale.append(handle)
                    timer.last_expiry_ns = None
                    timer.config = 0
                    timer.count = 0
        for handle in stale:
            handle.cancel()
        self.map.clear()

    def counters(self) -> dict:
        """``{"vp0": {"stimer0": {...}, ...}, ...}`` for timers that did anything."""
        out: dict = {}
        for vp in self.vps:
            with vp.lock:
                per_vp = {f"stimer{t.index}": dict(t.counters.__dict__) for t in vp.timers
                          if t.counters.expired or t.counters.refused}
            if per_vp:
                out[f"vp{vp.vp_index}"] = per_vp
        return out


def _sintx_rule(config: int) -> int:
    """TLFS: an enabled message-mode timer with SINTx = 0 is marked disabled immediately."""
    if config & STIMER_ENABLE and not config & STIMER_DIRECT_MODE \
            and not config & STIMER_SINTX_MASK:
        return config & ~STIMER_ENABLE
    return config


def _shortly_before(now: int, next_expiration: int, period: int) -> bool:
    """The lazy rule: less than a quarter period is left before ``next_expiration``."""
    return next_expiration - now < max(1, period // 4)


# --------------------------------------------------------------------------------------------
# Attach and declarations
# --------------------------------------------------------------------------------------------

_PLATFORM_SERVICES = ("host_time_ns", "start_timer", "signal_interrupt", "run_on_vp")


def attach(partition: "Partition") -> SyntheticTimers:
    clock = partition.reference_clock
    if clock is None:
        raise AttachError(f"{NAME} needs hv-time (partition reference time)")
    lacking = [name for name in _PLATFORM_SERVICES
               if not callable(getattr(partition.platform, name, None))]
    if lacking:
        raise AttachError(f"{NAME} needs a platform with {', '.join(lacking)}")
    if not callable(getattr(partition.state.get("hv-synic"), "synic", None)):
        raise AttachError(f"{NAME} needs the SynIC (hv-synic) for message mode")
    state = SyntheticTimers(partition, clock,
                            direct_available=DIRECT_NAME in partition.attached)
    for vp in range(partition.vp_count):  # a deferred message is retried at the guest's EOM
        state._synic_of(vp).add_eom_listener(lambda vp=vp: state.on_eom(vp))
    config_reserved = STIMER_CONFIG_RSVDZ
    if not state.direct_available:
        config_reserved |= STIMER_DIRECT_MODE  # not advertised (EDX bit 19) -> #GP
    for n in range(HV_SYNIC_STIMER_COUNT):
        partition.register_msr(
            HV_X64_MSR_STIMER0_CONFIG + 2 * n,
            read=lambda vp, n=n: state.read_config(vp, n),
            write=lambda vp, value, n=n: state.write_config(vp, n, value),
            reserved_mask=config_reserved)
        partition.register_msr(
            HV_X64_MSR_STIMER0_CONFIG + 2 * n + 1,
            read=lambda vp, n=n: state.read_count(vp, n),
            write=lambda vp, value, n=n: state.write_count(vp, n, value))
    return state


def attach_direct(partition: "Partition") -> None:
    """hv-stimer-direct has no state of its own: hv-stimer (attached first) sees it in
    ``partition.attached`` and accepts DirectMode."""
    if not isinstance(partition.state.get(NAME), SyntheticTimers):
        raise AttachError(f"{DIRECT_NAME} needs {NAME}")
    return None


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="synthetic timers STIMER0-3 (message mode via the SynIC; one-shot, periodic, lazy)",
    tlfs="timers.md: Synthetic Timers",
    attach=attach,
    requires=("hv-synic", "hv-time", "hv-vpindex"),
    cpuid=privileges(HvPartitionPrivilege.AccessSyntheticTimerRegs),
    msrs=tuple(HV_X64_MSR_STIMER0_CONFIG + n for n in range(2 * HV_SYNIC_STIMER_COUNT)),
)

DIRECT_ENLIGHTENMENT = Enlightenment(
    name=DIRECT_NAME,
    summary="synthetic timers in direct mode (an APIC vector instead of a message)",
    tlfs="timers.md: Direct Synthetic Timers",
    attach=attach_direct,
    requires=(NAME,),
    cpuid=features(HvFeatures.HV_STIMER_DIRECT_MODE_AVAILABLE),
)

ENLIGHTENMENTS = (ENLIGHTENMENT, DIRECT_ENLIGHTENMENT)

__all__ = [
    "DIRECT_ENLIGHTENMENT", "ENLIGHTENMENT", "ENLIGHTENMENTS", "HVMSG_TIMER_EXPIRED",
    "ReferenceHostMap", "SyntheticTimers", "decode_timer_message", "next_periodic_expiration",
    "timer_message",
]
