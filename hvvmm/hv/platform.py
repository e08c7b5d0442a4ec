"""What the Hyper-V emulator needs from the VMM: the :class:`HvPlatform` protocol.

The emulator (:mod:`hvvmm.hv.partition` and :mod:`hvvmm.enlightenments`) never talks to KVM. Every
service it needs from the machine goes through this small protocol: guest RAM, the vCPU count,
the guest TSC and its rate, the LAPIC timer rate, overlay pages, and a few requests (yield, idle,
reset, crash report). The VMM implements it over KVM; unit tests use ``FakePlatform`` in
``tests/unit/hvfakes.py``. This is the seam OpenVMM draws between ``hv1_emulator`` and a backend.

Threading: the emulator calls these methods from the vCPU thread that took the exit (``vp_index``
is that vCPU) and **never while holding any emulator lock**. That matters for the overlay calls:
changing memslots may park every other vCPU, and a vCPU blocked on an emulator lock inside its
exit handler could never park. :class:`OverlaySlot` is how the emulator keeps that rule.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from hvvmm.hv.hvdef import (HV_CRASH_CTL_CRASH_NOTIFY, HV_CRASH_CTL_CRASH_NOTIFY_MSG, HV_PAGE_SIZE,
                             GuestOsId, decode_guest_os_id)

if TYPE_CHECKING:
    from hvvmm.logonce import LogOnce
    from hvvmm.memory import GuestMemory


class OverlayError(Exception):
    """The platform cannot place an overlay page at the requested GPA (outside the guest-physical
    address space, or on top of another overlay)."""


class OverlayPage(Protocol):
    """A hypervisor-owned page shown to the guest at ``gpa``, hiding whatever is below it.

    ``write`` changes the page's contents from the host side (the guest sees the change at
    once); the emulator uses it only for the reference TSC page. TLFS "Establishing the Hypercall
    Interface" and ``timers.md``: overlays cover whatever is mapped at the GPA, and removing one
    uncovers it again (as QEMU ``hw/hyperv/hyperv.c`` does with MemoryRegion overlays).
    """

    @property
    def gpa(self) -> int: ...

    def write(self, offset: int, data: bytes) -> None: ...

    # For guest-writable overlays (the SynIC message and event-flag pages), which the guest and
    # the emulator both change while the guest runs:

    def read(self, offset: int, size: int) -> bytes:
        """The page's current contents at ``offset`` (what the guest sees)."""
        ...

    def fetch_or_u8(self, offset: int, mask: int) -> int:
        """OR ``mask`` into the byte at ``offset`` with one locked read-modify-write (as the
        guest's own ``lock or``/``lock bts`` would) and return the byte's previous value. A
        guest clearing other bits of the byte at the same time never has its change undone, and
        on x86 the locked instruction is also a full memory barrier: stores before it are visible
        before loads after it (the SynIC relies on this, see ``synic.py``)."""
        ...


class HvPlatform(Protocol):
    """Services of the VMM the emulator uses. All sizes in bytes, times as stated.

    Attributes (read whenever needed; constant for the life of the VM unless stated):

    * ``memory`` -- guest RAM (bounds-checked :class:`hvvmm.memory.GuestMemory`).
    * ``vp_count`` -- number of virtual processors; VP indices are ``0 .. vp_count - 1`` in the
      order of the MADT / APIC IDs.
    * ``tsc_frequency_hz`` -- the guest TSC rate (``KVM_GET_TSC_KHZ`` x 1000); served by
      HV_X64_MSR_TSC_FREQUENCY and used for the reference TSC page scale.
    * ``apic_frequency_hz`` -- the LAPIC timer rate (10**9 with KVM's in-kernel LAPIC,
      ``APIC_BUS_CYCLE_NS`` = 1); served by HV_X64_MSR_APIC_FREQUENCY.
    * ``guest_tsc_at_reference_zero`` -- the guest TSC value at which partition reference time is
      0: the guest TSC when the VM was created (0 on KVM, which starts guest TSCs at 0). Read at
      partition creation and again at :meth:`Partition.reset`, so a VMM that resets the guest TSC
      on reboot updates it first.
    """

    memory: "GuestMemory"
    vp_count: int
    tsc_frequency_hz: int
    apic_frequency_hz: int
    guest_tsc_at_reference_zero: int

    def read_guest_tsc(self, vp_index: int) -> int:
        """The guest's current TSC as VP ``vp_index`` would read it with RDTSC (all VPs share one
        TSC offset and rate). Called from that VP's thread during an MSR exit; on KVM,
        ``KVM_GET_MSRS(IA32_TSC)`` on that vCPU."""
        ...

    def vp_runtime_100ns(self, vp_index: int) -> int:
        """CPU time VP ``vp_index`` has run, in 100 ns units (the vCPU thread's CPU time)."""
        ...

    def yield_vp(self, vp_index: int) -> None:
        """A scheduling hint from HvCallNotifyLongSpinWait: let another vCPU run (``sched_yield``).
        Must return promptly."""
        ...

    def idle_vp(self, vp_index: int) -> None:
        """Guest idle (HV_X64_MSR_GUEST_IDLE read): return when an interrupt is pending for the VP
        **even if the guest has IF = 0** (TLFS ``vp-properties.md``), or after a short bound
        (a millisecond or so). Returning early is always allowed: callers re-check."""
        ...

    def request_reset(self) -> None:
        """The guest asked for a system reset (HV_X64_MSR_RESET). The VMM resets the VM after the
        current exit: hvvmm ends the run and ``--on-reset restart`` boots a fresh machine; a VMM
        that resets in place calls :meth:`Partition.reset`. Must not block on other vCPUs."""
        ...

    def report_crash(self, report: "CrashReport") -> None:
        """The guest reported a crash through CRASH_CTL. Keep the VM running (Windows writes its
        dump after this); record/print the report."""
        ...

    def map_overlay(self, gpa: int, content: bytes, *, readonly: bool, name: str) -> OverlayPage:
        """Show the 4096-byte ``content`` at page-aligned ``gpa``, hiding what is below.
        ``readonly``: guest writes fault (#GP) and are not applied (hypercall and TSC pages).
        Raises :class:`OverlayError` if the page cannot be placed there."""
        ...

    def unmap_overlay(self, page: OverlayPage) -> None:
        """Remove an overlay; the guest sees the RAM (or nothing) below it again."""
        ...

    def boot_zeroed_ranges(self) -> Sequence[tuple[int, int]]:
        """``(gpa, size)`` ranges of guest RAM that read as zero **now** and will until the guest
        writes them (HvExtCallGetBootZeroedMemory). Return ``()`` unless the VMM tracks this
        (e.g. with dirty logging): reporting a page that is not zero leaks stale data into the
        guest's freshly "zeroed" allocations."""
        ...

    # -- services for the interrupt side (SynIC, synthetic timers, PV IPI) ----------------------
    # Unlike the methods above, these may be called from any thread (the timer thread
    # included), and they never block on a vCPU.

    def host_time_ns(self) -> int:
        """The host monotonic clock (ns) that :meth:`start_timer` deadlines are in. Partition
        reference time advances at the same nominal rate (100 ns per unit) but has its own
        origin; convert with an anchor read on a vCPU thread."""
        ...

    def start_timer(self, deadline_ns: int, callback: Callable[[], None]) -> "TimerHandle":
        """Call ``callback()`` once, on the VMM's single timer thread, at host time
        ``deadline_ns`` (never earlier; a deadline already past fires as soon as possible).
        Returns a handle whose ``cancel()`` stops it (idempotent; a callback already running is
        not interrupted). Callbacks must be short and must not block on a vCPU."""
        ...

    def signal_interrupt(self, vp_index: int, vector: int) -> bool:
        """Raise fixed-mode, edge-triggered ``vector`` on VP ``vp_index``'s local APIC. Thread-safe
        and non-blocking. False if the LAPIC did not accept it (e.g. software-disabled)."""
        ...

    def run_on_vp(self, vp_index: int, work: Callable[[], None]) -> None:
        """Run ``work()`` on VP ``vp_index``'s thread while it is outside the guest (at once when
        called from that thread), e.g. to read that VP's TSC or LAPIC. Non-blocking: the work
        runs later when called from another thread."""
        ...

    def edit_lapic(self, vp_index: int, edit: Callable[[bytearray], bool]) -> bool:
        """Read VP ``vp_index``'s local APIC register page (1024 bytes, the ``KVM_GET_LAPIC``
        layout: xAPIC register offsets, ISR at 0x100, IRR at 0x200, 32 bits per 16-byte row),
        call ``edit(registers)``, and if it returns True write the page back
        (``KVM_SET_LAPIC``); returns whether it was written. **Only from** :meth:`run_on_vp`
        **work on that VP** (the vCPU is outside the guest, so nothing on it changes the page
        meanwhile). Interrupts sent with :meth:`signal_interrupt` to the VP wait until the write
        is done, so none is lost by writing back an older IRR; other sources (guest IPIs, device
        interrupts) are not held off, so keep ``edit`` short. The SynIC uses it for AutoEOI."""
        ...

    # -- remote TLB flushes (hv-tlbflush) -----------------------------------------------------

    def flush_guest_tlbs(self, vp_index: int, vps: Sequence[int]) -> None:
        """Flush the whole guest TLB (every address space and PCID, global entries included) of
        each VP in ``vps`` -- which may include the caller -- and return only when none of them
        can use a translation cached before the call: each is flushed already or will be before
        it next runs guest code. Called from VP ``vp_index``'s thread during its hypercall exit
        (the TLFS guarantee of HvCallFlushVirtualAddressSpace/List, see ``tlbflush.py``); may
        park every other vCPU meanwhile."""
        ...


class TimerHandle(Protocol):
    """What :meth:`HvPlatform.start_timer` returns."""

    def cancel(self) -> None: ...


class OverlaySlot:
    """One overlay the emulator places, moves and removes (the hypercall page, the TSC page).

    The platform is called with no lock held (see the module docstring); the slot's own lock
    (``lock``, shared with the owning feature's state) only guards the bookkeeping. Concurrent
    changes are linearized by a generation number: the change that started last wins, and an
    overlay placed by a change that lost the race is removed again. ``commit`` callbacks run
    under ``lock`` when (and only when) the change is the one that stands, so a feature updates
    its MSR value together with the page.
    """

    def __init__(self, platform: HvPlatform, name: str, *, readonly: bool = True,
                 lock: threading.Lock | threading.RLock | None = None):
        self._platform = platform
        self.name = name
        self.readonly = readonly
        self.lock = lock if lock is not None else threading.Lock()
        self._page: OverlayPage | None = None
        self._generation = 0
        # Called with the page (None: removed) under ``lock`` each time the overlay changes, so
        # what they record can never be older than the page: quick, and never the platform.
        self.watchers: list[Callable[[OverlayPage | None], None]] = []

    @property
    def page(self) -> OverlayPage | None:
        return self._page

    @property
    def gpa(self) -> int | None:
        page = self._page
        return page.gpa if page is not None else None

    def place(self, gpa: int, content: bytes,
              commit: Callable[[], None] | None = None) -> None:
        """Show ``content`` at ``gpa`` (moving the overlay if it is elsewhere; an overlay already
        at ``gpa`` is kept as it is). Raises :class:`OverlayError` if the platform refuses; then
        nothing changes and ``commit`` is not called."""
        with self.lock:
            if self._page is not None and self._page.gpa == gpa:
                if commit is not None:
                    commit()
                return
            self._generation += 1
            generation = self._generation
        page = self._platform.map_overlay(gpa, content, readonly=self.readonly, name=self.name)
        with self.lock:
            if generation == self._generation:
                stale, self._page = self._page, page
                if commit is not None:
                    commit()
                self._notify()
            else:  # a later change won while we were mapping
                stale = page
        if stale is not None:
            self._platform.unmap_overlay(stale)

    def remove(self, commit: Callable[[], None] | None = None) -> None:
        """Take the overlay away (if any); the RAM below shows again."""
        with self.lock:
            self._generation += 1
            stale, self._page = self._page, None
            if commit is not None:
                commit()
            if stale is not None:
                self._notify()
        if stale is not None:
            self._platform.unmap_overlay(stale)

    def _notify(self) -> None:
        for watcher in self.watchers:
            watcher(self._page)


def raise_interrupt(platform: "HvPlatform", vp_index: int, vector: int, log_once: "LogOnce",
                    source: str) -> bool:
    """Send ``vector`` to VP ``vp_index`` for a guest-triggered ``source`` (an IPI, a SINT, a
    timer). True if the LAPIC accepted it. A platform failure (an ioctl error) is logged once
    per source and VP and reads as not accepted: the interrupt is lost, and no exception reaches
    a hypercall or MSR handler that has already delivered to other targets."""
    try:
        return bool(platform.signal_interrupt(vp_index, vector))
    except Exception:  # noqa: BLE001 -- one policy for every caller, see the docstring
        log_once((source, "raise_interrupt_failed", vp_index), logging.ERROR,
                 "vp%d: %s: sending vector %#x failed", vp_index, source, vector, exc_info=True)
        return False


# --------------------------------------------------------------------------------------------
# Crash reports (TLFS partition-properties.md "Partition Crash Enlightenment")
# --------------------------------------------------------------------------------------------

CRASH_MESSAGE_MAX_BYTES = HV_PAGE_SIZE  # Linux sends at most one page (HV_HYP_PAGE_SIZE)


@dataclass(frozen=True)
class CrashReport:
    """What a guest reported through the crash MSRs.

    ``parameters`` are CRASH_P0..P4 as written. Windows puts the bugcheck code in P0 and its four
    parameters in P1..P4; Linux without the message channel writes P0 = error code, P1 = GuestOsId,
    P2 = RIP, P3 = RAX, P4 = RSP. With CrashMessage (CRASH_CTL bit 62) P3 is the GPA and P4 the
    length of a text message (Linux: the tail of the kernel log); ``message`` holds it, decoded
    leniently, or ``message_error`` says why it could not be read.
    """

    vp_index: int
    crash_ctl: int
    parameters: tuple[int, int, int, int, int]
    guest_os_id: int
    message: str | None = None
    message_gpa: int | None = None
    message_length: int | None = None
    message_error: str | None = None
    reference_time_100ns: int | None = None

    @property
    def guest_os(self) -> GuestOsId:
        return decode_guest_os_id(self.guest_os_id)

    @property
    def crash_notify(self) -> bool:
        return bool(self.crash_ctl & HV_CRASH_CTL_CRASH_NOTIFY)

    @property
    def crash_message(self) -> bool:
        return bool(self.crash_ctl & HV_CRASH_CTL_CRASH_NOTIFY_MSG)

    def to_dict(self) -> dict:
        """A JSON-ready dict; 64-bit values as hex strings (JSON numbers lose precision)."""
        data = asdict(self)
        data["crash_ctl"] = f"{self.crash_ctl:#018x}"
        data["parameters"] = [f"{p:#018x}" for p in self.parameters]
        data["guest_os_id"] = f"{self.guest_os_id:#018x}"
        data["guest_os"] = str(self.guest_os)
        if self.message_gpa is not None:
            data["message_gpa"] = f"{self.message_gpa:#x}"
        if self.guest_os.is_windows:
            data["bugcheck_code"] = f"{self.parameters[0]:#x}"
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        """One line for the log."""
        params = " ".join(f"P{i}={p:#x}" for i, p in enumerate(self.parameters))
        text = f"guest crash reported by vp{self.vp_index} ({self.guest_os}): {params}"
        if self.message:
            last = self.message.strip().splitlines()[-1:] or [""]
            text += f"; last message line: {last[0][:200]!r}"
        elif self.message_error:
            text += f"; message unavailable: {self.message_error}"
        return text
