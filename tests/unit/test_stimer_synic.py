"""hv-stimer message mode against the real SynIC (hvvmm.enlightenments.synic) on the
FakePlatform: the message lands in the guest's SIM page byte for byte, a busy slot gets
MessagePending and the timer's message follows the guest's EOM, a disabled SynIC or a masked SINT
holds the message until the SynIC can take it, and random guest activity never produces an
early or malformed message."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments import REGISTRY
from hvvmm.enlightenments import stimer as S
from hvvmm.hv import hvdef
from hvvmm.hv.msr import MsrAccessFault

try:
    from hvfakes import FakePlatform
    from test_stimer import (AUTO, ENABLE, MS, PERIODIC, Rig, config_msr, count_msr,
                             direct_config, sint_config)
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform
    from tests.unit.test_stimer import (AUTO, ENABLE, MS, PERIODIC, Rig, config_msr,
                                        count_msr, direct_config, sint_config)

SPEC = "hv-vpindex,hv-time,hv-synic,hv-stimer,hv-stimer-direct"
SIMP_GPA = 0x10000
SLOT = 256


class Guest(Rig):
    """A partition with the real SynIC and hv-stimer; helpers act as the guest would."""

    def __init__(self, vp_count: int = 2):
        super().__init__(SPEC, platform=FakePlatform(vp_count=vp_count,
                                                      guest_tsc_at_reference_zero=777),
                         registry=REGISTRY)

    def synic_on(self, vp: int = 0, sints=(2, 3)) -> None:
        self.wr(hvdef.HV_X64_MSR_SIMP, (SIMP_GPA + vp * 0x1000) | 1, vp)
        for sint in sints:
            self.wr(hvdef.HV_X64_MSR_SINT0 + sint, 0x40 + sint, vp)
        self.wr(hvdef.HV_X64_MSR_SCONTROL, 1, vp)

    def slot_gpa(self, sint: int, vp: int = 0) -> int:
        return SIMP_GPA + vp * 0x1000 + sint * SLOT

    def slot(self, sint: int, vp: int = 0) -> bytes:
        return self.platform.guest_read(self.slot_gpa(sint, vp), SLOT)

    def slot_type(self, sint: int, vp: int = 0) -> int:
        return struct.unpack_from("<I", self.slot(sint, vp))[0]

    def slot_pending(self, sint: int, vp: int = 0) -> bool:
        return bool(self.slot(sint, vp)[5] & 1)

    def consume(self, sint: int, vp: int = 0) -> bytes:
        """The guest's handler: copy the message, MessageType = 0, EOM if MessagePending."""
        message = self.slot(sint, vp)
        self.platform.guest_write(self.slot_gpa(sint, vp), b"\0\0\0\0")
        if message[5] & 1:
            self.wr(hvdef.HV_X64_MSR_EOM, 0, vp)
        return message



@pytest.fixture
def guest() -> Guest:
    g = Guest()
    g.synic_on()
    return g


def test_message_lands_in_the_sim_slot_byte_exact(guest):
    due = guest.now + 2 * MS
    guest.wr(count_msr(1), due)
    guest.wr(config_msr(1), sint_config(3, ENABLE))
    guest.advance_ms(2.5)
    slot = guest.slot(3)
    (_vp, index, expiration, _ref), = guest.signals
    delivery = struct.unpack_from("<Q", slot, 32)[0]
    assert slot[:40] == S.timer_message(1, due, delivery)
    assert slot[:8] == struct.pack("<IBBH", 0x80000010, 24, 0, 0)
    assert slot[8:16] == bytes(8)  # sender
    assert slot[16:24] == struct.pack("<II", 1, 0)  # TimerIndex, Reserved
    assert due <= delivery <= guest.now
    assert guest.platform.interrupts == [(0, 0x43)]
    assert guest.rd(config_msr(1)) == sint_config(3)  # one-shot: disabled after expiry


def test_busy_slot_message_pending_then_eom(guest):
    # Another sender's message occupies SINT 2's slot.
    guest.platform.guest_write(guest.slot_gpa(2), struct.pack("<IBBHQ", 0x1234, 0, 0, 0, 0))
    due = guest.now + MS
    guest.wr(count_msr(0), due)
    guest.wr(config_msr(0), sint_config(2, ENABLE))
    guest.advance_ms(5)
    assert guest.slot_type(2) == 0x1234 and guest.slot_pending(2)
    assert guest.platform.interrupts == []
    timer = guest.state.vps[0].timers[0]
    assert timer.pending is not None and timer.counters.deferred == 1
    guest.advance_ms(3)
    released = guest.now
    old = guest.consume(2)  # frees the slot and, seeing MessagePending, writes EOM
    assert struct.unpack_from("<I", old)[0] == 0x1234
    slot = guest.slot(2)
    _type, size, index, expiration, delivery = S.decode_timer_message(slot)
    assert (_type, size, index, expiration) == (0x80000010, 24, 0, due)
    assert delivery >= released
    assert not slot[5] & 1
    assert guest.platform.interrupts == [(0, 0x42)]
    assert timer.pending is None and timer.counters.retried == 1


def test_disabled_synic_holds_the_message_until_enabled():
    guest = Guest()
    guest.wr(hvdef.HV_X64_MSR_SIMP, SIMP_GPA | 1)
    guest.wr(hvdef.HV_X64_MSR_SINT0 + 2, 0x42)
    due = guest.now + MS
    guest.wr(count_msr(0), due)
    guest.wr(config_msr(0), sint_config(2, ENABLE))  # SCONTROL still 0
    guest.advance_ms(3)
    assert guest.slot_type(2) == 0
    guest.wr(hvdef.HV_X64_MSR_SCONTROL, 1)  # the SynIC tells its listeners it can take messages
    assert S.decode_timer_message(guest.slot(2))[3] == due


def test_masked_sint_holds_the_message_until_unmasked(guest):
    guest.wr(hvdef.HV_X64_MSR_SINT0 + 3, 0x43 | (1 << 16))  # masked
    guest.wr(count_msr(2), guest.now + MS)
    guest.wr(config_msr(2), sint_config(3, ENABLE))
    guest.advance_ms(2)
    assert guest.slot_type(3) == 0 and guest.platform.interrupts == []
    guest.wr(hvdef.HV_X64_MSR_SINT0 + 3, 0x43)
    assert guest.slot_type(3) == 0x80000010
    assert guest.platform.interrupts == [(0, 0x43)]


def test_periodic_messages_keep_the_grid_and_park_while_busy(guest):
    guest.wr(count_msr(0), MS)
    guest.wr(config_msr(0), sint_config(2, ENABLE, PERIODIC))
    t0 = guest.now
    guest.advance_ms(1.1)
    assert S.decode_timer_message(guest.consume(2))[3] == t0 + MS
    guest.advance_ms(3)  # 2 ms placed; 3 ms finds the slot busy and parks the timer
    timer = guest.state.vps[0].timers[0]
    assert (timer.counters.deferred, timer.counters.expired) == (1, 3)
    assert guest.platform.pending_timers() == []  # 4 ms does not wake the host
    assert guest.slot_pending(2)
    first = guest.consume(2)  # MessagePending set: the EOM delivers the pending message
    assert S.decode_timer_message(first)[3] == t0 + 2 * MS
    second = guest.consume(2)
    assert S.decode_timer_message(second)[3] == t0 + 3 * MS  # the first missed expiry
    assert S.decode_timer_message(second)[4] >= t0 + 4 * MS  # delivered at the EOM
    guest.advance_ms(1)
    assert S.decode_timer_message(guest.slot(2))[3] == t0 + 5 * MS


def test_direct_mode_needs_no_synic_setup():
    guest = Guest()
    guest.wr(config_msr(0), direct_config(0xED, ENABLE, AUTO))
    guest.wr(count_msr(0), guest.now + MS, vp=0)
    guest.advance_ms(2)
    assert guest.platform.interrupts == [(0, 0xED)]


def test_vp_reset_clears_timers_and_pending_messages(guest):
    guest.platform.guest_write(guest.slot_gpa(2), struct.pack("<I", 0x99))
    guest.wr(count_msr(0), guest.now + MS)
    guest.wr(config_msr(0), sint_config(2, ENABLE))
    guest.advance_ms(2)
    assert guest.state.vps[0].timers[0].pending is not None
    guest.partition.reset()
    assert guest.state.vps[0].timers[0].pending is None
    assert guest.rd(config_msr(0)) == 0 and guest.platform.pending_timers() == []


_ops = st.lists(st.one_of(
    st.tuples(st.just("config"), st.integers(0, 1), st.integers(0, 3),
              st.sampled_from([0, ENABLE, ENABLE | PERIODIC, AUTO, ENABLE | AUTO, PERIODIC]),
              st.sampled_from([0, 1, 2, 3]), st.booleans()),
    st.tuples(st.just("count"), st.integers(0, 1), st.integers(0, 3),
              st.sampled_from([0, MS // 2, MS, 3 * MS]), st.booleans()),
    st.tuples(st.just("advance"), st.integers(0, 5000)),
    st.tuples(st.just("consume"), st.integers(0, 1), st.sampled_from([1, 2, 3])),
    st.tuples(st.just("mask"), st.integers(0, 1), st.sampled_from([1, 2, 3]), st.booleans()),
    st.tuples(st.just("scontrol"), st.integers(0, 1), st.booleans()),
), max_size=40)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_random_guest_activity(ops):
    guest = Guest()
    for vp in (0, 1):
        guest.synic_on(vp, sints=(1, 2, 3))
    for op in ops:
        kind = op[0]
        if kind == "config":
            _k, vp, n, flags, sint, direct = op
            value = (direct_config(0x80 + n) | flags) if direct else sint_config(sint) | flags
            guest.wr(config_msr(n), value, vp)
        elif kind == "count":
            _k, vp, n, value, absolute = op
            guest.wr(count_msr(n), (guest.now + value if absolute and value else value), vp)
        elif kind == "advance":
            guest.platform.advance_and_fire(seconds=op[1] / 1e6)
        elif kind == "consume":
            _k, vp, sint = op
            if guest.slot_type(sint, vp):
                message = guest.consume(sint, vp)
                mtype, size, index, expiration, delivery = S.decode_timer_message(message)
                assert (mtype, size) == (0x80000010, 24) and index < 4
                assert expiration <= delivery <= guest.now
        elif kind == "mask":
            _k, vp, sint, masked = op
            guest.wr(hvdef.HV_X64_MSR_SINT0 + sint, (0x40 + sint) | (masked << 16), vp)
        else:
            _k, vp, enabled = op
            guest.wr(hvdef.HV_X64_MSR_SCONTROL, int(enabled), vp)
    for vp, _index, expiration, ref in guest.signals:
        assert ref >= expiration
    assert guest.partition.handler_failures == 0
    with pytest.raises(MsrAccessFault):
        guest.wr(config_msr(0), 1 << 20)


def test_no_message_of_the_old_setting_after_the_disabling_write_returns(guest):
    # The timer thread delivers an expiry while the guest's vCPU disables the timer: the
    # message must be placed before the guest's write returns, never after it.
    import threading

    guest.synic_on()
    guest.wr(count_msr(0), MS)
    guest.wr(config_msr(0), sint_config(2, ENABLE, PERIODIC))
    state = guest.state
    deliver = state._deliver_message
    order = []
    writers = []

    def racing_delivery(vp, sint, message):
        if not writers:
            writer = threading.Thread(
                target=lambda: (guest.wr(config_msr(0), 0), order.append("write returned")))
            writers.append(writer)
            writer.start()
            writer.join(0.2)  # a write that does not wait for the delivery returns now
        order.append("message placed")
        return deliver(vp, sint, message)

    state._deliver_message = racing_delivery
    guest.advance_ms(1.5)
    writers[0].join(5)
    assert order == ["message placed", "write returned"]
    assert guest.rd(config_msr(0)) == 0
