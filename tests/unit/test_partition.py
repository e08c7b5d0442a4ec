"""hvvmm.hv.partition: MSR gating, hypercalls through the real dispatcher, tracing, counters,
reset, and the enlightenment declaration checks."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvvmm.enlightenments import REGISTRY, AttachError, Enlightenment, EnlightenmentRegistry
from hvvmm.enlightenments.core import HYPERCALL_PAGE
from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.hvdef import HvStatus, HypercallCode
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.partition import HYPERCALL_PORT, Partition, PartitionError, TraceEvent

try:
    from hvfakes import FAKE_APIC_HZ, FAKE_TSC_HZ, FakePlatform, FakeRegisters
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FAKE_APIC_HZ, FAKE_TSC_HZ, FakePlatform, FakeRegisters

GP = "#GP"
OK = "ok"
ANY = "any"
VP = 1
RUNTIME = 12345
LINUX_GUEST_OS_ID = hvdef.linux_guest_os_id(6, 1, 192)
FAST = hvdef.HV_HYPERCALL_FAST_BIT


def make_partition(spec: str | None = None, **platform_args) -> tuple[Partition, FakePlatform]:
    platform = FakePlatform(**platform_args)
    platform.runtime[VP] = RUNTIME
    return Partition(parse_hyperv_spec(spec), platform), platform


# -- the MSR gating table ------------------------------------------------------------------------
# (MSR, owning feature, operation, value written, expected). Operations: "read"; "write" a
# plausible value; "rsvd" = a write setting only RsvdP/reserved bits, which the TLFS says to
# preserve or ignore (no implemented MSR has RsvdZ bits, so none of these fault).
M = hvdef
GATING = [
    (M.HV_X64_MSR_GUEST_OS_ID, "hv-core", "read", None, 0),
    (M.HV_X64_MSR_GUEST_OS_ID, "hv-core", "write", LINUX_GUEST_OS_ID, OK),
    (M.HV_X64_MSR_HYPERCALL, "hv-core", "read", None, 0),
    (M.HV_X64_MSR_HYPERCALL, "hv-core", "write", 0x5000, OK),
    (M.HV_X64_MSR_HYPERCALL, "hv-core", "rsvd", 0xFFC, OK),
    (M.HV_X64_MSR_VP_ASSIST_PAGE, "hv-core", "read", None, 0),
    (M.HV_X64_MSR_VP_ASSIST_PAGE, "hv-core", "write", 0x7001, OK),
    (M.HV_X64_MSR_VP_INDEX, "hv-vpindex", "read", None, VP),
    (M.HV_X64_MSR_VP_INDEX, "hv-vpindex", "write", VP, GP),
    (M.HV_X64_MSR_VP_RUNTIME, "hv-runtime", "read", None, RUNTIME),
    (M.HV_X64_MSR_VP_RUNTIME, "hv-runtime", "write", 0, GP),
    (M.HV_X64_MSR_TIME_REF_COUNT, "hv-time", "read", None, ANY),
    (M.HV_X64_MSR_TIME_REF_COUNT, "hv-time", "write", 0, GP),
    (M.HV_X64_MSR_REFERENCE_TSC, "hv-time", "read", None, 0),
    (M.HV_X64_MSR_REFERENCE_TSC, "hv-time", "write", 0x6001, OK),
    (M.HV_X64_MSR_REFERENCE_TSC, "hv-time", "rsvd", 0xFFE, OK),
    (M.HV_X64_MSR_TSC_FREQUENCY, "hv-frequencies", "read", None, FAKE_TSC_HZ),
    (M.HV_X64_MSR_TSC_FREQUENCY, "hv-frequencies", "write", FAKE_TSC_HZ, GP),
    (M.HV_X64_MSR_APIC_FREQUENCY, "hv-frequencies", "read", None, FAKE_APIC_HZ),
    (M.HV_X64_MSR_APIC_FREQUENCY, "hv-frequencies", "write", 1, GP),
    (M.HV_X64_MSR_RESET, "hv-reset", "read", None, 0),
    (M.HV_X64_MSR_RESET, "hv-reset", "write", 0, OK),
    (M.HV_X64_MSR_RESET, "hv-reset", "rsvd", 0xFFFF_FFFF_FFFF_FFFE, OK),
    (M.HV_X64_MSR_GUEST_IDLE, "hv-idle", "read", None, 0),
    (M.HV_X64_MSR_GUEST_IDLE, "hv-idle", "write", 0, GP),
    *((M.HV_X64_MSR_CRASH_P0 + n, "hv-crash", op, value, expected)
      for n in range(5)
      for op, value, expected in (("read", None, 0), ("write", 0xDEAD, OK))),
    (M.HV_X64_MSR_CRASH_CTL, "hv-crash", "read", None, (1 << 63) | (1 << 62)),
    (M.HV_X64_MSR_CRASH_CTL, "hv-crash", "write", 0, OK),
    (M.HV_X64_MSR_CRASH_CTL, "hv-crash", "rsvd", (1 << 62) - 1, OK),
]
# Known synthetic MSRs hvvmm does not implement yet, and unassigned ones: #GP in every config.
# (STIMERn: tests/unit/test_stimer.py.)
NOT_IMPLEMENTED_MSRS = [
    M.HV_X64_MSR_EOI, M.HV_X64_MSR_ICR, M.HV_X64_MSR_TPR, M.HV_X64_MSR_SIRBP,
    M.HV_X64_MSR_SYNDBG_CONTROL, M.HV_X64_MSR_SYNDBG_OPTIONS,
    M.HV_X64_MSR_REENLIGHTENMENT_CONTROL, M.HV_X64_MSR_TSC_EMULATION_STATUS,
    M.HV_X64_MSR_STIME_UNHALTED_TIMER_CONFIG, M.HV_X64_MSR_TSC_INVARIANT_CONTROL,
    M.HV_X64_MSR_NESTED_SCONTROL, 0x40000004, 0x400001FF, 0x40001000,
]


def _spec(feature: str, advertised: bool) -> str:
    if feature in ("hv-core",):
        return "minimal"
    if feature == "hv-vpindex":
        return "minimal" if advertised else "hv-relaxed"
    if advertised:
        return f"minimal,{feature}"
    # "all" minus the feature and whatever requires it (hv-time off takes hv-stimer with it).
    off = [feature]
    for _ in REGISTRY.names():  # enough rounds for any chain of requirements
        off += [e.name for e in REGISTRY if e.name not in off and set(e.requires) & set(off)]
    return "all," + ",".join(f"{name}=off" for name in off)


def _access(partition: Partition, index: int, op: str, value: int | None):
    if op == "read":
        return partition.msr_read(VP, index)
    partition.msr_write(VP, index, value)
    return OK


# The core is on whenever Hyper-V is on, so it has no "not advertised" case.
GATING_CASES = [(*row, advertised) for row in GATING for advertised in (True, False)
                if advertised or row[1] != "hv-core"]


@pytest.mark.parametrize(
    "index, feature, op, value, expected, advertised", GATING_CASES,
    ids=[f"{hvdef.msr_name(c[0])}-{c[2]}-{'on' if c[5] else 'off'}" for c in GATING_CASES])
def test_msr_gating(index, feature, op, value, expected, advertised):
    partition, platform = make_partition(_spec(feature, advertised))
    platform.advance(seconds=1)
    if not advertised:
        expected = GP
    if expected == GP:
        with pytest.raises(MsrAccessFault):
            _access(partition, index, op, value)
        assert sum(partition.vps[VP].msr_faults.values()) == 1
    else:
        result = _access(partition, index, op, value)
        if expected == ANY:
            assert isinstance(result, int)
        else:
            assert result == expected
        if op != "read":  # what was written reads back (RsvdP preserved) unless write-only
            if index in (M.HV_X64_MSR_RESET, M.HV_X64_MSR_CRASH_CTL):
                assert partition.msr_read(VP, index) in (0, (1 << 63) | (1 << 62))
            else:
                assert partition.msr_read(VP, index) == value
    assert partition.handler_failures == 0


@pytest.mark.parametrize("spec", ["minimal", "all"])
@pytest.mark.parametrize("index", NOT_IMPLEMENTED_MSRS, ids=hvdef.msr_name)
def test_unimplemented_msrs_fault(spec, index):
    partition, _ = make_partition(spec)
    with pytest.raises(MsrAccessFault, match="not available"):
        partition.msr_read(0, index)
    with pytest.raises(MsrAccessFault, match="not available"):
        partition.msr_write(0, index, 0)


def test_msr_indices_are_exactly_the_enabled_features():
    partition, _ = make_partition("minimal")
    assert partition.msr_indices() == (M.HV_X64_MSR_GUEST_OS_ID, M.HV_X64_MSR_HYPERCALL,
                                       M.HV_X64_MSR_VP_INDEX, M.HV_X64_MSR_VP_ASSIST_PAGE)
    everything, _ = make_partition("all")
    expected = set()
    for name in everything.attached:
        expected |= set(REGISTRY[name].msrs)
    assert set(everything.msr_indices()) == expected
    assert Partition.msr_filter_ranges() == ((0x40000000, 0x400001FF), (0x40001000, 0x400010FF))


# Fuzz: random indices (mostly synthetic), values and VPs never raise anything but a #GP.
msr_indices = st.one_of(
    st.sampled_from(sorted(hvdef.SYNTHETIC_MSR_NAMES)),
    st.integers(0x40000000, 0x400001FF),
    st.integers(0x40001000, 0x400010FF),
    st.integers(0, 0xFFFF_FFFF),
)
msr_ops = st.lists(st.tuples(st.booleans(), msr_indices, st.integers(0, (1 << 64) - 1),
                             st.integers(0, 1)), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=msr_ops)
def test_random_msr_accesses_only_ever_fault(ops):
    partition, platform = make_partition("all", max_gpa=1 << 36)
    for write, index, value, vp in ops:
        platform.advance(ticks=value & 0xFFFFF)
        try:
            if write:
                partition.msr_write(vp, index, value)
            else:
                assert 0 <= partition.msr_read(vp, index) < 1 << 64
        except MsrAccessFault:
            pass
    assert partition.handler_failures == 0
    partition.reset()
    assert platform.overlays == {}


# -- hypercalls through the real dispatcher ----------------------------------------------------


def enable_page(partition: Partition, gpa: int = 0x5000) -> None:
    partition.msr_write(0, M.HV_X64_MSR_GUEST_OS_ID, LINUX_GUEST_OS_ID)
    partition.msr_write(0, M.HV_X64_MSR_HYPERCALL, gpa | 1)


def test_port_is_a_hypercall_only_while_the_page_is_enabled():
    partition, platform = make_partition("minimal")
    assert HYPERCALL_PORT < 0x100
    assert not partition.hypercall_port_active()
    enable_page(partition)
    assert partition.hypercall_port_active()
    assert partition.hypercall_page_gpa == 0x5000
    assert platform.guest_read(0x5000, 7) == bytes.fromhex("f30f1efae6") + bytes(
        [HYPERCALL_PORT, 0xC3])
    partition.msr_write(0, M.HV_X64_MSR_HYPERCALL, 0x5000)
    assert not partition.hypercall_port_active()


@pytest.mark.parametrize("long_mode", [True, False])
def test_notify_long_spin_wait_yields(long_mode):
    partition, platform = make_partition("minimal,hv-spinlocks=0xfff")
    enable_page(partition)
    io = FakeRegisters(long_mode=long_mode)
    io.set_call(HypercallCode.HvCallNotifyLongSpinWait | FAST, 0x1000, 0)
    outcome = partition.hypercall(VP, io)
    assert outcome.status == HvStatus.HV_STATUS_SUCCESS
    assert io.result() == 0
    assert platform.yields == [VP]
    # memory form too (TLFS: simple call with an 8-byte input)
    platform.memory.write_u64(0x2000, 0xFFF)
    io.set_call(HypercallCode.HvCallNotifyLongSpinWait, 0x2000, 0)
    assert partition.hypercall(VP, io).status == 0
    assert platform.yields == [VP, VP]
    assert partition.vps[VP].hypercalls[(HypercallCode.HvCallNotifyLongSpinWait, 0)] == 2


def test_unimplemented_hypercall_is_invalid_code():
    partition, _ = make_partition("all")
    io = FakeRegisters()
    io.set_call(HypercallCode.HvCallPostDebugData, 0x1000, 0x2000)
    outcome = partition.hypercall(0, io)
    assert outcome.status == HvStatus.HV_STATUS_INVALID_HYPERCALL_CODE
    io.set_call(HypercallCode.HvCallGetPartitionId, 0x1000, 0x2000)
    assert partition.hypercall(0, io).status == HvStatus.HV_STATUS_INVALID_HYPERCALL_CODE


def test_user_mode_hypercall_is_ud():
    partition, _ = make_partition("minimal")
    io = FakeRegisters(cpl=3)
    io.set_call(HypercallCode.HvCallNotifyLongSpinWait | FAST, 0, 0)
    before = io.snapshot()
    outcome = partition.hypercall(0, io)
    assert outcome.inject_ud and io.snapshot() == before
    assert partition.vps[0].hypercalls[(HypercallCode.HvCallNotifyLongSpinWait, None)] == 1


# -- tracing and counters --------------------------------------------------------------------------


def test_trace_events():
    events: list[TraceEvent] = []
    platform = FakePlatform()
    partition = Partition(parse_hyperv_spec("minimal"), platform, on_event=events.append)
    enable_page(partition)
    partition.msr_read(1, M.HV_X64_MSR_VP_INDEX)
    with pytest.raises(MsrAccessFault):
        partition.msr_write(1, M.HV_X64_MSR_VP_INDEX, 7)
    io = FakeRegisters()
    io.set_call(HypercallCode.HvCallNotifyLongSpinWait | FAST, 5, 0)
    partition.hypercall(1, io)
    kinds = [(e.kind, e.name, e.vp) for e in events]
    assert kinds == [("msr_write", "HV_X64_MSR_GUEST_OS_ID", 0),
                     ("msr_write", "HV_X64_MSR_HYPERCALL", 0),
                     ("msr_read", "HV_X64_MSR_VP_INDEX", 1),
                     ("msr_write", "HV_X64_MSR_VP_INDEX", 1),
                     ("hypercall", "HvCallNotifyLongSpinWait", 1)]
    assert events[2].result == {"value": "0x1"}
    assert events[3].result == {"fault": "#GP", "reason": "read-only"}
    assert events[3].inputs == {"value": "0x7"}
    assert events[4].result["status"] == "HV_STATUS_SUCCESS"
    assert events[4].inputs["fast"] is True
    decoded = json.loads(events[4].to_json())
    assert decoded["number"] == "0x8" and decoded["kind"] == "hypercall"
    assert all(e.time >= 0 for e in events)


def test_a_failing_trace_callback_does_not_hurt_the_guest():
    def broken(event):
        raise RuntimeError("observer bug")

    partition = Partition(parse_hyperv_spec("minimal"), FakePlatform(), on_event=broken)
    assert partition.msr_read(1, M.HV_X64_MSR_VP_INDEX) == 1
    assert partition.msr_read(1, M.HV_X64_MSR_VP_INDEX) == 1


def test_counters():
    partition, _ = make_partition("minimal")
    for _ in range(3):
        partition.msr_read(0, M.HV_X64_MSR_VP_INDEX)
    with pytest.raises(MsrAccessFault):
        partition.msr_read(0, M.HV_X64_MSR_SCONTROL)
    partition.msr_write(1, M.HV_X64_MSR_GUEST_OS_ID, 1)
    counters = partition.counters()
    assert counters["vp0"]["msr_reads"] == {"HV_X64_MSR_VP_INDEX": 3}
    assert counters["vp0"]["msr_faults"] == {"HV_X64_MSR_SCONTROL/read": 1}
    assert counters["vp1"]["msr_writes"] == {"HV_X64_MSR_GUEST_OS_ID": 1}
    json.dumps(counters)


# -- reset ---------------------------------------------------------------------------------------


def test_reset_restores_every_msr_and_removes_every_overlay():
    partition, platform = make_partition("all")
    platform.memory.write(0x5000, b"RAM under the hypercall page")
    platform.memory.write(0x6000, b"RAM under the TSC page")
    enable_page(partition)
    partition.msr_write(0, M.HV_X64_MSR_HYPERCALL, 0x5003)  # lock it
    partition.msr_write(0, M.HV_X64_MSR_REFERENCE_TSC, 0x6001)
    partition.msr_write(1, M.HV_X64_MSR_VP_ASSIST_PAGE, 0x7001)
    partition.msr_write(0, M.HV_X64_MSR_CRASH_P2, 0x42)
    assert len(platform.overlays) == 2
    partition.reset()
    assert platform.overlays == {}
    assert platform.memory.read(0x5000, 28) == b"RAM under the hypercall page"
    assert platform.memory.read(0x6000, 22) == b"RAM under the TSC page"
    assert not partition.hypercall_port_active()
    for index in (M.HV_X64_MSR_GUEST_OS_ID, M.HV_X64_MSR_HYPERCALL, M.HV_X64_MSR_REFERENCE_TSC,
                  M.HV_X64_MSR_CRASH_P2):
        assert partition.msr_read(0, index) == 0, hvdef.msr_name(index)
    assert partition.msr_read(1, M.HV_X64_MSR_VP_ASSIST_PAGE) == 0
    enable_page(partition, 0x8000)  # Locked is gone after the reset
    assert partition.hypercall_page_gpa == 0x8000


# -- construction and declarations -------------------------------------------------------------


def test_hyperv_off_has_no_partition():
    with pytest.raises(PartitionError, match="Hyper-V is off"):
        Partition(parse_hyperv_spec("none"), FakePlatform())


def test_every_implemented_feature_registers_exactly_what_it_declares():
    partition, _ = make_partition("all")  # Partition checks this for each attach
    assert set(partition.attached) == {e.name for e in REGISTRY.implemented()}
    claimed = {code for e in REGISTRY.implemented() for code in e.hypercalls}
    assert {spec.code for spec in partition.hypercalls} == claimed


def test_cpuid_leaves_match_the_config():
    partition, _ = make_partition("linux")
    features = [e for e in partition.cpuid_leaves() if e.function == 0x40000003][0]
    assert (features.eax, features.ebx, features.edx) == (0xE6E, 0x100030, 0xC0520)


def _registry_with(extra: Enlightenment) -> EnlightenmentRegistry:
    return EnlightenmentRegistry([*REGISTRY, extra])


def test_undeclared_registration_is_refused():
    def sneaky(partition):
        partition.register_msr(0x40000118, read=lambda vp: 0)

    registry = _registry_with(Enlightenment("hv-sneaky", "s", "x", sneaky))
    with pytest.raises(PartitionError, match="registers HV_X64_MSR_TSC_INVARIANT_CONTROL .* "
                                             "without declaring it"):
        Partition(parse_hyperv_spec("minimal,hv-sneaky", registry=registry), FakePlatform(),
                  registry=registry)


def test_declared_but_unregistered_is_refused():
    registry = _registry_with(Enlightenment("hv-lazy", "l", "x", lambda partition: None,
                                            msrs=(0x40000118,)))
    with pytest.raises(PartitionError, match="hv-lazy registered MSRs"):
        Partition(parse_hyperv_spec("minimal,hv-lazy", registry=registry), FakePlatform(),
                  registry=registry)


def test_registration_outside_attach_is_refused():
    partition, _ = make_partition("minimal")
    with pytest.raises(PartitionError, match="only for an enlightenment's attach"):
        partition.register_msr(0x40000118, read=lambda vp: 0)


def test_a_crashing_handler_becomes_a_gp_and_is_counted(caplog):
    def attach(partition):
        def read(vp):
            raise RuntimeError("handler bug")

        partition.register_msr(0x40000118, read=read, write=lambda vp, value: 1 // 0)

    registry = _registry_with(Enlightenment("hv-buggy", "b", "x", attach, msrs=(0x40000118,)))
    partition = Partition(parse_hyperv_spec("minimal,hv-buggy", registry=registry),
                          FakePlatform(), registry=registry)
    with pytest.raises(MsrAccessFault, match="internal error in the handler"):
        partition.msr_read(0, 0x40000118)
    with pytest.raises(MsrAccessFault, match="ZeroDivisionError"):
        partition.msr_write(0, 0x40000118, 1)
    assert partition.handler_failures == 2
    assert "handler bug" in caplog.text


@pytest.mark.parametrize("spec, platform_args, message", [
    ("minimal,hv-frequencies", {"tsc_frequency_hz": 0}, "hv-frequencies needs the TSC"),
    ("minimal,hv-time", {"tsc_frequency_hz": 5_000_000}, "hv-time cannot work"),
])
def test_attach_errors_name_the_feature(spec, platform_args, message):
    with pytest.raises(AttachError, match=message):
        make_partition(spec, **platform_args)


def test_bad_vp_index_is_a_vmm_bug():
    partition, _ = make_partition("minimal")
    with pytest.raises(ValueError, match="VP index 7"):
        partition.msr_read(7, M.HV_X64_MSR_VP_INDEX)


def test_emulator_imports_nothing_kvm_related():
    # In a fresh interpreter: other test files may have imported the KVM layer already.
    code = ("import sys, hvvmm.hv.partition, hvvmm.hv.features, hvvmm.hv.platform, "
            "hvvmm.hv.msr, hvvmm.cpuid, hvvmm.enlightenments; "
            "bad = [m for m in sys.modules if m.startswith(('hvvmm.kvm', 'hvvmm._kvm', 'cffi', "
            "'fcntl', 'hvvmm.vcpu', 'hvvmm.machine'))]; "
            "sys.exit(repr(bad) if bad else 0)")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_page_constant():
    assert len(HYPERCALL_PAGE) == 4096
    assert HYPERCALL_PAGE[:7] == struct.pack("<IBBB", 0xFA1E0FF3, 0xE6, HYPERCALL_PORT, 0xC3)
    assert set(HYPERCALL_PAGE[7:]) == {0xCC}


# -- locking: the platform is never called with an emulator lock held ---------------------------


def test_no_emulator_lock_is_held_across_platform_calls():
    # The KVM platform parks every other vCPU to change memslots; a vCPU blocked on an emulator
    # lock would never park (deadlock). So overlay calls must see every emulator lock free.
    platform = FakePlatform()
    partition = Partition(parse_hyperv_spec("all"), platform)
    locks = [partition.lock, partition.state["hv-core"].lock, partition.state["hv-time"].lock,
             partition.reference_clock._lock]
    checked = []

    def check(name):
        def wrapper(*args, **kwargs):
            for lock in locks:
                assert lock.acquire(blocking=False), f"{name} called with an emulator lock held"
                lock.release()
            checked.append(name)
            return original[name](*args, **kwargs)
        return wrapper

    original = {name: getattr(platform, name) for name in
                ("map_overlay", "unmap_overlay", "read_guest_tsc", "report_crash")}
    for name in original:
        setattr(platform, name, check(name))
    enable_page(partition)
    partition.msr_write(0, M.HV_X64_MSR_REFERENCE_TSC, 0x6001)
    partition.msr_write(0, M.HV_X64_MSR_REFERENCE_TSC, 0x7001)
    partition.msr_read(0, M.HV_X64_MSR_TIME_REF_COUNT)
    partition.msr_write(0, M.HV_X64_MSR_CRASH_CTL, 1 << 63)
    partition.msr_write(0, M.HV_X64_MSR_GUEST_OS_ID, 0)
    partition.reset()
    assert {"map_overlay", "unmap_overlay", "read_guest_tsc", "report_crash"} <= set(checked)


def test_overlay_slot_linearizes_racing_changes():
    from hvvmm.hv.platform import OverlaySlot

    platform = FakePlatform()
    slot = OverlaySlot(platform, "test page")
    content = bytes(4096)
    commits = []
    original_map = platform.map_overlay

    # Another VP removes the overlay while ours is being mapped: the removal started later, so
    # it wins; our page is unmapped again and our commit never runs.
    def racing_map(gpa, data, **kwargs):
        page = original_map(gpa, data, **kwargs)
        slot.remove(commit=lambda: commits.append("remove"))
        return page

    platform.map_overlay = racing_map
    slot.place(0x5000, content, commit=lambda: commits.append("place"))
    assert slot.page is None and platform.overlays == {}
    assert commits == ["remove"]

    # Without a race: placed, moved (new page in before the old goes), kept, removed.
    platform.map_overlay = original_map
    slot.place(0x5000, content, commit=lambda: commits.append("place"))
    slot.place(0x9000, content)
    assert slot.gpa == 0x9000 and list(platform.overlays) == [0x9000]
    assert [entry[:2] for entry in platform.overlay_log[-3:]] == [
        ("map", 0x5000), ("map", 0x9000), ("unmap", 0x5000)]
    slot.place(0x9000, content, commit=lambda: commits.append("same"))
    assert commits[-1] == "same" and platform.overlay_log[-1][:2] == ("unmap", 0x5000)
    slot.remove()
    assert slot.page is None and platform.overlays == {}


def test_harness_hypercalls_go_through_the_dispatcher():
    from hvvmm.hv.hypercall import HypercallResult, HypercallSpec, HypercallTableError

    partition, _ = make_partition("minimal")
    partition.add_test_hypercall(HypercallSpec(code=0x7F00, name="TestEcho",
                                               handler=lambda request: HypercallResult()))
    with pytest.raises(HypercallTableError):
        partition.add_test_hypercall(HypercallSpec(code=0x7F00, handler=lambda request: None))
    with pytest.raises(HypercallTableError):  # a code an enlightenment already answers
        partition.add_test_hypercall(HypercallSpec(code=0x8001, handler=lambda request: None))


def test_a_guest_sweeping_hypercall_codes_grows_neither_counters_nor_log_memory():
    partition, _ = make_partition("minimal")
    for code in range(0x7000, 0x7000 + 3000):
        regs = FakeRegisters(gprs={"rcx": code, "rdx": 0, "r8": 0})
        outcome = partition.hypercall(0, regs)
        assert outcome.status == HvStatus.HV_STATUS_INVALID_HYPERCALL_CODE
    counters = partition.counters()["vp0"]["hypercalls"]
    assert counters == {"unknown codes/HV_STATUS_INVALID_HYPERCALL_CODE": 3000}
    assert len(partition.log_once._seen) <= 1024


def test_sweeps_of_unnamed_codes_and_msrs_leave_later_warnings_audible(caplog):
    # Each sweep spends one log-once key, so a new cause afterwards is still a WARNING.
    partition, _ = make_partition("minimal")
    for code in range(0x7000, 0x7000 + 3000):
        partition.hypercall(0, FakeRegisters(gprs={"rcx": code, "rdx": 0, "r8": 0}))
    for index in range(0x40000120, 0x40000200):  # no MSR of this range has a TLFS name
        with pytest.raises(MsrAccessFault):
            partition.msr_read(0, index)
    assert len(partition.log_once._seen) <= 2
    with caplog.at_level(logging.WARNING):
        with pytest.raises(MsrAccessFault):
            partition.msr_write(0, hvdef.HV_X64_MSR_VP_INDEX, 1)  # read-only
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and "HV_X64_MSR_VP_INDEX" in r.getMessage()]


# -- reads of MSRs that cannot change (CONSTANT_MSRS) -----------------------------------------


def test_constant_msrs_are_read_once_through_the_registry_then_counted_and_traced_alike():
    from dataclasses import replace

    from hvvmm.hv.partition import CONSTANT_MSRS

    events = []
    partition, _ = make_partition("minimal,hv-frequencies")
    partition.on_event = lambda event: events.append(event.to_dict())
    handler_calls = []
    for index in (*CONSTANT_MSRS, hvdef.HV_X64_MSR_GUEST_OS_ID):
        msr = partition.msrs._msrs[index]  # count the registry's handler calls
        partition.msrs._msrs[index] = replace(
            msr, read=lambda vp, read=msr.read, index=index: handler_calls.append((vp, index))
            or read(vp))
    expected = {hvdef.HV_X64_MSR_VP_INDEX: 1, hvdef.HV_X64_MSR_TSC_FREQUENCY: FAKE_TSC_HZ,
                hvdef.HV_X64_MSR_APIC_FREQUENCY: FAKE_APIC_HZ, hvdef.HV_X64_MSR_GUEST_OS_ID: 0}
    for _ in range(3):
        for index, value in expected.items():
            assert partition.msr_read(1, index) == value
    # The constant ones reached their handler once, GUEST_OS_ID every time.
    assert sorted(handler_calls) == sorted([(1, index) for index in CONSTANT_MSRS]
                                           + [(1, hvdef.HV_X64_MSR_GUEST_OS_ID)] * 3)
    reads = partition.counters()["vp1"]["msr_reads"]
    assert reads == {hvdef.msr_name(index): 3 for index in expected}
    for event in events:
        del event["time"]
    assert events == [{"vp": 1, "kind": "msr_read", "number": f"{index:#x}",
                       "name": hvdef.msr_name(index), "inputs": {},
                       "result": {"value": f"{value:#x}"}}
                      for _ in range(3) for index, value in expected.items()]
    # Each VP has its own: VP 0 reads its own index.
    assert partition.msr_read(0, hvdef.HV_X64_MSR_VP_INDEX) == 0


def test_a_constant_msr_that_faults_is_not_cached():
    partition, _ = make_partition("minimal")  # no hv-frequencies: TSC_FREQUENCY #GPs
    for _ in range(2):
        with pytest.raises(MsrAccessFault):
            partition.msr_read(0, hvdef.HV_X64_MSR_TSC_FREQUENCY)
    counters = partition.counters()["vp0"]
    assert counters["msr_faults"] == {"HV_X64_MSR_TSC_FREQUENCY/read": 2}
    assert partition.vps[0].constant_msrs == {}
