"""hv-synic (hvvmm.enlightenments.synic): registers, the SIM/SIEF overlays, message slots, event
flags, EOM listeners and the AutoEOI fix-up, on the FakePlatform."""

from __future__ import annotations

import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments import REGISTRY
from hvvmm.enlightenments.synic import (
    APIC_ISR,
    AUTO_EOI_FIRST_DELAY_NS,
    AUTO_EOI_MAX_DELAY_NS,
    HV_MESSAGE_FLAG_PENDING,
    HV_SYNIC_SINT_AUTO_EOI,
    HV_SYNIC_SINT_MASKED,
    HV_SYNIC_SINT_POLLING,
    Delivery,
    build_message,
    parse_message,
)
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.hvdef import (
    HYPERV_CPUID_ENLIGHTMENT_INFO,
    HYPERV_CPUID_FEATURES,
    HvEnlightenmentInformation,
    HvPartitionPrivilege,
)
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.partition import Partition

try:
    from hvfakes import (LAPIC_IRR, LAPIC_ISR, FakePlatform, enable_synic, siefp_gpa, simp_gpa,
                         synic_slot)
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import (LAPIC_IRR, LAPIC_ISR, FakePlatform, enable_synic, siefp_gpa,
                                    simp_gpa, synic_slot)

M = hvdef
SPEC = "hv-vpindex,hv-synic"
PAGE = 4096
VECTOR = 0xB0
TIMER_TYPE = 0x8000_0010


def make(vp_count: int = 2, spec: str = SPEC, **platform_args):
    platform = FakePlatform(vp_count=vp_count, **platform_args)
    partition = Partition(parse_hyperv_spec(spec), platform)
    return partition, platform


def enable(partition: Partition, vp: int = 0, sints: dict[int, int] | None = None) -> None:
    enable_synic(partition, vp, sints if sints is not None else {0: VECTOR})


def slot(platform: FakePlatform, vp: int, sint: int) -> tuple[int, int, int, int, bytes]:
    return synic_slot(platform, vp, sint)


def guest_free_slot(platform: FakePlatform, vp: int, sint: int) -> bool:
    """The guest's recommended handling: MessageType = 0, then 'is MessagePending set?'."""
    base = simp_gpa(vp) + 256 * sint
    platform.guest_write(base, bytes(4))
    return bool(platform.guest_read(base + 5, 1)[0] & HV_MESSAGE_FLAG_PENDING)


def message(n: int = 1, payload: bytes = b"") -> bytes:
    return build_message(TIMER_TYPE, payload or struct.pack("<IIQQ", n, 0, n, n))


# -- declaration, CPUID, reset values -------------------------------------------------------------


def test_declaration_and_cpuid():
    synic = REGISTRY["hv-synic"]
    assert synic.implemented and synic.requires == ("hv-vpindex",)
    core = REGISTRY.cpuid_bits(set())  # the always-on features
    bits = {key: value & ~core.get(key, 0)
            for key, value in REGISTRY.cpuid_bits({"hv-synic"}).items()}
    privileges = HvPartitionPrivilege.AccessSynicRegs | HvPartitionPrivilege.PostMessages \
        | HvPartitionPrivilege.SignalEvents
    assert bits[(HYPERV_CPUID_FEATURES, "eax")] == privileges.eax == 1 << 2
    assert bits[(HYPERV_CPUID_FEATURES, "ebx")] == privileges.ebx == 0x30
    assert bits[(HYPERV_CPUID_ENLIGHTMENT_INFO, "eax")] \
        == HvEnlightenmentInformation.HV_DEPRECATING_AEOI_RECOMMENDED == 1 << 9
    assert not bits.get((HYPERV_CPUID_FEATURES, "edx"))  # polling mode not advertised
    partition, _ = make()
    synics = partition.state["hv-synic"]
    assert synics.synic(1).vp_index == 1
    with pytest.raises(ValueError):
        synics.synic(2)


def test_reset_values_and_read_only_registers():
    partition, _ = make()
    for vp in (0, 1):
        assert partition.msr_read(vp, M.HV_X64_MSR_SCONTROL) == 0  # TLFS (not OpenVMM's 1)
        assert partition.msr_read(vp, M.HV_X64_MSR_SVERSION) == 1
        assert partition.msr_read(vp, M.HV_X64_MSR_SIMP) == 0
        assert partition.msr_read(vp, M.HV_X64_MSR_SIEFP) == 0
        assert partition.msr_read(vp, M.HV_X64_MSR_EOM) == 0
        for sint in range(16):
            assert partition.msr_read(vp, M.HV_X64_MSR_SINT0 + sint) == HV_SYNIC_SINT_MASKED
    with pytest.raises(MsrAccessFault, match="read-only"):
        partition.msr_write(0, M.HV_X64_MSR_SVERSION, 1)
    with pytest.raises(MsrAccessFault, match="not available"):
        partition.msr_read(0, M.HV_X64_MSR_SIRBP)  # implemented by nobody
    partition.msr_write(0, M.HV_X64_MSR_EOM, 0xDEAD)
    assert partition.msr_read(0, M.HV_X64_MSR_EOM) == 0
    assert partition.handler_failures == 0


def test_synic_msrs_fault_without_hv_synic():
    partition, _ = make(spec="hv-vpindex")
    for index in (M.HV_X64_MSR_SCONTROL, M.HV_X64_MSR_SIMP, M.HV_X64_MSR_EOM,
                  M.HV_X64_MSR_SINT0 + 5):
        with pytest.raises(MsrAccessFault, match="not available"):
            partition.msr_read(0, index)


@pytest.mark.parametrize("bit", [8, 15, 19, 20, 31, 32, 63])
def test_sint_reserved_bits_fault(bit):
    partition, _ = make()
    with pytest.raises(MsrAccessFault, match="reserved"):
        partition.msr_write(0, M.HV_X64_MSR_SINT0 + 3, VECTOR | (1 << bit))
    assert partition.msr_read(0, M.HV_X64_MSR_SINT0 + 3) == HV_SYNIC_SINT_MASKED


@pytest.mark.parametrize("value, faults", [
    (0x0F, True), (0x00, True), (0x0F | HV_SYNIC_SINT_AUTO_EOI, True),
    (0x0F | HV_SYNIC_SINT_POLLING, True),
    (0x10, False), (0xFF, False), (0x00 | HV_SYNIC_SINT_MASKED, False),
    (0xFF | HV_SYNIC_SINT_MASKED, False),  # what kvm-unit-tests write at cleanup
    (0xB3 | HV_SYNIC_SINT_AUTO_EOI, False), (0x20 | HV_SYNIC_SINT_POLLING, False),
])
def test_sint_vector_below_16_faults_only_unmasked(value, faults):
    partition, _ = make()
    index = M.HV_X64_MSR_SINT0 + 15
    if faults:
        with pytest.raises(MsrAccessFault, match="vector"):
            partition.msr_write(1, index, value)
        assert partition.msr_read(1, index) == HV_SYNIC_SINT_MASKED
    else:
        partition.msr_write(1, index, value)
        assert partition.msr_read(1, index) == value
        assert partition.msr_read(0, index) == HV_SYNIC_SINT_MASKED  # per VP


def test_rsvdp_bits_of_scontrol_simp_siefp_read_back():
    partition, platform = make()
    partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 0xFFFF_0000_0000_0001)
    partition.msr_write(0, M.HV_X64_MSR_SIMP, simp_gpa(0) | 0xFFE | 1)
    partition.msr_write(0, M.HV_X64_MSR_SIEFP, siefp_gpa(0) | 0x2)  # disabled, bits kept
    assert partition.msr_read(0, M.HV_X64_MSR_SCONTROL) == 0xFFFF_0000_0000_0001
    assert partition.msr_read(0, M.HV_X64_MSR_SIMP) == simp_gpa(0) | 0xFFF
    assert partition.msr_read(0, M.HV_X64_MSR_SIEFP) == siefp_gpa(0) | 0x2
    assert set(platform.overlays) == {simp_gpa(0)}
    assert partition.state["hv-synic"].synic(0).enabled


# -- the SIM/SIEF overlays ------------------------------------------------------------------------


def test_overlay_lifecycle_hides_and_uncovers_ram():
    partition, platform = make()
    ram = bytes(range(256)) * 16
    platform.memory.write(simp_gpa(0), ram)
    partition.msr_write(0, M.HV_X64_MSR_SIMP, simp_gpa(0) | 1)
    overlay = platform.overlays[simp_gpa(0)]
    assert not overlay.readonly and "message" in overlay.name
    assert platform.guest_read(simp_gpa(0), PAGE) == bytes(PAGE)  # "cleared to zero" at creation
    platform.guest_write(simp_gpa(0) + 100, b"guest")  # the guest may write it like RAM
    assert overlay.read(100, 5) == b"guest"
    partition.msr_write(0, M.HV_X64_MSR_SIMP, simp_gpa(0))  # disable: the RAM shows again
    assert platform.overlays == {} and platform.memory.read(simp_gpa(0), PAGE) == ram
    partition.msr_write(0, M.HV_X64_MSR_SIMP, simp_gpa(0) | 1)  # the VP's page comes back
    assert platform.guest_read(simp_gpa(0) + 100, 5) == b"guest"
    assert [kind for kind, _gpa, _name in platform.overlay_log] == ["map", "unmap", "map"]


def test_overlay_moves_with_its_contents_and_reset_clears_it():
    partition, platform = make()
    enable(partition)
    synic = partition.state["hv-synic"].synic(0)
    assert synic.deliver_message(0, message(7))
    assert synic.signal_event(0, 9)
    partition.msr_write(0, M.HV_X64_MSR_SIMP, 0x30000 | 1)
    partition.msr_write(0, M.HV_X64_MSR_SIEFP, 0x31000 | 1)
    assert set(platform.overlays) == {0x30000, 0x31000}
    assert parse_message(platform.guest_read(0x30000, 256))[0] == TIMER_TYPE
    assert platform.guest_read(0x31000 + 1, 1) == b"\x02"
    partition.reset()
    assert platform.overlays == {}
    assert partition.msr_read(0, M.HV_X64_MSR_SIMP) == 0
    assert partition.msr_read(0, M.HV_X64_MSR_SCONTROL) == 0
    assert partition.msr_read(0, M.HV_X64_MSR_SINT0) == HV_SYNIC_SINT_MASKED
    enable(partition)
    assert platform.guest_read(simp_gpa(0), PAGE) == bytes(PAGE)
    assert platform.guest_read(siefp_gpa(0), PAGE) == bytes(PAGE)


def test_unplaceable_page_is_no_fault_and_takes_nothing():
    partition, platform = make(max_gpa=1 << 20)
    partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 1)
    partition.msr_write(0, M.HV_X64_MSR_SINT0, VECTOR)
    partition.msr_write(0, M.HV_X64_MSR_SIMP, (1 << 30) | 1)  # beyond the GPA space
    assert partition.msr_read(0, M.HV_X64_MSR_SIMP) == (1 << 30) | 1
    assert platform.overlays == {}
    assert partition.state["hv-synic"].synic(0).post(0, message()) is Delivery.PAGE_DISABLED
    assert partition.handler_failures == 0


# -- messages -------------------------------------------------------------------------------------


def test_message_slot_state_machine_with_eom_redelivery():
    partition, platform = make()
    enable(partition, 1, {3: VECTOR + 3})
    synic = partition.state["hv-synic"].synic(1)
    eoms = []
    synic.add_eom_listener(lambda: eoms.append("eom"))

    # Free slot: written, the SINT raised.
    assert synic.deliver_message(3, message(1))
    assert platform.interrupts == [(1, VECTOR + 3)]
    mtype, size, flags, sender, payload = slot(platform, 1, 3)
    assert (mtype, size, flags, sender) == (TIMER_TYPE, 24, 0, 0)
    assert struct.unpack("<IIQQ", payload) == (1, 0, 1, 1)

    # Busy slot: not written, MessagePending set, no interrupt.
    assert not synic.deliver_message(3, message(2))
    assert synic.post(3, message(2)) is Delivery.BUSY
    mtype, _size, flags, _sender, payload = slot(platform, 1, 3)
    assert mtype == TIMER_TYPE and flags == HV_MESSAGE_FLAG_PENDING
    assert struct.unpack("<IIQQ", payload)[0] == 1
    assert platform.interrupts == [(1, VECTOR + 3)]

    # The guest consumes it, sees MessagePending, writes EOM: the listener runs; the sender
    # retries and the new message arrives with MessagePending clear and one interrupt.
    assert guest_free_slot(platform, 1, 3)
    partition.msr_write(1, M.HV_X64_MSR_EOM, 0)
    assert eoms == ["eom"]
    assert synic.deliver_message(3, message(2))
    mtype, _size, flags, _sender, payload = slot(platform, 1, 3)
    assert (mtype, flags, struct.unpack("<IIQQ", payload)[0]) == (TIMER_TYPE, 0, 2)
    assert platform.interrupts == [(1, VECTOR + 3)] * 2
    assert slot(platform, 0, 3)[0] == 0  # other VP untouched


def test_message_type_is_written_last():
    partition, platform = make()
    enable(partition)
    page = platform.overlays[simp_gpa(0)]
    writes = []
    original = page.write
    page.write = lambda offset, data: (writes.append((offset, len(data))), original(offset, data))
    synic = partition.state["hv-synic"].synic(0)
    assert synic.deliver_message(0, build_message(0x1234, b"x" * 240))
    assert writes[-1] == (0, 4)
    assert sum(size for _offset, size in writes) == 256


def test_slot_freed_while_setting_pending_is_delivered_at_once():
    """The guest frees the slot between our look at MessageType and the MessagePending write, so
    it may not see the flag: the re-read after the locked OR catches it."""
    partition, platform = make()
    enable(partition)
    synic = partition.state["hv-synic"].synic(0)
    assert synic.deliver_message(0, message(1))
    page = platform.overlays[simp_gpa(0)]
    original = page.fetch_or_u8

    def guest_races(offset, mask):
        platform.guest_write(simp_gpa(0), bytes(4))  # the guest: MessageType = 0, no EOM yet
        return original(offset, mask)

    page.fetch_or_u8 = guest_races
    assert synic.deliver_message(0, message(2))
    assert slot(platform, 0, 0)[2] == 0  # delivered, flag clear
    assert struct.unpack("<IIQQ", slot(platform, 0, 0)[4])[0] == 2
    assert len(platform.interrupts) == 2


@pytest.mark.parametrize("setup, outcome", [
    ("scontrol_off", Delivery.SYNIC_DISABLED),
    ("simp_off", Delivery.PAGE_DISABLED),
    ("masked", Delivery.MASKED),
])
def test_message_refused_without_pending_flag(setup, outcome):
    partition, platform = make()
    enable(partition)
    if setup == "scontrol_off":
        partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 0)
    elif setup == "simp_off":
        partition.msr_write(0, M.HV_X64_MSR_SIMP, simp_gpa(0))
    else:
        partition.msr_write(0, M.HV_X64_MSR_SINT0, VECTOR | HV_SYNIC_SINT_MASKED)
    assert partition.state["hv-synic"].synic(0).post(0, message()) is outcome
    assert platform.interrupts == []
    if setup != "simp_off":
        assert platform.guest_read(simp_gpa(0), 16) == bytes(16)


def test_becoming_able_to_take_messages_calls_the_listeners():
    partition, _ = make()
    synic = partition.state["hv-synic"].synic(0)
    calls = []
    synic.add_eom_listener(lambda: calls.append(1))
    partition.msr_write(0, M.HV_X64_MSR_SINT0, VECTOR)  # unmasked
    partition.msr_write(0, M.HV_X64_MSR_SINT0, VECTOR)  # no change: no call
    partition.msr_write(0, M.HV_X64_MSR_SIMP, simp_gpa(0) | 1)
    partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 1)
    partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 1)
    assert len(calls) == 3


def test_polling_sint_gets_messages_and_events_without_interrupts():
    partition, platform = make()
    enable(partition, 0, {4: VECTOR | HV_SYNIC_SINT_MASKED | HV_SYNIC_SINT_POLLING})
    synic = partition.state["hv-synic"].synic(0)
    assert synic.deliver_message(4, message())
    assert synic.signal_event(4, 0)
    assert not synic.raise_sint(4)
    assert platform.interrupts == []


def test_listener_failure_is_logged_not_a_gp(caplog):
    partition, _ = make()
    enable(partition)
    synic = partition.state["hv-synic"].synic(0)
    calls = []

    def bad():
        raise RuntimeError("listener bug")

    synic.add_eom_listener(bad)
    synic.add_eom_listener(lambda: calls.append(1))
    partition.msr_write(0, M.HV_X64_MSR_EOM, 0)
    assert calls == [1] and partition.handler_failures == 0
    synic.remove_eom_listener(bad)
    partition.msr_write(0, M.HV_X64_MSR_EOM, 0)
    assert calls == [1, 1]


def test_bad_messages_are_programming_errors():
    partition, _ = make()
    enable(partition)
    synic = partition.state["hv-synic"].synic(0)
    with pytest.raises(ValueError):
        synic.deliver_message(0, bytes(16))  # HvMessageTypeNone
    with pytest.raises(ValueError):
        synic.deliver_message(0, message() + bytes(300))
    with pytest.raises(ValueError):
        synic.deliver_message(16, message())
    with pytest.raises(ValueError):
        build_message(1, bytes(241))


# -- event flags ----------------------------------------------------------------------------------


def test_event_flag_set_once_interrupt_only_on_0_to_1():
    partition, platform = make()
    enable(partition, 0, {9: VECTOR + 9})
    synic = partition.state["hv-synic"].synic(0)
    assert synic.signal_event(9, 2047)
    assert not synic.signal_event(9, 2047)  # already set: no interrupt
    assert synic.set_event_flag(9, 2047) is Delivery.BUSY
    assert platform.interrupts == [(0, VECTOR + 9)]
    byte = siefp_gpa(0) + 9 * 256 + 255
    assert platform.guest_read(byte, 1) == b"\x80"
    assert platform.fetch_or_calls[-1] == (byte, 0x80)  # a locked OR of exactly that byte
    platform.guest_write(byte, b"\x00")  # the guest consumes it
    assert synic.signal_event(9, 2047)
    assert len(platform.interrupts) == 2


def test_event_flag_keeps_the_guests_other_bits():
    partition, platform = make()
    enable(partition, 0, {0: VECTOR})
    synic = partition.state["hv-synic"].synic(0)
    for flag in (0, 1, 2):
        assert synic.signal_event(0, flag)
    platform.guest_write(siefp_gpa(0), b"\x05")  # the guest cleared flag 1
    assert synic.signal_event(0, 3)
    assert platform.guest_read(siefp_gpa(0), 1) == b"\x0d"  # flag 1 stays clear
    with pytest.raises(ValueError):
        synic.signal_event(0, 2048)


@pytest.mark.parametrize("setup, outcome", [
    ("scontrol_off", Delivery.SYNIC_DISABLED), ("siefp_off", Delivery.PAGE_DISABLED),
    ("masked", Delivery.MASKED)])
def test_event_refused(setup, outcome):
    partition, platform = make()
    enable(partition)
    if setup == "scontrol_off":
        partition.msr_write(0, M.HV_X64_MSR_SCONTROL, 0)
    elif setup == "siefp_off":
        partition.msr_write(0, M.HV_X64_MSR_SIEFP, 0)
    else:
        partition.msr_write(0, M.HV_X64_MSR_SINT0, VECTOR | HV_SYNIC_SINT_MASKED)
    assert partition.state["hv-synic"].synic(0).set_event_flag(0, 5) is outcome
    assert not partition.state["hv-synic"].synic(0).signal_event(0, 5)
    assert platform.interrupts == [] and platform.fetch_or_calls == []


def test_raise_sint():
    partition, platform = make()
    synic = partition.state["hv-synic"].synic(1)
    partition.msr_write(1, M.HV_X64_MSR_SINT0 + 2, VECTOR + 2)
    assert not synic.raise_sint(2)  # SCONTROL clear
    partition.msr_write(1, M.HV_X64_MSR_SCONTROL, 1)
    assert synic.raise_sint(2)
    assert not synic.raise_sint(3)  # masked
    platform.accept_interrupts = False
    assert not synic.raise_sint(2)  # the LAPIC refused it
    assert platform.interrupts == [(1, VECTOR + 2)]
    assert synic.sint_vector(2) == VECTOR + 2 and not synic.sint_masked(2)
    assert synic.sint_masked(3)


# -- AutoEOI --------------------------------------------------------------------------------------


def auto_eoi_setup(**platform_args):
    partition, platform = make(**platform_args)
    enable(partition, 0, {0: 0xB0, 3: 0xB3 | HV_SYNIC_SINT_AUTO_EOI})
    return partition, platform, partition.state["hv-synic"].synic(0)


def test_auto_eoi_clears_isr_after_the_lapic_took_the_vector():
    partition, platform, synic = auto_eoi_setup()
    assert synic.raise_sint(3)
    assert platform.lapic_bit(0, LAPIC_IRR, 0xB3)
    assert platform.accept_interrupt(0) == 0xB3  # the LAPIC injects it: IRR -> ISR
    assert platform.lapic_bit(0, LAPIC_ISR, 0xB3)
    [timer] = platform.pending_timers()
    assert timer.deadline_ns - timer.started_at_ns == AUTO_EOI_FIRST_DELAY_NS
    platform.advance_and_fire(seconds=0.001)  # timer -> run_on_vp -> check on the VP's thread
    assert not platform.lapic_bit(0, LAPIC_ISR, 0xB3)
    assert platform.lapic_edits == [(0, True)]
    assert platform.pending_timers() == [] and synic.auto_eoi.pending_vectors == ()
    assert synic.auto_eoi.cleared == 1


def test_explicit_eoi_sint_is_left_to_the_guest():
    partition, platform, synic = auto_eoi_setup()
    assert synic.raise_sint(0)
    assert platform.accept_interrupt(0) == 0xB0
    assert platform.pending_timers() == []
    platform.advance_and_fire(seconds=0.01)
    assert platform.lapic_bit(0, LAPIC_ISR, 0xB0)  # until the guest's EOI
    assert platform.guest_eoi(0) == 0xB0
    assert platform.lapic_edits == []


def test_auto_eoi_waits_while_the_vector_is_still_pending():
    partition, platform, synic = auto_eoi_setup()
    assert synic.deliver_message(3, message())
    delays = []
    for _ in range(12):  # IF = 0 in the guest: the vector stays in IRR
        [timer] = platform.pending_timers()
        delays.append(timer.deadline_ns - timer.started_at_ns)
        platform.advance_to_ns(timer.deadline_ns)
        platform.fire_due_timers()
    assert delays[0] == AUTO_EOI_FIRST_DELAY_NS and delays[1] == 2 * delays[0]
    assert max(delays) == AUTO_EOI_MAX_DELAY_NS
    assert all(written is False for _vp, written in platform.lapic_edits)
    assert platform.accept_interrupt(0) == 0xB3
    platform.advance_and_fire(seconds=0.02)
    assert not platform.lapic_bit(0, LAPIC_ISR, 0xB3) and platform.pending_timers() == []


def test_auto_eoi_vector_delivered_again_while_in_service():
    partition, platform, synic = auto_eoi_setup()
    assert synic.raise_sint(3)
    assert platform.accept_interrupt(0) == 0xB3
    assert synic.raise_sint(3)  # in IRR, blocked by its own ISR bit
    assert platform.accept_interrupt(0) is None
    platform.advance_and_fire(seconds=0.0001)  # ISR cleared, IRR still pending: keep checking
    assert not platform.lapic_bit(0, LAPIC_ISR, 0xB3) and synic.auto_eoi.pending_vectors == (0xB3,)
    assert platform.accept_interrupt(0) == 0xB3
    platform.advance_and_fire(seconds=0.001)
    assert platform.lapic_vectors(0, LAPIC_ISR) == [] and platform.pending_timers() == []


def test_auto_eoi_delivery_during_a_check_is_not_forgotten():
    partition, platform, synic = auto_eoi_setup()
    assert synic.raise_sint(3)
    assert platform.accept_interrupt(0) == 0xB3
    real_edit = platform.edit_lapic

    def edit_then_deliver(vp, edit):
        written = real_edit(vp, edit)
        synic.raise_sint(3)  # another thread delivers it again right after the read
        platform.accept_interrupt(0)
        return written

    platform.edit_lapic = edit_then_deliver
    platform.advance_and_fire(seconds=0.0001)
    platform.edit_lapic = real_edit
    assert platform.lapic_bit(0, LAPIC_ISR, 0xB3)  # the second one is in service now...
    platform.advance_and_fire(seconds=0.001)
    assert not platform.lapic_bit(0, LAPIC_ISR, 0xB3)  # ...and was EOI'd too


def test_auto_eoi_keeps_thousands_of_interrupts_flowing():
    partition, platform, synic = auto_eoi_setup()
    platform.run_vp_work_at_once = False
    taken = {0xB0: 0, 0xB3: 0}
    for i in range(3000):
        sint = 3 if i % 3 else 0
        assert synic.raise_sint(sint)
        vector = platform.accept_interrupt(0)
        assert vector == (0xB3 if sint else 0xB0), i
        taken[vector] += 1
        if vector == 0xB0:
            platform.guest_eoi(0)  # explicit EOI in the handler
        platform.advance_and_fire(seconds=0.0001)
        platform.run_vp_work()
        platform.timers = platform.pending_timers()  # forget fired timers (keeps the test fast)
    platform.advance_and_fire(seconds=0.01)
    platform.run_vp_work()
    assert taken == {0xB0: 1000, 0xB3: 2000}
    assert platform.lapic_vectors(0, LAPIC_ISR) == []
    assert synic.auto_eoi.cleared == 2000


def test_auto_eoi_on_a_lapic_that_never_sets_isr_only_reads():
    partition, platform, synic = auto_eoi_setup()
    platform.lapic_sets_isr = False  # the development host's quirk
    for _ in range(50):
        assert synic.raise_sint(3)
        assert platform.accept_interrupt(0) == 0xB3
        platform.advance_and_fire(seconds=0.001)
    assert platform.lapic_edits and all(not written for _vp, written in platform.lapic_edits)
    assert synic.auto_eoi.pending_vectors == ()


def test_auto_eoi_not_armed_when_the_lapic_refuses():
    partition, platform, synic = auto_eoi_setup()
    platform.accept_interrupts = False
    assert not synic.raise_sint(3)
    assert platform.pending_timers() == []


def test_lapic_bit_layout():
    page = bytearray(1024)
    from hvvmm.enlightenments.synic import lapic_clear, lapic_test

    page[APIC_ISR + 0x10 * 5 + 3] = 0x80  # vector 5*32 + 31 = 191
    assert lapic_test(page, APIC_ISR, 191) and not lapic_test(page, APIC_ISR, 190)
    lapic_clear(page, APIC_ISR, 191)
    assert page == bytearray(1024)


# -- threads --------------------------------------------------------------------------------------


def test_concurrent_senders():
    partition, platform = make(vp_count=2)
    enable(partition, 0, {s: 0x40 + s for s in range(16)})
    synic = partition.state["hv-synic"].synic(0)
    flags_set = []
    delivered = []

    def sender(n):
        for flag in range(n * 128, n * 128 + 128):
            if synic.signal_event(5, flag):
                flags_set.append(flag)
        if synic.deliver_message(n, message(n)):
            delivered.append(n)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(flags_set) == list(range(1024))
    assert platform.guest_read(siefp_gpa(0) + 5 * 256, 128) == b"\xff" * 128
    assert sorted(delivered) == list(range(8))
    assert len(platform.interrupts) == 1024 + 8


# -- hypothesis: guest-chosen register values never break the emulator ---------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(st.tuples(
    st.sampled_from([M.HV_X64_MSR_SCONTROL, M.HV_X64_MSR_SIMP, M.HV_X64_MSR_SIEFP,
                     M.HV_X64_MSR_EOM, M.HV_X64_MSR_SVERSION, M.HV_X64_MSR_SINT0,
                     M.HV_X64_MSR_SINT0 + 15]),
    st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 0x3FFFF),
              st.sampled_from([0x10000, 0x200B3, 0x4000F, 0x10, 0x0F, 0x20001, 0x21001])),
    st.integers(0, 1)), max_size=12))
def test_random_register_writes_never_raise_out(writes):
    partition, platform = make(mem_size=0x40000, max_gpa=1 << 36)
    for index, value, vp in writes:
        try:
            partition.msr_write(vp, index, value)
        except MsrAccessFault:
            continue
        if index not in (M.HV_X64_MSR_EOM,):
            assert partition.msr_read(vp, index) == value
    for vp in (0, 1):
        synic = partition.state["hv-synic"].synic(vp)
        for sint in (0, 15):
            synic.post(sint, message())
            synic.set_event_flag(sint, 100)
            synic.raise_sint(sint)
    assert partition.handler_failures == 0
    partition.reset()
    assert platform.overlays == {}


def test_attach_needs_the_interrupt_services():
    from hvvmm.enlightenments import AttachError

    platform = FakePlatform()
    platform.edit_lapic = None
    with pytest.raises(AttachError, match="hv-synic needs a platform with edit_lapic"):
        Partition(parse_hyperv_spec(SPEC), platform)


def test_kvm_overlay_fetch_or_is_one_locked_or():
    """The VMM's overlay (hvvmm.memslots.Overlay) ORs with one locked instruction on the page's
    host address (hvvmm.kvm.atomic_fetch_or_u8), so other bits of the byte are never written
    back stale; it returns the old byte."""
    from hvvmm.memslots import Overlay

    overlay = Overlay(0x5000, bytes(PAGE), False, "test")
    try:
        assert overlay.fetch_or_u8(300, 0x10) == 0
        assert overlay.fetch_or_u8(300, 0x81) == 0x10
        assert overlay.read(299, 3) == b"\x00\x91\x00"
        with pytest.raises(ValueError):
            overlay.fetch_or_u8(4096, 1)
    finally:
        overlay.close()
    with pytest.raises(ValueError, match="closed"):
        overlay.fetch_or_u8(0, 1)
