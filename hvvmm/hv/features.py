"""``--hyperv SPEC``: which Hyper-V enlightenments a VM gets (:class:`HyperVConfig`).

A spec is a comma-separated list read left to right, in QEMU's ``-cpu`` vocabulary:

* a **preset** replaces the feature set: ``none`` (Hyper-V off: a plain KVM machine), ``minimal``,
  ``linux``, ``windows``, ``all`` (alias ``max``); see :data:`PRESETS`;
* ``hv-FEATURE`` or ``hv-FEATURE=on`` adds a feature, ``hv-FEATURE=off`` removes one
  (``hv_feature`` works too; ``on/off``, ``yes/no``, ``true/false`` are accepted);
* ``hv-passthrough`` adds everything hvvmm implements (QEMU: everything the host supports);
* values: ``hv-spinlocks=N`` (retry count in CPUID 0x40000004 EBX; N >= 0xFFF, QEMU's rule, or
  0xFFFFFFFF = never notify, the default), ``hv-vendor-id=STR`` (at most 12 bytes),
  ``hv-version-id-build=N`` / ``-major`` / ``-minor`` / ``-spack`` / ``-sbranch`` / ``-snumber``
  (CPUID 0x40000002; QEMU's default WS2016, build 0x3839, version 10.0);
* ``hv-enforce-cpuid``: hvvmm always enforces CPUID (TLFS); the flag is accepted as a statement,
  ``=off`` is refused.

Without a spec (None or empty) a VM gets everything hvvmm implements (the ``all`` preset). A
spec that starts with a feature starts from nothing, as QEMU does; ``all,hv-reset=off`` is how
to subtract from the full set. Anything hvvmm cannot honour is a :class:`HyperVConfigError` with
one sentence: an unknown name, a feature that is not implemented yet, a value out of range or an
unmet requirement ("hv-stimer needs hv-synic, hv-time and hv-vpindex"). Nothing is silently
ignored. Advice that is not an error (e.g. "hv-time without hv-vpindex") becomes a warning in
:attr:`HyperVConfig.warnings`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from hvvmm.enlightenments import REGISTRY, EnlightenmentRegistry, join_names, normalize_name
from hvvmm.hv.hvdef import HV_CPUID_VENDOR_MICROSOFT, HV_SPINLOCK_NEVER_NOTIFY

SPINLOCK_RETRIES_MINIMUM = 0xFFF  # QEMU: "hv-spinlocks" below 0xFFF is refused
VENDOR_ID_MAX_BYTES = 12  # CPUID 0x40000000 EBX:ECX:EDX


class HyperVConfigError(ValueError):
    """A ``--hyperv`` spec hvvmm cannot honour; the message is one sentence saying why."""


@dataclass(frozen=True)
class HvVersion:
    """CPUID 0x40000002 (TLFS ``feature-discovery.md`` "Hypervisor Version Information").

    Default: Windows Server 2016, 10.0.14393 (build 0x3839), QEMU's default since it learned
    that "some tools in Windows actually check version info" (QEMU commit "i386: Change the
    default Hyper-V version to match WS2016", 2021)."""

    build: int = 0x3839
    major: int = 10
    minor: int = 0
    service_pack: int = 0
    service_branch: int = 0
    service_number: int = 0

    def __post_init__(self) -> None:
        limits = {"build": 0xFFFF_FFFF, "major": 0xFFFF, "minor": 0xFFFF,
                  "service_pack": 0xFFFF_FFFF, "service_branch": 0xFF,
                  "service_number": 0xFF_FFFF}
        for name, limit in limits.items():
            value = getattr(self, name)
            if not 0 <= value <= limit:
                raise HyperVConfigError(f"Hyper-V version field {name} = {value} is outside "
                                        f"0..{limit:#x}")

    def cpuid(self) -> tuple[int, int, int, int]:
        """EAX build; EBX major 31:16, minor 15:0; ECX service pack; EDX branch 31:24, number
        23:0."""
        return (self.build, (self.major << 16) | self.minor, self.service_pack,
                (self.service_branch << 24) | self.service_number)

    def __str__(self) -> str:
        return (f"{self.major}.{self.minor}.{self.build}.{self.service_pack}"
                f"-{self.service_branch}-{self.service_number}")


@dataclass(frozen=True)
class HyperVConfig:
    """The Hyper-V interface of one VM.

    ``enabled`` False means no Hyper-V at all (no hypervisor leaves of ours, no partition).
    ``features`` are the selectable enlightenments switched on; the always-on core (GUEST_OS_ID,
    HYPERCALL, the hypercall page, NotifyLongSpinWait) comes with ``enabled``.
    """

    enabled: bool = False
    features: frozenset[str] = frozenset()
    spinlock_retries: int = HV_SPINLOCK_NEVER_NOTIFY
    vendor_id: str = HV_CPUID_VENDOR_MICROSOFT.decode()
    version: HvVersion = field(default_factory=HvVersion)
    enforce_cpuid: bool = True
    source: str = ""
    warnings: tuple[str, ...] = ()

    @classmethod
    def off(cls) -> "HyperVConfig":
        return cls(enabled=False, source="none")

    @classmethod
    def default(cls, registry: EnlightenmentRegistry = REGISTRY) -> "HyperVConfig":
        return parse_hyperv_spec(None, registry=registry)

    def has(self, name: str) -> bool:
        return self.enabled and normalize_name(name) in self.features

    def active(self, registry: EnlightenmentRegistry = REGISTRY) -> frozenset[str]:
        """Enabled features plus the always-on ones (empty when Hyper-V is off)."""
        if not self.enabled:
            return frozenset()
        return frozenset(registry.with_always_on(self.features))

    def describe(self) -> str:
        """The canonical spec: features in name order, then the non-default values."""
        if not self.enabled:
            return "none"
        parts = sorted(self.features)
        if self.spinlock_retries != HV_SPINLOCK_NEVER_NOTIFY:
            parts.append(f"hv-spinlocks={self.spinlock_retries:#x}")
        if self.vendor_id != HV_CPUID_VENDOR_MICROSOFT.decode():
            parts.append(f"hv-vendor-id={self.vendor_id}")
        defaults = HvVersion()
        for option, attribute in _VERSION_OPTIONS.items():
            value = getattr(self.version, attribute)
            if value != getattr(defaults, attribute):
                parts.append(f"{option}={value:#x}")
        # "hv-enforce-cpuid" alone parses back to "Hyper-V on, core only".
        return ",".join(parts) if parts else "hv-enforce-cpuid"


# --------------------------------------------------------------------------------------------
# Presets (QEMU docs/system/i386/hyperv.rst flag set, restricted to what is implemented)
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, frozenset[str]] = {
    # Hyper-V off: a plain KVM machine.
    "none": frozenset(),
    # The minimal HV#1 interface of Microsoft's "Requirements for Implementing the Microsoft
    # Hypervisor Interface": the identification leaves, AccessHypercallMsrs (core) and
    # AccessVpIndex, a working hypercall page. Linux and Windows both detect Hyper-V with it.
    "minimal": frozenset({"hv-vpindex"}),
    # What Linux 6.1 uses (arch/x86/kernel/cpu/mshyperv.c ms_hyperv_init_platform()): VP index
    # (mandatory for detection), the TSC page clocksource, known TSC/APIC frequencies, crash
    # reporting with the kmsg channel, the extended-hypercall query, guest idle, direct-mode stimers
    # (the per-CPU clockevent; stimer needs synic by QEMU's rules), cluster IPIs and remote TLB
    # flushes; relaxed is free.
    "linux": frozenset({"hv-vpindex", "hv-time", "hv-frequencies", "hv-crash", "hv-relaxed",
                        "hv-idle", "hv-ext-hypercalls", "hv-synic", "hv-stimer",
                        "hv-stimer-direct", "hv-ipi", "hv-tlbflush"}),
    # QEMU's recommended Windows set (docs/system/i386/hyperv.rst "Recommendations") minus
    # hv-vapic (refused: see hvvmm/enlightenments/vapic.py) and minus hv-reset, which QEMU advises
    # against. Spin count stays 0xFFFFFFFF (QEMU: 0xFFF only when overcommitted).
    "windows": frozenset({"hv-relaxed", "hv-vpindex", "hv-runtime", "hv-time",
                          "hv-frequencies", "hv-crash", "hv-idle", "hv-ext-hypercalls",
                          "hv-synic", "hv-stimer", "hv-ipi", "hv-tlbflush"}),
    # Everything implemented (also the default when no spec is given, and hv-passthrough).
    "all": REGISTRY.selectable_implemented(),
}
PRESET_ALIASES = {"max": "all", "off": "none"}

_VERSION_OPTIONS = {
    "hv-version-id-build": "build",
    "hv-version-id-major": "major",
    "hv-version-id-minor": "minor",
    "hv-version-id-spack": "service_pack",
    "hv-version-id-sbranch": "service_branch",
    "hv-version-id-snumber": "service_number",
}
_VALUE_OPTIONS = ("hv-spinlocks", "hv-vendor-id", *_VERSION_OPTIONS)
_FLAG_OPTIONS = ("hv-passthrough", "hv-enforce-cpuid")
_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


def _parse_int(option: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise HyperVConfigError(f"{option} needs an integer (decimal or 0x...), not "
                                f"{text!r}") from None


def _parse_switch(option: str, text: str | None) -> bool:
    if text is None:
        return True
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise HyperVConfigError(f"{option} takes on or off, not {text!r}")


def _unknown(item: str, registry: EnlightenmentRegistry) -> HyperVConfigError:
    known = [*PRESETS, *PRESET_ALIASES, *registry.names(), *_VALUE_OPTIONS, *_FLAG_OPTIONS]
    close = difflib.get_close_matches(item, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return HyperVConfigError(f"unknown Hyper-V option {item!r}{hint} (presets: "
                             f"{', '.join(PRESETS)}; features: "
                             f"{', '.join(sorted(registry.selectable_implemented()))})")


def parse_hyperv_spec(spec: str | None, *, registry: EnlightenmentRegistry = REGISTRY
                      ) -> HyperVConfig:
    """Parse a ``--hyperv`` spec (see the module docstring); raises :class:`HyperVConfigError`."""
    if spec is None or not spec.strip():
        config = HyperVConfig(enabled=True, features=registry.selectable_implemented(),
                              source="")
        return _finish(config, registry)
    enabled = False
    preset_seen = False
    selected: set[str] = set()
    values: dict[str, object] = {}
    version = HvVersion()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name_part, sep, value = item.partition("=")
        name = normalize_name(name_part)
        value_text = value.strip() if sep else None
        preset = PRESET_ALIASES.get(name, name)
        if preset in PRESETS:
            if sep:
                raise HyperVConfigError(f"preset {name!r} takes no value")
            # "all" means everything *this* registry implements.
            selected = set(registry.selectable_implemented() if preset == "all"
                           else PRESETS[preset])
            enabled = preset != "none"
            preset_seen = True
            if not enabled:  # "none" forgets everything before it
                values.clear()
                version = HvVersion()
        elif name == "hv-spinlocks":
            if value_text is None:
                raise HyperVConfigError("hv-spinlocks needs a retry count, e.g. hv-spinlocks=0xfff")
            retries = _parse_int(name, value_text)
            if not SPINLOCK_RETRIES_MINIMUM <= retries <= HV_SPINLOCK_NEVER_NOTIFY:
                raise HyperVConfigError(
                    f"hv-spinlocks={value_text} is out of range: the retry count must be at least "
                    f"{SPINLOCK_RETRIES_MINIMUM:#x} (QEMU's rule) and at most 0xffffffff "
                    "(never notify)")
            values["spinlock_retries"] = retries
            enabled = True
        elif name == "hv-vendor-id":
            if not value_text:
                raise HyperVConfigError("hv-vendor-id needs a vendor string, e.g. "
                                        "hv-vendor-id=Microsoft Hv")
            vendor = value.strip("\r\n")
            try:
                encoded = vendor.encode("ascii")
            except UnicodeEncodeError:
                raise HyperVConfigError(f"hv-vendor-id {vendor!r} must be ASCII") from None
            if len(encoded) > VENDOR_ID_MAX_BYTES:
                raise HyperVConfigError(f"hv-vendor-id {vendor!r} is {len(encoded)} bytes; "
                                        f"CPUID holds at most {VENDOR_ID_MAX_BYTES}")
            values["vendor_id"] = vendor
            enabled = True
        elif name in _VERSION_OPTIONS:
            if value_text is None:
                raise HyperVConfigError(f"{name} needs a value, e.g. {name}=0x3839")
            version = replace(version, **{_VERSION_OPTIONS[name]: _parse_int(name, value_text)})
            enabled = True
        elif name == "hv-passthrough":
            if not _parse_switch(name, value_text):
                raise HyperVConfigError("hv-passthrough=off means nothing; leave it out")
            selected |= registry.selectable_implemented()
            enabled = True
        elif name == "hv-enforce-cpuid":
            if not _parse_switch(name, value_text):
                raise HyperVConfigError("hv-enforce-cpuid=off is not supported: hvvmm always "
                                        "raises #GP for MSRs whose CPUID bit is not advertised "
                                        "(TLFS)")
            enabled = True
        else:
            enlightenment = registry.lookup(name)
            if enlightenment is None:
                raise _unknown(item, registry)
            canonical = enlightenment.name
            if not enlightenment.selectable:
                raise HyperVConfigError(f"{canonical} is always on when Hyper-V is on; it cannot "
                                        "be switched by name")
            if _parse_switch(canonical, value_text):
                if not enlightenment.implemented:
                    raise HyperVConfigError(enlightenment.refusal
                                            or f"{canonical} is not implemented yet")
                selected.add(canonical)
                enabled = True
            else:
                if canonical not in selected and not preset_seen:
                    raise HyperVConfigError(
                        f"{canonical}=off has nothing to remove: a spec starts from nothing "
                        f"unless it names a preset (e.g. 'all,{canonical}=off')")
                selected.discard(canonical)
    config = HyperVConfig(enabled=enabled, features=frozenset(selected) if enabled else frozenset(),
                          version=version, source=spec, **values)  # type: ignore[arg-type]
    return _finish(config, registry)


def _finish(config: HyperVConfig, registry: EnlightenmentRegistry) -> HyperVConfig:
    """Check requirements and collect warnings."""
    if not config.enabled:
        return HyperVConfig.off() if not config.source else replace(
            HyperVConfig.off(), source=config.source)
    missing = registry.missing_requirements(config.features)
    if missing:
        name, lacking = next(iter(missing.items()))
        required = registry[name].requires
        raise HyperVConfigError(f"{name} needs {join_names(required)} (missing: "
                                f"{join_names(lacking)})")
    warnings = []
    if "hv-vpindex" not in config.features:
        warnings.append("without hv-vpindex Linux does not detect Hyper-V at all (it requires "
                        "AccessVpIndex) and Windows ignores the reference TSC page; the TLFS says "
                        "'Hv#1' implies VP_INDEX")
    for name in sorted(config.features):
        for other, reason in registry[name].advice:
            # The hv-vpindex warning above already covers advice about hv-vpindex.
            if other not in config.features and other != "hv-vpindex":
                warnings.append(f"{name} without {other}: {reason}")
    if config.vendor_id.encode() != HV_CPUID_VENDOR_MICROSOFT:
        warnings.append(f"vendor {config.vendor_id!r}: Linux ignores every enlightenment unless "
                        f"the vendor is {HV_CPUID_VENDOR_MICROSOFT.decode()!r}")
    return replace(config, warnings=tuple(warnings))
