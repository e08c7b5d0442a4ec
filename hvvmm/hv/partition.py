"""The Hyper-V emulator state of one VM (OpenVMM ``hv1_emulator`` in Python): :class:`Partition`.

A partition holds the :class:`~hvvmm.hv.features.HyperVConfig`, the
:class:`~hvvmm.hv.platform.HvPlatform`, the synthetic MSR registry, the hypercall table and
dispatcher, per-VP state keyed by VP index, and the state of every attached enlightenment (the
always-on core plus the enabled features, attached in dependency order). The VMM's vCPU loop calls
four entry points:

* :meth:`Partition.msr_read` / :meth:`Partition.msr_write` for ``KVM_EXIT_X86_RDMSR/WRMSR`` on the
  synthetic ranges; :class:`~hvvmm.hv.msr.MsrAccessFault` means "inject #GP";
* :meth:`Partition.hypercall` for an OUT to :data:`HYPERCALL_PORT` while
  :meth:`Partition.hypercall_port_active` is true (TLFS "Establishing the Hypercall Interface");
* :meth:`Partition.reset` when the VM resets (every overlay removed, every MSR back to its reset
  value; Propolis issue #863 is what stale state does to a rebooted guest).

Observability: per-VP counters of MSR accesses by index (reads, writes, faults) and of hypercalls
by (code, status), and an optional ``on_event`` callback that receives a :class:`TraceEvent` for
every access (``--trace FILE`` writes them as JSON lines). Guest-triggered log lines go through a
:class:`~hvvmm.logonce.LogOnce` (once per distinct cause).

Nothing here imports the KVM layer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hvvmm.cpuid import CpuidEntry, hyperv_cpuid_leaves
from hvvmm.enlightenments import REGISTRY, EnlightenmentRegistry
from hvvmm.enlightenments.core import HYPERCALL_PORT, CoreState, hypercall_page_bytes
from hvvmm.hv.features import HyperVConfig
from hvvmm.hv.hvdef import (
    HV_U64_MASK,
    HV_X64_MSR_APIC_FREQUENCY,
    HV_X64_MSR_TSC_FREQUENCY,
    HV_X64_MSR_VP_INDEX,
    HV_X64_SYNTHETIC_MSR_RANGES,
    SYNTHETIC_MSR_NAMES,
    HvStatus,
    hypercall_name,
    msr_name,
    status_name,
)
from hvvmm.hv.hypercall import (
    HypercallDispatcher,
    HypercallError,
    HypercallOutcome,
    HypercallRegisters,
    HypercallRequest,
    HypercallSpec,
    HypercallTable,
    NOT_SIMPLE_CONTROL_BITS,
    SimpleCalls,
    SUCCESS_NOT_WRITTEN,
    write_success_result,
)
from hvvmm.hv.msr import MsrAccessFault, MsrRegistry, MsrScope, SyntheticMsr
from hvvmm.logonce import LogOnce

if TYPE_CHECKING:
    from hvvmm.enlightenments.reference_time import ReferenceClock
    from hvvmm.hv.platform import HvPlatform
    from hvvmm.memory import GuestMemory

log = logging.getLogger(__name__)

__all__ = ["HYPERCALL_PORT", "Partition", "PartitionError", "TraceEvent", "VpState",
           "hypercall_page_bytes"]


class PartitionError(Exception):
    """The partition cannot be built as configured, or an enlightenment broke its declaration."""


@dataclass(frozen=True)
class TraceEvent:
    """One synthetic MSR access or hypercall, for ``--trace``.

    ``time`` is seconds since the partition was created (host monotonic clock); ``kind`` is
    ``"msr_read"``, ``"msr_write"`` or ``"hypercall"``; ``number`` the MSR index or call code;
    ``inputs`` and ``result`` are JSON-ready dicts (``result["fault"]`` names a #GP or #UD)."""

    time: float
    vp: int
    kind: str
    number: int
    name: str
    inputs: dict[str, Any]
    result: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"time": round(self.time, 9), "vp": self.vp, "kind": self.kind,
                "number": f"{self.number:#x}", "name": self.name, "inputs": self.inputs,
                "result": self.result}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


UNKNOWN_HYPERCALL = -1  # the counter key for every code no feature registered

# Read-only synthetic MSRs whose value cannot change while the VM exists: the VP's own index
# (TLFS "Virtual Processor Index": fixed when the VP is created) and the TSC and APIC timer
# frequencies (TLFS "Partition Properties MSRs"; the host's, fixed at start). Once a VP has read
# one through the MSR registry, Partition.msr_read answers it from the VP's cache: counted and
# traced like every read, without the registry lookup and handler call.
CONSTANT_MSRS = frozenset({HV_X64_MSR_VP_INDEX, HV_X64_MSR_TSC_FREQUENCY,
                           HV_X64_MSR_APIC_FREQUENCY})


@dataclass
class VpState:
    """Per-VP emulator bookkeeping. Only the VP's own thread updates it."""

    index: int
    msr_reads: Counter = field(default_factory=Counter)  # index -> count
    msr_writes: Counter = field(default_factory=Counter)  # index -> count
    msr_faults: Counter = field(default_factory=Counter)  # (index, "read"|"write") -> count
    # (code, status or None) -> count; the compact path's successes are in all_hypercalls().
    hypercalls: Counter = field(default_factory=Counter)
    # CONSTANT_MSRS this VP has read once through the registry: index -> value.
    constant_msrs: dict = field(default_factory=dict)
    # Reads counted elsewhere (a VMM that answers constant MSRs without calling msr_read):
    # each returns index -> reads so far, added to msr_reads in counters().
    msr_read_sources: list = field(default_factory=list)
    # The compact hypercall path of this VP (Partition.simple_hypercalls), made on first use.
    simple_calls: Any = None

    def all_hypercalls(self) -> Counter:
        """:attr:`hypercalls` with the successes the compact path counts on its own."""
        if self.simple_calls is None:
            return Counter(self.hypercalls)
        return self.hypercalls + self.simple_calls.pending_counts()

    def all_msr_reads(self) -> Counter:
        """:attr:`msr_reads` with the reads the :attr:`msr_read_sources` counted."""
        reads = Counter(self.msr_reads)
        for source in self.msr_read_sources:
            reads.update(source())
        return +reads

    def counters(self) -> dict[str, Any]:
        """JSON-ready counters, keyed by names (``HV_X64_MSR_VP_INDEX``,
        ``HvCallNotifyLongSpinWait/HV_STATUS_SUCCESS``)."""
        def hypercall_key(key: tuple[int, int | None]) -> str:
            code, status = key
            outcome = "#UD or continued" if status is None else status_name(status)
            name = "unknown codes" if code == UNKNOWN_HYPERCALL else hypercall_name(code)
            return f"{name}/{outcome}"
        return {
            "msr_reads": {msr_name(i): n for i, n in sorted(self.all_msr_reads().items())},
            "msr_writes": {msr_name(i): n for i, n in sorted(self.msr_writes.items())},
            "msr_faults": {f"{msr_name(i)}/{op}": n
                           for (i, op), n in sorted(self.msr_faults.items())},
            "hypercalls": {hypercall_key(k): n for k, n in sorted(
                self.all_hypercalls().items(), key=lambda item: (item[0][0], item[0][1] or -1))},
        }


EventCallback = Callable[[TraceEvent], None]


class Partition:
    """The Hyper-V interface of one VM. See the module docstring.

    Enlightenments (``attach``) use :meth:`register_msr`, :meth:`register_hypercall`,
    :attr:`platform`, :attr:`config`, :attr:`lock`, :attr:`log_once`, :attr:`state` and
    :attr:`reference_clock`. :attr:`lock` guards simple partition-wide values; **never call the
    platform while holding it** (or any emulator lock): the platform may park every other vCPU,
    and one blocked on the lock never parks. Overlays go through
    :class:`~hvvmm.hv.platform.OverlaySlot`.
    """

    def __init__(self, config: HyperVConfig, platform: "HvPlatform", *,
                 registry: EnlightenmentRegistry = REGISTRY,
                 on_event: EventCallback | None = None):
        if not config.enabled:
            raise PartitionError("Hyper-V is off for this VM ('none'); a plain KVM machine has "
                                 "no partition")
        vp_count = int(platform.vp_count)
        if vp_count < 1:
            raise PartitionError(f"a partition needs at least one VP, not {vp_count}")
        self.config = config
        self.platform = platform
        self.registry = registry
        self.vp_count = vp_count
        self.on_event = on_event
        self.lock = threading.Lock()  # simple values only; see the class docstring
        self.log_once = LogOnce(log)
        self.msrs = MsrRegistry()
        self.hypercalls = HypercallTable()
        self.dispatcher = HypercallDispatcher(self.hypercalls, platform.memory,
                                              log_once=self.log_once)
        self.vps = {index: VpState(index) for index in range(vp_count)}
        self.state: dict[str, object] = {}
        self.reference_clock: "ReferenceClock | None" = None
        self.handler_failures = 0  # MSR handlers that raised something other than a #GP
        self._created = time.monotonic()
        self._event_callback_failed = False
        self._attaching: str | None = None
        self.attached = tuple(registry.dependency_order(config.active(registry)))
        for name in self.attached:
            self._attach(name)
        self._register_denied_hypercalls()
        self._core = self._find_core()
        log.info("Hyper-V partition: %d VP(s), %s", vp_count, ", ".join(self.attached))

    # -- construction -------------------------------------------------------------------------

    def _attach(self, name: str) -> None:
        enlightenment = self.registry[name]
        if enlightenment.attach is None:
            raise PartitionError(f"{name} is not implemented yet")
        self._attaching = name
        try:
            state = enlightenment.attach(self)
        finally:
            self._attaching = None
        registered_msrs = {m.index for m in self.msrs if m.owner == name}
        # Only the attaching feature can register its declared codes (the registry gives each
        # code one feature), so the declared codes now in the table are the ones it registered.
        registered_calls = {code for code in enlightenment.hypercalls if code in self.hypercalls}
        if registered_msrs != set(enlightenment.msrs) or \
                registered_calls != set(enlightenment.hypercalls):
            raise PartitionError(f"{name} registered MSRs {sorted(map(hex, registered_msrs))} and "
                                 f"hypercalls {sorted(map(hex, registered_calls))} but declares "
                                 f"{sorted(map(hex, enlightenment.msrs))} and "
                                 f"{sorted(map(hex, enlightenment.hypercalls))}")
        self.state[name] = state

    def _find_core(self) -> CoreState:
        for state in self.state.values():
            if isinstance(state, CoreState):
                return state
        raise PartitionError("the registry has no hypercall core (hv-core)")

    def _register_denied_hypercalls(self) -> None:
        """Implemented-but-disabled features marked ``denied_when_off``: their calls exist and
        answer ACCESS_DENIED (TLFS: privilege not granted) instead of INVALID_HYPERCALL_CODE."""
        for enlightenment in self.registry:
            if enlightenment.name in self.attached or not enlightenment.implemented \
                    or not enlightenment.denied_when_off:
                continue
            for code in enlightenment.hypercalls:
                self.hypercalls.register(HypercallSpec(code=code, handler=_never_called,
                                                       access_allowed=False))

    def register_msr(self, index: int, *, read: Callable[[int], int],
                     write: Callable[[int, int], None] | None = None, reserved_mask: int = 0,
                     scope: MsrScope = "vp") -> SyntheticMsr:
        """For ``attach``: register a synthetic MSR the attaching feature declares."""
        owner = self._require_attaching("register_msr")
        if index not in self.registry[owner].msrs:
            raise PartitionError(f"{owner} registers {msr_name(index)} ({index:#x}) without "
                                 "declaring it")
        return self.msrs.register(SyntheticMsr(index=index, name=msr_name(index), read=read,
                                               write=write, reserved_mask=reserved_mask,
                                               scope=scope, owner=owner))

    def register_hypercall(self, spec: HypercallSpec) -> HypercallSpec:
        """For ``attach``: register a hypercall the attaching feature declares."""
        owner = self._require_attaching("register_hypercall")
        if spec.code not in self.registry[owner].hypercalls:
            raise PartitionError(f"{owner} registers {spec.name} ({spec.code:#06x}) without "
                                 "declaring it")
        self.hypercalls.register(spec)
        return spec

    def add_test_hypercall(self, spec: HypercallSpec) -> HypercallSpec:
        """For harnesses: answer an extra hypercall code that no enlightenment claims (a test
        call, a vendor call under study). It goes through the same dispatcher, validation,
        counters and trace as every other call. Refuses a code already registered."""
        self.hypercalls.register(spec)  # raises HypercallTableError on a duplicate code
        return spec

    def _require_attaching(self, what: str) -> str:
        if self._attaching is None:
            raise PartitionError(f"{what} is only for an enlightenment's attach()")
        return self._attaching

    # -- what the VMM asks --------------------------------------------------------------------

    @property
    def memory(self) -> "GuestMemory":
        return self.platform.memory

    @property
    def guest_os_id(self) -> int:
        """The current HV_X64_MSR_GUEST_OS_ID value."""
        return self._core.guest_os_id

    def hypercall_port_active(self) -> bool:
        """Whether an OUT to :data:`HYPERCALL_PORT` is a hypercall now: only while the hypercall
        page is enabled (HYPERCALL.Enable = 1, GUEST_OS_ID != 0; TLFS "Establishing the
        Hypercall Interface").
        Otherwise the OUT is an ordinary write to an unclaimed port."""
        return self._core.page_enabled

    def watch_hypercall_port(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(active)`` now and each time :meth:`hypercall_port_active` changes,
        under the hypercall page's lock, so what the caller records is never older than the
        page (a VMM arming its fast path for the port). It must be quick and call nothing
        that blocks or reaches the platform."""
        slot = self._core.slot
        with slot.lock:
            slot.watchers.append(lambda page: callback(page is not None))
            callback(slot.page is not None)

    @property
    def hypercall_page_gpa(self) -> int | None:
        """GPA of the hypercall page while it is enabled (for RIP checks and #UD placement)."""
        return self._core.page_gpa

    def msr_indices(self) -> tuple[int, ...]:
        """The synthetic MSRs this VM implements (the ones that do not #GP)."""
        return self.msrs.indices()

    @staticmethod
    def msr_filter_ranges() -> tuple[tuple[int, int], ...]:
        """Inclusive MSR ranges the VMM must deny to KVM (``KVM_X86_SET_MSR_FILTER``) so that
        every access, implemented or not, reaches :meth:`msr_read`/:meth:`msr_write`. Deny the
        whole ranges, not just :meth:`msr_indices`: an unimplemented synthetic MSR must #GP here,
        not reach a host kernel's in-kernel Hyper-V (Linux ``arch/x86/kvm/hyperv.c``, enabled
        by "Hv#1" in CPUID unless ``CONFIG_KVM_HYPERV=n``)."""
        return HV_X64_SYNTHETIC_MSR_RANGES

    def cpuid_leaves(self) -> list[CpuidEntry]:
        """The Hyper-V CPUID leaves (0x40000000+) matching this partition."""
        return hyperv_cpuid_leaves(self.config, self.vp_count, registry=self.registry)

    def reference_time_100ns(self, vp_index: int = 0) -> int | None:
        """Partition reference time now (100 ns units) with hv-time on, else None."""
        clock = self.reference_clock
        if clock is None:
            return None
        try:
            return clock.now(vp_index)
        except Exception:  # noqa: BLE001 -- only used for reports; never fail the caller
            self.log_once("reference_time_failed", logging.ERROR,
                          "reading reference time failed", exc_info=True)
            return None

    # -- vCPU entry points --------------------------------------------------------------------

    def msr_read(self, vp_index: int, index: int) -> int:
        """RDMSR ``index`` on VP ``vp_index``. Returns the value or raises
        :class:`~hvvmm.hv.msr.MsrAccessFault` (inject #GP)."""
        vp = self.vps.get(vp_index) or self._vp(vp_index)  # the hot path: no frame
        value = vp.constant_msrs.get(index)
        if value is None:
            try:
                value = self.msrs.read(vp_index, index)
            except MsrAccessFault as fault:
                self._msr_fault(vp, fault)
                raise
            except Exception as error:  # noqa: BLE001 -- a handler bug: #GP, logged, counted
                fault = self._handler_failed(vp_index, index, False, None, error)
                self._msr_fault(vp, fault)
                raise fault from error
            if index in CONSTANT_MSRS and self.msrs.get(index).read_only:
                vp.constant_msrs[index] = value
        vp.msr_reads[index] += 1
        if self.on_event is not None:
            self._emit(vp_index, "msr_read", index, msr_name(index), {}, {"value": f"{value:#x}"})
        return value

    def msr_write(self, vp_index: int, index: int, value: int) -> None:
        """WRMSR ``index`` = ``value`` on VP ``vp_index``; raises
        :class:`~hvvmm.hv.msr.MsrAccessFault` (inject #GP)."""
        vp = self._vp(vp_index)
        if not 0 <= value <= HV_U64_MASK:
            raise ValueError(f"MSR value {value!r} is not a u64 (a VMM bug, not a guest error)")
        try:
            self.msrs.write(vp_index, index, value)
        except MsrAccessFault as fault:
            self._msr_fault(vp, fault)
            raise
        except Exception as error:  # noqa: BLE001 -- a handler bug: #GP, logged, counted
            fault = self._handler_failed(vp_index, index, True, value, error)
            self._msr_fault(vp, fault)
            raise fault from error
        vp.msr_writes[index] += 1
        if self.on_event is not None:
            self._emit(vp_index, "msr_write", index, msr_name(index), {"value": f"{value:#x}"},
                       {})

    def constant_msr_values(self, vp_index: int) -> Mapping[int, int]:
        """The MSRs whose value cannot change while the VM exists (:data:`CONSTANT_MSRS`) that
        VP ``vp_index`` has read so far, index -> value: a live, read-only view. A VMM may
        answer later reads of these itself, if it counts them (:meth:`add_msr_read_source`)
        and no one traces (``on_event``): each read must still be seen."""
        return MappingProxyType(self._vp(vp_index).constant_msrs)

    def add_msr_read_source(self, vp_index: int, source: Callable[[], Mapping[int, int]]) -> None:
        """Count the reads ``source()`` reports (index -> reads so far) as reads of VP
        ``vp_index``: those a VMM answered itself (:meth:`constant_msr_values`)."""
        self._vp(vp_index).msr_read_sources.append(source)

    def hypercall(self, vp_index: int, io: HypercallRegisters) -> HypercallOutcome:
        """Handle the hypercall VP ``vp_index`` is making (its registers behind ``io``).

        Call it for an OUT to :data:`HYPERCALL_PORT` while :meth:`hypercall_port_active`. The
        outcome says what to do: ``inject_ud`` -> inject #UD with RIP at the page base;
        ``retried`` -> the input value was rewritten and ``io.retry()`` was called (RIP to the
        page base); otherwise the result is in RAX (EDX:EAX) and RIP must be left alone
        (Linux ``arch/x86/kvm/x86.c`` ``complete_fast_pio_out()`` skips the OUT only if RIP is
        unchanged). Never raises for guest input."""
        vp = self._vp(vp_index)
        outcome = self.dispatcher.dispatch(io, vp_index)
        # Codes nobody registered share one counter: the guest picks them, 65536 of them.
        code = outcome.code if outcome.code in self.hypercalls else UNKNOWN_HYPERCALL
        vp.hypercalls[(code, outcome.status)] += 1
        if self.on_event is not None:
            result: dict[str, Any]
            if outcome.inject_ud:
                result = {"fault": "#UD"}
            elif outcome.retried:
                result = {"continued_at_rep": outcome.reps_completed}
            else:
                result = {"status": status_name(outcome.status or 0),
                          "reps_completed": outcome.reps_completed}
            if outcome.reason:
                result["reason"] = outcome.reason
            inputs = {"control": f"{outcome.control:#x}", "fast": outcome.fast,
                      "long_mode": outcome.long_mode}
            if outcome.rep_count:
                inputs.update(rep_count=outcome.rep_count, rep_start=outcome.rep_start)
            if outcome.input_gpa is not None:
                inputs.update(input_gpa=f"{outcome.input_gpa:#x}",
                              output_gpa=f"{outcome.output_gpa or 0:#x}")
            self._emit(vp_index, "hypercall", outcome.code, outcome.name, inputs, result)
        return outcome

    def hypercall_simple(self, vp_index: int, io: HypercallRegisters, long_mode: bool,
                         control: int, first: int, second: int) -> bool:
        """The compact path of :meth:`hypercall` for the common call shape
        (:meth:`~hvvmm.hv.hypercall.HypercallDispatcher.dispatch_simple` says which, and what
        the caller must have checked and read). True: the call was answered and counted exactly
        as :meth:`hypercall` would have; False: nothing happened, call :meth:`hypercall`. With
        an ``on_event`` callback it always says False, so trace events come from one place."""
        if self.on_event is not None or control & NOT_SIMPLE_CONTROL_BITS:
            return False
        call = self.simple_hypercalls(vp_index)[control]
        if call is None:
            return False
        status = call(io, long_mode, first, second)
        if status is None:
            return False
        if status == SUCCESS_NOT_WRITTEN:
            write_success_result(io, long_mode)
        return True

    def simple_hypercalls(self, vp_index: int) -> SimpleCalls:
        """The compact path of VP ``vp_index`` for a VMM's hot path, prepared once per VP:
        ``calls[control]`` for an input value of a call code and the fast bit only (check
        :data:`~hvvmm.hv.hypercall.NOT_SIMPLE_CONTROL_BITS` first) is None or
        ``call(io, long_mode, first, second)``, which returns None (nothing happened: call
        :meth:`hypercall`), or the status written as the result (-1: continued), or
        :data:`~hvvmm.hv.hypercall.SUCCESS_NOT_WRITTEN`: the call succeeded and the caller
        writes the result (:func:`~hvvmm.hv.hypercall.write_success_result`, or faster), so a
        VMM with the registers at hand writes them once. Calls are counted as :meth:`hypercall`
        counts them. Use it only while ``on_event`` is None: trace events come from
        :meth:`hypercall` alone (:meth:`hypercall_simple` checks that for its callers)."""
        vp = self._vp(vp_index)  # a VMM bug, before any handler runs, as in hypercall
        calls = vp.simple_calls
        if calls is None:
            calls = vp.simple_calls = self.dispatcher.simple_calls(vp_index, vp.hypercalls)
        return calls

    def reset(self) -> None:
        """VM reset: every enlightenment's state back to its reset value (overlays removed,
        GUEST_OS_ID/HYPERCALL/REFERENCE_TSC/crash MSRs 0, Locked cleared, reference time
        re-based from the platform). Counters are kept; log-once memory is cleared so the next
        boot's events are logged again. Call with every vCPU stopped."""
        # No partition lock around this: the features reset their own state, and removing
        # overlays may park vCPUs (see hvvmm.hv.platform).
        for name in reversed(self.attached):
            reset = getattr(self.state.get(name), "reset", None)
            if reset is not None:
                reset()
        self.log_once.forget()
        log.info("Hyper-V partition reset")

    # -- observability ------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """JSON-ready per-VP counters (``{"vp0": {...}, ...}``)."""
        return {f"vp{index}": vp.counters() for index, vp in sorted(self.vps.items())}

    # -- internals ----------------------------------------------------------------------------

    def _vp(self, vp_index: int) -> VpState:
        try:
            return self.vps[vp_index]
        except KeyError:
            raise ValueError(f"VP index {vp_index!r} outside 0..{self.vp_count - 1} "
                             "(a VMM bug)") from None

    def _msr_fault(self, vp: VpState, fault: MsrAccessFault) -> None:
        op = "write" if fault.write else "read"
        vp.msr_faults[(fault.index, op)] += 1
        # Keyed by named MSR and operation only: reasons can carry guest values (reserved bits
        # set, the page address), the unnamed indices of the filtered ranges share one key, and
        # every distinct key spends the shared log-once budget.
        named = fault.index in SYNTHETIC_MSR_NAMES
        self.log_once(("msr_fault", fault.index if named else None, op), logging.WARNING,
                      "vp%d: %s%s", vp.index, fault,
                      "" if named else " (MSRs without a TLFS name: one warning for all)")
        if self.on_event is not None:
            inputs = {"value": f"{fault.value:#x}"} if fault.value is not None else {}
            self._emit(vp.index, f"msr_{op}", fault.index, msr_name(fault.index), inputs,
                       {"fault": "#GP", "reason": fault.reason})

    def _handler_failed(self, vp_index: int, index: int, write: bool, value: int | None,
                        error: BaseException) -> MsrAccessFault:
        """A handler raised something other than MsrAccessFault: the guest gets #GP (the TLFS
        has no better answer and the VMM must survive), the traceback is logged once per MSR and
        :attr:`handler_failures` counts it so tests notice."""
        self.handler_failures += 1
        self.log_once(("msr_handler_failed", index, write), logging.ERROR,
                      "vp%d: handler for %s failed; injecting #GP", vp_index, msr_name(index),
                      exc_info=error)
        return MsrAccessFault(index, write=write, value=value,
                              reason=f"internal error in the handler ({type(error).__name__})")

    def _emit(self, vp_index: int, kind: str, number: int, name: str, inputs: dict[str, Any],
              result: dict[str, Any]) -> None:
        callback = self.on_event
        if callback is None:
            return
        event = TraceEvent(time=time.monotonic() - self._created, vp=vp_index, kind=kind,
                           number=number, name=name, inputs=inputs, result=result)
        try:
            callback(event)
        except Exception:  # noqa: BLE001 -- an observer must not break the guest's access
            if not self._event_callback_failed:
                self._event_callback_failed = True
                log.exception("on_event callback failed (logged once)")


def _never_called(request: HypercallRequest) -> None:
    # Registered with access_allowed=False: the dispatcher answers ACCESS_DENIED first.
    raise HypercallError(HvStatus.HV_STATUS_ACCESS_DENIED)
