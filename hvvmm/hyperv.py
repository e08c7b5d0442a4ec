"""Hyper-V on KVM: the glue between the emulator (:mod:`hvvmm.hv`, no KVM inside) and a machine.

* :class:`VcpuRegisters` is the hypercall register file over a real vCPU at a hypercall exit.
* :class:`KvmHvPlatform` is :class:`hvvmm.hv.platform.HvPlatform` over the machine.
* :class:`HyperV` attaches a partition to a machine: the MSR filter that sends the synthetic MSRs
  to user space, the MSR and hypercall-port handlers of every vCPU, and the event listeners.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Sequence

from .hv.hypercall import NOT_SIMPLE_CONTROL_BITS, SUCCESS_NOT_WRITTEN, write_success_result
from .hv.msr import MsrAccessFault
from .hv.platform import CrashReport, OverlayPage
from .kvm import KvmError, KvmUnavailableError, Vcpu
from .kvm.exits import (HC_SUCCESS_32, HC_SUCCESS_64, PACKED_HC_LONG, PACKED_HC_SIMPLE,
                         PACKED_WRMSR)
from .kvm.system import GPR_INDEX, GPR_NAMES
from .kvm import constants as kvmc
from .logonce import LogOnce
from .timers import Timer, TimerService

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

EFER_LMA = 1 << 10
CR0_PE = 1 << 0
IA32_TSC = 0x10
UD_VECTOR = 6
PAGE_MASK = ~0xFFF
# KVM's in-kernel LAPIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS = 1 in arch/x86/kvm/lapic.h).
KVM_APIC_FREQUENCY_HZ = 1_000_000_000
# The LAPIC's IRR: eight 32-bit registers at 0x200, 0x210, ... in KVM_GET_LAPIC's page.
_APIC_IRR = tuple(0x200 + 0x10 * i for i in range(8))
IDLE_BOUND_S = 0.001
MSI_ADDRESS_BASE = 0xFEE0_0000  # MSI to one LAPIC: destination APIC ID in bits 19:12

SYNC_MASK = kvmc.KVM_SYNC_X86_REGS | kvmc.KVM_SYNC_X86_SREGS
_RIP = GPR_INDEX["rip"]
_N_GPRS = len(GPR_NAMES)
_RAX, _RBX, _RCX, _RDX, _RSI, _RDI, _R8 = (GPR_INDEX[name] for name in
                                          ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8"))
_U32 = 0xFFFF_FFFF


class VcpuRegisters:
    """:class:`hvvmm.hv.hypercall.HypercallRegisters` over one vCPU, for one hypercall exit.

    With ``KVM_CAP_SYNC_REGS`` the registers come from the ``kvm_run`` page (no ioctl) and changed
    GPRs go back there; otherwise ``KVM_GET/SET_REGS`` and ``KVM_GET_SREGS``. XMM registers,
    needed only for XMM fast calls, come from ``KVM_GET_FPU``. :meth:`commit` writes back what
    changed; RIP is left as KVM reported it unless :meth:`retry` or :meth:`inject_ud` moves it
    (Linux ``arch/x86/kvm/x86.c`` ``complete_fast_pio_out()``).
    """

    __slots__ = ("_vcpu", "_sync", "_regs", "_gprs", "_cs_base", "_cs_l", "_ss_dpl", "_cr0",
                 "_efer", "_dirty", "_fpu", "_fpu_dirty")

    def __init__(self, vcpu: Vcpu, use_sync_regs: bool):
        self._vcpu = vcpu
        self._sync = use_sync_regs
        if use_sync_regs:
            # One unpack: GPRs at 0..17 (GPR_NAMES order), then the five sregs fields; the list
            # keeps those five at its end, where no GPR index reaches.
            self._gprs = gprs = list(vcpu.sync_values())
            self._cs_base, self._cs_l, self._ss_dpl, self._cr0, self._efer = gprs[_N_GPRS:]
        else:
            self._regs = regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
            self._gprs = [getattr(regs, name) for name in GPR_NAMES]
            self._cs_base, self._cs_l, self._ss_dpl = sregs.cs.base, sregs.cs.l, sregs.ss.dpl
            self._cr0, self._efer = sregs.cr0, sregs.efer
        self._dirty: dict[int, int] = {}  # GPR index -> new value
        self._fpu = None
        self._fpu_dirty = False

    def is_long_mode(self) -> bool:
        return bool(self._efer & EFER_LMA) and bool(self._cs_l)

    def is_protected_mode(self) -> bool:
        return bool(self._cr0 & CR0_PE)

    def cpl(self) -> int:
        return self._ss_dpl  # CPL = SS.DPL (Intel SDM Vol. 3A "Privilege Levels")

    def get_gpr(self, name: str) -> int:
        return self._gprs[GPR_INDEX[name]]

    def set_gpr(self, name: str, value: int) -> None:
        index = GPR_INDEX[name]
        self._gprs[index] = self._dirty[index] = value & 0xFFFF_FFFF_FFFF_FFFF

    def _load_fpu(self):
        if self._fpu is None:
            self._fpu = self._vcpu.get_fpu()
        return self._fpu

    def get_xmm(self, index: int) -> int:
        return int.from_bytes(bytes(self._load_fpu().xmm[index]), "little")

    def set_xmm(self, index: int, value: int) -> None:
        self._load_fpu().xmm[index] = list((value & ((1 << 128) - 1)).to_bytes(16, "little"))
        self._fpu_dirty = True

    def _rip_of_page_start(self) -> int:
        # The stub sits at the start of a page; RIP is at or just past its OUT. Work on the linear
        # address so a non-zero CS base (32-bit segmented guests) is honoured.
        base = 0 if self.is_long_mode() else self._cs_base
        rip = self._gprs[_RIP]
        return (((base + rip) & PAGE_MASK) - base) & 0xFFFF_FFFF_FFFF_FFFF

    def retry(self) -> None:
        """Continuation: re-execute the stub from its first byte (TLFS "Hypercall Continuation")."""
        self._gprs[_RIP] = self._dirty[_RIP] = self._rip_of_page_start()

    def inject_ud(self) -> None:
        """#UD reported at the page start, with no OUT skip pending (RIP moved, so
        Linux ``arch/x86/kvm/x86.c`` ``complete_fast_pio_out()`` skips nothing)."""
        self.retry()
        self.commit()
        self._vcpu.inject_exception(UD_VECTOR)

    def commit(self) -> None:
        if self._dirty:
            if self._sync:
                self._vcpu.write_sync_gprs(self._dirty)
            else:
                for index, value in self._dirty.items():
                    setattr(self._regs, GPR_NAMES[index], value)
                self._vcpu.set_regs(self._regs)
            self._dirty.clear()
        if self._fpu_dirty:
            self._vcpu.set_fpu(self._fpu)
            self._fpu_dirty = False


class SyncRegisters:
    """:class:`hvvmm.hv.hypercall.HypercallRegisters` straight over the sync-regs area of a
    vCPU's ``kvm_run`` page (``KVM_CAP_SYNC_REGS``), made once per vCPU for the compact hypercall
    path: GPR reads and writes go to the page, so there is no snapshot to build; :meth:`commit`
    makes KVM reload the GPRs from there at the next entry (``kvm_dirty_regs``). The rarely
    needed rest (continuation, XMM) goes through a :class:`VcpuRegisters` of the moment."""

    __slots__ = ("_vcpu", "_put", "_dirty")

    def __init__(self, vcpu: Vcpu):
        self._vcpu = vcpu
        self._put = vcpu.put_sync_gpr
        self._dirty = False

    def _registers(self) -> VcpuRegisters:
        self.commit()  # what was set stays set when that one commits
        return VcpuRegisters(self._vcpu, True)

    def is_long_mode(self) -> bool:
        return self._registers().is_long_mode()

    def is_protected_mode(self) -> bool:
        return self._registers().is_protected_mode()

    def cpl(self) -> int:
        return self._registers().cpl()

    def get_gpr(self, name: str) -> int:
        return self._vcpu.sync_gpr(GPR_INDEX[name])

    def set_gpr(self, name: str, value: int) -> None:
        self._put(GPR_INDEX[name], value)
        self._dirty = True

    def commit(self) -> None:
        if self._dirty:
            self._vcpu.mark_sync_gprs_dirty()
            self._dirty = False

    def get_xmm(self, index: int) -> int:
        return self._registers().get_xmm(index)

    def set_xmm(self, index: int, value: int) -> None:
        registers = self._registers()
        registers.set_xmm(index, value)
        registers.commit()

    def retry(self) -> None:
        registers = self._registers()
        registers.retry()
        registers.commit()


class KvmHvPlatform:
    """:class:`hvvmm.hv.platform.HvPlatform` over a :class:`hvvmm.machine.Machine`."""

    def __init__(self, machine: "Machine"):
        self._machine = machine
        self.memory = machine.memory
        self.vp_count = len(machine.vcpus)
        boot_vcpu = machine.vcpus[0].vcpu
        tsc_khz = boot_vcpu.tsc_khz()
        if not tsc_khz:
            raise KvmUnavailableError("KVM does not report the guest TSC frequency "
                                      "(KVM_GET_TSC_KHZ), which the Hyper-V clocks need (use "
                                      "--hyperv none)")
        self.tsc_frequency_hz = tsc_khz * 1000
        self.apic_frequency_hz = KVM_APIC_FREQUENCY_HZ
        # KVM starts every guest TSC at 0 when the vCPU is created; read it to be exact.
        self.guest_tsc_at_reference_zero = boot_vcpu.get_msrs([IA32_TSC])[IA32_TSC]
        self.timers = TimerService()
        self._lapic_locks = [threading.Lock() for _ in range(self.vp_count)]
        self._log_once = LogOnce(log)

    def read_guest_tsc(self, vp_index: int) -> int:
        return self._machine.vcpus[vp_index].vcpu.get_msrs([IA32_TSC])[IA32_TSC]

    def vp_runtime_100ns(self, vp_index: int) -> int:
        thread = self._machine.vcpus[vp_index].thread
        if thread is None or thread.ident is None or not thread.is_alive():
            return 0
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            return time.clock_gettime_ns(clock) // 100
        except OSError:
            return 0

    def yield_vp(self, vp_index: int) -> None:
        os.sched_yield()

    def idle_vp(self, vp_index: int) -> None:
        """Return once an interrupt is pending in the vCPU's LAPIC, or after a millisecond."""
        vcpu = self._machine.vcpus[vp_index].vcpu
        deadline = time.monotonic() + IDLE_BOUND_S
        while not self._machine.stopping:
            lapic = vcpu.get_lapic()
            if any(lapic[offset:offset + 4] != b"\0\0\0\0" for offset in _APIC_IRR):
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.0001)

    def request_reset(self) -> None:
        self._machine.request_reset("the guest wrote the Hyper-V reset MSR")

    def report_crash(self, report: CrashReport) -> None:
        self._machine.report_crash(report)

    def map_overlay(self, gpa: int, content: bytes, *, readonly: bool, name: str) -> OverlayPage:
        return self._machine.memslots.map_overlay(gpa, content, readonly=readonly, name=name)

    def unmap_overlay(self, page: OverlayPage) -> None:
        self._machine.memslots.unmap_overlay(page)  # type: ignore[arg-type]

    # -- services for the interrupt side (SynIC, synthetic timers, PV IPI) ----------------------

    def signal_interrupt(self, vp_index: int, vector: int) -> bool:
        """Send fixed-mode, edge-triggered ``vector`` to VP ``vp_index`` through the in-kernel
        LAPIC (``KVM_SIGNAL_MSI``; the APIC ID equals the VP index). Thread-safe. Returns False if
        the LAPIC did not accept it (e.g. software-disabled)."""
        with self._lapic_locks[vp_index]:  # not while edit_lapic rewrites this LAPIC
            return self._machine.vm.signal_msi(MSI_ADDRESS_BASE | (vp_index << 12),
                                               vector & 0xFF) > 0

    def edit_lapic(self, vp_index: int, edit) -> bool:
        """``KVM_GET_LAPIC``, ``edit(registers)``, and ``KVM_SET_LAPIC`` if it returned True; on
        VP ``vp_index``'s own thread only (from :meth:`run_on_vp` work). KVM_SET_LAPIC copies the
        whole register page, IRR included, so an interrupt that arrived after the read would be
        lost: :meth:`signal_interrupt` to this VP waits meanwhile (the lock below)."""
        vcpu = self._machine.vcpus[vp_index].vcpu
        with self._lapic_locks[vp_index]:
            registers = bytearray(vcpu.get_lapic())
            if not edit(registers):
                return False
            vcpu.set_lapic(bytes(registers))
            return True

    def run_on_vp(self, vp_index: int, work) -> None:
        """Run ``work()`` on VP ``vp_index``'s thread while it is outside ``KVM_RUN`` (at once
        when called from that thread): for its LAPIC state and other per-vCPU ioctls."""
        self._machine.vcpus[vp_index].run_soon(work)

    def host_time_ns(self) -> int:
        """The host monotonic clock the timer service uses."""
        return self.timers.now_ns()

    def start_timer(self, deadline_ns: int, callback) -> "Timer":
        """Call ``callback()`` on the timer thread at host monotonic time ``deadline_ns``
        (never earlier). Returns a handle with ``cancel()``."""
        return self.timers.start_timer(deadline_ns, callback)

    def close(self) -> None:
        self.timers.close()

    def boot_zeroed_ranges(self) -> Sequence[tuple[int, int]]:
        # hvvmm does not track which RAM the loader and the guest have written; reporting a page
        # that is not zero would hand the guest stale data as "zeroed", so report none.
        return ()

    # -- remote TLB flushes (hv-tlbflush) -------------------------------------------------------

    def flush_guest_tlbs(self, vp_index: int, vps: Sequence[int]) -> None:
        """Flush the guest TLBs of ``vps`` before the hypercall returns. Every other vCPU is
        parked outside ``KVM_RUN`` (``Machine.exclusive``, which also lets two vCPUs flush at
        once without deadlock), then each target gets :func:`flush_vcpu_guest_tlb`. KVM services
        the resulting ``KVM_REQ_TLB_FLUSH_GUEST`` before the vCPU next enters the guest, so once
        the section ends no target can use a stale translation. The reasoning, with the KVM
        sources, is in ``hvvmm/enlightenments/tlbflush.py``."""
        machine = self._machine
        with machine.exclusive(vp_index):
            if machine.stopping:
                return  # the VM is going away; nobody runs guest code again
            for target in vps:
                outcome = flush_vcpu_guest_tlb(machine.vcpus[target].vcpu)
                if outcome == FLUSHED_TPR_SUBCLASS_CLEARED:
                    self._log_once(("tpr_subclass_cleared", target), logging.INFO,
                                   "vp%d: a TLB flush cleared TPR bits 3:0 (KVM_SET_SREGS; xAPIC "
                                   "mode has no race-free way to put them back, and interrupt "
                                   "priority uses bits 7:4 only)", target)


# KVM_SET_SREGS-based TLB flush of one parked vCPU (see KvmHvPlatform.flush_guest_tlbs).
CR0_PG = 1 << 31
CR3_PWT = 1 << 3
CR4_PGE = 1 << 7
APIC_BASE_EXTD = 1 << 10  # IA32_APIC_BASE bit 10: x2APIC mode
APIC_TPR_OFFSET = 0x80  # TPR in the KVM_GET_LAPIC register page
MSR_X2APIC_TPR = 0x808
FLUSH_SKIPPED_NO_PAGING = "skipped: paging off"
FLUSHED = "flushed"
FLUSHED_TPR_SUBCLASS_CLEARED = "flushed; TPR bits 3:0 cleared"


def flush_vcpu_guest_tlb(vcpu: Vcpu) -> str:
    """Make KVM flush ``vcpu``'s whole guest TLB before it next enters the guest; the vCPU must be
    outside ``KVM_RUN`` (parked, or the caller's own vCPU during its exit). Returns one of
    :data:`FLUSHED`, :data:`FLUSHED_TPR_SUBCLASS_CLEARED`, :data:`FLUSH_SKIPPED_NO_PAGING`.

    Two ``KVM_SET_SREGS`` calls, the first with CR4.PGE flipped, the second with the registers
    as read: each one differs from KVM's current CR4, so ``__set_sregs()`` resets the MMU context
    and makes ``KVM_REQ_TLB_FLUSH_GUEST`` (``hvvmm/enlightenments/tlbflush.py`` has the sources).
    Everything else is written back as ``KVM_GET_SREGS`` read it (an injected-but-undelivered
    interrupt in ``interrupt_bitmap`` is re-queued as it was). If KVM refuses the flipped CR4
    (a guest CPUID without PGE), CR3 bit 3 is flipped instead: the same reset, and legal in every
    paging mode. ``kvm_set_cr8()`` rewrites TPR as ``(cr8 & 0xf) << 4``; in x2APIC mode the TPR
    MSR puts bits 3:0 back exactly, in xAPIC mode they stay cleared (the return value says so).
    A vCPU with CR0.PG = 0 caches no translations (enabling paging loads a root, which KVM
    flushes), so it is left alone."""
    sregs = vcpu.get_sregs()
    if not sregs.cr0 & CR0_PG:
        return FLUSH_SKIPPED_NO_PAGING
    tpr = vcpu.get_lapic()[APIC_TPR_OFFSET]
    cr4, cr3 = sregs.cr4, sregs.cr3
    sregs.cr4 = cr4 ^ CR4_PGE
    try:
        vcpu.set_sregs(sregs)
    except KvmError:
        sregs.cr4 = cr4
        sregs.cr3 = cr3 ^ CR3_PWT
        vcpu.set_sregs(sregs)
    sregs.cr4, sregs.cr3 = cr4, cr3
    vcpu.set_sregs(sregs)
    if not tpr & 0x0F:
        return FLUSHED
    if sregs.apic_base & APIC_BASE_EXTD:
        vcpu.set_msrs({MSR_X2APIC_TPR: tpr})
        return FLUSHED
    return FLUSHED_TPR_SUBCLASS_CLEARED


class _ReservedPort:
    """Holds the hypercall port on the PIO bus so no device can be registered over it. While the
    hypercall page is off, an OUT there is an ordinary write to an unclaimed port."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class HyperV:
    """The Hyper-V interface of one machine: a :class:`~hvvmm.hv.partition.Partition` wired to
    its vCPUs. Created by :class:`hvvmm.machine.Machine` when Hyper-V is on."""

    def __init__(self, machine: "Machine", config):
        from .hv.partition import HYPERCALL_PORT, Partition
        from .kvm import MsrFilterRange

        vm = machine.vm
        kvm = machine.kvm
        for cap, name in ((kvmc.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR"),
                          (kvmc.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")):
            if not kvm.check_extension(cap):
                raise KvmUnavailableError(f"KVM on this host lacks {name}, which hvvmm needs to "
                                          "answer the Hyper-V synthetic MSRs (use --hyperv none)")
        # Every access to the synthetic MSR ranges exits to user space (reason FILTER), also for
        # MSRs hvvmm does not implement, which then #GP here rather than reach an in-kernel
        # Hyper-V on hosts that have one.
        vm.enable_cap(kvmc.KVM_CAP_X86_USER_SPACE_MSR, kvmc.KVM_MSR_EXIT_REASON_FILTER)
        both = kvmc.KVM_MSR_FILTER_READ | kvmc.KVM_MSR_FILTER_WRITE
        vm.set_msr_filter([MsrFilterRange(low, high - low + 1, both)
                           for low, high in Partition.msr_filter_ranges()])

        self.machine = machine
        self.port = HYPERCALL_PORT
        self.listeners: list = []
        self._closed = False
        self.platform = KvmHvPlatform(machine)
        # No trace events until someone listens: building one costs microseconds per exit.
        # No time budget for rep calls either: the TLFS says a hypervisor continues a call after
        # about 50 us, but no rep call hvvmm implements does per-element work worth splitting
        # (the TLB flushes flush everything at once), so, like KVM, calls run to completion.
        self.partition = Partition(config, self.platform)
        machine.pio_bus.register(HYPERCALL_PORT, 1, _ReservedPort(), "hyperv-hypercall")
        # Hypercall registers come from the kvm_run page (KVM_CAP_SYNC_REGS) when KVM offers
        # it, else through KVM_GET/SET_REGS; tests switch it off to cover that path.
        self.use_sync_regs = bool(kvm.check_extension(kvmc.KVM_CAP_SYNC_REGS) & SYNC_MASK
                                  == SYNC_MASK)
        for vcpu_thread in machine.vcpus:
            vcpu_thread.msr_handler = self
            vcpu_thread.vcpu_ports[HYPERCALL_PORT] = self
            vcpu_thread.set_hypercall_exit(self._hypercall_exit(vcpu_thread))
            vcpu_thread.set_msr_exit(self._msr_exit(vcpu_thread))
            # The reads its run loop answers itself (the constant MSRs, see _msr_exit).
            self.partition.add_msr_read_source(vcpu_thread.index,
                                               vcpu_thread.vcpu.constant_msr_hits)
            if self.use_sync_regs:
                vcpu_thread.vcpu.enable_sync_regs(SYNC_MASK)
        # The run loops mark the stub's OUT as a hypercall only while the page is enabled;
        # otherwise it is an ordinary port access (handle_port checks again).
        vcpus = [vcpu_thread.vcpu for vcpu_thread in machine.vcpus]

        def arm(active: bool) -> None:
            for vcpu in vcpus:
                vcpu.set_hypercall_port(HYPERCALL_PORT if active else None)

        self.partition.watch_hypercall_port(arm)

    def add_listener(self, listener) -> None:
        """Call ``listener(event)`` (a :class:`~hvvmm.hv.partition.TraceEvent`) for every
        synthetic MSR access and hypercall, on the vCPU thread."""
        self.listeners.append(listener)
        self.partition.on_event = self._on_event
        for vcpu_thread in self.machine.vcpus:  # every read must now reach the listener
            vcpu_thread.vcpu.disable_constant_msrs()

    def _on_event(self, event) -> None:
        for listener in self.listeners:
            listener(event)

    def close(self) -> None:
        self._closed = True
        self.platform.close()

    def counters(self) -> dict:
        """Per-VP counters of synthetic MSR accesses and hypercalls (by name and status)."""
        return self.partition.counters()

    # -- SynIC connections from the host (hv-synic; hvvmm.enlightenments.connections) -----------

    def _connections(self):
        if self._closed:
            raise RuntimeError("the machine is closed")
        state = self.partition.state.get("hv-synic")
        if state is None:
            raise RuntimeError("hv-synic is not enabled on this machine")
        return state.connections

    def register_message_connection(self, connection_id: int, *, vp: int | None = None,
                                    sint: int | None = None, handler=None,
                                    port_id: int | None = None):
        """Guest HvCallPostMessage on ``connection_id`` goes to SIM slot ``sint`` of ``vp``, or
        to ``handler(vp_index, message_type, payload) -> HV_STATUS or None`` (on the calling
        vCPU's thread; must not block)."""
        return self._connections().register_message_connection(
            connection_id, vp=vp, sint=sint, handler=handler, port_id=port_id)

    def register_event_connection(self, connection_id: int, *, vp: int | None = None,
                                  sint: int | None = None, flag: int = 0, flag_count: int = 1,
                                  handler=None):
        """Guest HvCallSignalEvent on ``connection_id`` with FlagNumber n sets flag ``flag + n``
        of SINT ``sint`` on ``vp``, or calls ``handler(vp_index, n)``."""
        return self._connections().register_event_connection(
            connection_id, vp=vp, sint=sint, flag=flag, flag_count=flag_count, handler=handler)

    def unregister_connection(self, connection_id: int) -> bool:
        return self._connections().unregister_connection(connection_id)

    def post_message(self, vp: int, sint: int, message_type: int, payload: bytes = b"", *,
                     sender: int = 0) -> bool:
        """Send a message into SIM slot ``sint`` of ``vp``: True if it is there now, False if it
        waits for the guest to free the slot (delivered after its EOM)."""
        return self._connections().post_message(vp, sint, message_type, payload, sender=sender)

    def signal_event(self, vp: int, sint: int, flag: int) -> bool:
        """Set event flag ``flag`` of SINT ``sint`` on ``vp``: True if it was newly set."""
        return self._connections().signal_event(vp, sint, flag)

    # -- vCPU handlers ------------------------------------------------------------------------

    def read_msr(self, vcpu_index: int, index: int) -> int | None:
        try:
            return self.partition.msr_read(vcpu_index, index)
        except MsrAccessFault:
            return None  # #GP, as the TLFS says

    def write_msr(self, vcpu_index: int, index: int, value: int) -> bool:
        try:
            self.partition.msr_write(vcpu_index, index, value)
        except MsrAccessFault:
            return False  # #GP, as the TLFS says
        return True

    def _hypercall_exit(self, vcpu_thread):
        """The function ``vcpu_thread``'s loop calls for a 1-byte OUT to the hypercall port
        while the page is enabled (``PACKED_HYPERCALL``; the argument is the packed exit),
        prepared once per vCPU. A call the run loop decoded (``PACKED_HC_SIMPLE``: the legal
        environment and the common shape, its registers read in C) goes through the
        partition's compact path with the registers of the page; every other call as
        :meth:`handle_port` does it."""
        partition = self.partition
        calls = partition.simple_hypercalls(vcpu_thread.index)
        vcpu = vcpu_thread.vcpu
        direct = SyncRegisters(vcpu)
        success_32, success_64 = HC_SUCCESS_32, HC_SUCCESS_64

        def on_hypercall(packed: int, first: int, second: int) -> int | None:
            # The port is armed only while the page is enabled (watch_hypercall_port): an exit
            # that raced with a disable counts as a call made just before it. Trace events
            # come from the general path alone. The run loop hands a decoded call's register
            # pair over, and writes the result when the answer is HC_SUCCESS_32/64.
            use_sync = self.use_sync_regs  # read each time: tests switch it off
            if packed & PACKED_HC_SIMPLE and use_sync and partition.on_event is None:
                call = calls[packed >> 8 & 0x1FFFF]
                if call is not None:
                    long_mode = packed & PACKED_HC_LONG != 0
                    status = call(direct, long_mode, first, second)
                    if status == SUCCESS_NOT_WRITTEN:
                        return success_64 if long_mode else success_32
                    if status is not None:
                        direct.commit()  # written by the general completion
                        return None
            elif not use_sync:
                # Registers through KVM_GET_REGS/SREGS (tests; hosts without KVM_CAP_SYNC_REGS).
                io = VcpuRegisters(vcpu, False)
                if not self._simple_without_sync_regs(io, calls):
                    self._dispatch(vcpu_thread, io)
                return None
            # Real mode, CPL > 0 (#UD: TLFS "Legal Hypercall Environments"), another call
            # shape, tracing, or the compact path declined: the general path.
            self._dispatch(vcpu_thread, VcpuRegisters(vcpu, True))
            return None

        return on_hypercall

    def _simple_without_sync_regs(self, io: VcpuRegisters, calls) -> bool:
        """The compact path over registers read by ioctl: the decoding the run loop does in C
        for the sync-regs area (``hvvmm_pack_hypercall`` in ``hvvmm/kvm/_build.py``)."""
        g = io._gprs
        # CPL is SS.DPL, as KVM reads it (arch/x86/kvm/vmx/vmx.c vmx_get_cpl).
        if not io._cr0 & CR0_PE or io._ss_dpl or self.partition.on_event is not None:
            return False
        long_mode = bool(io._efer & EFER_LMA and io._cs_l)
        if long_mode:
            control, first, second = g[_RCX], g[_RDX], g[_R8]
        else:
            control = (g[_RDX] & _U32) << 32 | g[_RAX] & _U32
            first = (g[_RBX] & _U32) << 32 | g[_RCX] & _U32
            second = (g[_RDI] & _U32) << 32 | g[_RSI] & _U32
        if control & NOT_SIMPLE_CONTROL_BITS:
            return False
        call = calls[control]
        status = None if call is None else call(io, long_mode, first, second)
        if status is None:
            return False
        if status == SUCCESS_NOT_WRITTEN:
            write_success_result(io, long_mode)
        io.commit()
        return True

    def _msr_exit(self, vcpu_thread):
        """What :meth:`read_msr`/:meth:`write_msr` answer through the vCPU's ``msr_handler``,
        as one function per vCPU for its packed MSR exits (``PACKED_MSR``). After the first
        read of an MSR whose value cannot change (the partition's constant MSRs), the run loop
        answers it in C, counted there, unless someone watches: a trace listener or an exit
        observer must see every read."""
        partition = self.partition
        msr_read, msr_write = partition.msr_read, partition.msr_write
        vcpu, index = vcpu_thread.vcpu, vcpu_thread.index
        complete_msr, msr_value = vcpu.complete_msr, vcpu.msr_value
        constants = partition.constant_msr_values(index)
        observers = vcpu_thread.observers

        def on_msr(packed: int) -> int | None:
            # An RDMSR is answered with its value, which the run loop stores
            # (Vcpu.exit_runner); everything else completes the access here.
            msr = packed & _U32
            try:
                if packed & PACKED_WRMSR:
                    msr_write(index, msr, msr_value())
                    complete_msr(True)
                    return None
                value = msr_read(index, msr)
            except MsrAccessFault:
                complete_msr(False)  # #GP, as the TLFS says
                return None
            if msr in constants and partition.on_event is None and not observers:
                vcpu.set_constant_msr(msr, constants[msr])
            return value

        return on_msr

    def _dispatch(self, vcpu_thread, registers: VcpuRegisters) -> None:
        outcome = self.partition.hypercall(vcpu_thread.index, registers)
        if outcome.inject_ud:
            registers.inject_ud()
        else:
            registers.commit()

    def handle_port(self, vcpu_thread, exit) -> None:
        """An OUT to the hypercall port: a hypercall while the page is enabled and the access is
        the stub's (`out imm8, al`: 1 byte, one item); anything else is an ordinary port."""
        partition = self.partition
        if not (exit.is_write and exit.size == 1 and exit.count == 1
                and partition.hypercall_port_active()):
            vcpu_thread.bus_io(exit)
            return
        self._dispatch(vcpu_thread, VcpuRegisters(vcpu_thread.vcpu, self.use_sync_regs))
