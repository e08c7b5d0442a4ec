"""HvCallPostMessage / HvCallSignalEvent and the connection table
(hvvmm.enlightenments.connections), through the real dispatcher with FakeRegisters."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments.connections import (
    HV_ANY_VP,
    HV_PORT_MESSAGE_BUFFERS,
    ConnectionSetupError,
    MessageQueueFull,
)
from hvvmm.enlightenments.synic import (
    HV_MESSAGE_FLAG_PENDING,
    HV_SYNIC_SINT_MASKED,
)
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.hvdef import HV_HYPERCALL_FAST_BIT, HvStatus, HypercallCode
from hvvmm.hv.partition import Partition

try:
    from hvfakes import (FakePlatform, FakeRegisters, enable_synic, siefp_gpa, simp_gpa,
                         synic_slot)
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import (FakePlatform, FakeRegisters, enable_synic, siefp_gpa,
                                    simp_gpa, synic_slot)

M = hvdef
S = HvStatus
POST = HypercallCode.HvCallPostMessage
SIGNAL = HypercallCode.HvCallSignalEvent
INPUT = 0x30000
MSG_TYPE = 0x12345678
MSG_SINT, EVT_SINT = 8, 9
MSG_CONN, EVT_CONN = 0x10, 0x20


def make(spec: str = "hv-vpindex,hv-synic", *, enable_vps=(0, 1), connections=True):
    platform = FakePlatform(vp_count=2)
    partition = Partition(parse_hyperv_spec(spec), platform)
    if "hv-synic" not in partition.state:
        return partition, platform, None
    for vp in enable_vps:
        enable_synic(partition, vp, {MSG_SINT: 0xB0, EVT_SINT: 0xB1})
    table = partition.state["hv-synic"].connections
    if connections:  # kvm-unit-tests hyperv_connections: one of each per VP
        for vp in (0, 1):
            table.register_message_connection(MSG_CONN + vp, vp=vp, sint=MSG_SINT)
            table.register_event_connection(EVT_CONN + vp, vp=vp, sint=EVT_SINT, flag=EVT_CONN + vp)
    return partition, platform, table


def post_input(connection: int, message_type: int = MSG_TYPE, payload: bytes = b"",
               size: int | None = None, reserved: int = 0) -> bytes:
    header = struct.pack("<IIII", connection, reserved, message_type,
                         len(payload) if size is None else size)
    return header + payload.ljust(240, b"\0")


def post(partition, platform, vp: int, connection: int, *, extra_control: int = 0,
         gpa: int = INPUT, **fields) -> int | None:
    platform.memory.write(gpa, post_input(connection, **fields))
    io = FakeRegisters()
    io.set_call(POST | extra_control, gpa, 0)
    return partition.hypercall(vp, io).status


def signal(partition, platform, vp: int, connection: int, flag: int = 0, reserved: int = 0,
           fast: bool = True) -> int | None:
    value = connection | flag << 32 | reserved << 48
    io = FakeRegisters()
    if fast:
        io.set_call(SIGNAL | HV_HYPERCALL_FAST_BIT, value, 0)
    else:
        platform.memory.write(INPUT, struct.pack("<Q", value))
        io.set_call(SIGNAL, INPUT, 0)
    return partition.hypercall(vp, io).status


def slot(platform, vp: int, sint: int = MSG_SINT):
    return synic_slot(platform, vp, sint)


def flag_set(platform, vp: int, flag: int, sint: int = EVT_SINT) -> bool:
    byte = platform.guest_read(siefp_gpa(vp) + 256 * sint + flag // 8, 1)[0]
    return bool(byte >> (flag % 8) & 1)


# -- PostMessage ----------------------------------------------------------------------------------


def test_post_message_to_self_and_to_another_vp():
    partition, platform, _ = make()
    assert post(partition, platform, 0, MSG_CONN, payload=b"hello") == S.HV_STATUS_SUCCESS
    mtype, size, flags, sender, payload = slot(platform, 0)
    assert (mtype, size, flags, sender, payload) == (MSG_TYPE, 5, 0, MSG_CONN, b"hello")
    assert post(partition, platform, 0, MSG_CONN + 1, payload=b"x" * 240) == S.HV_STATUS_SUCCESS
    assert slot(platform, 1)[4] == b"x" * 240
    assert platform.interrupts == [(0, 0xB0), (1, 0xB0)]


def test_post_message_to_busy_slot_then_eom():
    """kvm-unit-tests hyperv_connections: "send message to busy slot" (status 0, old payload
    with msg_pending = 1, no interrupt) then "receive pending message" after EOM."""
    partition, platform, _ = make()
    assert post(partition, platform, 1, MSG_CONN, payload=b"\x01") == S.HV_STATUS_SUCCESS
    assert post(partition, platform, 1, MSG_CONN, payload=b"\x02") == S.HV_STATUS_SUCCESS
    _type, _size, flags, _sender, payload = slot(platform, 0)
    assert payload == b"\x01" and flags == HV_MESSAGE_FLAG_PENDING
    assert len(platform.interrupts) == 1
    platform.guest_write(simp_gpa(0) + 256 * MSG_SINT, bytes(4))
    partition.msr_write(0, M.HV_X64_MSR_EOM, 0)
    _type, _size, flags, _sender, payload = slot(platform, 0)
    assert payload == b"\x02" and flags == 0
    assert len(platform.interrupts) == 2


def test_queued_messages_keep_their_order():
    partition, platform, table = make()
    for n in range(5):
        assert post(partition, platform, 0, MSG_CONN, payload=bytes([n])) == S.HV_STATUS_SUCCESS
    assert table.queued(0, MSG_SINT) == 4
    seen = []
    for _ in range(5):
        _type, _size, flags, _sender, payload = slot(platform, 0)
        seen.append((payload[0], flags))
        platform.guest_write(simp_gpa(0) + 256 * MSG_SINT, bytes(4))
        partition.msr_write(0, M.HV_X64_MSR_EOM, 0)
    assert seen == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 0)]
    assert table.queued(0, MSG_SINT) == 0


def test_insufficient_buffers_when_the_port_is_full():
    partition, platform, _ = make()
    for _ in range(HV_PORT_MESSAGE_BUFFERS + 1):  # one in the slot, sixteen queued
        assert post(partition, platform, 0, MSG_CONN) == S.HV_STATUS_SUCCESS
    assert post(partition, platform, 0, MSG_CONN) == S.HV_STATUS_INSUFFICIENT_BUFFERS
    assert post(partition, platform, 0, MSG_CONN + 1) == S.HV_STATUS_SUCCESS  # another port
    platform.guest_write(simp_gpa(0) + 256 * MSG_SINT, bytes(4))
    partition.msr_write(0, M.HV_X64_MSR_EOM, 0)
    assert post(partition, platform, 0, MSG_CONN) == S.HV_STATUS_SUCCESS


def test_message_to_a_masked_sint_waits_for_the_unmask():
    partition, platform, _ = make()
    partition.msr_write(0, M.HV_X64_MSR_SINT0 + MSG_SINT, 0xB0 | HV_SYNIC_SINT_MASKED)
    assert post(partition, platform, 1, MSG_CONN, payload=b"m") == S.HV_STATUS_SUCCESS
    assert slot(platform, 0)[0] == 0 and platform.interrupts == []
    partition.msr_write(0, M.HV_X64_MSR_SINT0 + MSG_SINT, 0xB0)
    assert slot(platform, 0)[4] == b"m" and platform.interrupts == [(0, 0xB0)]


@pytest.mark.parametrize("case, status", [
    ("reserved word", S.HV_STATUS_INVALID_HYPERCALL_INPUT),
    ("connection id bits 31:24", S.HV_STATUS_INVALID_HYPERCALL_INPUT),
    ("fast", S.HV_STATUS_INVALID_HYPERCALL_INPUT),
    ("misaligned", S.HV_STATUS_INVALID_ALIGNMENT),
    ("unknown connection", S.HV_STATUS_INVALID_CONNECTION_ID),
    ("event connection", S.HV_STATUS_INVALID_PORT_ID),
    ("type 0", S.HV_STATUS_INVALID_PARAMETER),
    ("hypervisor type", S.HV_STATUS_INVALID_PARAMETER),
    ("payload 241", S.HV_STATUS_INVALID_PARAMETER),
    ("scontrol off", S.HV_STATUS_INVALID_SYNIC_STATE),
    ("simp off", S.HV_STATUS_INVALID_SYNIC_STATE),
    ("any vp, none ready", S.HV_STATUS_INVALID_VP_INDEX),
    ("handler status", S.HV_STATUS_INSUFFICIENT_MEMORY),
])
def test_post_message_statuses(case, status):
    partition, platform, table = make()
    vp, connection, fields, extra, gpa = 0, MSG_CONN + 1, {}, 0, INPUT
    if case == "reserved word":
        fields = {"reserved": 1}
    elif case == "connection id bits 31:24":
        connection |= 0x0100_0000
    elif case == "fast":
        extra = HV_HYPERCALL_FAST_BIT
    elif case == "misaligned":
        gpa = INPUT + 4
    elif case == "unknown connection":
        connection = 0x1234
    elif case == "event connection":
        connection = EVT_CONN
    elif case == "type 0":
        fields = {"message_type": 0}
    elif case == "hypervisor type":
        fields = {"message_type": 0x8000_0010}
    elif case == "payload 241":
        fields = {"size": 241}
    elif case == "scontrol off":
        partition.msr_write(1, M.HV_X64_MSR_SCONTROL, 0)
    elif case == "simp off":
        partition.msr_write(1, M.HV_X64_MSR_SIMP, 0)
    elif case == "any vp, none ready":
        table.register_message_connection(0x99, vp=HV_ANY_VP, sint=MSG_SINT)
        connection = 0x99
        for target in (0, 1):
            partition.msr_write(target, M.HV_X64_MSR_SCONTROL, 0)
    elif case == "handler status":
        table.register_message_connection(0x98, handler=lambda *_: S.HV_STATUS_INSUFFICIENT_MEMORY)
        connection = 0x98
    assert post(partition, platform, vp, connection, extra_control=extra, gpa=gpa,
                **fields) == status
    assert slot(platform, 1)[0] == 0 and platform.interrupts == []


def test_post_message_access_denied_without_hv_synic():
    partition, platform, _ = make("hv-vpindex")
    assert post(partition, platform, 0, MSG_CONN) == S.HV_STATUS_ACCESS_DENIED
    assert signal(partition, platform, 0, EVT_CONN) == S.HV_STATUS_ACCESS_DENIED
    features = next(e for e in partition.cpuid_leaves() if e.function == 0x40000003)
    assert features.ebx & 0x30 == 0


def test_any_vp_port_picks_a_ready_vp():
    partition, platform, table = make(enable_vps=(1,))
    table.register_message_connection(0x77, vp=HV_ANY_VP, sint=MSG_SINT, port_id=0x4242)
    assert post(partition, platform, 0, 0x77, payload=b"a") == S.HV_STATUS_SUCCESS
    assert slot(platform, 1)[3:] == (0x4242, b"a")


def test_handler_port_gets_the_message_on_the_callers_vp():
    partition, platform, table = make()
    got = []
    table.register_message_connection(0x55, handler=lambda vp, mtype, data: got.append(
        (vp, mtype, data)))
    assert post(partition, platform, 1, 0x55, payload=b"ping") == S.HV_STATUS_SUCCESS
    assert got == [(1, MSG_TYPE, b"ping")]
    assert table.unregister_connection(0x55) and not table.unregister_connection(0x55)
    assert post(partition, platform, 1, 0x55) == S.HV_STATUS_INVALID_CONNECTION_ID


# -- SignalEvent ----------------------------------------------------------------------------------


def test_signal_event_self_other_and_already_set():
    """kvm-unit-tests hyperv_connections: "signal event on self", "... on another cpu",
    "signal event already set" (status 0, bit still set, no interrupt)."""
    partition, platform, _ = make()
    assert signal(partition, platform, 0, EVT_CONN) == S.HV_STATUS_SUCCESS
    assert flag_set(platform, 0, EVT_CONN) and platform.interrupts == [(0, 0xB1)]
    assert signal(partition, platform, 0, EVT_CONN + 1, fast=False) == S.HV_STATUS_SUCCESS
    assert flag_set(platform, 1, EVT_CONN + 1)
    assert signal(partition, platform, 1, EVT_CONN + 1) == S.HV_STATUS_SUCCESS
    assert platform.interrupts == [(0, 0xB1), (1, 0xB1)]


def test_signal_event_flag_numbers_within_the_port():
    partition, platform, table = make()
    table.register_event_connection(0x40, vp=1, sint=EVT_SINT, flag=100, flag_count=8)
    assert signal(partition, platform, 0, 0x40, flag=7) == S.HV_STATUS_SUCCESS
    assert flag_set(platform, 1, 107)
    assert signal(partition, platform, 0, 0x40, flag=8) == S.HV_STATUS_INVALID_PARAMETER


@pytest.mark.parametrize("case, status", [
    ("reserved 63:48", S.HV_STATUS_INVALID_HYPERCALL_INPUT),
    ("connection id bits 31:24", S.HV_STATUS_INVALID_HYPERCALL_INPUT),
    ("unknown connection", S.HV_STATUS_INVALID_CONNECTION_ID),  # kvm-unit-tests probe: 0x12
    ("message connection", S.HV_STATUS_INVALID_PORT_ID),
    ("flag out of range", S.HV_STATUS_INVALID_PARAMETER),
    ("masked", S.HV_STATUS_INVALID_SYNIC_STATE),
    ("scontrol off", S.HV_STATUS_INVALID_SYNIC_STATE),
    ("siefp off", S.HV_STATUS_INVALID_SYNIC_STATE),
    ("any vp, none ready", S.HV_STATUS_INVALID_VP_INDEX),
    ("handler status", S.HV_STATUS_INVALID_PORT_ID),
])
def test_signal_event_statuses(case, status):
    partition, platform, table = make()
    connection, flag, reserved = EVT_CONN + 1, 0, 0
    if case == "reserved 63:48":
        reserved = 1
    elif case == "connection id bits 31:24":
        connection |= 0x8000_0000
    elif case == "unknown connection":
        connection = 0x1234
    elif case == "message connection":
        connection = MSG_CONN
    elif case == "flag out of range":
        flag = 1
    elif case == "masked":
        partition.msr_write(1, M.HV_X64_MSR_SINT0 + EVT_SINT, 0xB1 | HV_SYNIC_SINT_MASKED)
    elif case == "scontrol off":
        partition.msr_write(1, M.HV_X64_MSR_SCONTROL, 0)
    elif case == "siefp off":
        partition.msr_write(1, M.HV_X64_MSR_SIEFP, 0)
    elif case == "any vp, none ready":
        table.register_event_connection(0x99, vp=HV_ANY_VP, sint=EVT_SINT)
        connection = 0x99
        for target in (0, 1):
            partition.msr_write(target, M.HV_X64_MSR_SIEFP, 0)
    elif case == "handler status":
        table.register_event_connection(0x98, handler=lambda vp, n: S.HV_STATUS_INVALID_PORT_ID)
        connection = 0x98
    for fast in (True, False):
        assert signal(partition, platform, 0, connection, flag, reserved, fast=fast) == status
    assert platform.interrupts == [] and not flag_set(platform, 1, EVT_CONN + 1)


def test_event_handler_port():
    partition, platform, table = make()
    got = []
    table.register_event_connection(0x33, handler=lambda vp, n: got.append((vp, n)),
                                    flag_count=4)
    assert signal(partition, platform, 1, 0x33, flag=3) == S.HV_STATUS_SUCCESS
    assert got == [(1, 3)]


# -- the host side --------------------------------------------------------------------------------


def test_host_post_message_twice_into_one_slot():
    partition, platform, table = make(connections=False)
    partition.msr_write(1, M.HV_X64_MSR_SINT0 + 2, 0xC2)
    assert table.post_message(1, 2, 0x8000_0010, b"first") is True  # any type from the host
    assert table.post_message(1, 2, 0x8000_0010, b"second") is False  # pending until EOM
    assert slot(platform, 1, 2)[4] == b"first" and slot(platform, 1, 2)[2] == 1
    partition.msr_write(1, M.HV_X64_MSR_EOM, 0)  # EOM while the slot is still full: no change
    assert slot(platform, 1, 2)[4] == b"first"
    platform.guest_write(simp_gpa(1) + 256 * 2, bytes(4))
    partition.msr_write(1, M.HV_X64_MSR_EOM, 0)
    assert slot(platform, 1, 2)[4] == b"second" and slot(platform, 1, 2)[2] == 0
    assert platform.interrupts == [(1, 0xC2), (1, 0xC2)]


def test_host_queue_limit_and_reset():
    partition, platform, table = make(connections=False)
    partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 0)  # nothing can be delivered
    for _ in range(16):
        assert table.post_message(0, 0, 1) is False
    with pytest.raises(MessageQueueFull):
        table.post_message(0, 0, 1)
    partition.reset()
    assert table.queued(0, 0) == 0
    assert table.post_message(0, 0, 1) is False


def test_host_signal_event_and_raise():
    partition, platform, table = make(connections=False)
    assert table.signal_event(1, EVT_SINT, 5) is True
    assert table.signal_event(1, EVT_SINT, 5) is False
    assert table.raise_sint(0, MSG_SINT) is True
    assert platform.interrupts == [(1, 0xB1), (0, 0xB0)]


@pytest.mark.parametrize("kwargs, message", [
    ({"connection_id": 1 << 24, "vp": 0, "sint": 0}, "24-bit"),
    ({"connection_id": 1, "vp": 2, "sint": 0}, "VP 2"),
    ({"connection_id": 1, "vp": 0, "sint": 16}, "SINT 16"),
    ({"connection_id": 1, "vp": 0}, "needs a handler"),
    ({"connection_id": 1, "vp": 0, "sint": 0, "handler": print}, "not both"),
    ({"connection_id": 1, "handler": 5}, "not callable"),
])
def test_registration_errors(kwargs, message):
    _partition, _platform, table = make(connections=False)
    with pytest.raises(ConnectionSetupError, match=message):
        table.register_message_connection(**kwargs)


def test_duplicate_and_flag_range_errors():
    _partition, _platform, table = make()
    with pytest.raises(ConnectionSetupError, match="already exists"):
        table.register_message_connection(MSG_CONN, vp=0, sint=0)
    with pytest.raises(ConnectionSetupError, match="already exists"):
        table.register_event_connection(EVT_CONN, vp=0, sint=0)
    with pytest.raises(ConnectionSetupError, match="do not fit"):
        table.register_event_connection(5, vp=0, sint=0, flag=2047, flag_count=2)
    with pytest.raises(ConnectionSetupError, match="flag count"):
        table.register_event_connection(5, vp=0, sint=0, flag_count=0)
    table.register_message_connection(EVT_CONN, vp=0, sint=0)  # one id, both kinds: allowed
    assert set(table.message_connections()) == {MSG_CONN, MSG_CONN + 1, EVT_CONN}
    assert set(table.event_connections()) == {EVT_CONN, EVT_CONN + 1}


# -- hypothesis -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(connection=st.one_of(st.sampled_from([MSG_CONN, MSG_CONN + 1, EVT_CONN, 0, 0xFFFFFF]),
                            st.integers(0, 0xFFFF_FFFF)),
       reserved=st.sampled_from([0, 0, 1, 0xFFFF_FFFF]),
       message_type=st.one_of(st.sampled_from([0, 1, MSG_TYPE, 0x8000_0000]),
                              st.integers(0, 0xFFFF_FFFF)),
       size=st.one_of(st.integers(0, 240), st.integers(0, 0xFFFF_FFFF)),
       payload=st.binary(max_size=240),
       control=st.integers(0, (1 << 64) - 1),
       use_random_control=st.booleans(),
       event=st.tuples(st.sampled_from([EVT_CONN, EVT_CONN + 1, MSG_CONN]), st.integers(0, 2)),
       vp=st.integers(0, 1))
def test_random_post_message_and_signal_event_never_raise_out(
        connection, reserved, message_type, size, payload, control, use_random_control, event,
        vp):
    partition, platform, _ = make()
    data = struct.pack("<IIII", connection, reserved, message_type, size) + payload.ljust(240)
    platform.memory.write(INPUT, data)
    io = FakeRegisters()
    value = control if use_random_control else POST
    io.set_call(value, INPUT, 0)
    outcome = partition.hypercall(vp, io)
    assert outcome.reason != "handler failed"
    if not use_random_control:
        assert outcome.status in {S.HV_STATUS_SUCCESS, S.HV_STATUS_INVALID_HYPERCALL_INPUT,
                                  S.HV_STATUS_INVALID_CONNECTION_ID, S.HV_STATUS_INVALID_PORT_ID,
                                  S.HV_STATUS_INVALID_PARAMETER}
    # SignalEvent: the random input value, or a known connection and a small flag number (a
    # random value almost never names a registered connection).
    event_connection, flag = event
    io = FakeRegisters()
    io.set_call(SIGNAL | HV_HYPERCALL_FAST_BIT,
                control if use_random_control else event_connection | flag << 32, 0)
    assert partition.hypercall(vp, io).reason != "handler failed"
