"""hvvmm.hv.msr: the synthetic MSR registry and its #GP rules; hvvmm.logonce's rate limiter."""

from __future__ import annotations

import logging

import pytest

from hvvmm.hv.hvdef import HV_X64_MSR_HYPERCALL, HV_X64_MSR_VP_INDEX
from hvvmm.hv.msr import MsrAccessFault, MsrRegistry, MsrRegistryError, SyntheticMsr
from hvvmm.logonce import LogOnce

U64 = (1 << 64) - 1


def make_registry() -> tuple[MsrRegistry, dict]:
    store = {"rw": 0}
    registry = MsrRegistry()
    registry.register(SyntheticMsr(HV_X64_MSR_VP_INDEX, "VP_INDEX", read=lambda vp: vp))
    registry.register(SyntheticMsr(
        HV_X64_MSR_HYPERCALL, "HYPERCALL", read=lambda vp: store["rw"],
        write=lambda vp, value: store.__setitem__("rw", value), reserved_mask=0xF0,
        scope="partition", owner="test"))
    return registry, store


def test_read_returns_the_handler_value():
    registry, _ = make_registry()
    assert registry.read(3, HV_X64_MSR_VP_INDEX) == 3


def test_write_goes_to_the_handler():
    registry, store = make_registry()
    registry.write(0, HV_X64_MSR_HYPERCALL, 0x1001)
    assert store["rw"] == 0x1001
    assert registry.read(1, HV_X64_MSR_HYPERCALL) == 0x1001


@pytest.mark.parametrize("write", [False, True])
def test_unregistered_msr_faults(write):
    registry, _ = make_registry()
    with pytest.raises(MsrAccessFault, match="not available") as info:
        if write:
            registry.write(0, 0x40000080, 1)
        else:
            registry.read(0, 0x40000080)
    assert info.value.index == 0x40000080
    assert info.value.write is write
    assert "HV_X64_MSR_SCONTROL" in str(info.value)


def test_read_only_write_faults_before_the_handler():
    registry, _ = make_registry()
    with pytest.raises(MsrAccessFault, match="read-only") as info:
        registry.write(0, HV_X64_MSR_VP_INDEX, 5)
    assert info.value.value == 5


def test_reserved_bits_fault_and_leave_state_alone():
    registry, store = make_registry()
    with pytest.raises(MsrAccessFault, match="reserved bits 0x10"):
        registry.write(0, HV_X64_MSR_HYPERCALL, 0x11)
    assert store["rw"] == 0


def test_handler_may_refuse():
    registry = MsrRegistry()

    def refuse(vp, value):
        raise MsrAccessFault(0x40000105, write=True, value=value, reason="no")

    registry.register(SyntheticMsr(0x40000105, "X", read=lambda vp: 0, write=refuse))
    with pytest.raises(MsrAccessFault, match="no"):
        registry.write(0, 0x40000105, 1)


def test_duplicate_registration_is_refused():
    registry, _ = make_registry()
    with pytest.raises(MsrRegistryError, match="already registered by test"):
        registry.register(SyntheticMsr(HV_X64_MSR_HYPERCALL, "again", read=lambda vp: 0))


def test_registry_listing():
    registry, _ = make_registry()
    assert registry.indices() == tuple(sorted((HV_X64_MSR_HYPERCALL, HV_X64_MSR_VP_INDEX)))
    assert HV_X64_MSR_VP_INDEX in registry and 0x10 not in registry
    assert [m.index for m in registry] == list(registry.indices())
    assert len(registry) == 2
    assert registry.get(HV_X64_MSR_VP_INDEX).read_only


@pytest.mark.parametrize("kwargs, message", [
    ({"index": 1 << 32}, "32-bit"),
    ({"scope": "cpu"}, "scope"),
    ({"reserved_mask": 1 << 64}, "reserved mask"),
    ({"read": None}, "callable"),
])
def test_bad_declarations(kwargs, message):
    args = {"index": 0x40000000, "name": "X", "read": lambda vp: 0, **kwargs}
    with pytest.raises(MsrRegistryError, match=message):
        SyntheticMsr(**args)


def test_bad_handler_value_is_a_type_error():
    registry = MsrRegistry()
    registry.register(SyntheticMsr(0x40000000, "X", read=lambda vp: -1))
    with pytest.raises(TypeError):
        registry.read(0, 0x40000000)


def test_non_u64_write_is_a_vmm_bug():
    registry, _ = make_registry()
    with pytest.raises(ValueError):
        registry.write(0, HV_X64_MSR_HYPERCALL, U64 + 1)


def test_log_once(caplog):
    limiter = LogOnce(logging.getLogger("test.logonce"), max_keys=2)
    with caplog.at_level(logging.DEBUG, logger="test.logonce"):
        assert limiter("a", logging.WARNING, "event %s", "a")
        assert not limiter("a", logging.WARNING, "event %s", "a")
        assert limiter("b", logging.WARNING, "event %s", "b")
        assert not limiter("c", logging.WARNING, "event %s", "c")  # over the key budget
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0] == (logging.WARNING, "event a (logged once)")
    assert levels[1] == (logging.DEBUG, "event a")
    assert (logging.WARNING, "event b (logged once)") in levels
    assert any("more than 2 distinct" in m for _, m in levels)
    assert levels[-1] == (logging.DEBUG, "event c")
    limiter.forget()
    with caplog.at_level(logging.DEBUG, logger="test.logonce"):
        assert limiter("a", logging.WARNING, "event %s", "a")
