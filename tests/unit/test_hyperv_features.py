"""hvvmm.hv.features (``--hyperv`` specs) and the enlightenment registry."""

from __future__ import annotations

import pytest

from hvvmm.enlightenments import (
    REGISTRY,
    CpuidBits,
    Enlightenment,
    EnlightenmentRegistry,
    EnlightenmentRegistryError,
    join_names,
    privileges,
)
from hvvmm.hv.features import (
    PRESETS,
    HvVersion,
    HyperVConfig,
    HyperVConfigError,
    parse_hyperv_spec,
)
from hvvmm.hv.hvdef import (
    HV_SPINLOCK_NEVER_NOTIFY,
    HV_X64_MSR_GUEST_OS_ID,
    HV_X64_MSR_VP_INDEX,
    HvPartitionPrivilege,
    HypercallCode,
)

IMPLEMENTED = {"hv-relaxed", "hv-vpindex", "hv-runtime", "hv-time", "hv-frequencies", "hv-reset",
               "hv-crash", "hv-idle", "hv-ext-hypercalls", "hv-xmm-input", "hv-synic", "hv-ipi",
               "hv-tlbflush", "hv-tlbflush-ext", "hv-stimer", "hv-stimer-direct"}
# hv-vapic is declared but refused (its own message; tests/unit/test_vapic.py).
NOT_IMPLEMENTED = ["hv-evmcs", "hv-syndbg", "hv-reenlightenment"]


def _noop(partition):
    return None


# -- presets and defaults -----------------------------------------------------------------------


def test_default_is_everything_implemented():
    for spec in (None, "", "  "):
        config = parse_hyperv_spec(spec)
        assert config.enabled
        assert config.features == IMPLEMENTED
        assert config.spinlock_retries == HV_SPINLOCK_NEVER_NOTIFY
        assert config.vendor_id == "Microsoft Hv"
        assert config.version == HvVersion(0x3839, 10, 0)
        assert config.warnings == ()


def test_registry_knows_what_is_implemented():
    assert REGISTRY.selectable_implemented() == IMPLEMENTED
    assert {e.name for e in REGISTRY.always_on()} == {"hv-core", "hv-spinlocks"}


@pytest.mark.parametrize("preset, expected", [
    ("none", set()),
    ("off", set()),
    ("minimal", {"hv-vpindex"}),
    ("linux", {"hv-vpindex", "hv-time", "hv-frequencies", "hv-crash", "hv-relaxed", "hv-idle",
               "hv-ext-hypercalls", "hv-synic", "hv-stimer", "hv-stimer-direct", "hv-ipi",
               "hv-tlbflush"}),
    ("windows", {"hv-relaxed", "hv-vpindex", "hv-runtime", "hv-time", "hv-frequencies",
                 "hv-crash", "hv-idle", "hv-ext-hypercalls", "hv-synic", "hv-stimer", "hv-ipi",
                 "hv-tlbflush"}),
    ("all", IMPLEMENTED),
    ("max", IMPLEMENTED),
])
def test_presets(preset, expected):
    config = parse_hyperv_spec(preset)
    assert config.features == expected
    assert config.enabled == bool(expected)
    assert config.warnings == ()


def test_presets_only_name_implemented_features():
    for name, features in PRESETS.items():
        assert features <= IMPLEMENTED, name


def test_none_is_hyperv_off():
    config = parse_hyperv_spec("none")
    assert not config.enabled
    assert config.active() == frozenset()
    assert config.describe() == "none"
    assert HyperVConfig.off().enabled is False


# -- flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["hv-relaxed,hv-vpindex", "hv_relaxed,hv_vpindex",
                                  "HV-Relaxed, hv-vpindex=on", "hv-relaxed=yes,hv-vpindex=true",
                                  "hv-vpindex,hv-relaxed,"])
def test_flag_spellings(spec):
    config = parse_hyperv_spec(spec)
    assert config.enabled
    assert config.features == {"hv-relaxed", "hv-vpindex"}


def test_off_subtracts_from_a_preset():
    config = parse_hyperv_spec("all,hv-reset=off,hv_xmm_input=no")
    assert config.features == IMPLEMENTED - {"hv-reset", "hv-xmm-input"}


def test_left_to_right():
    assert parse_hyperv_spec("hv-crash,minimal").features == {"hv-vpindex"}
    assert parse_hyperv_spec("minimal,hv-crash").features == {"hv-vpindex", "hv-crash"}
    assert not parse_hyperv_spec("linux,none").enabled
    assert parse_hyperv_spec("none,hv-vpindex").features == {"hv-vpindex"}


def test_aliases():
    assert parse_hyperv_spec("hv-guest-idle,hv-vpindex").has("hv-idle")
    assert parse_hyperv_spec("hv-extended-hypercalls,hv-vpindex").has("hv_ext_hypercalls")


def test_passthrough_is_everything_implemented():
    assert parse_hyperv_spec("hv-passthrough").features == IMPLEMENTED
    assert parse_hyperv_spec("hv-passthrough=on,hv-reset=off").features == IMPLEMENTED - {
        "hv-reset"}


def test_spinlocks():
    config = parse_hyperv_spec("minimal,hv-spinlocks=0xfff")
    assert config.spinlock_retries == 0xFFF
    assert parse_hyperv_spec("minimal,hv-spinlocks=4095").spinlock_retries == 0xFFF
    assert parse_hyperv_spec("minimal,hv-spinlocks=0xffffffff").spinlock_retries == 0xFFFF_FFFF
    # A value option alone switches Hyper-V on (core only), as in QEMU.
    alone = parse_hyperv_spec("hv-spinlocks=0x2000")
    assert alone.enabled and alone.features == frozenset()


def test_vendor_and_version():
    config = parse_hyperv_spec("minimal,hv-vendor-id=KVMKVMKVM,hv-version-id-build=0x1bbc,"
                               "hv-version-id-major=6,hv-version-id-minor=1")
    assert config.vendor_id == "KVMKVMKVM"
    assert config.version == HvVersion(build=0x1BBC, major=6, minor=1)
    assert config.version.cpuid() == (0x1BBC, 0x0006_0001, 0, 0)
    assert any("Linux ignores every enlightenment" in w for w in config.warnings)


def test_enforce_cpuid_is_accepted():
    config = parse_hyperv_spec("minimal,hv-enforce-cpuid")
    assert config.enforce_cpuid and config.features == {"hv-vpindex"}


def test_describe_round_trips():
    for spec in ["linux", "windows,hv-spinlocks=0xfff", "minimal,hv-vendor-id=Foo",
                 "minimal,hv-version-id-build=0x1bbc", "hv-spinlocks=0x2000", "hv-enforce-cpuid"]:
        config = parse_hyperv_spec(spec)
        again = parse_hyperv_spec(config.describe())
        assert (again.enabled, again.features, again.spinlock_retries, again.vendor_id,
                again.version) == (config.enabled, config.features, config.spinlock_retries,
                                   config.vendor_id, config.version), spec


def test_warnings_for_advisable_additions():
    config = parse_hyperv_spec("hv-time")
    assert config.enabled
    assert len(config.warnings) == 1
    assert "without hv-vpindex Linux does not detect Hyper-V" in config.warnings[0]


# -- errors: one clear sentence each ----------------------------------------------------------


@pytest.mark.parametrize("name", NOT_IMPLEMENTED)
def test_not_implemented_yet(name):
    with pytest.raises(HyperVConfigError) as info:
        parse_hyperv_spec(f"minimal,{name}")
    assert str(info.value) == f"{name} is not implemented yet"


def test_not_implemented_off_is_fine():
    assert parse_hyperv_spec("linux,hv-evmcs=off").features == PRESETS["linux"]


@pytest.mark.parametrize("spec, message", [
    ("hv-relax", "unknown Hyper-V option 'hv-relax'; did you mean 'hv-relaxed'?"),
    ("hv-bogus", "unknown Hyper-V option 'hv-bogus'"),
    ("windoze", "unknown Hyper-V option 'windoze'"),
    ("hv-spinlocks", "hv-spinlocks needs a retry count"),
    ("hv-spinlocks=0x10", "hv-spinlocks=0x10 is out of range"),
    ("hv-spinlocks=0x100000000", "out of range"),
    ("hv-spinlocks=many", "hv-spinlocks needs an integer"),
    ("hv-vendor-id=", "hv-vendor-id needs a vendor string"),
    ("hv-vendor-id=ABCDEFGHIJKLM", "is 13 bytes; CPUID holds at most 12"),
    ("hv-vendor-id=Micrösoft", "must be ASCII"),
    ("hv-version-id-major=0x10000", "version field major = 65536 is outside"),
    ("hv-version-id-build", "hv-version-id-build needs a value"),
    ("hv-relaxed=maybe", "hv-relaxed takes on or off, not 'maybe'"),
    ("hv-vpindex=off", "hv-vpindex=off has nothing to remove"),
    ("hv-core", "hv-core is always on when Hyper-V is on"),
    ("hv-spinlocks=0xfff,hv-core=off", "hv-core is always on"),
    ("hv-passthrough=off", "hv-passthrough=off means nothing"),
    ("hv-enforce-cpuid=off", "hv-enforce-cpuid=off is not supported"),
    ("linux=on", "preset 'linux' takes no value"),
])
def test_errors(spec, message):
    with pytest.raises(HyperVConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_hyperv_spec(spec)


# -- dependencies (with a registry where the planned features are implemented) -----------------


def _registry_with_implemented_synic_stack() -> EnlightenmentRegistry:
    features = []
    for enlightenment in REGISTRY:
        if enlightenment.name in ("hv-synic", "hv-stimer", "hv-stimer-direct", "hv-tlbflush",
                                  "hv-tlbflush-ext", "hv-ipi"):
            enlightenment = Enlightenment(**{**enlightenment.__dict__, "attach": _noop})
        features.append(enlightenment)
    return EnlightenmentRegistry(features)


@pytest.mark.parametrize("spec, message", [
    ("hv-vpindex,hv-synic,hv-stimer",
     "hv-stimer needs hv-synic, hv-time and hv-vpindex (missing: hv-time)"),
    ("hv-synic", "hv-synic needs hv-vpindex (missing: hv-vpindex)"),
    ("hv-vpindex,hv-tlbflush-ext", "hv-tlbflush-ext needs hv-tlbflush (missing: hv-tlbflush)"),
    ("minimal,hv-ipi,hv-vpindex=off", "hv-ipi needs hv-vpindex"),
    ("all,hv-synic,hv-stimer,hv-stimer-direct,hv-time=off", "hv-stimer needs"),
])
def test_unmet_requirements(spec, message):
    registry = _registry_with_implemented_synic_stack()
    with pytest.raises(HyperVConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_hyperv_spec(spec, registry=registry)


def test_met_requirements():
    registry = _registry_with_implemented_synic_stack()
    config = parse_hyperv_spec("hv-vpindex,hv-time,hv-synic,hv-stimer,hv-stimer-direct",
                               registry=registry)
    order = registry.dependency_order(config.active(registry))
    assert order.index("hv-vpindex") < order.index("hv-synic") < order.index("hv-stimer") \
        < order.index("hv-stimer-direct")
    assert order.index("hv-time") < order.index("hv-stimer")
    assert order[:2] == ["hv-core", "hv-spinlocks"]  # always-on first


# -- the registry refuses inconsistent declarations -----------------------------------------------


def test_registry_refuses_two_claims_on_one_msr():
    with pytest.raises(EnlightenmentRegistryError,
                       match=r"hv-b and hv-a both claim HV_X64_MSR_VP_INDEX \(0x40000002\)"):
        EnlightenmentRegistry([
            Enlightenment("hv-a", "a", "x", _noop, msrs=(HV_X64_MSR_VP_INDEX,)),
            Enlightenment("hv-b", "b", "x", _noop, msrs=(HV_X64_MSR_VP_INDEX,))])


def test_registry_refuses_two_claims_on_one_hypercall():
    code = HypercallCode.HvCallNotifyLongSpinWait
    with pytest.raises(EnlightenmentRegistryError, match="both claim HvCallNotifyLongSpinWait"):
        EnlightenmentRegistry([Enlightenment("hv-a", "a", "x", hypercalls=(code,)),
                               Enlightenment("hv-b", "b", "x", hypercalls=(code,))])


def test_registry_refuses_duplicate_names_and_aliases():
    with pytest.raises(EnlightenmentRegistryError, match="claimed twice"):
        EnlightenmentRegistry([Enlightenment("hv-a", "a", "x"), Enlightenment("hv-a", "b", "x")])
    with pytest.raises(EnlightenmentRegistryError, match="claimed twice"):
        EnlightenmentRegistry([Enlightenment("hv-a", "a", "x"),
                               Enlightenment("hv-b", "b", "x", aliases=("hv_a",))])
    with pytest.raises(EnlightenmentRegistryError, match="must be spelled 'hv-a'"):
        EnlightenmentRegistry([Enlightenment("hv_a", "a", "x")])


def test_registry_checks_requirements():
    with pytest.raises(EnlightenmentRegistryError, match="requires unknown feature 'hv-zz'"):
        EnlightenmentRegistry([Enlightenment("hv-a", "a", "x", requires=("hv-zz",))])
    with pytest.raises(EnlightenmentRegistryError, match="cycle"):
        EnlightenmentRegistry([Enlightenment("hv-a", "a", "x", requires=("hv-b",)),
                               Enlightenment("hv-b", "b", "x", requires=("hv-a",))])
    with pytest.raises(EnlightenmentRegistryError, match="is implemented but requires hv-b"):
        EnlightenmentRegistry([Enlightenment("hv-a", "a", "x", _noop, requires=("hv-b",)),
                               Enlightenment("hv-b", "b", "x")])


def test_cpuid_bits_come_only_from_implemented_features():
    registry = EnlightenmentRegistry([
        Enlightenment("hv-a", "a", "x", _noop,
                      cpuid=privileges(HvPartitionPrivilege.AccessVpIndex
                                       | HvPartitionPrivilege.EnableExtendedHypercalls)),
        Enlightenment("hv-b", "b", "x", cpuid=(CpuidBits(0x40000003, "edx", 1),))])
    assert registry.cpuid_bits({"hv-a", "hv-b"}) == {(0x40000003, "eax"): 1 << 6,
                                                      (0x40000003, "ebx"): 1 << 20}
    with pytest.raises(EnlightenmentRegistryError):
        CpuidBits(0x40000003, "esi", 1)


def test_every_msr_and_hypercall_has_one_owner():
    assert REGISTRY.msr_owner(HV_X64_MSR_GUEST_OS_ID) == "hv-core"
    assert REGISTRY.msr_owner(0x40000080) == "hv-synic"
    assert REGISTRY.hypercall_owner(HypercallCode.HvExtCallQueryCapabilities) == \
        "hv-ext-hypercalls"


def test_describe_lines_name_what_each_feature_does():
    text = REGISTRY["hv-time"].describe()
    assert "HV_X64_MSR_TIME_REF_COUNT" in text and "TLFS timers.md" in text
    assert "not implemented yet" in REGISTRY["hv-evmcs"].describe()
    assert join_names(["a"]) == "a" and join_names(["a", "b", "c"]) == "a, b and c"
