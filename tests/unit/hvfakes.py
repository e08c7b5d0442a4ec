"""Fakes for the hypercall unit tests: a dict-backed register file and call helpers.

Modelled on OpenVMM ``hv1_hypercall/src/tests.rs``: a fake register file, heap-backed guest
memory, and a fill pattern that makes over-reads and over-writes visible.
"""

from __future__ import annotations

import struct

from hvvmm.memory import GuestMemory

FILL_PATTERN = 0x123456789ABCDEF0  # OpenVMM's fill pattern
PAGE_BASE = 0xFFFF_F000  # where the fake hypercall page lives
# RIP after `endbr64; out NN, al` (KVM's emulator path, as measured on a PVM-based KVM host)
STUB_RIP = PAGE_BASE + 6

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
U64 = (1 << 64) - 1
U128 = (1 << 128) - 1


class FakeRegisters:
    """A :class:`hvvmm.hv.hypercall.HypercallRegisters` over plain dicts, recording accesses."""

    def __init__(self, *, long_mode: bool = True, protected: bool = True, cpl: int = 0,
                 gprs: dict[str, int] | None = None, xmm: list[int] | None = None,
                 rip: int = STUB_RIP):
        self.long_mode = long_mode
        self.protected = protected
        self._cpl = cpl
        # Distinct junk in every register, so an unexpected write is visible.
        self.gprs = {name: (0xA5A5_0000_0000_0000 | i) for i, name in enumerate(GPR_NAMES)}
        if gprs:
            self.gprs.update(gprs)
        self.xmm = list(xmm) if xmm is not None else [(0xC3C3 << 112) | i for i in range(16)]
        self.rip = rip
        self.retries = 0
        self.xmm_reads: list[int] = []
        self.xmm_writes: list[int] = []
        self.gpr_writes: list[str] = []

    # -- HypercallRegisters -------------------------------------------------------------------

    def is_long_mode(self) -> bool:
        return self.long_mode

    def is_protected_mode(self) -> bool:
        return self.protected

    def cpl(self) -> int:
        return self._cpl

    def get_gpr(self, name: str) -> int:
        return self.gprs[name]

    def set_gpr(self, name: str, value: int) -> None:
        assert name in self.gprs, name
        assert 0 <= value <= U64, (name, value)
        self.gpr_writes.append(name)
        self.gprs[name] = value

    def get_xmm(self, index: int) -> int:
        assert 0 <= index < 6, index
        self.xmm_reads.append(index)
        return self.xmm[index]

    def set_xmm(self, index: int, value: int) -> None:
        assert 0 <= index < 6, index
        assert 0 <= value <= U128, value
        self.xmm_writes.append(index)
        self.xmm[index] = value

    def retry(self) -> None:
        self.retries += 1
        self.rip = PAGE_BASE

    # -- test helpers -------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        return dict(self.gprs), list(self.xmm), self.rip

    def set_call(self, control: int, input_gpa: int = 0, output_gpa: int = 0) -> None:
        """Load the input registers of the caller's convention (not recorded as writes)."""
        if self.long_mode:
            self.gprs["rcx"], self.gprs["rdx"], self.gprs["r8"] = control, input_gpa, output_gpa
        else:
            self.gprs["rdx"], self.gprs["rax"] = control >> 32, control & 0xFFFF_FFFF
            self.gprs["rbx"], self.gprs["rcx"] = input_gpa >> 32, input_gpa & 0xFFFF_FFFF
            self.gprs["rdi"], self.gprs["rsi"] = output_gpa >> 32, output_gpa & 0xFFFF_FFFF

    def set_fast_block(self, block: bytes) -> None:
        """Load a fast-call input block: pair 0 = RDX:R8 (EBX:ECX, EDI:ESI), then XMM0.."""
        block = block.ljust(-(-len(block) // 16) * 16, b"\0")
        for i in range(0, len(block), 16):
            lo, hi = struct.unpack_from("<QQ", block, i)
            if i == 0:
                self.set_call(self.control(), lo, hi)
            else:
                self.xmm[i // 16 - 1] = lo | (hi << 64)

    def control(self) -> int:
        if self.long_mode:
            return self.gprs["rcx"]
        return ((self.gprs["rdx"] & 0xFFFF_FFFF) << 32) | (self.gprs["rax"] & 0xFFFF_FFFF)

    def result(self) -> int:
        if self.long_mode:
            return self.gprs["rax"]
        return ((self.gprs["rdx"] & 0xFFFF_FFFF) << 32) | (self.gprs["rax"] & 0xFFFF_FFFF)

    def xmm_bytes(self, index: int) -> bytes:
        return self.xmm[index].to_bytes(16, "little")


def filled_memory(size: int = 0x10000, gpa: int = 0) -> GuestMemory:
    """Guest RAM filled with :data:`FILL_PATTERN`."""
    memory = GuestMemory.from_bytes(size, gpa)
    pattern = FILL_PATTERN.to_bytes(8, "little") * (size // 8)
    memory.write(gpa, pattern)
    return memory


# --------------------------------------------------------------------------------------------
# FakePlatform: an hvvmm.hv.platform.HvPlatform for the emulator's unit tests
# --------------------------------------------------------------------------------------------

FAKE_TSC_HZ = 2_793_436_000  # KVM_GET_TSC_KHZ x 1000 on one development machine
FAKE_APIC_HZ = 1_000_000_000  # KVM's in-kernel LAPIC (APIC_BUS_CYCLE_NS = 1)
OVERLAY_PAGE = 4096


class FakeOverlay:
    """An overlay page of :class:`FakePlatform` (the ``OverlayPage`` protocol)."""

    def __init__(self, platform: "FakePlatform", gpa: int, content: bytes, readonly: bool,
                 name: str):
        self._platform = platform
        self._gpa = gpa
        self.content = bytearray(content)
        self.readonly = readonly
        self.name = name
        self.mapped = True

    @property
    def gpa(self) -> int:
        return self._gpa

    def write(self, offset: int, data: bytes) -> None:
        assert self.mapped, "write to an unmapped overlay"
        assert 0 <= offset and offset + len(data) <= OVERLAY_PAGE, (offset, len(data))
        self.content[offset:offset + len(data)] = data
        if self._platform.memory.contains(self._gpa, OVERLAY_PAGE):
            self._platform.memory.write(self._gpa + offset, data)

    def read(self, offset: int, size: int) -> bytes:
        """What the guest sees (a guest-writable overlay in RAM: the RAM, which the guest
        writes through :meth:`FakePlatform.guest_write`)."""
        assert self.mapped, "read of an unmapped overlay"
        assert 0 <= offset and offset + size <= OVERLAY_PAGE, (offset, size)
        if self._platform.memory.contains(self._gpa, OVERLAY_PAGE):
            return self._platform.memory.read(self._gpa + offset, size)
        return bytes(self.content[offset:offset + size])

    def fetch_or_u8(self, offset: int, mask: int) -> int:
        assert 0 <= mask <= 0xFF, mask
        old = self.read(offset, 1)[0]
        self.write(offset, bytes([old | mask]))
        self._platform.fetch_or_calls.append((self._gpa + offset, mask))
        return old


class FakePlatform:
    """Guest RAM plus recorded requests; overlays emulated Propolis-style (the RAM below an
    overlay is saved and restored, so ``memory`` shows what the guest sees).

    ``tsc`` is the guest TSC; tests move it with :meth:`advance`.
    """

    def __init__(self, *, vp_count: int = 2, memory: GuestMemory | None = None,
                 mem_size: int = 0x40000, tsc_frequency_hz: int = FAKE_TSC_HZ,
                 apic_frequency_hz: int = FAKE_APIC_HZ, guest_tsc_at_reference_zero: int = 0,
                 max_gpa: int = 1 << 52, zeroed_ranges=()):
        self.memory = memory if memory is not None else GuestMemory.from_bytes(mem_size)
        self.vp_count = vp_count
        self.tsc_frequency_hz = tsc_frequency_hz
        self.apic_frequency_hz = apic_frequency_hz
        self.guest_tsc_at_reference_zero = guest_tsc_at_reference_zero
        self.max_gpa = max_gpa
        self.zeroed_ranges = list(zeroed_ranges)
        self.tsc = guest_tsc_at_reference_zero
        self.tsc_reads: list[int] = []
        self.runtime = {vp: 0 for vp in range(vp_count)}
        self.yields: list[int] = []
        self.idles: list[int] = []
        self.resets = 0
        self.crashes: list = []
        self.overlays: dict[int, FakeOverlay] = {}
        self.overlay_log: list[tuple[str, int, str]] = []
        self._hidden: dict[int, bytes] = {}
        self.fail_report_crash = False
        # Services for the interrupt side (see "timers and interrupts" below).
        self.host_epoch_ns = FAKE_HOST_EPOCH_NS
        self.timers: list[FakeTimer] = []  # every timer ever started, in start order
        self.interrupts: list[tuple[int, int]] = []  # (vp, vector) accepted by signal_interrupt
        self.refused_interrupts: list[tuple[int, int]] = []
        self.accept_interrupts = True  # False: signal_interrupt refuses (a disabled LAPIC)
        self.vp_work: list[tuple[int, object]] = []  # run_on_vp requests, in order
        self.run_vp_work_at_once = True  # False: queue until run_vp_work()
        # A LAPIC register page per VP (KVM_GET_LAPIC layout) for edit_lapic: signal_interrupt
        # sets the IRR bit, accept_interrupt() models the LAPIC injecting one (IRR -> ISR, unless
        # lapic_sets_isr is False, like a host whose LAPIC never sets ISR bits), guest_eoi() the
        # guest's EOI.
        self.lapic = {vp: bytearray(LAPIC_PAGE) for vp in range(vp_count)}
        self.lapic_sets_isr = True
        self.lapic_edits: list[tuple[int, bool]] = []  # (vp, written) per edit_lapic call
        self.fetch_or_calls: list[tuple[int, int]] = []  # (gpa, mask) of OverlayPage.fetch_or_u8
        self.tlb_flushes: list[tuple[int, tuple[int, ...]]] = []  # (caller, targets) per flush

    # -- HvPlatform ---------------------------------------------------------------------------

    def read_guest_tsc(self, vp_index: int) -> int:
        self.tsc_reads.append(vp_index)
        return self.tsc

    def vp_runtime_100ns(self, vp_index: int) -> int:
        return self.runtime[vp_index]

    def yield_vp(self, vp_index: int) -> None:
        self.yields.append(vp_index)

    def idle_vp(self, vp_index: int) -> None:
        self.idles.append(vp_index)

    def request_reset(self) -> None:
        self.resets += 1

    def report_crash(self, report) -> None:
        if self.fail_report_crash:
            raise OSError("disk full")
        self.crashes.append(report)

    def map_overlay(self, gpa: int, content: bytes, *, readonly: bool, name: str) -> FakeOverlay:
        from hvvmm.hv.platform import OverlayError

        assert len(content) == OVERLAY_PAGE, len(content)
        if gpa % OVERLAY_PAGE:
            raise OverlayError(f"{gpa:#x} is not page aligned")
        if gpa + OVERLAY_PAGE > self.max_gpa:
            raise OverlayError(f"{gpa:#x} is beyond the guest-physical address space")
        if gpa in self.overlays:
            raise OverlayError(f"{gpa:#x} already holds the {self.overlays[gpa].name}")
        overlay = FakeOverlay(self, gpa, content, readonly, name)
        if self.memory.contains(gpa, OVERLAY_PAGE):
            self._hidden[gpa] = self.memory.read(gpa, OVERLAY_PAGE)
            self.memory.write(gpa, content)
        self.overlays[gpa] = overlay
        self.overlay_log.append(("map", gpa, name))
        return overlay

    def unmap_overlay(self, page: FakeOverlay) -> None:
        assert self.overlays.get(page.gpa) is page, "unmapping an overlay that is not mapped"
        del self.overlays[page.gpa]
        page.mapped = False
        hidden = self._hidden.pop(page.gpa, None)
        if hidden is not None:
            self.memory.write(page.gpa, hidden)
        self.overlay_log.append(("unmap", page.gpa, page.name))

    def boot_zeroed_ranges(self):
        return list(self.zeroed_ranges)

    def flush_guest_tlbs(self, vp_index: int, vps) -> None:
        """hv-tlbflush: records ``(caller, targets)``; see ``self.tlb_flushes``."""
        assert all(0 <= vp < self.vp_count for vp in vps), vps
        self.tlb_flushes.append((vp_index, tuple(vps)))

    # -- test helpers -------------------------------------------------------------------------

    def advance(self, *, seconds: float = 0.0, ticks: int = 0) -> None:
        """Move the guest TSC forward."""
        self.tsc += ticks + round(seconds * self.tsc_frequency_hz)

    def guest_read(self, gpa: int, size: int) -> bytes:
        """What the guest reads at ``gpa`` (overlays outside RAM included)."""
        base = gpa - gpa % OVERLAY_PAGE
        overlay = self.overlays.get(base)
        if overlay is not None and gpa + size <= base + OVERLAY_PAGE:
            return bytes(overlay.content[gpa - base:gpa - base + size])
        return self.memory.read(gpa, size)

    def guest_write(self, gpa: int, data: bytes) -> None:
        """A guest store: refused (#GP, as a PermissionError) inside a read-only overlay."""
        base = gpa - gpa % OVERLAY_PAGE
        overlay = self.overlays.get(base)
        if overlay is not None and overlay.readonly:
            raise PermissionError(f"#GP: write to the read-only {overlay.name} at {gpa:#x}")
        if overlay is not None and gpa + len(data) <= base + OVERLAY_PAGE:
            overlay.write(gpa - base, data)  # a guest-writable overlay (the SynIC pages)
            return
        self.memory.write(gpa, data)

    # -- timers and interrupts (HvPlatform services for the SynIC and the synthetic timers) ---
    #
    # Host time is derived from the guest TSC, so host time and partition reference time move
    # together (:meth:`advance`); timers fire only when a test calls :meth:`fire_due_timers`
    # or :meth:`advance_and_fire`, on the test's thread.

    def host_time_ns(self) -> int:
        elapsed = self.tsc - self.guest_tsc_at_reference_zero
        return self.host_epoch_ns + elapsed * 1_000_000_000 // self.tsc_frequency_hz

    def start_timer(self, deadline_ns: int, callback) -> "FakeTimer":
        timer = FakeTimer(deadline_ns, callback, started_at_ns=self.host_time_ns())
        self.timers.append(timer)
        return timer

    def signal_interrupt(self, vp_index: int, vector: int) -> bool:
        assert 0 <= vp_index < self.vp_count, vp_index
        if not self.accept_interrupts:
            self.refused_interrupts.append((vp_index, vector))
            return False
        self.interrupts.append((vp_index, vector))
        _set_lapic_bit(self.lapic[vp_index], LAPIC_IRR, vector)
        return True

    def run_on_vp(self, vp_index: int, work) -> None:
        assert 0 <= vp_index < self.vp_count, vp_index
        self.vp_work.append((vp_index, work))
        if self.run_vp_work_at_once:
            self.run_vp_work()

    def edit_lapic(self, vp_index: int, edit) -> bool:
        assert 0 <= vp_index < self.vp_count, vp_index
        registers = bytearray(self.lapic[vp_index])
        written = bool(edit(registers))
        if written:
            assert len(registers) == LAPIC_PAGE
            self.lapic[vp_index][:] = registers
        self.lapic_edits.append((vp_index, written))
        return written

    def lapic_bit(self, vp_index: int, base: int, vector: int) -> bool:
        offset, mask = _lapic_bit_position(base, vector)
        return bool(self.lapic[vp_index][offset] & mask)

    def lapic_vectors(self, vp_index: int, base: int) -> list[int]:
        """The vectors whose bit is set in the LAPIC register array at ``base`` (ISR, IRR)."""
        page = self.lapic[vp_index]
        vectors = []
        for row in range(8):
            word = int.from_bytes(page[base + 0x10 * row:base + 0x10 * row + 4], "little")
            vectors.extend(32 * row + bit for bit in range(32) if word >> bit & 1)
        return vectors

    def accept_interrupt(self, vp_index: int) -> int | None:
        """The LAPIC delivers its highest IRR vector whose priority class is above the highest
        in-service one (the guest has IF = 1): its IRR bit clears and its ISR bit sets (unless
        ``lapic_sets_isr`` is False). Returns the vector, or None if nothing can go."""
        pending = self.lapic_vectors(vp_index, LAPIC_IRR)
        in_service = self.lapic_vectors(vp_index, LAPIC_ISR)
        if not pending:
            return None
        vector = max(pending)
        if in_service and vector >> 4 <= max(in_service) >> 4:
            return None
        _clear_lapic_bit(self.lapic[vp_index], LAPIC_IRR, vector)
        if self.lapic_sets_isr:
            _set_lapic_bit(self.lapic[vp_index], LAPIC_ISR, vector)
        return vector

    def guest_eoi(self, vp_index: int) -> int | None:
        """The guest writes the EOI register: the highest ISR bit clears."""
        in_service = self.lapic_vectors(vp_index, LAPIC_ISR)
        if not in_service:
            return None
        _clear_lapic_bit(self.lapic[vp_index], LAPIC_ISR, max(in_service))
        return max(in_service)

    def run_vp_work(self) -> int:
        """Run the queued :meth:`run_on_vp` work; returns how many ran."""
        ran = 0
        while self.vp_work:
            _vp, work = self.vp_work.pop(0)
            work()
            ran += 1
        return ran

    def pending_timers(self) -> list["FakeTimer"]:
        """Timers started and neither cancelled nor fired, earliest first."""
        return sorted((t for t in self.timers if t.pending), key=lambda t: t.deadline_ns)

    def fire_due_timers(self) -> int:
        """Fire every pending timer whose deadline is at or before the current host time, in
        deadline order (including ones armed by the callbacks); returns how many fired."""
        fired = 0
        while True:
            now = self.host_time_ns()
            due = [t for t in self.pending_timers() if t.deadline_ns <= now]
            if not due:
                return fired
            due[0].fire(now)
            fired += 1
            assert fired < 100_000, "timer callbacks keep re-arming at once"

    def advance_to_ns(self, host_ns: int) -> None:
        """Move the guest TSC (and with it host time) forward to host time ``host_ns``
        (at least; never backwards)."""
        delta = host_ns - self.host_time_ns()
        if delta > 0:
            self.tsc += -(-delta * self.tsc_frequency_hz // 1_000_000_000)
        while self.host_time_ns() < host_ns:
            self.tsc += 1

    def advance_and_fire(self, *, seconds: float = 0.0, ticks: int = 0) -> int:
        """Move time forward like :meth:`advance`, firing timers at their deadlines on the way
        (so a callback sees the host time of its own deadline); returns how many fired."""
        target = self.tsc + ticks + round(seconds * self.tsc_frequency_hz)
        fired = 0
        while True:
            pending = self.pending_timers()
            if not pending:
                break
            deadline = pending[0].deadline_ns
            if deadline > self.host_time_ns():
                before = self.tsc
                self.advance_to_ns(deadline)
                if self.tsc > target:  # the next deadline lies beyond the target
                    self.tsc = before
                    break
            fired += self.fire_due_timers()
        self.tsc = max(self.tsc, target)
        return fired + self.fire_due_timers()


LAPIC_PAGE = 1024  # struct kvm_lapic_state
LAPIC_ISR = 0x100
LAPIC_IRR = 0x200


def _lapic_bit_position(base: int, vector: int) -> tuple[int, int]:
    return base + 0x10 * (vector // 32) + (vector % 32) // 8, 1 << (vector % 8)


def _set_lapic_bit(page: bytearray, base: int, vector: int) -> None:
    offset, mask = _lapic_bit_position(base, vector)
    page[offset] |= mask


def _clear_lapic_bit(page: bytearray, base: int, vector: int) -> None:
    offset, mask = _lapic_bit_position(base, vector)
    page[offset] &= ~mask & 0xFF


FAKE_HOST_EPOCH_NS = 5_000_000_000_000  # host monotonic time at reference time 0 (arbitrary)


class FakeTimer:
    """A timer of :class:`FakePlatform` (the ``TimerHandle`` protocol)."""

    def __init__(self, deadline_ns: int, callback, *, started_at_ns: int):
        self.deadline_ns = deadline_ns
        self.callback = callback
        self.started_at_ns = started_at_ns
        self.cancelled = False
        self.fired_at_ns: int | None = None

    @property
    def pending(self) -> bool:
        return not self.cancelled and self.fired_at_ns is None

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self, now_ns: int) -> None:
        assert now_ns >= self.deadline_ns, "a fake timer fired early"
        self.fired_at_ns = now_ns
        self.callback()


# -- a SynIC set up as a guest does it (shared by the SynIC and connection tests) ---------------


def simp_gpa(vp: int) -> int:
    """Where the tests put VP ``vp``'s SynIC message page (SIEFP is the next page)."""
    return 0x20000 + vp * 0x2000


def siefp_gpa(vp: int) -> int:
    return 0x21000 + vp * 0x2000


def enable_synic(partition, vp: int, sints: dict[int, int]) -> None:
    """What a guest does: SIMP, SIEFP, SCONTROL, then the SINTs (sint -> register value)."""
    from hvvmm.hv import hvdef

    partition.msr_write(vp, hvdef.HV_X64_MSR_SIMP, simp_gpa(vp) | 1)
    partition.msr_write(vp, hvdef.HV_X64_MSR_SIEFP, siefp_gpa(vp) | 1)
    partition.msr_write(vp, hvdef.HV_X64_MSR_SCONTROL, 1)
    for sint, value in sints.items():
        partition.msr_write(vp, hvdef.HV_X64_MSR_SINT0 + sint, value)


def synic_slot(platform: "FakePlatform", vp: int, sint: int):
    """The parsed message in SIM slot ``sint`` of VP ``vp``."""
    from hvvmm.enlightenments.synic import parse_message

    return parse_message(platform.guest_read(simp_gpa(vp) + 256 * sint, 256))


def linux_partition(spec: str, vp_count: int = 4, **platform_args):
    """``(partition, platform)`` after what Linux does first: GUEST_OS_ID, then the hypercall
    page at 0x5000 (the IPI and TLB-flush tests start here)."""
    from hvvmm.hv import hvdef
    from hvvmm.hv.features import parse_hyperv_spec
    from hvvmm.hv.partition import Partition

    platform = FakePlatform(vp_count=vp_count, **platform_args)
    partition = Partition(parse_hyperv_spec(spec), platform)
    partition.msr_write(0, hvdef.HV_X64_MSR_GUEST_OS_ID, hvdef.linux_guest_os_id(6, 1, 192))
    partition.msr_write(0, hvdef.HV_X64_MSR_HYPERCALL, 0x5000 | 1)
    return partition, platform
