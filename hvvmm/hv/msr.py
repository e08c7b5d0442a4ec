"""The synthetic MSR registry: which 0x4000xxxx MSRs exist for this VM and who handles them.

An enlightenment registers each MSR it implements as a :class:`SyntheticMsr` when it is attached
to a partition. An MSR that is not registered does not exist for the guest: the enlightenment that
owns it is not enabled, so its CPUID bit is not advertised, and the TLFS says an access to an MSR
whose CPUID bit is not advertised raises #GP (TLFS ``feature-discovery.md``; KVM selftest
``tools/testing/selftests/kvm/x86/hyperv_features.c`` expects the same faults). KVM applies that
gate only with ``KVM_CAP_HYPERV_ENFORCE_CPUID``; hvvmm always applies it.

Every refused access raises :class:`MsrAccessFault`; the vCPU layer turns it into a #GP injected
into the guest. The reasons, checked in this order:

1. the MSR is not registered (not advertised, or unknown) -- TLFS ``feature-discovery.md``;
2. a write to a read-only MSR (VP_INDEX, TIME_REF_COUNT, ...) -- TLFS register tables;
3. a write that sets a bit of ``reserved_mask`` (RsvdZ bits) -- TLFS "Reserved bits";
4. the handler itself refuses the access (it raises :class:`MsrAccessFault`).

RsvdP ("preserved") bits are not in ``reserved_mask``: the guest must write back what it read, and
the handler decides what to keep.

Guest-triggered log lines go through :class:`hvvmm.logonce.LogOnce`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

from hvvmm.hv.hvdef import HV_U64_MASK, msr_name


MsrScope = Literal["vp", "partition"]
MsrReader = Callable[[int], int]  # read(vp_index) -> value
MsrWriter = Callable[[int, int], None]  # write(vp_index, value)


class MsrAccessFault(Exception):
    """A guest RDMSR/WRMSR that must raise #GP. ``value`` is the value written (None for reads)."""

    def __init__(self, index: int, *, write: bool, reason: str, value: int | None = None):
        self.index = index
        self.write = write
        self.reason = reason
        self.value = value
        op = f"WRMSR {msr_name(index)} ({index:#x}) <- {value:#x}" if write and value is not None \
            else f"{'WRMSR' if write else 'RDMSR'} {msr_name(index)} ({index:#x})"
        super().__init__(f"#GP on {op}: {reason}")


class MsrRegistryError(ValueError):
    """A programming error while building the registry (two owners for one MSR, bad spec)."""


@dataclass(frozen=True)
class SyntheticMsr:
    """One synthetic MSR as an enlightenment implements it.

    ``read(vp_index) -> int`` returns the value (0 .. 2**64-1). ``write(vp_index, value)`` stores
    it; ``write=None`` makes the MSR read-only (a guest write raises #GP). ``reserved_mask`` holds
    the RsvdZ bits: a write setting any of them raises #GP before the handler runs. ``scope``
    documents whether the MSR is per VP or partition-wide (TLFS; KVM's
    ``kvm_hv_msr_partition_wide``); partition-wide handlers do their own locking. ``owner`` is
    the enlightenment that registered it (for messages and the registry's claim check).
    """

    index: int
    name: str
    read: MsrReader
    write: MsrWriter | None = None
    reserved_mask: int = 0
    scope: MsrScope = "vp"
    owner: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 0xFFFF_FFFF:
            raise MsrRegistryError(f"MSR index {self.index!r} is not a 32-bit value")
        if self.scope not in ("vp", "partition"):
            raise MsrRegistryError(f"{self.name}: scope must be 'vp' or 'partition', "
                                   f"not {self.scope!r}")
        if not 0 <= self.reserved_mask <= HV_U64_MASK:
            raise MsrRegistryError(f"{self.name}: reserved mask {self.reserved_mask!r} is not "
                                   "a 64-bit value")
        if not callable(self.read) or (self.write is not None and not callable(self.write)):
            raise MsrRegistryError(f"{self.name}: read/write handlers must be callable")

    @property
    def read_only(self) -> bool:
        return self.write is None


class MsrRegistry:
    """MSR index -> :class:`SyntheticMsr`. Each index is registered once, by one owner."""

    def __init__(self) -> None:
        self._msrs: dict[int, SyntheticMsr] = {}

    def register(self, msr: SyntheticMsr) -> SyntheticMsr:
        other = self._msrs.get(msr.index)
        if other is not None:
            raise MsrRegistryError(
                f"MSR {msr.index:#x} ({msr.name}) is already registered by "
                f"{other.owner or 'another owner'} as {other.name}")
        self._msrs[msr.index] = msr
        return msr

    def get(self, index: int) -> SyntheticMsr | None:
        return self._msrs.get(index)

    def __contains__(self, index: object) -> bool:
        return index in self._msrs

    def __iter__(self) -> Iterator[SyntheticMsr]:
        return iter(sorted(self._msrs.values(), key=lambda msr: msr.index))

    def __len__(self) -> int:
        return len(self._msrs)

    def indices(self) -> tuple[int, ...]:
        return tuple(sorted(self._msrs))

    def read(self, vp_index: int, index: int) -> int:
        """MSR ``index`` as VP ``vp_index`` reads it; raises :class:`MsrAccessFault`."""
        msr = self._msrs.get(index)
        if msr is None:
            raise MsrAccessFault(index, write=False, reason="not available (not advertised)")
        value = msr.read(vp_index)
        if not isinstance(value, int) or not 0 <= value <= HV_U64_MASK:
            raise TypeError(f"{msr.name} read handler returned {value!r}, not a u64")
        return value

    def write(self, vp_index: int, index: int, value: int) -> None:
        """Write ``value`` to MSR ``index`` for VP ``vp_index``; raises :class:`MsrAccessFault`."""
        if not 0 <= value <= HV_U64_MASK:
            raise ValueError(f"MSR value {value!r} is not a u64 (a VMM bug, not a guest error)")
        msr = self._msrs.get(index)
        if msr is None:
            raise MsrAccessFault(index, write=True, value=value,
                                 reason="not available (not advertised)")
        if msr.write is None:
            raise MsrAccessFault(index, write=True, value=value, reason="read-only")
        if value & msr.reserved_mask:
            raise MsrAccessFault(index, write=True, value=value,
                                 reason=f"reserved bits {value & msr.reserved_mask:#x} set")
        msr.write(vp_index, value)
