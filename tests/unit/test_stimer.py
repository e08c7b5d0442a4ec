"""hv-stimer / hv-stimer-direct: the synthetic timers (TLFS timers.md).

Driven by FakePlatform's controllable clock and timers (host time follows the guest TSC, timers
fire only when a test moves time) and a small fake SynIC with the interface of
``partition.state["hv-synic"].synic(vp)``: ``deliver_message``, ``add_eom_listener``,
``sint_vector``, ``sint_masked``. ``test_stimer_synic.py`` runs the message paths against the real SynIC."""

from __future__ import annotations

import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments import REGISTRY, Enlightenment, EnlightenmentRegistry
from hvvmm.enlightenments import stimer as S
from hvvmm.enlightenments.reference_time import reference_time, tsc_offset, tsc_scale
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FakePlatform
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform

CONFIG0 = hvdef.HV_X64_MSR_STIMER0_CONFIG
COUNT0 = hvdef.HV_X64_MSR_STIMER0_COUNT
ENABLE, PERIODIC, LAZY, AUTO = S.STIMER_ENABLE, S.STIMER_PERIODIC, S.STIMER_LAZY, \
    S.STIMER_AUTO_ENABLE
DIRECT = S.STIMER_DIRECT_MODE
MS = 10_000  # reference units (100 ns) per millisecond
SPEC = "minimal,hv-time,hv-synic,hv-stimer"
SPEC_DIRECT = SPEC + ",hv-stimer-direct"


def config_msr(n: int) -> int:
    return CONFIG0 + 2 * n


def count_msr(n: int) -> int:
    return COUNT0 + 2 * n


def sint_config(sint: int, *flags: int) -> int:
    value = sint << S.STIMER_SINTX_SHIFT
    for flag in flags:
        value |= flag
    return value


def direct_config(vector: int, *flags: int) -> int:
    value = DIRECT | (vector << S.STIMER_APIC_VECTOR_SHIFT)
    for flag in flags:
        value |= flag
    return value


# -- a fake SynIC with the interface hv-stimer uses ------------------------------------------------

class FakeSynic:
    """One VP's SynIC as hv-stimer sees it: 16 message slots. ``deliver_message`` places a
    message only into a free slot of an enabled, unmasked SINT; on a busy slot it sets the
    occupying message's MessagePending flag and returns False (TLFS
    inter-partition-communication.md, the message protocol).
    """

    def __init__(self, vp_index: int, platform: FakePlatform):
        self.vp_index = vp_index
        self.platform = platform
        self.enabled = True
        self.masked: set[int] = set()
        self.vectors = {sint: 0x40 + sint for sint in range(16)}
        self.slots: dict[int, bytes | None] = {sint: None for sint in range(16)}
        self.message_pending: dict[int, bool] = {sint: False for sint in range(16)}
        self.delivered: list[tuple[int, bytes, int]] = []  # (sint, message, true ref time)
        self.refused: list[tuple[int, bytes]] = []
        self.listeners: list = []
        self.lock = threading.Lock()  # for the threaded tests; never held around listeners

    def deliver_message(self, sint: int, message: bytes) -> bool:
        with self.lock:
            return self._deliver_message(sint, message)

    def _deliver_message(self, sint: int, message: bytes) -> bool:
        assert isinstance(message, bytes) and len(message) <= 256
        if not self.enabled or sint in self.masked:
            self.refused.append((sint, message))
            return False
        if self.slots[sint] is not None:
            self.message_pending[sint] = True
            self.refused.append((sint, message))
            return False
        self.slots[sint] = message
        self.delivered.append((sint, message, true_reference_time(self.platform)))
        self.platform.signal_interrupt(self.vp_index, self.vectors[sint])
        return True

    def add_eom_listener(self, callback) -> None:
        self.listeners.append(callback)

    def sint_vector(self, sint: int) -> int:
        return self.vectors[sint]

    def sint_masked(self, sint: int) -> bool:
        return sint in self.masked

    # the guest's side
    def consume(self, sint: int) -> tuple[bytes, bool]:
        """The guest handles the slot: MessageType = 0; returns (message, MessagePending)."""
        with self.lock:
            message, self.slots[sint] = self.slots[sint], None
            assert message is not None, f"slot {sint} is empty"
            pending, self.message_pending[sint] = self.message_pending[sint], False
            return message, pending

    def eom(self) -> None:
        for listener in list(self.listeners):
            listener()


class FakeSynics(list):
    """The fake SynICs of every VP, with the real SynicState's ``synic(vp)`` accessor."""

    def synic(self, vp: int) -> FakeSynic:
        return self[vp]


def _fake_synic_attach(partition):
    return FakeSynics(FakeSynic(vp, partition.platform) for vp in range(partition.vp_count))


FAKE_SYNIC = Enlightenment(name="hv-synic", summary="fake SynIC for the stimer tests", tlfs="",
                           attach=_fake_synic_attach, requires=("hv-vpindex",))


def stimer_registry(fake_synic: bool = True) -> EnlightenmentRegistry:
    """The default registry with hv-stimer(-direct) implemented, and the fake SynIC."""
    items = []
    for enlightenment in REGISTRY:
        if enlightenment.name in (S.NAME, S.DIRECT_NAME):
            continue
        if enlightenment.name == "hv-synic" and (fake_synic or not enlightenment.implemented):
            enlightenment = FAKE_SYNIC
        items.append(enlightenment)
    return EnlightenmentRegistry([*items, *S.ENLIGHTENMENTS])


def true_reference_time(platform: FakePlatform) -> int:
    """Reference time (100 ns) at the fake's current TSC, computed the way the guest computes it
    (the TSC page formula, which TIME_REF_COUNT shares). That, not the exact quotient, is the
    clock a timer must never fire early against: the two differ by up to one unit of rounding."""
    scale = tsc_scale(platform.tsc_frequency_hz)
    offset = tsc_offset(platform.guest_tsc_at_reference_zero, scale)
    return reference_time(platform.tsc, scale, offset)


class Rig:
    """A partition with hv-stimer on a FakePlatform, and helpers for writing and moving time."""

    def __init__(self, spec: str = SPEC_DIRECT, vp_count: int = 2,
                 platform: FakePlatform | None = None,
                 registry: EnlightenmentRegistry | None = None):
        """``registry`` defaults to the fake SynIC's; pass the real one to test against it."""
        self.platform = platform if platform is not None else \
            FakePlatform(vp_count=vp_count, guest_tsc_at_reference_zero=12345)
        self.registry = registry if registry is not None else stimer_registry()
        self.partition = Partition(parse_hyperv_spec(spec, registry=self.registry),
                                   self.platform, registry=self.registry)
        self.state: S.SyntheticTimers = self.partition.state[S.NAME]
        self.synics = self.partition.state["hv-synic"]
        self.signals: list[tuple[int, int, int, int]] = []  # (vp, timer, expiration, true ref)

        def observe(vp_index, timer_index, expiration, bound):
            ref = true_reference_time(self.platform)
            assert bound <= ref  # the host's bound of reference time is a lower bound
            self.signals.append((vp_index, timer_index, expiration, ref))

        self.state.observer = observe

    @property
    def now(self) -> int:
        return true_reference_time(self.platform)

    def wr(self, msr: int, value: int, vp: int = 0) -> None:
        self.partition.msr_write(vp, msr, value)

    def rd(self, msr: int, vp: int = 0) -> int:
        return self.partition.msr_read(vp, msr)

    def advance_ms(self, ms: float) -> int:
        return self.platform.advance_and_fire(seconds=ms / 1000)

    def advance_units(self, units: int) -> int:
        return self.platform.advance_and_fire(seconds=units / 10**7)

    def messages(self, vp: int = 0, sint: int | None = None) -> list[tuple]:
        """Decoded delivered messages: (sint, type, size, index, expiration, delivery, ref)."""
        return [(s, *S.decode_timer_message(m), ref) for s, m, ref in self.synics[vp].delivered
                if sint is None or s == sint]

    def assert_never_early(self) -> None:
        for vp, index, expiration, ref in self.signals:
            assert ref >= expiration, (vp, index, expiration, ref)
        for synic in self.synics:
            for _sint, message, ref in synic.delivered:
                _type, _size, _index, expiration, delivery = S.decode_timer_message(message)
                assert expiration <= delivery <= ref, (expiration, delivery, ref)


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- declarations, CPUID, MSR rules ---------------------------------------------------------------

def test_declarations():
    assert S.ENLIGHTENMENT.requires == ("hv-synic", "hv-time", "hv-vpindex")
    assert S.DIRECT_ENLIGHTENMENT.requires == ("hv-stimer",)
    assert set(S.ENLIGHTENMENT.msrs) == set(range(0x400000B0, 0x400000B8))
    assert S.DIRECT_ENLIGHTENMENT.msrs == ()


@pytest.mark.parametrize("spec, direct", [(SPEC, False), (SPEC_DIRECT, True)])
def test_cpuid_bits(spec, direct):
    rig = Rig(spec)
    leaves = {(e.function, e.index): e for e in rig.partition.cpuid_leaves()}
    features = leaves[(hvdef.HYPERV_CPUID_FEATURES, 0)]
    assert features.eax & hvdef.HvPartitionPrivilege.AccessSyntheticTimerRegs
    assert bool(features.edx & hvdef.HvFeatures.HV_STIMER_DIRECT_MODE_AVAILABLE) is direct


def test_msrs_absent_without_the_feature():
    registry = stimer_registry()
    platform = FakePlatform()
    partition = Partition(parse_hyperv_spec("minimal,hv-time,hv-synic", registry=registry),
                          platform, registry=registry)
    for msr in range(0x400000B0, 0x400000B8):
        with pytest.raises(MsrAccessFault):
            partition.msr_read(0, msr)


def test_reset_values_and_read_back(rig):
    for n in range(4):
        assert rig.rd(config_msr(n)) == 0 and rig.rd(count_msr(n)) == 0
    rig.wr(count_msr(2), 0xFFFF_FFFF_FFFF_FFFF)
    assert rig.rd(count_msr(2)) == 0xFFFF_FFFF_FFFF_FFFF
    value = sint_config(15, PERIODIC, LAZY) | (0xAB << 4)
    rig.wr(config_msr(3), value, vp=1)
    assert rig.rd(config_msr(3), vp=1) == value
    assert rig.rd(config_msr(3), vp=0) == 0  # per VP


@pytest.mark.parametrize("bit", [13, 14, 15, 20, 31, 32, 63])
def test_reserved_config_bits_fault(rig, bit):
    with pytest.raises(MsrAccessFault, match="reserved"):
        rig.wr(config_msr(0), sint_config(2) | (1 << bit))
    assert rig.rd(config_msr(0)) == 0


def test_direct_mode_needs_hv_stimer_direct():
    rig = Rig(SPEC)
    with pytest.raises(MsrAccessFault):
        rig.wr(config_msr(0), direct_config(0x50, ENABLE))
    rig = Rig(SPEC_DIRECT)
    rig.wr(config_msr(0), direct_config(0x50))
    assert rig.rd(config_msr(0)) == direct_config(0x50)


def test_enabled_message_timer_with_sint0_is_disabled(rig):
    rig.wr(config_msr(0), ENABLE | PERIODIC)  # SINTx = 0, not direct (TLFS)
    assert rig.rd(config_msr(0)) == PERIODIC
    rig.wr(count_msr(1), 5 * MS)
    rig.wr(config_msr(1), AUTO)
    rig.wr(count_msr(1), rig.now + MS)  # auto-enable would enable it: SINTx = 0 -> disabled
    assert rig.rd(config_msr(1)) == AUTO
    rig.wr(config_msr(2), direct_config(0x50, ENABLE))  # direct mode: SINTx is irrelevant
    assert rig.rd(config_msr(2)) & ENABLE
    assert rig.platform.pending_timers() == []


# -- message format -------------------------------------------------------------------------------

def test_message_is_byte_exact():
    message = S.timer_message(3, 0x1122334455667788, 0x99AABBCCDDEEFF00)
    expected = (struct.pack("<I", 0x80000010) + bytes([24, 0]) + b"\0\0" + bytes(8)
                + struct.pack("<II", 3, 0) + bytes.fromhex("8877665544332211")
                + bytes.fromhex("00ffeeddccbbaa99"))
    assert message == expected
    assert len(message) == 40
    assert S.decode_timer_message(message) == (0x80000010, 24, 3, 0x1122334455667788,
                                                0x99AABBCCDDEEFF00)


# -- one-shot -------------------------------------------------------------------------------------

def test_one_shot_fires_once_at_its_absolute_time_never_early(rig):
    due = rig.now + 10 * MS
    rig.wr(count_msr(1), due)
    rig.wr(config_msr(1), sint_config(3, ENABLE))  # kvm-unit-tests order: COUNT, then CONFIG
    rig.advance_units(due - rig.now - 1)
    assert rig.synics[0].delivered == []
    rig.advance_ms(1)
    [(sint, mtype, size, index, expiration, delivery, ref)] = rig.messages()
    assert (sint, mtype, size, index, expiration) == (3, 0x80000010, 24, 1, due)
    assert due <= delivery <= ref
    # late by at most the rounding (1 us) plus the rate margin (100 ppm of 10 ms = 1 us)
    assert ref - due <= 25
    assert rig.platform.interrupts == [(0, 0x43)]  # the SINT's vector
    assert rig.rd(config_msr(1)) == sint_config(3)  # a one-shot disables itself
    rig.advance_ms(100)
    assert len(rig.messages()) == 1
    rig.assert_never_early()


def test_one_shot_in_the_past_fires_at_once(rig):
    rig.advance_ms(50)
    rig.wr(config_msr(0), sint_config(2, ENABLE))
    rig.wr(count_msr(0), rig.now - 20 * MS)
    [timer] = rig.platform.pending_timers()
    assert timer.deadline_ns == rig.platform.host_time_ns()  # due now, on the timer thread
    assert rig.platform.fire_due_timers() == 1
    [(sint, _t, _s, index, expiration, delivery, _ref)] = rig.messages()
    assert (sint, index, expiration) == (2, 0, rig.now - 20 * MS)
    assert delivery >= expiration


def test_deadlines_are_never_scheduled_before_the_expiry():
    rig = Rig()
    for offset in (1, 7, 99, 10_001, 123_457):
        rig.wr(config_msr(0), direct_config(0x60, ENABLE))
        due = rig.now + offset
        rig.wr(count_msr(0), due)
        [timer] = rig.platform.pending_timers()
        # The host deadline maps to a reference time at or after the expiry.
        elapsed_ns = timer.deadline_ns - rig.platform.host_epoch_ns
        assert elapsed_ns * 10**7 // 10**9 >= due - 1
        assert timer.deadline_ns >= rig.platform.host_time_ns()
        rig.advance_units(offset + 100 + S.MIN_REARM_NS // 100)  # past the re-arm floor too
    rig.assert_never_early()
    assert len(rig.signals) == 5


def test_auto_enable_and_count_zero(rig):
    rig.wr(config_msr(0), sint_config(2, AUTO))
    assert not rig.rd(config_msr(0)) & ENABLE
    rig.wr(count_msr(0), rig.now + MS)  # non-zero COUNT with AutoEnable: enabled
    assert rig.rd(config_msr(0)) & ENABLE
    rig.wr(count_msr(0), 0)  # COUNT 0 disables, AutoEnable or not
    assert rig.rd(config_msr(0)) == sint_config(2, AUTO)
    rig.advance_ms(5)
    assert rig.synics[0].delivered == []
    # Linux's order: CONFIG (enable | auto_enable) with the old count, then COUNT.
    rig.wr(config_msr(0), sint_config(2, ENABLE, AUTO))
    rig.wr(count_msr(0), rig.now + 2 * MS)
    rig.advance_ms(3)
    assert len(rig.messages()) == 1


def test_enabled_with_count_zero_does_nothing(rig):
    rig.wr(config_msr(0), sint_config(2, ENABLE, PERIODIC))
    assert rig.rd(config_msr(0)) & ENABLE  # stays enabled (KVM) but nothing is armed
    assert rig.platform.pending_timers() == []


@pytest.mark.parametrize("how", ["config", "count", "reset"])
def test_disable_cancels(rig, how):
    rig.wr(config_msr(0), sint_config(2, PERIODIC))
    rig.wr(count_msr(0), MS)
    rig.wr(config_msr(0), sint_config(2, PERIODIC, ENABLE))
    rig.advance_ms(2.5)
    assert len(rig.messages()) >= 1
    rig.synics[0].consume(2)
    before = len(rig.messages())
    if how == "config":
        rig.wr(config_msr(0), sint_config(2, PERIODIC))
    elif how == "count":
        rig.wr(count_msr(0), 0)
    else:
        rig.partition.reset()
    assert rig.platform.pending_timers() == []
    rig.advance_ms(10)
    assert len(rig.messages()) == before
    if how == "reset":
        assert rig.rd(config_msr(0)) == 0 and rig.rd(count_msr(0)) == 0


# -- periodic -------------------------------------------------------------------------------------

def test_periodic_grid(rig):
    rig.wr(count_msr(0), 3 * MS)
    rig.wr(config_msr(0), direct_config(0xED, ENABLE, PERIODIC))
    t0 = rig.now  # "The first period begins when the synthetic timer is enabled"
    rig.advance_ms(30.5)
    expirations = [e for _vp, _i, e, _r in rig.signals]
    assert expirations == [t0 + k * 3 * MS for k in range(1, 11)]
    assert rig.platform.interrupts == [(0, 0xED)] * 10
    assert rig.rd(config_msr(0)) & ENABLE  # periodic timers stay enabled
    rig.assert_never_early()


def test_periodic_catch_up_fires_once_and_keeps_the_grid(rig):
    period = 2 * MS
    rig.wr(count_msr(0), period)
    rig.wr(config_msr(0), direct_config(0x51, ENABLE, PERIODIC))
    t0 = rig.now
    # The host timer thread stalls for 3.5 periods (time moves without firing anything).
    rig.platform.advance(seconds=0.007)
    assert rig.platform.fire_due_timers() == 1
    [(_vp, _i, expiration, ref)] = rig.signals
    assert expiration == t0 + period  # the missed expiry is the one reported
    counters = rig.state.vps[0].timers[0].counters
    assert counters.missed_periods == 2
    assert rig.state.vps[0].timers[0].expiration == t0 + 4 * period  # back on the grid
    rig.advance_ms(4.2)
    assert [e for _vp, _i, e, _r in rig.signals] == [t0 + k * period for k in (1, 4, 5)]
    rig.assert_never_early()


def test_next_periodic_expiration():
    assert S.next_periodic_expiration(100, 10, 100) == 110
    assert S.next_periodic_expiration(100, 10, 109) == 110
    assert S.next_periodic_expiration(100, 10, 110) == 120
    assert S.next_periodic_expiration(100, 10, 135) == 140


def test_lazy_periodic_skips_a_signal_just_before_the_next(rig):
    period = 4 * MS
    for n, flags in ((0, (ENABLE, PERIODIC, LAZY)), (1, (ENABLE, PERIODIC))):
        rig.wr(count_msr(n), period)
        rig.wr(config_msr(n), direct_config(0x60 + n, *flags))
    # Stall until 0.9 period after the first expiry: 0.1 period before the next one.
    rig.platform.advance(seconds=0.0076)
    rig.platform.fire_due_timers()
    timers = rig.state.vps[0].timers
    assert timers[0].counters.lazy_skipped == 1
    assert timers[1].counters.lazy_skipped == 0
    assert [i for _vp, i, _e, _r in rig.signals] == [1]  # only the non-lazy timer signalled
    rig.advance_ms(1)  # the next expiry signals both
    assert sorted(i for _vp, i, _e, _r in rig.signals[1:]) == [0, 1]


def test_tiny_period_cannot_livelock_the_timer_thread(rig):
    rig.wr(count_msr(0), 1)  # 100 ns
    rig.wr(config_msr(0), direct_config(0x70, ENABLE, PERIODIC))
    fired = rig.advance_ms(10)
    assert fired <= 10_000_000 // S.MIN_REARM_NS + 2
    rig.assert_never_early()


@pytest.mark.parametrize("count", [1, 7, 15, S.MIN_PERIOD_UNITS - 1])
@pytest.mark.parametrize("lazy", [False, True])
def test_tiny_periods_wake_the_host_at_most_once_per_minimum_period(rig, count, lazy):
    # A guest arming a 100 ns - 1.5 us periodic timer (interrupts masked: it never takes them)
    # cost the host one expiry per 50 us; the effective period is now at least 200 us.
    flags = (ENABLE, PERIODIC, LAZY) if lazy else (ENABLE, PERIODIC)
    rig.wr(count_msr(0), count)
    rig.wr(config_msr(0), direct_config(0x70, *flags))
    t0 = rig.now
    fired = rig.advance_ms(100)
    per_second = fired * 10
    assert per_second <= 10**7 // S.MIN_PERIOD_UNITS + 10  # 5,000 host wake-ups a second
    assert fired >= 100 * MS // S.MIN_PERIOD_UNITS - 2  # and the timer still runs
    assert rig.rd(count_msr(0)) == count  # the guest's value reads back
    expirations = [e for _vp, _i, e, _r in rig.signals]
    assert all((e - t0) % S.MIN_PERIOD_UNITS == 0 and e > t0 for e in expirations)
    rig.assert_never_early()


def test_a_busy_slot_stops_a_tiny_period_message_timer_waking_the_host(rig):
    synic = rig.synics[0]
    rig.wr(count_msr(0), 1)  # 100 ns, message mode; the guest never takes the message
    rig.wr(config_msr(0), sint_config(4, ENABLE, PERIODIC))
    fired = rig.advance_ms(100)
    assert fired == 2  # the first expiry placed its message, the second found it there
    assert len(rig.messages()) == 1 and rig.platform.pending_timers() == []
    synic.consume(4)
    synic.eom()  # the waiting expiry is placed, the timer resumes
    assert len(rig.messages()) == 2
    assert rig.advance_ms(100) == 1
    rig.assert_never_early()


def test_a_one_shot_rewritten_into_the_past_is_rate_limited(rig):
    # Each COUNT write in the past expires the one-shot at once; a guest doing that in a loop
    # gets at most one host expiry per MIN_REARM_NS.
    rig.wr(config_msr(3), direct_config(0x71))
    fired = 0
    for _ in range(2_000):
        rig.wr(config_msr(3), direct_config(0x71, ENABLE))
        rig.wr(count_msr(3), 1)
        fired += rig.advance_units(10)  # 1 us of guest time per round: 2 ms in all
    assert fired <= 2_000_000 // S.MIN_REARM_NS + 2
    assert fired >= 2_000_000 // S.MIN_REARM_NS // 2
    rig.assert_never_early()


# -- message mode: busy slot, EOM, SynIC off ------------------------------------------------------

def test_busy_slot_is_retried_after_eom_with_the_original_expiration(rig):
    synic = rig.synics[0]
    first, second = rig.now + MS, rig.now + 2 * MS
    rig.wr(count_msr(0), first)
    rig.wr(config_msr(0), sint_config(5, ENABLE))
    rig.wr(count_msr(1), second)
    rig.wr(config_msr(1), sint_config(5, ENABLE))
    rig.advance_ms(3)
    assert [m[3] for m in rig.messages()] == [0]  # timer 1 found the slot busy
    assert synic.message_pending[5]
    assert rig.state.vps[0].timers[1].counters.deferred == 1
    assert rig.rd(config_msr(1)) == sint_config(5)  # it expired (disabled); message waits
    rig.advance_ms(5)
    assert len(rig.messages()) == 1  # nothing happens until EOM
    message, pending = synic.consume(5)
    assert pending
    synic.eom()  # the guest saw MessagePending and wrote EOM
    [_, (sint, mtype, size, index, expiration, delivery, ref)] = rig.messages()
    assert (sint, index, expiration) == (5, 1, second)
    assert delivery >= rig.now - 1 and delivery <= ref
    assert rig.state.vps[0].timers[1].counters.retried == 1
    rig.assert_never_early()


def test_periodic_timer_parks_while_its_message_waits(rig):
    synic = rig.synics[0]
    synic.slots[4] = b"occupied by someone else"
    rig.wr(count_msr(0), MS)
    rig.wr(config_msr(0), sint_config(4, ENABLE, PERIODIC))
    t0 = rig.now
    rig.advance_ms(5.5)
    timer = rig.state.vps[0].timers[0]
    assert synic.delivered == []
    # The unconsumed expiries coalesce into the one waiting message: no host timer meanwhile.
    assert timer.counters.expired == 1 and timer.counters.deferred == 1
    assert rig.platform.pending_timers() == []
    synic.consume(4)
    synic.eom()
    [(_s, _t, _z, _i, expiration, delivery, _r)] = rig.messages()
    assert expiration == t0 + MS  # the first missed expiry
    assert delivery >= t0 + 5 * MS
    assert timer.counters.missed_periods == 4  # t0 + 2..5 ms passed while parked
    assert timer.expiration == t0 + 6 * MS  # back on the grid
    rig.advance_ms(1)
    assert len(rig.messages()) == 1  # slot now busy with our message: next one waits again
    assert rig.platform.pending_timers() == []
    synic.consume(4)
    synic.eom()  # places the t0 + 6 ms expiry; the timer runs again
    assert [m[4] for m in rig.messages()] == [t0 + MS, t0 + 6 * MS]
    rig.advance_ms(1)  # t0 + 7 ms finds the slot busy
    synic.consume(4)
    synic.eom()
    assert [m[4] for m in rig.messages()] == [t0 + MS, t0 + 6 * MS, t0 + 7 * MS]
    rig.assert_never_early()


def test_a_parked_timer_rewritten_runs_again_and_disabled_stays_stopped(rig):
    """Parking holds only until the timer's next CONFIG/COUNT write: a new setting starts at
    once without any EOM, and a timer disabled while parked is not restarted by a later EOM."""
    synic = rig.synics[0]
    synic.slots[4] = b"occupied by someone else"
    rig.wr(count_msr(0), MS)
    rig.wr(config_msr(0), sint_config(4, ENABLE, PERIODIC))
    rig.advance_ms(1.5)
    timer = rig.state.vps[0].timers[0]
    assert timer.parked and rig.platform.pending_timers() == []
    rig.wr(config_msr(0), sint_config(5, ENABLE, PERIODIC))
    assert not timer.parked and timer.pending is None
    rig.advance_ms(1.5)
    assert [m[0] for m in rig.messages()] == [5]
    rig.advance_ms(1)  # slot 5 still holds that message: parked again
    assert timer.parked
    rig.wr(config_msr(0), 0)
    synic.consume(5)
    synic.eom()
    rig.advance_ms(3)
    assert len(rig.messages()) == 1 and rig.platform.pending_timers() == []
    assert not timer.parked and timer.expiration is None
    rig.assert_never_early()


def test_lazy_pending_message_dropped_near_the_next_expiry(rig):
    synic = rig.synics[0]
    synic.slots[4] = b"busy"
    period = 4 * MS
    rig.wr(count_msr(0), period)
    rig.wr(config_msr(0), sint_config(4, ENABLE, PERIODIC, LAZY))
    rig.advance_ms(4.1)
    rig.platform.advance(seconds=0.0035)  # 0.4 ms before the next expiry
    synic.consume(4)
    synic.eom()
    assert synic.delivered == []
    assert rig.state.vps[0].timers[0].counters.lazy_skipped == 1
    rig.advance_ms(0.5)
    assert len(rig.messages()) == 1


def test_lazy_message_parked_for_periods_is_judged_against_the_coming_expiry(rig):
    """The lazy rule at EOM compares with the next expiry still to come: a timer parked behind
    its message for several periods keeps a past expiration, and that alone must not drop the
    message when the VP becomes available mid-period."""
    synic = rig.synics[0]
    synic.slots[4] = b"busy"
    period = 4 * MS
    rig.wr(count_msr(0), period)
    rig.wr(config_msr(0), sint_config(4, ENABLE, PERIODIC, LAZY))
    t0 = rig.now
    rig.advance_ms(4.1)  # the t0 + 4 ms expiry finds the slot busy: parked
    rig.platform.advance(seconds=0.0139)  # t0 + 18 ms: 2 ms before the t0 + 20 ms expiry
    synic.consume(4)
    synic.eom()
    timer = rig.state.vps[0].timers[0]
    [(_s, _t, _z, _i, expiration, _d, _r)] = rig.messages()
    assert expiration == t0 + period and timer.counters.lazy_skipped == 0
    assert timer.expiration == t0 + 5 * period  # back on the grid
    rig.assert_never_early()


def test_synic_off_or_masked_keeps_the_message_pending(rig):
    synic = rig.synics[1]
    synic.enabled = False
    rig.wr(count_msr(2), rig.now + MS, vp=1)
    rig.wr(config_msr(2), sint_config(7, ENABLE), vp=1)
    rig.advance_ms(2)
    assert synic.delivered == [] and len(synic.refused) == 1
    synic.enabled = True
    synic.masked.add(7)
    synic.eom()
    assert synic.delivered == []
    synic.masked.clear()
    synic.eom()
    [(sint, _t, _z, index, _e, _d, _r)] = rig.messages(vp=1)
    assert (sint, index) == (7, 2)


def test_rewriting_a_timer_drops_its_pending_message(rig):
    synic = rig.synics[0]
    synic.slots[2] = b"busy"
    rig.wr(count_msr(0), rig.now + MS)
    rig.wr(config_msr(0), sint_config(2, ENABLE))
    rig.advance_ms(2)
    assert rig.state.vps[0].timers[0].pending is not None
    rig.wr(count_msr(0), 0)
    assert rig.state.vps[0].timers[0].pending is None
    synic.consume(2)
    synic.eom()
    assert synic.delivered == []


# -- direct mode ----------------------------------------------------------------------------------

def test_direct_mode_raises_the_vector_on_its_vp(rig):
    rig.wr(config_msr(3), direct_config(0xED, ENABLE, AUTO), vp=1)  # Linux: 0x1ED9
    assert rig.rd(config_msr(3), vp=1) == 0x1ED9
    rig.wr(count_msr(3), rig.now + 2 * MS, vp=1)
    rig.advance_ms(3)
    assert rig.platform.interrupts == [(1, 0xED)]
    assert rig.synics[1].delivered == [] and rig.synics[1].refused == []
    rig.assert_never_early()


def test_direct_mode_refused_interrupt_is_counted_and_lost(rig):
    rig.platform.accept_interrupts = False
    rig.wr(count_msr(0), MS)
    rig.wr(config_msr(0), direct_config(0x80, ENABLE, PERIODIC))
    rig.advance_ms(3.5)
    counters = rig.state.vps[0].timers[0].counters
    assert counters.refused == 3 and counters.delivered == 0
    rig.platform.accept_interrupts = True
    rig.advance_ms(1)
    assert rig.platform.interrupts == [(0, 0x80)]


# -- the reference/host clock map -----------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.value = 0

    def now(self, vp):
        return self.value


class _Host:
    def __init__(self):
        self.ns = 10**12

    def host_time_ns(self):
        return self.ns


def test_map_bounds_are_conservative():
    host, clock = _Host(), _Clock()
    m = S.ReferenceHostMap(host, clock, margin_ppm=100)
    assert m.lower_bound(host.ns) is None and m.host_deadline(5) is None
    clock.value = 1_000_000
    m.sample(0)
    assert m.lower_bound(host.ns) == 1_000_000
    # one second later the bound lags by the margin (100 ppm of 10**7 units = 1000 units)
    assert m.lower_bound(host.ns + 10**9) == 1_000_000 + 10**7 - 1000
    assert m.lower_bound(host.ns - 10**9) == 1_000_000 - 10**7 - 1000
    deadline = m.host_deadline(1_000_000 + 10**7)
    assert m.lower_bound(deadline) >= 1_000_000 + 10**7
    assert m.lower_bound(deadline - S.ROUND_UP_NS - 1) < 1_000_000 + 10**7
    assert m.host_deadline(5) == host.ns  # already reached


def test_map_widens_its_margin_when_reference_time_runs_slow():
    host, clock = _Host(), _Clock()
    m = S.ReferenceHostMap(host, clock, margin_ppm=100)
    m.sample(0)
    host.ns += 10**9
    clock.value += 10**7 - 5000  # 500 ppm slow
    m.sample(0)
    assert m.violations == 1 and m.margin_ppm == 200
    host.ns += 10**9
    clock.value += 10**7 - 100  # within the margin
    m.sample(0)
    assert m.violations == 1


def test_stale_anchor_is_refreshed_on_the_vp(rig):
    rig.wr(count_msr(0), 30 * MS)
    rig.wr(config_msr(0), direct_config(0x60, ENABLE, PERIODIC))
    samples = rig.state.map.samples
    rig.advance_ms(500)
    # No MSR writes since: only run_on_vp re-anchors (about every RESYNC_AFTER_NS).
    assert rig.state.map.samples - samples >= 3
    assert rig.state.map.age(rig.platform.host_time_ns()) <= S.RESYNC_AFTER_NS + 31_000_000


def test_attach_needs_the_platform_services():
    class Bare(FakePlatform):
        start_timer = None

    registry = stimer_registry()
    from hvvmm.enlightenments import AttachError
    with pytest.raises(AttachError, match="start_timer"):
        Partition(parse_hyperv_spec(SPEC, registry=registry), Bare(), registry=registry)


# -- random writes --------------------------------------------------------------------------------

_config_values = st.one_of(
    st.integers(0, 2**64 - 1),
    st.builds(lambda e, p, l, a, v, d, s: (e | p << 1 | l << 2 | a << 3 | v << 4 | d << 12
                                           | s << 16),
              st.integers(0, 1), st.integers(0, 1), st.integers(0, 1), st.integers(0, 1),
              st.integers(0, 255), st.integers(0, 1), st.integers(0, 15)))
_operations = st.lists(st.one_of(
    st.tuples(st.just("config"), st.integers(0, 1), st.integers(0, 3), _config_values),
    st.tuples(st.just("count"), st.integers(0, 1), st.integers(0, 3),
              st.one_of(st.integers(0, 2**64 - 1), st.integers(-50 * MS, 50 * MS),
                        st.just(0))),
    st.tuples(st.just("advance"), st.integers(0, 20_000)),  # microseconds
    st.tuples(st.just("consume"), st.integers(0, 1), st.integers(0, 15)),
    st.tuples(st.just("reset")),
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_operations, direct=st.booleans())
def test_random_writes_only_fault_and_never_fire_early(ops, direct):
    rig = Rig(SPEC_DIRECT if direct else SPEC)
    for op in ops:
        kind = op[0]
        if kind in ("config", "count"):
            _kind, vp, n, value = op
            if kind == "count" and value < 2 * 50 * MS:  # small values: relative to now
                value = max(0, rig.now + value) if value else 0
            msr = config_msr(n) if kind == "config" else count_msr(n)
            try:
                rig.wr(msr, value & (2**64 - 1), vp=vp)
            except MsrAccessFault:
                assert kind == "config"
                assert value & S.STIMER_CONFIG_RSVDZ or (value & DIRECT and not direct)
            else:
                expected = value
                sintx = (value >> 16) & 0xF
                if kind == "config" and value & ENABLE and not value & DIRECT and not sintx:
                    expected &= ~ENABLE  # TLFS: message mode with SINTx = 0 is disabled at once
                assert rig.rd(msr, vp=vp) == expected
        elif kind == "advance":
            rig.platform.advance_and_fire(seconds=op[1] / 1e6)
        elif kind == "consume":
            synic = rig.synics[op[1]]
            if synic.slots[op[2]] is not None:
                _message, pending = synic.consume(op[2])
                if pending:
                    synic.eom()
        else:
            rig.partition.reset()
        for timer in rig.platform.timers:
            assert timer.deadline_ns >= timer.started_at_ns  # never scheduled before "now"
    rig.assert_never_early()
    assert rig.partition.handler_failures == 0
