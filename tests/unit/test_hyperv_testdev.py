"""QEMU's hyperv-testdev (hvvmm.devices.hyperv_testdev): control decoding, and each control
against a real partition on the FakePlatform."""

from __future__ import annotations

import struct

import pytest

from hvvmm.devices.hyperv_testdev import (
    HYPERV_TESTDEV_BASE,
    HYPERV_TESTDEV_PORT_COUNT,
    HypervTestDev,
    HvTestDevControl,
    decode,
    encode,
)
from hvvmm.enlightenments.synic import HV_SYNIC_SINT_AUTO_EOI
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.hvdef import HV_HYPERCALL_FAST_BIT, HvStatus, HypercallCode
from hvvmm.hv.partition import Partition

try:
    from hvfakes import FakePlatform, FakeRegisters, enable_synic, siefp_gpa, synic_slot
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import (FakePlatform, FakeRegisters, enable_synic, siefp_gpa,
                                    synic_slot)

M = hvdef
C = HvTestDevControl
INPUT = 0x30000


def test_decode_and_encode():
    assert (HYPERV_TESTDEV_BASE, HYPERV_TESTDEV_PORT_COUNT) == (0x3000, 4)
    assert decode(0x21_04_01_08) == (0x21, 4, 1, 8)  # conn 0x21, MSG_CONN_CREATE, vp 1, sint 8
    assert encode(C.EVT_CONN_CREATE, 1, 9, 0x21) == 0x21_06_01_09
    assert encode(C.SINT_ROUTE_SET_SINT, 0, 15) == 0x00_03_00_0F  # kvm-unit-tests synic_ctl
    assert [c.value for c in C] == list(range(1, 8))  # QEMU's enum order


class Recorder:
    """A SynicControl that records calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs)) or True


@pytest.mark.parametrize("word, expected", [
    (encode(C.SINT_ROUTE_SET_SINT, 1, 3), []),  # no route yet: ignored
    (encode(C.MSG_CONN_CREATE, 1, 8, 0x11),
     [("register_message_connection", (0x11,), {"vp": 1, "sint": 8})]),
    (encode(C.EVT_CONN_CREATE, 0, 9, 0x21),
     [("register_event_connection", (0x21,), {"vp": 0, "sint": 9, "flag": 0x21})]),
    (encode(C.MSG_CONN_DESTROY, 0, 0, 0x11), []),  # nothing to destroy: ignored
    (encode(0, 0, 0), []), (encode(8, 0, 0), []), (encode(0xFF, 1, 1, 1), []),
])
def test_single_controls(word, expected):
    recorder = Recorder()
    device = HypervTestDev(recorder)
    device.write(0, 4, word)
    assert recorder.calls == expected


def test_route_lifecycle_and_bad_accesses():
    recorder = Recorder()
    device = HypervTestDev(recorder)
    device.write(0, 4, encode(C.SINT_ROUTE_CREATE, 1, 3))
    device.write(0, 4, encode(C.SINT_ROUTE_SET_SINT, 1, 3))
    device.write(0, 2, encode(C.SINT_ROUTE_SET_SINT, 1, 3))  # QEMU: 4-byte accesses only
    device.write(1, 4, encode(C.SINT_ROUTE_SET_SINT, 1, 3))
    device.write(0, 4, encode(C.SINT_ROUTE_DESTROY, 1, 3))
    device.write(0, 4, encode(C.SINT_ROUTE_SET_SINT, 1, 3))
    assert recorder.calls == [("raise_sint", (1, 3), {})]
    assert device.read(0, 4) == 0 and device.ignored == 3 and device.writes == 6
    device.write(0, 4, encode(C.MSG_CONN_CREATE, 1, 8, 0x11))
    device.write(0, 4, encode(C.EVT_CONN_CREATE, 1, 9, 0x21))
    device.reset()
    assert [name for name, _a, _k in recorder.calls[-2:]] == [
        "unregister_message_connection", "unregister_event_connection"]
    assert device.routes == set() and device.message_connections == {}


# -- against a real partition ---------------------------------------------------------------------


def make():
    platform = FakePlatform(vp_count=2)
    partition = Partition(parse_hyperv_spec("hv-vpindex,hv-synic"), platform)
    connections = partition.state["hv-synic"].connections
    device = HypervTestDev(connections)
    for vp in (0, 1):
        enable_synic(partition, vp, {})
    return partition, platform, device


def hypercall(partition, vp, control, rdx):
    io = FakeRegisters()
    io.set_call(control, rdx, 0)
    return partition.hypercall(vp, io).status


def test_set_sint_raises_the_vector_with_auto_eoi_handled():
    partition, platform, device = make()
    partition.msr_write(1, M.HV_X64_MSR_SINT0 + 3, 0xB3 | HV_SYNIC_SINT_AUTO_EOI)
    device.write(0, 4, encode(C.SINT_ROUTE_CREATE, 1, 3))
    device.write(0, 4, encode(C.SINT_ROUTE_SET_SINT, 1, 3))
    assert platform.interrupts == [(1, 0xB3)]
    assert platform.pending_timers()  # the AutoEOI check is armed
    device.write(0, 4, encode(C.SINT_ROUTE_CREATE, 1, 4))
    device.write(0, 4, encode(C.SINT_ROUTE_SET_SINT, 1, 4))  # masked SINT: nothing
    device.write(0, 4, encode(C.SINT_ROUTE_CREATE, 7, 4))
    device.write(0, 4, encode(C.SINT_ROUTE_SET_SINT, 7, 4))  # no VP 7: ignored, no exception
    assert platform.interrupts == [(1, 0xB3)]


def test_message_connection_echoes_postmessage():
    partition, platform, device = make()
    partition.msr_write(0, M.HV_X64_MSR_SINT0 + 8, 0xB0 | HV_SYNIC_SINT_AUTO_EOI)
    device.write(0, 4, encode(C.MSG_CONN_CREATE, 0, 8, 0x10))
    device.write(0, 4, encode(C.MSG_CONN_CREATE, 0, 8, 0x10))  # twice: ignored
    platform.memory.write(INPUT, struct.pack("<IIII", 0x10, 0, 0x12345678, 8)
                          + struct.pack("<Q", 1 << 16).ljust(240, b"\0"))
    assert hypercall(partition, 1, HypercallCode.HvCallPostMessage, INPUT) == 0
    mtype, size, flags, _sender, payload = synic_slot(platform, 0, 8)
    assert (mtype, size, flags, payload) == (0x12345678, 8, 0, struct.pack("<Q", 1 << 16))
    assert platform.interrupts == [(0, 0xB0)]
    device.write(0, 4, encode(C.MSG_CONN_DESTROY, 0, 0, 0x10))
    assert hypercall(partition, 1, HypercallCode.HvCallPostMessage, INPUT) == \
        HvStatus.HV_STATUS_INVALID_CONNECTION_ID


def test_event_connection_sets_flag_conn_id():
    partition, platform, device = make()
    partition.msr_write(1, M.HV_X64_MSR_SINT0 + 9, 0xB1)
    device.write(0, 4, encode(C.EVT_CONN_CREATE, 1, 9, 0x21))
    fast = HypercallCode.HvCallSignalEvent | HV_HYPERCALL_FAST_BIT
    assert hypercall(partition, 0, fast, 0x21) == 0
    assert platform.guest_read(siefp_gpa(1) + 9 * 256 + 4, 1) == b"\x02"  # bit 0x21
    assert hypercall(partition, 0, fast, 0x21) == 0  # already set: no second interrupt
    assert platform.interrupts == [(1, 0xB1)]
    assert hypercall(partition, 0, fast, 0x21 | 1 << 32) == HvStatus.HV_STATUS_INVALID_PARAMETER
    device.write(0, 4, encode(C.EVT_CONN_DESTROY, 1, 9, 0x21))
    assert hypercall(partition, 0, fast, 0x21) == HvStatus.HV_STATUS_INVALID_CONNECTION_ID


def test_a_route_to_a_sint_that_does_not_exist_is_refused():
    device = HypervTestDev(Recorder())
    device.write(0, 4, encode(C.SINT_ROUTE_CREATE, 0, 16))
    assert device.routes == set() and device.ignored == 1
