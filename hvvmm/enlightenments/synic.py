"""hv-synic: the synthetic interrupt controller (SynIC) of every VP.

TLFS ``inter-partition-communication.md`` (cited as [I]), ``datatypes/hv_message.md`` and
``datatypes/hv_synic_event_flags.md``; kvm-unit-tests ``x86/hyperv_synic.c``.
PostMessage/SignalEvent and the connection table are in
:mod:`hvvmm.enlightenments.connections`; this module registers their hypercalls because the
privileges that gate them come with the SynIC (below).

Registers (per VP; CPUID 0x40000003 EAX bit 2, AccessSynicRegs):

* ``SCONTROL`` (0x40000080): bit 0 Enable, 63:1 RsvdP (kept as written). Reset 0 [I] -- OpenVMM
  starts it at 1 ("KVM incorrectly initializes SCONTROL to 0", OpenVMM
  ``vm/hv1/hv1_emulator/src/synic.rs``); hvvmm follows the TLFS.
  While it is clear "message queuing and event flag notifications cannot be directed to this
  virtual processor" [I].
* ``SVERSION`` (0x40000081): read-only, 1; a write raises #GP [I].
* ``SIEFP`` / ``SIMP`` (0x40000082 / 0x40000083): bit 0 Enable, 11:1 RsvdP (kept as written, read
  back exactly), 63:12 GPFN. Each enabled page is a guest-writable overlay
  (``platform.map_overlay(readonly=False)``): the guest reads and writes it like RAM while the
  SynIC writes messages and flags into it [I]. Disabling removes the overlay and uncovers the RAM
  below. The page is the VP's own: "cleared to zero" at creation and reset [I], and otherwise
  keeps its contents while disabled or moved to another GPFN (an overlay moves, RAM does not).
  A GPFN outside the guest-physical space is not a fault: the page is "not accessible to the
  guest" [I]; the MSR keeps the value.
* ``EOM`` (0x40000084): a write of any value is end-of-message; reads return 0 [I] (kvm-unit-tests
  ``hyperv_synic`` fails on a non-zero read).
* ``SINT0..15`` (0x40000090..0x4000009F): 7:0 Vector, 16 Masked, 17 AutoEOI, 18 Polling; reset
  0x10000 (masked) [I]. Every other bit is refused with #GP (the TLFS marks 15:8 and 63:19 RsvdP;
  19 AsIntercept and 20 Proxy exist only for the root and VTLs). "Valid values for vector are
  16-255 inclusive. Specifying an invalid vector number results in #GP" [I]: like KVM and Xen,
  only for an unmasked SINT (kvm-unit-tests write ``0xFF | Masked`` and ``0x0 | Masked``).
  Polling "has the effect of unmasking an interrupt source, except that an actual interrupt is not
  generated" [I]; it is accepted although SintPollingModeAvailable (EDX bit 17) is not advertised,
  as KVM and QEMU do.
* SIRBP (0x40000085) is implemented by no anchor and not here: it raises #GP like every synthetic
  MSR nobody registers.

CPUID: AccessSynicRegs; PostMessages and SignalEvents (EBX bits 4/5), which QEMU sets whenever
hv-synic is on ("SynIC and Vmbus devices require messages/signals hypercalls"), so the calls are
reachable (connections are registered at run time by a test device or the host); and
DeprecatingAutoEOI (0x40000004 EAX bit 9), which KVM, Cloud Hypervisor and OpenVMM-on-KVM set too
and which makes Linux program its SINTs without AutoEOI (Linux ``drivers/hv/hv.c``
``hv_synic_enable_regs()``). Without hv-synic the two hypercalls still exist and answer
ACCESS_DENIED (privilege not granted).

Messages (:meth:`VpSynic.deliver_message`): the 16 slots of 256 bytes of the SIM page, one per
SINT. A message is written only into a free slot (MessageType == HvMessageTypeNone): everything
but the MessageType first and the MessageType last, so a guest polling the slot never sees a
half-written message; then the SINT's vector is raised (unless Polling). A busy slot gets
MessagePending set (flags bit 0) and the message stays with its sender, which retries when the
guest writes EOM [I]. Delivery needs SCONTROL.Enable, SIMP enabled and the SINT unmasked (or
Polling). For a masked SINT the TLFS writes the message and loses the interrupt, which leaves the
message in its slot with nothing to tell the guest; hvvmm keeps it queued instead, as OpenVMM
does (its ``post_message`` refuses a masked SINT), and delivers it once the SINT is unmasked.

The MessagePending race: the guest frees a slot by writing MessageType = 0, then (after a barrier)
writes EOM if it sees MessagePending. If it freed the slot between our look at MessageType and our
setting MessagePending, it may never see the flag. So the flag is set with a locked
read-modify-write (a full barrier, :meth:`OverlayPage.fetch_or_u8`) and MessageType is read again
after it: if the slot is free by then the message is delivered at once; otherwise the guest must
see the flag (Dekker's argument: each side stores, fences, then loads the other's location).

Event flags (:meth:`VpSynic.signal_event`): the SIEF page holds 16 x 2048 flag bits, 256 bytes per
SINT. The flag is set with one locked OR on its byte, so the guest's concurrent LOCK AND/CMPXCHG
clearing of neighbouring flags is never undone [I: "Clear ... by using a locked (atomic)
operation"]; the SINT is raised only if the flag was clear [I]. A masked SINT refuses the event
(HvCallSignalEvent answers INVALID_SYNIC_STATE [I]).

Retrying senders: :meth:`VpSynic.add_eom_listener` callbacks run on the VP's thread after each EOM
write [I: EOM "causes the hypervisor to scan the internal message buffer queue(s)"], and also after
SCONTROL, SIMP or a SINT change that lets the SynIC take a message it could not take before.
They are called with no arguments.

AutoEOI (SINTx bit 17): "an implicit EOI should be performed by the hypervisor when an interrupt
is delivered to the virtual processor. In addition, the hypervisor will automatically clear the
corresponding flag in the in-service register (ISR)" [I]. KVM does that inside its interrupt
acknowledge path (``lapic.c``, the SynIC ``auto_eoi_bitmap``), which user space cannot reach: KVM's
in-kernel LAPIC moves the vector from IRR to ISR when it injects it, the guest never EOIs, and the
ISR bit would block that vector and everything of equal or lower priority for good. So after
raising an AutoEOI SINT hvvmm arms a check (:class:`AutoEoi`): on the platform timer thread a
short delay later, then on the VP's own thread (``platform.run_on_vp``) it reads the LAPIC page
(``KVM_GET_LAPIC``) and, for each such vector it delivered: ISR bit set -> the guest took it ->
clear the ISR bit and write the page back (``KVM_SET_LAPIC``, which also recomputes PPR); IRR bit
still set -> not taken yet (IF = 0, or blocked by priority) -> check again later, backing off to
:data:`AUTO_EOI_MAX_DELAY_NS`; neither -> done. An ISR bit is cleared only for a vector hvvmm
delivered as AutoEOI and only after the LAPIC accepted it, and the page is written only when a bit
changes. Why not something else: the EOI register is MMIO in xAPIC mode (the host cannot write it),
a host EOI through the x2APIC MSR would clear the *highest* ISR bit rather than this vector, and
the in-kernel SynIC route (``KVM_IRQ_ROUTING_HV_SINT``) needs KVM's own Hyper-V emulation, which
hvvmm keeps out of the way (it filters the MSRs; api.rst). The cost of KVM_SET_LAPIC: it rewrites
the whole page, so an interrupt arriving between the read and the write would be lost;
``platform.edit_lapic`` holds off every interrupt hvvmm sends (``signal_interrupt``: SynIC, timers,
PV IPIs) meanwhile, and writes only when an ISR bit really has to go. What it cannot hold off is an
IPI another vCPU sends through its in-kernel LAPIC or a device line in those two ioctls -- a narrow
window that exists only for AutoEOI SINTs on a host whose LAPIC sets ISR bits.
Guests that honour DeprecatingAutoEOI (Linux, current Windows) never set AutoEOI; kvm-unit-tests'
``hyperv_synic`` and ``hyperv_connections`` do. A guest that uses one vector for an AutoEOI SINT
and for another source gets that other source's ISR bit cleared too (the TLFS does not allow for
sharing either). On a host whose LAPIC never sets ISR bits the check only reads the page.

Threads and locks: MSR writes run on the VP's thread; deliveries come from any thread (vCPU
threads posting to another VP, the timer thread, host threads). Each VP has one lock guarding its
registers and page bookkeeping; pages are only touched under it, and an overlay is detached under
it before it is unmapped, so no write lands in a page being removed. The platform's blocking calls
(overlay changes) happen with no lock held; ``signal_interrupt`` (non-blocking) is called after the
lock is released. EOM listeners run with no SynIC lock held.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from collections import Counter
from typing import TYPE_CHECKING, Callable

from hvvmm.enlightenments import AttachError, Enlightenment, privileges, recommendations
from hvvmm.hv.hvdef import (
    HV_PAGE_MASK,
    HV_PAGE_SIZE,
    HV_SYNIC_SINT_COUNT,
    HV_U64_MASK,
    HV_X64_MSR_EOM,
    HV_X64_MSR_SCONTROL,
    HV_X64_MSR_SIEFP,
    HV_X64_MSR_SIMP,
    HV_X64_MSR_SINT0,
    HV_X64_MSR_SVERSION,
    HvEnlightenmentInformation,
    HvPartitionPrivilege,
    HypercallCode,
)
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.platform import OverlayError, OverlaySlot, raise_interrupt

if TYPE_CHECKING:
    from hvvmm.logonce import LogOnce
    from hvvmm.hv.partition import Partition
    from hvvmm.hv.platform import HvPlatform, OverlayPage

log = logging.getLogger(__name__)

NAME = "hv-synic"

# -- registers (TLFS inter-partition-communication.md "SynIC MSRs"; Linux hvgdk_mini.h) -----
HV_SYNIC_VERSION_1 = 1
HV_SYNIC_CONTROL_ENABLE = 1 << 0
HV_SYNIC_PAGE_ENABLE = 1 << 0  # SIMP and SIEFP: bit 0 enables, 63:12 the GPFN
HV_SYNIC_SINT_VECTOR_MASK = 0xFF
HV_SYNIC_SINT_MASKED = 1 << 16
HV_SYNIC_SINT_AUTO_EOI = 1 << 17
HV_SYNIC_SINT_POLLING = 1 << 18
HV_SYNIC_SINT_RESERVED = HV_U64_MASK & ~(HV_SYNIC_SINT_VECTOR_MASK | HV_SYNIC_SINT_MASKED
                                         | HV_SYNIC_SINT_AUTO_EOI | HV_SYNIC_SINT_POLLING)
HV_SYNIC_SINT_RESET = HV_SYNIC_SINT_MASKED
HV_SYNIC_FIRST_VALID_VECTOR = 16

# -- the SIM page: 16 x HV_MESSAGE (TLFS datatypes/hv_message.md) -------------------------------
HV_MESSAGE_SIZE = 256
HV_MESSAGE_HEADER_SIZE = 16
HV_MESSAGE_PAYLOAD_MAX = HV_MESSAGE_SIZE - HV_MESSAGE_HEADER_SIZE  # 240
HVMSG_NONE = 0
HV_MESSAGE_FLAG_PENDING = 1 << 0  # MessageFlags bit 0, MessagePending
MESSAGE_FLAGS_OFFSET = 5
MESSAGE_HEADER = struct.Struct("<IBBHQ")  # MessageType, PayloadSize, MessageFlags, Reserved, Sender

# -- the SIEF page: 16 x HV_SYNIC_EVENT_FLAGS (2048 bits each) ----------------------------------
HV_EVENT_FLAGS_BYTES = HV_PAGE_SIZE // HV_SYNIC_SINT_COUNT  # 256
HV_EVENT_FLAGS_COUNT = HV_EVENT_FLAGS_BYTES * 8  # 2048

# -- the LAPIC register page (KVM_GET_LAPIC: xAPIC offsets, one 32-bit register per 16 bytes) --
APIC_ISR = 0x100
APIC_IRR = 0x200
AUTO_EOI_FIRST_DELAY_NS = 50_000  # the guest usually takes the interrupt at its next entry
AUTO_EOI_MAX_DELAY_NS = 10_000_000  # while IF = 0 or a higher priority is in service

_U32 = struct.Struct("<I")
_EMPTY_PAGE = bytes(HV_PAGE_SIZE)


def build_message(message_type: int, payload: bytes = b"", *, sender: int = 0,
                  flags: int = 0) -> bytes:
    """An ``HV_MESSAGE``: the 16-byte header and ``payload`` (at most 240 bytes), not padded."""
    if not 0 < message_type <= 0xFFFF_FFFF:
        raise ValueError(f"message type {message_type!r} is not a non-zero u32")
    if len(payload) > HV_MESSAGE_PAYLOAD_MAX:
        raise ValueError(f"a {len(payload)}-byte payload exceeds {HV_MESSAGE_PAYLOAD_MAX} bytes")
    return MESSAGE_HEADER.pack(message_type, len(payload), flags & 0xFF, 0,
                               sender & HV_U64_MASK) + bytes(payload)


def parse_message(data: bytes) -> tuple[int, int, int, int, bytes]:
    """``(message_type, payload_size, flags, sender, payload)`` of a message slot (the payload
    cut to PayloadSize, at most 240 bytes)."""
    message_type, size, flags, _reserved, sender = MESSAGE_HEADER.unpack_from(data, 0)
    size_used = min(size, HV_MESSAGE_PAYLOAD_MAX)
    return message_type, size, flags, sender, bytes(
        data[HV_MESSAGE_HEADER_SIZE:HV_MESSAGE_HEADER_SIZE + size_used])


def _bit_position(base: int, vector: int) -> tuple[int, int]:
    """Byte offset and bit mask of ``vector`` in the 256-bit LAPIC register array at ``base``."""
    return base + 0x10 * (vector // 32) + (vector % 32) // 8, 1 << (vector % 8)


def lapic_test(registers: bytes | bytearray, base: int, vector: int) -> bool:
    offset, mask = _bit_position(base, vector)
    return bool(registers[offset] & mask)


def lapic_clear(registers: bytearray, base: int, vector: int) -> None:
    offset, mask = _bit_position(base, vector)
    registers[offset] &= ~mask & 0xFF


class Delivery(enum.Enum):
    """What happened to a message or event flag sent to a SINT (the connection layer turns it
    into an HV_STATUS)."""

    DONE = "delivered"  # message written / flag newly set (and the SINT raised unless Polling)
    BUSY = "busy"  # message slot occupied (MessagePending set) / flag already set
    SYNIC_DISABLED = "SCONTROL.Enable clear"
    PAGE_DISABLED = "SIM/SIEF page disabled or not placed"
    MASKED = "SINT masked"


# ------------------------------------------------------------------------------------------------
# AutoEOI (see the module docstring)
# ------------------------------------------------------------------------------------------------


class AutoEoi:
    """Clears the ISR bits of one VP's AutoEOI SINT vectors once the LAPIC has taken them."""

    def __init__(self, platform: "HvPlatform", vp_index: int, log_once: "LogOnce"):
        self._platform = platform
        self.vp_index = vp_index
        self._log_once = log_once
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # vector -> generation (bumped by every delivery)
        self._generation = 0
        self._armed = False
        self._delay_ns = AUTO_EOI_FIRST_DELAY_NS
        self.checks = 0
        self.cleared = 0

    def delivered(self, vector: int) -> None:
        """An AutoEOI SINT's ``vector`` was accepted by the LAPIC (any thread)."""
        with self._lock:
            self._generation += 1
            self._pending[vector] = self._generation
            if self._armed:
                return
            self._armed = True
            self._delay_ns = AUTO_EOI_FIRST_DELAY_NS
            delay = self._delay_ns
        self._arm(delay)

    def _arm(self, delay_ns: int) -> None:
        try:
            self._platform.start_timer(self._platform.host_time_ns() + delay_ns, self._due)
        except Exception:  # noqa: BLE001 -- e.g. the timer service is closed (VM ending)
            with self._lock:
                self._armed = False
            self._log_once(("auto_eoi_arm_failed", self.vp_index), logging.WARNING,
                           "vp%d: cannot arm the AutoEOI check", self.vp_index, exc_info=True)

    def _due(self) -> None:  # timer thread: the LAPIC is only touched on the VP's own thread
        try:
            self._platform.run_on_vp(self.vp_index, self.check)
        except Exception:  # noqa: BLE001
            with self._lock:
                self._armed = False
            self._log_once(("auto_eoi_run_failed", self.vp_index), logging.WARNING,
                           "vp%d: cannot schedule the AutoEOI check", self.vp_index,
                           exc_info=True)

    def check(self) -> None:
        """On the VP's thread: EOI every pending AutoEOI vector the LAPIC has put in service."""
        with self._lock:
            snapshot = dict(self._pending)
        waiting: set[int] = set()
        cleared: list[int] = []

        def edit(registers: bytearray) -> bool:
            waiting.clear()
            cleared.clear()
            for vector in snapshot:
                if lapic_test(registers, APIC_ISR, vector):
                    lapic_clear(registers, APIC_ISR, vector)
                    cleared.append(vector)
                if lapic_test(registers, APIC_IRR, vector):
                    waiting.add(vector)  # (again) pending: it will be put in service later
            return bool(cleared)

        failed = False
        if snapshot:
            try:
                self._platform.edit_lapic(self.vp_index, edit)
            except Exception:  # noqa: BLE001 -- never let this kill the vCPU thread
                failed = True
                self._log_once(("auto_eoi_check_failed", self.vp_index), logging.WARNING,
                               "vp%d: AutoEOI check failed", self.vp_index, exc_info=True)
        with self._lock:
            self.checks += 1
            self.cleared += len(cleared)
            if not failed:
                for vector, generation in snapshot.items():
                    # Delivered again since the snapshot: keep it for the next round.
                    if vector not in waiting and self._pending.get(vector) == generation:
                        del self._pending[vector]
            if not self._pending:
                self._armed = False
                return
            self._delay_ns = AUTO_EOI_FIRST_DELAY_NS if cleared else \
                min(self._delay_ns * 2, AUTO_EOI_MAX_DELAY_NS)
            delay = self._delay_ns
        self._arm(delay)

    @property
    def pending_vectors(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._pending))

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()  # an armed check finds nothing to do and stops


# ------------------------------------------------------------------------------------------------
# The SIM and SIEF pages
# ------------------------------------------------------------------------------------------------


class _SynicPage:
    """One guest-writable SynIC overlay (SIM or SIEF): its MSR value, the overlay, and the page's
    contents while it is not shown. ``lock`` is the VP's SynIC lock."""

    def __init__(self, platform: "HvPlatform", name: str, lock: threading.Lock,
                 log_once: "LogOnce"):
        self.name = name
        self.lock = lock
        self.slot = OverlaySlot(platform, name, readonly=False, lock=lock)
        self._log_once = log_once
        self.msr = 0
        self._content = _EMPTY_PAGE  # the page's bytes while no overlay shows them

    def page_locked(self) -> "OverlayPage | None":
        """The overlay to write into, if the page is enabled and shown where the MSR says."""
        if not self.msr & HV_SYNIC_PAGE_ENABLE:
            return None
        page = self.slot.page
        if page is None or page.gpa != self.msr & HV_PAGE_MASK:
            return None
        return page

    def write_msr(self, vp_index: int, value: int) -> bool:
        """The guest wrote the MSR (VP thread, no lock held). Returns True when the page became
        usable (placed at a new GPA)."""
        gpa = value & HV_PAGE_MASK
        with self.lock:
            self.msr = value
            current = self.slot.page
            if value & HV_SYNIC_PAGE_ENABLE and current is not None and current.gpa == gpa:
                return False  # already there: nothing moves
            if current is not None:
                # From now on page_locked() refuses the old overlay, so nothing else lands in it.
                self._content = current.read(0, HV_PAGE_SIZE)
            content = self._content
        if not value & HV_SYNIC_PAGE_ENABLE:
            self.slot.remove()
            return False
        try:
            self.slot.place(gpa, content)
        except OverlayError as error:
            # TLFS: a base address beyond the GPA space makes the page inaccessible, no fault.
            self._log_once(("synic_page_unplaceable", self.name, gpa), logging.WARNING,
                           "vp%d: %s not placed at %#x: %s", vp_index, self.name, gpa, error)
            self.slot.remove()
            return False
        return True

    def reset(self) -> None:
        def commit() -> None:
            self.msr = 0
            self._content = _EMPTY_PAGE

        self.slot.remove(commit=commit)


# ------------------------------------------------------------------------------------------------
# One VP's SynIC
# ------------------------------------------------------------------------------------------------

EomListener = Callable[[], None]


class VpSynic:
    """The SynIC of one VP: registers, pages, message and event delivery. See the module
    docstring; the public API other features use is :meth:`deliver_message`,
    :meth:`signal_event`, :meth:`add_eom_listener`, :meth:`sint_vector` and
    :meth:`sint_masked`."""

    def __init__(self, platform: "HvPlatform", vp_index: int, log_once: "LogOnce"):
        self._platform = platform
        self.vp_index = vp_index
        self._log_once = log_once
        self.lock = threading.Lock()
        self.scontrol = 0
        self.sints = [HV_SYNIC_SINT_RESET] * HV_SYNIC_SINT_COUNT
        self.message_page = _SynicPage(platform, f"SynIC message page (vp{vp_index})",
                                       self.lock, log_once)
        self.event_page = _SynicPage(platform, f"SynIC event flags page (vp{vp_index})",
                                     self.lock, log_once)
        self.auto_eoi = AutoEoi(platform, vp_index, log_once)
        self._listeners: tuple[EomListener, ...] = ()
        self._listeners_lock = threading.Lock()
        self.counters: Counter = Counter()

    # -- the public API -------------------------------------------------------------------------

    def deliver_message(self, sint: int, message: bytes) -> bool:
        """Write ``message`` (an ``HV_MESSAGE``: 16-byte header and payload, at most 256 bytes)
        into SIM slot ``sint`` and raise the SINT, if the slot is free and the SynIC can take it
        (SCONTROL and SIMP enabled, SINT unmasked or Polling). A busy slot gets MessagePending
        set. Returns True only when the message was written; otherwise the caller keeps it and
        retries from an EOM listener. Any thread."""
        return self.post(sint, message) is Delivery.DONE

    def signal_event(self, sint: int, flag: int) -> bool:
        """Set event flag ``flag`` (0..2047) of SINT ``sint`` in the SIEF page and raise the SINT
        if the flag was clear. Returns True when the flag was newly set; False if it was already
        set or the SynIC cannot take it (SCONTROL or SIEFP disabled, SINT masked). Any thread."""
        return self.set_event_flag(sint, flag) is Delivery.DONE

    def add_eom_listener(self, callback: EomListener) -> None:
        """Call ``callback()`` on this VP's thread after every EOM write (and when the SynIC
        becomes able to take messages it could not take before), so a sender whose message met
        a busy slot can retry."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, callback)

    def remove_eom_listener(self, callback: EomListener) -> None:
        with self._listeners_lock:
            self._listeners = tuple(c for c in self._listeners if c is not callback)

    def sint_vector(self, sint: int) -> int:
        return self.sints[check_sint(sint)] & HV_SYNIC_SINT_VECTOR_MASK

    def sint_masked(self, sint: int) -> bool:
        return bool(self.sints[check_sint(sint)] & HV_SYNIC_SINT_MASKED)

    @property
    def enabled(self) -> bool:
        return bool(self.scontrol & HV_SYNIC_CONTROL_ENABLE)

    def accepts_messages(self) -> bool:
        """SCONTROL and SIMP enabled and the page shown (TLFS: otherwise not a target)."""
        with self.lock:
            return self.enabled and self.message_page.page_locked() is not None

    def accepts_events(self) -> bool:
        with self.lock:
            return self.enabled and self.event_page.page_locked() is not None

    def raise_sint(self, sint: int) -> bool:
        """Raise SINT ``sint``'s interrupt with no message or flag (QEMU's
        ``hyperv_sint_route_set_sint``; the hyperv-testdev). False if SCONTROL is clear or the
        SINT is masked or Polling, or the LAPIC refused the vector."""
        check_sint(sint)
        with self.lock:
            if not self.enabled:
                return False
            register = self.sints[sint]
        if register & (HV_SYNIC_SINT_MASKED | HV_SYNIC_SINT_POLLING):
            return False
        return self._interrupt(register)

    # -- delivery -------------------------------------------------------------------------------

    def post(self, sint: int, message: bytes) -> Delivery:
        """:meth:`deliver_message` with the reason when the message was not written."""
        check_sint(sint)
        if not HV_MESSAGE_HEADER_SIZE <= len(message) <= HV_MESSAGE_SIZE:
            raise ValueError(f"a message is 16 to 256 bytes, not {len(message)}")
        if _U32.unpack_from(message, 0)[0] == HVMSG_NONE:
            raise ValueError("a message of type HvMessageTypeNone (0) cannot be delivered")
        slot = sint * HV_MESSAGE_SIZE
        with self.lock:
            refused, register = self._target_locked(sint)
            if refused is not None:
                self.counters[f"message_{refused.name.lower()}"] += 1
                return refused
            page = self.message_page.page_locked()
            if page is None:
                self.counters["message_page_disabled"] += 1
                return Delivery.PAGE_DISABLED
            if _U32.unpack(page.read(slot, 4))[0] != HVMSG_NONE:
                page.fetch_or_u8(slot + MESSAGE_FLAGS_OFFSET, HV_MESSAGE_FLAG_PENDING)  # barrier
                if _U32.unpack(page.read(slot, 4))[0] != HVMSG_NONE:
                    self.counters["message_busy"] += 1
                    return Delivery.BUSY
                # The guest freed the slot meanwhile and may have missed the flag: deliver now.
            body = bytearray(message[4:])
            body[MESSAGE_FLAGS_OFFSET - 4] &= ~HV_MESSAGE_FLAG_PENDING & 0xFF  # the SynIC's bit
            page.write(slot + 4, bytes(body))
            page.write(slot, message[:4])  # MessageType last [I]
            self.counters["messages"] += 1
        if not register & HV_SYNIC_SINT_POLLING:
            self._interrupt(register)
        return Delivery.DONE

    def set_event_flag(self, sint: int, flag: int) -> Delivery:
        """:meth:`signal_event` with the reason when the flag was not newly set."""
        check_sint(sint)
        if not 0 <= flag < HV_EVENT_FLAGS_COUNT:
            raise ValueError(f"event flag {flag!r} outside 0..{HV_EVENT_FLAGS_COUNT - 1}")
        with self.lock:
            refused, register = self._target_locked(sint)
            if refused is not None:
                self.counters[f"event_{refused.name.lower()}"] += 1
                return refused
            page = self.event_page.page_locked()
            if page is None:
                self.counters["event_page_disabled"] += 1
                return Delivery.PAGE_DISABLED
            mask = 1 << (flag % 8)
            old = page.fetch_or_u8(sint * HV_EVENT_FLAGS_BYTES + flag // 8, mask)
            if old & mask:
                self.counters["event_already_set"] += 1
                return Delivery.BUSY
            self.counters["events"] += 1
        if not register & HV_SYNIC_SINT_POLLING:
            self._interrupt(register)
        return Delivery.DONE

    def _target_locked(self, sint: int) -> tuple[Delivery | None, int]:
        register = self.sints[sint]
        if not self.enabled:
            return Delivery.SYNIC_DISABLED, register
        if register & HV_SYNIC_SINT_MASKED and not register & HV_SYNIC_SINT_POLLING:
            return Delivery.MASKED, register
        return None, register

    def _interrupt(self, register: int) -> bool:
        """Send the SINT's vector (no lock held); arm the AutoEOI check if it needs one."""
        vector = register & HV_SYNIC_SINT_VECTOR_MASK
        accepted = raise_interrupt(self._platform, self.vp_index, vector, self._log_once, "SINT")
        with self.lock:
            self.counters["interrupts" if accepted else "interrupts_refused"] += 1
        if accepted and register & HV_SYNIC_SINT_AUTO_EOI:
            self.auto_eoi.delivered(vector)
        return accepted

    def _notify_listeners(self) -> None:
        for callback in self._listeners:
            try:
                callback()
            except Exception:  # noqa: BLE001 -- a listener bug must not #GP the guest's EOM
                self._log_once(("eom_listener_failed", self.vp_index, id(callback)),
                               logging.ERROR, "vp%d: an EOM listener failed", self.vp_index,
                               exc_info=True)

    # -- MSR handlers (on this VP's thread) -----------------------------------------------------

    def read_scontrol(self, vp_index: int) -> int:
        return self.scontrol

    def write_scontrol(self, vp_index: int, value: int) -> None:
        with self.lock:
            was_enabled = self.enabled
            self.scontrol = value  # 63:1 RsvdP: kept as written
        if self.enabled and not was_enabled:
            self._notify_listeners()

    def read_simp(self, vp_index: int) -> int:
        return self.message_page.msr

    def write_simp(self, vp_index: int, value: int) -> None:
        if self.message_page.write_msr(vp_index, value):
            self._notify_listeners()

    def read_siefp(self, vp_index: int) -> int:
        return self.event_page.msr

    def write_siefp(self, vp_index: int, value: int) -> None:
        self.event_page.write_msr(vp_index, value)

    def read_eom(self, vp_index: int) -> int:
        return 0  # TLFS: "Reads from the EOM register always returns zeros"

    def write_eom(self, vp_index: int, value: int) -> None:
        with self.lock:
            self.counters["eom"] += 1
        self._notify_listeners()

    def write_sint(self, sint: int, value: int) -> None:
        """SINTx write; reserved bits were refused by the registry (``reserved_mask``)."""
        vector = value & HV_SYNIC_SINT_VECTOR_MASK
        if not value & HV_SYNIC_SINT_MASKED and vector < HV_SYNIC_FIRST_VALID_VECTOR:
            raise MsrAccessFault(HV_X64_MSR_SINT0 + sint, write=True, value=value,
                                 reason=f"vector {vector} < 16 in an unmasked SINT")
        with self.lock:
            before = self.sints[sint]
            self.sints[sint] = value
        if _deliverable(value) and not _deliverable(before):
            self._notify_listeners()

    def reset(self) -> None:
        """VM reset: registers to their reset values, pages removed and cleared (TLFS: "Upon
        virtual processor creation and reset, the SIM page is cleared to zero")."""
        self.message_page.reset()
        self.event_page.reset()
        with self.lock:
            self.scontrol = 0
            self.sints = [HV_SYNIC_SINT_RESET] * HV_SYNIC_SINT_COUNT
        self.auto_eoi.reset()


def _deliverable(register: int) -> bool:
    return not register & HV_SYNIC_SINT_MASKED or bool(register & HV_SYNIC_SINT_POLLING)


def check_sint(sint: int) -> int:
    """``sint`` if it names one of the 16 SINTs, else ValueError."""
    if not isinstance(sint, int) or not 0 <= sint < HV_SYNIC_SINT_COUNT:
        raise ValueError(f"SINT {sint!r} outside 0..{HV_SYNIC_SINT_COUNT - 1}")
    return sint


# ------------------------------------------------------------------------------------------------
# The partition's SynIC
# ------------------------------------------------------------------------------------------------


class SynicState:
    """Every VP's :class:`VpSynic` and the partition's :class:`Connections`; kept by the partition
    under ``"hv-synic"``, where other features (hv-stimer) get a VP's SynIC with :meth:`synic`."""

    def __init__(self, partition: "Partition"):
        from hvvmm.enlightenments.connections import Connections

        self.vps = [VpSynic(partition.platform, index, partition.log_once)
                    for index in range(partition.vp_count)]
        self.connections = Connections(self, partition.log_once)

    def synic(self, vp_index: int) -> VpSynic:
        """VP ``vp_index``'s SynIC."""
        if not isinstance(vp_index, int) or not 0 <= vp_index < len(self.vps):
            raise ValueError(f"VP index {vp_index!r} outside 0..{len(self.vps) - 1}")
        return self.vps[vp_index]

    def reset(self) -> None:
        self.connections.reset()
        for vp in self.vps:
            vp.reset()

    def counters(self) -> dict:
        """``{"vp0": {...}, ...}`` for VPs whose SynIC did anything."""
        out = {}
        for vp in self.vps:
            counters = dict(vp.counters)
            if vp.auto_eoi.checks:
                counters.update(auto_eoi_checks=vp.auto_eoi.checks,
                                auto_eoi_cleared=vp.auto_eoi.cleared)
            if counters:
                out[f"vp{vp.vp_index}"] = counters
        return out


_PLATFORM_SERVICES = ("signal_interrupt", "run_on_vp", "edit_lapic", "start_timer",
                      "host_time_ns")


def attach(partition: "Partition") -> SynicState:
    from hvvmm.enlightenments.connections import register_hypercalls

    lacking = [name for name in _PLATFORM_SERVICES
               if not callable(getattr(partition.platform, name, None))]
    if lacking:
        raise AttachError(f"{NAME} needs a platform with {', '.join(lacking)}")
    state = SynicState(partition)

    def on_vp(method_name: str):
        return lambda vp_index, *args: getattr(state.vps[vp_index], method_name)(vp_index, *args)

    partition.register_msr(HV_X64_MSR_SCONTROL, read=on_vp("read_scontrol"),
                           write=on_vp("write_scontrol"))
    partition.register_msr(HV_X64_MSR_SVERSION, read=lambda vp_index: HV_SYNIC_VERSION_1)
    partition.register_msr(HV_X64_MSR_SIEFP, read=on_vp("read_siefp"), write=on_vp("write_siefp"))
    partition.register_msr(HV_X64_MSR_SIMP, read=on_vp("read_simp"), write=on_vp("write_simp"))
    partition.register_msr(HV_X64_MSR_EOM, read=on_vp("read_eom"), write=on_vp("write_eom"))
    for sint in range(HV_SYNIC_SINT_COUNT):
        partition.register_msr(
            HV_X64_MSR_SINT0 + sint,
            read=lambda vp_index, sint=sint: state.vps[vp_index].sints[sint],
            write=lambda vp_index, value, sint=sint: state.vps[vp_index].write_sint(sint, value),
            reserved_mask=HV_SYNIC_SINT_RESERVED)
    register_hypercalls(partition, state.connections)
    return state  # other features find it as partition.state["hv-synic"]


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="synthetic interrupt controller: SIM/SIEF pages, SINTs, EOM, PostMessage/SignalEvent",
    tlfs="inter-partition-communication.md: Synthetic Interrupt Controller",
    attach=attach,
    requires=("hv-vpindex",),
    cpuid=(*privileges(HvPartitionPrivilege.AccessSynicRegs | HvPartitionPrivilege.PostMessages
                       | HvPartitionPrivilege.SignalEvents),
           *recommendations(HvEnlightenmentInformation.HV_DEPRECATING_AEOI_RECOMMENDED)),
    msrs=(HV_X64_MSR_SCONTROL, HV_X64_MSR_SVERSION, HV_X64_MSR_SIEFP, HV_X64_MSR_SIMP,
          HV_X64_MSR_EOM, *(HV_X64_MSR_SINT0 + n for n in range(HV_SYNIC_SINT_COUNT))),
    hypercalls=(HypercallCode.HvCallPostMessage, HypercallCode.HvCallSignalEvent),
    denied_when_off=True,
)
