"""The Hyper-V enlightenments hvvmm offers, one module per feature, and the registry of them.

Each module declares one :class:`Enlightenment` in one place (OpenVMM ``hv1_emulator`` split by
feature, QEMU's ``hv-*`` flags and their "Requires:" lines in ``docs/system/i386/hyperv.rst``):

* its QEMU-style name (``hv-vpindex``) and aliases;
* the features it requires (QEMU ``target/i386/kvm/kvm.c``
  ``kvm_hyperv_properties[].dependencies``);
* its CPUID contributions (leaf, register, bits, from the :mod:`hvvmm.hv.hvdef` flag classes);
* the synthetic MSRs and hypercall codes it implements;
* ``attach(partition)``, which creates its state and registers its MSRs and hypercalls with the
  partition. A feature without ``attach`` is known (so its name and dependencies can be checked)
  but not implemented yet.

The :class:`EnlightenmentRegistry` refuses two features claiming one name, MSR or hypercall code,
checks that every requirement names a known feature and that requirements have no cycle, and
answers the questions the config parser (:mod:`hvvmm.hv.features`), the CPUID builder
(:mod:`hvvmm.cpuid`) and the partition (:mod:`hvvmm.hv.partition`) ask. Because the CPUID bits and
the registered MSRs/hypercalls come from the same declaration, the guest is never told about
something the VM does not implement (a Linux guest trusts CPUID: an advertised MSR that faults is
"unchecked MSR access error", Linux ``arch/x86/mm/extable.c`` ``ex_handler_msr()``); a test
checks that each ``attach`` registers exactly what its declaration lists.

Nothing here imports the KVM layer.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from hvvmm.hv.hvdef import (
    HYPERV_CPUID_ENLIGHTMENT_INFO,
    HYPERV_CPUID_FEATURES,
    HvEnlightenmentInformation,
    HvFeatures,
    HvPartitionPrivilege,
    hypercall_name,
    msr_name,
)

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

CPUID_REGISTERS = ("eax", "ebx", "ecx", "edx")


class EnlightenmentRegistryError(ValueError):
    """Two features claim one name, MSR or hypercall, or a requirement is unknown or cyclic."""


class AttachError(Exception):
    """An enabled enlightenment cannot work on this VM (the platform lacks something it needs);
    raised by ``attach`` with a sentence naming the feature and what is missing."""


@dataclass(frozen=True)
class CpuidBits:
    """Bits an enlightenment sets in one register of one hypervisor CPUID leaf."""

    leaf: int
    register: str
    bits: int

    def __post_init__(self) -> None:
        if self.register not in CPUID_REGISTERS:
            raise EnlightenmentRegistryError(f"CPUID register {self.register!r} is not one of "
                                             f"{', '.join(CPUID_REGISTERS)}")
        if not 0 < self.bits <= 0xFFFF_FFFF:
            raise EnlightenmentRegistryError(f"CPUID bits {self.bits!r} do not fit a register")


def privileges(mask: HvPartitionPrivilege) -> tuple[CpuidBits, ...]:
    """CPUID 0x40000003 EAX/EBX contributions for partition privileges (TLFS
    ``HV_PARTITION_PRIVILEGE_MASK``: EAX = bits 31:0, EBX = bits 63:32)."""
    out = []
    if mask.eax:
        out.append(CpuidBits(HYPERV_CPUID_FEATURES, "eax", mask.eax))
    if mask.ebx:
        out.append(CpuidBits(HYPERV_CPUID_FEATURES, "ebx", mask.ebx))
    return tuple(out)


def features(mask: HvFeatures) -> tuple[CpuidBits, ...]:
    """CPUID 0x40000003 EDX contributions (TLFS "Hypervisor Feature Identification")."""
    return (CpuidBits(HYPERV_CPUID_FEATURES, "edx", int(mask)),)


def recommendations(mask: HvEnlightenmentInformation) -> tuple[CpuidBits, ...]:
    """CPUID 0x40000004 EAX contributions (TLFS "Implementation Recommendations")."""
    return (CpuidBits(HYPERV_CPUID_ENLIGHTMENT_INFO, "eax", int(mask)),)


AttachFunction = Callable[["Partition"], object]


@dataclass(frozen=True)
class Enlightenment:
    """One feature's declaration. See the module docstring.

    ``attach(partition)`` returns the feature's state object (or None); the partition keeps it
    under the feature's name and calls its ``reset()`` method, if any, on a VM reset.
    ``always_on``: attached whenever Hyper-V is on (the TLFS core; not selectable by name).
    ``denied_when_off``: when the feature is implemented but not enabled, its hypercalls still
    exist and answer HV_STATUS_ACCESS_DENIED (TLFS: a call whose privilege is not granted), rather
    than INVALID_HYPERCALL_CODE. ``advice`` pairs another feature with the reason it should be on
    too; unlike ``requires`` it is not enforced, it becomes a warning. ``refusal``: for a
    feature declared without ``attach`` because hvvmm cannot offer it at all (not merely "not
    yet"), the sentence ``--hyperv`` answers when it is asked for.
    """

    name: str
    summary: str
    tlfs: str
    attach: AttachFunction | None = None
    requires: tuple[str, ...] = ()
    cpuid: tuple[CpuidBits, ...] = ()
    msrs: tuple[int, ...] = ()
    hypercalls: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()
    always_on: bool = False
    denied_when_off: bool = False
    advice: tuple[tuple[str, str], ...] = ()
    refusal: str = ""

    @property
    def implemented(self) -> bool:
        return self.attach is not None

    @property
    def selectable(self) -> bool:
        """Can be switched on and off by name in a ``--hyperv`` spec."""
        return not self.always_on

    def describe(self) -> str:
        parts = [f"{self.name}: {self.summary}"]
        if self.requires:
            parts.append(f"requires {join_names(self.requires)}")
        if self.msrs:
            parts.append("MSRs " + ", ".join(msr_name(index) for index in self.msrs))
        if self.hypercalls:
            parts.append("hypercalls " + ", ".join(hypercall_name(c) for c in self.hypercalls))
        if self.refusal:
            parts.append("refused: " + self.refusal)
        elif not self.implemented:
            parts.append("not implemented yet")
        return "; ".join(parts) + f" (TLFS {self.tlfs})"


def normalize_name(name: str) -> str:
    """``hv_foo`` / ``HV-Foo`` -> ``hv-foo`` (QEMU accepts both spellings)."""
    return name.strip().lower().replace("_", "-")


def join_names(names: Iterable[str]) -> str:
    """``a``, ``a and b``, ``a, b and c`` -- for messages that read as sentences."""
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


class EnlightenmentRegistry:
    """All enlightenments hvvmm knows, implemented or planned."""

    def __init__(self, enlightenments: Iterable[Enlightenment] = ()):
        self._by_name: dict[str, Enlightenment] = {}
        self._aliases: dict[str, str] = {}
        self._msr_owner: dict[int, str] = {}
        self._hypercall_owner: dict[int, str] = {}
        for enlightenment in enlightenments:
            self.register(enlightenment)
        self.validate()

    # -- building -----------------------------------------------------------------------------

    def register(self, enlightenment: Enlightenment) -> Enlightenment:
        name = normalize_name(enlightenment.name)
        if name != enlightenment.name:
            raise EnlightenmentRegistryError(f"feature name {enlightenment.name!r} must be "
                                             f"spelled {name!r}")
        for spelling in (name, *map(normalize_name, enlightenment.aliases)):
            if spelling in self._by_name or spelling in self._aliases:
                raise EnlightenmentRegistryError(f"feature name {spelling!r} is claimed twice")
        for index in enlightenment.msrs:
            owner = self._msr_owner.get(index)
            if owner is not None:
                raise EnlightenmentRegistryError(
                    f"{name} and {owner} both claim {msr_name(index)} ({index:#x})")
        for code in enlightenment.hypercalls:
            owner = self._hypercall_owner.get(code)
            if owner is not None:
                raise EnlightenmentRegistryError(
                    f"{name} and {owner} both claim {hypercall_name(code)} ({code:#06x})")
        self._by_name[name] = enlightenment
        for alias in enlightenment.aliases:
            self._aliases[normalize_name(alias)] = name
        for index in enlightenment.msrs:
            self._msr_owner[index] = name
        for code in enlightenment.hypercalls:
            self._hypercall_owner[code] = name
        return enlightenment

    def validate(self) -> None:
        """Every requirement names a known feature; requirements have no cycle; an implemented
        feature does not require an unimplemented one."""
        for enlightenment in self._by_name.values():
            for required in enlightenment.requires:
                target = self._by_name.get(required)
                if target is None:
                    raise EnlightenmentRegistryError(
                        f"{enlightenment.name} requires unknown feature {required!r}")
                if enlightenment.implemented and not target.implemented:
                    raise EnlightenmentRegistryError(
                        f"{enlightenment.name} is implemented but requires {required}, which "
                        "is not")
            for other, _reason in enlightenment.advice:
                if other not in self._by_name:
                    raise EnlightenmentRegistryError(
                        f"{enlightenment.name} advises unknown feature {other!r}")
        try:
            self.dependency_order(self._by_name)
        except graphlib.CycleError as error:
            raise EnlightenmentRegistryError(f"feature requirements form a cycle: "
                                             f"{' -> '.join(error.args[1])}") from error

    # -- queries ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Enlightenment]:
        return iter(sorted(self._by_name.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name) is not None

    def __getitem__(self, name: str) -> Enlightenment:
        found = self.lookup(name)
        if found is None:
            raise KeyError(name)
        return found

    def lookup(self, name: str) -> Enlightenment | None:
        """The feature called ``name`` (any spelling, or an alias), or None."""
        name = normalize_name(name)
        name = self._aliases.get(name, name)
        return self._by_name.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_name))

    def implemented(self) -> tuple[Enlightenment, ...]:
        return tuple(e for e in self if e.implemented)

    def always_on(self) -> tuple[Enlightenment, ...]:
        return tuple(e for e in self if e.always_on)

    def with_always_on(self, names: Iterable[str]) -> set[str]:
        """``names`` plus the features that are on whenever Hyper-V is."""
        return set(names) | {e.name for e in self.always_on()}

    def selectable_implemented(self) -> frozenset[str]:
        """Everything a user can switch on today (``hv-passthrough``, the ``all`` preset)."""
        return frozenset(e.name for e in self if e.implemented and e.selectable)

    def msr_owner(self, index: int) -> str | None:
        return self._msr_owner.get(index)

    def hypercall_owner(self, code: int) -> str | None:
        return self._hypercall_owner.get(code)

    def missing_requirements(self, enabled: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """``{feature: missing requirements}`` for each enabled feature whose requirements are
        not all enabled."""
        enabled = self.with_always_on(enabled)
        missing = {}
        for name in sorted(enabled):
            enlightenment = self._by_name[name]
            lacking = tuple(r for r in enlightenment.requires if r not in enabled)
            if lacking:
                missing[name] = lacking
        return missing

    def dependency_order(self, names: Iterable[str]) -> list[str]:
        """``names`` sorted so that every feature comes after what it requires (attach order);
        always-on features first."""
        names = set(names)
        sorter: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
        for name in sorted(names):
            sorter.add(name, *sorted(r for r in self._by_name[name].requires if r in names))
        ordered = list(sorter.static_order())
        return sorted(ordered, key=lambda n: (not self._by_name[n].always_on, ordered.index(n)))

    def cpuid_bits(self, enabled: Iterable[str]) -> dict[tuple[int, str], int]:
        """``{(leaf, register): bits}`` contributed by the enabled features plus the always-on
        ones (only implemented features contribute)."""
        active = self.with_always_on(enabled)
        bits: dict[tuple[int, str], int] = {}
        for name in sorted(active):
            enlightenment = self._by_name[name]
            if not enlightenment.implemented:
                continue
            for contribution in enlightenment.cpuid:
                key = (contribution.leaf, contribution.register)
                bits[key] = bits.get(key, 0) | contribution.bits
        return bits


def _build_default_registry() -> EnlightenmentRegistry:
    # Imported here, after the classes above exist: each module imports them from this package.
    from hvvmm.enlightenments import (
        core,
        crash,
        ext_hypercalls,
        frequencies,
        idle,
        ipi,
        planned,
        reference_time,
        relaxed,
        reset,
        runtime,
        spinlocks,
        stimer,
        synic,
        tlbflush,
        vapic,
        vpindex,
        xmm_input,
    )

    modules = (core, vpindex, runtime, reference_time, frequencies, relaxed, spinlocks, reset,
               crash, idle, ext_hypercalls, xmm_input, synic)
    # ipi/tlbflush/vapic: hv-ipi, hv-tlbflush (+ hv-tlbflush-ext), hv-vapic (declared, refused).
    modules += (ipi, tlbflush, vapic)
    return EnlightenmentRegistry([*(m.ENLIGHTENMENT for m in modules), tlbflush.EXT_ENLIGHTENMENT,
                                  *stimer.ENLIGHTENMENTS, *planned.ENLIGHTENMENTS])


REGISTRY: EnlightenmentRegistry = _build_default_registry()
"""Every enlightenment hvvmm knows; the default registry for parsing, CPUID and partitions."""

__all__ = [
    "REGISTRY", "AttachError", "CpuidBits", "Enlightenment", "EnlightenmentRegistry",
    "EnlightenmentRegistryError", "features", "join_names", "normalize_name", "privileges",
    "recommendations",
]
