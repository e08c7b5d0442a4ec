"""The vCPU run loop: one thread per vCPU turns each KVM exit into a bus access or a handler call.

The loop is deliberately short (Firecracker's ``run_emulation`` shape): port I/O and MMIO go to the
buses, MSR exits to the synthetic-MSR handler, and every exit that ends the VM (triple fault, KVM
errors, exits we do not handle) becomes a :class:`StopRequest` for the machine. The hot exits
(hypercalls, MSRs, port accesses seen before) are handed to the same handlers from C
(``Vcpu.exit_runner``), which comes back to this loop only for the rest. ``KVM_RUN`` releases
the GIL, so vCPUs run in parallel; a stop sets ``immediate_exit`` and sends the kick signal, which
makes ``KVM_RUN`` return EINTR.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from .bus import Bus
from .kvm.exits import PACKED_IO, PACKED_OUT, PACKED_WRMSR
from .kvm import (KICK_SIGNAL, FailEntryExit, HltExit, InternalErrorExit, InterruptedExit, IoExit,
                  MmioExit, MsrExit, ShutdownExit, SystemEventExit, UnknownExit, Vcpu, VcpuExit,
                  constants)

log = logging.getLogger(__name__)

ExitObserver = Callable[[int, VcpuExit], None]

_thread_state = threading.local()


def current_vcpu_index() -> int | None:
    """The index of the vCPU whose thread is calling, or None on any other thread."""
    return getattr(_thread_state, "vcpu_index", None)


@dataclass(frozen=True)
class StopRequest:
    """Why a vCPU asks the machine to stop: ``kind`` is a :class:`hvvmm.machine.ExitKind` value."""

    kind: str
    message: str
    vcpu: int | None = None
    rip: int | None = None
    exit_reason: str | None = None


class MachineControl(Protocol):
    """What a vCPU needs from its machine."""

    stopping: bool

    def request_stop(self, request: StopRequest) -> bool | None:
        """End the run; a true answer means the machine handled it otherwise (a triple fault
        that resets a firmware boot in place) and this vCPU runs on."""

    def park_if_requested(self, vcpu_index: int) -> None: ...


class MsrHandler(Protocol):
    """Answers RDMSR/WRMSR exits (the Hyper-V synthetic MSRs) on vCPU ``vcpu_index``."""

    def read_msr(self, vcpu_index: int, index: int) -> int | None:
        """The value the guest reads; None refuses the read (#GP)."""

    def write_msr(self, vcpu_index: int, index: int, value: int) -> bool:
        """Apply the write; False refuses it (#GP)."""


class PortHandler(Protocol):
    """A port that needs the vCPU itself (registers), not just a value: the hypercall port."""

    def handle_port(self, vcpu: "VcpuThread", exit: IoExit) -> None: ...


# Consulted for every MMIO write exit before the bus: ``hook(vcpu_index, address, size)``
# returns True when it took the write (the memslot manager takes writes to read-only pages it
# maps over RAM, which the bus knows nothing of).
MmioWriteHook = Callable[[int, int, int], bool]


class VcpuThread:
    """Runs one vCPU until the machine stops."""

    def __init__(self, machine: MachineControl, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus,
                 mmio_write_hook: MmioWriteHook | None = None):
        self.machine = machine
        self._mmio_write_hook = mmio_write_hook
        self.vcpu = vcpu
        self.index = vcpu.index
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.msr_handler: MsrHandler | None = None
        # Ports handled with the vCPU at hand, checked before the PIO bus (set before the
        # thread starts: the loop remembers which ports go to the bus).
        self.vcpu_ports: dict[int, PortHandler] = {}
        self.observers: list[ExitObserver] = []
        # A 1-byte OUT to the hypercall port, handed the packed exit and the register pair
        # (set_hypercall_exit); None: no Hyper-V.
        self.hypercall_exit: Callable[[int, int, int], int | None] | None = None
        # Answers a packed MSR exit in place of msr_handler (set_msr_exit); None: msr_handler.
        self.msr_exit: Callable[[int], int | None] | None = None
        # Completes instructions KVM's emulator cannot run (hvvmm.x86.kvm_adapter); returns None
        # when the vCPU may go on, else the line that ends the run. Set by the machine.
        self.complete_instruction: Callable[["VcpuThread", InternalErrorExit], str | None] | \
            None = None
        self._work: collections.deque[Callable[[], None]] = collections.deque()
        self.thread: threading.Thread | None = None
        self._started = threading.Event()

    def set_hypercall_exit(self, handler: Callable[[int, int, int], int | None]) -> None:
        """Send every packed exit marked ``PACKED_HYPERCALL`` (a 1-byte OUT to the port armed
        with ``Vcpu.set_hypercall_port``; AL in bits 7:0) to ``handler(packed, first, second)``
        (``Vcpu.exit_runner`` says what the pair and the answer are) before any other port
        handling (the hypercall page's ``out imm8, al``). Exits seen by observers go
        through :attr:`vcpu_ports` instead. Call before the thread starts."""
        self.hypercall_exit = handler

    def set_msr_exit(self, handler: Callable[[int], int | None]) -> None:
        """Answer packed MSR exits with ``handler(packed)`` rather than through
        :attr:`msr_handler`, which still answers the exits observers see: it completes the
        access in the kvm_run page, or answers an RDMSR with the value (an int) for the run
        loop to store. Call before the thread starts."""
        self.msr_exit = handler

    # -- thread management --------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"hvvmm-vcpu{self.index}",
                                       daemon=True)
        self.thread.start()
        self._started.wait()

    def run_soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` on this vCPU's thread while the vCPU is outside ``KVM_RUN`` (at once if
        called from that thread). For state only the vCPU's own thread may touch, such as its
        LAPIC registers."""
        if current_vcpu_index() == self.index:
            work()
            return
        self._work.append(work)
        self.kick()

    def run_after_exit(self, work: Callable[[], None]) -> None:
        """Run ``work`` on this vCPU's thread once the exit being handled is complete: the next
        ``KVM_RUN`` first finishes the pending I/O or MSR access, then returns at once, and the
        loop runs ``work`` (a reset rewrites registers that completion would change)."""
        self._work.append(work)
        self.kick()

    def kick(self) -> None:
        """Make the vCPU leave ``KVM_RUN`` now (or at its next entry)."""
        self.vcpu.request_immediate_exit()
        thread = self.thread
        if thread is not None and thread.is_alive() and thread.ident is not None:
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread ended between the check and the kill

    def _thread_main(self) -> None:
        _thread_state.vcpu_index = self.index
        self._started.set()
        try:
            self.run_loop()
        except BaseException as exc:  # a vCPU must never die silently or hang the machine
            rip = self._safe_rip()
            log.error("vCPU %d failed at rip %s", self.index,
                      f"{rip:#x}" if rip is not None else "?", exc_info=True)
            self.machine.request_stop(StopRequest(
                "error", f"vCPU {self.index}: {type(exc).__name__}: {exc}", self.index, rip))
        finally:
            self.vcpu.leave_python_gate()

    def _safe_rip(self) -> int | None:
        try:
            return self.vcpu.get_regs().rip
        except Exception:
            return None

    # -- the loop -----------------------------------------------------------------------------

    def run_loop(self) -> None:
        vcpu = self.vcpu
        last_exit, complete_in = vcpu.last_exit, vcpu.complete_in
        machine = self.machine
        observers = self.observers
        vcpu_ports = self.vcpu_ports
        pio = self.pio_bus
        pio_read, pio_write = pio.read, pio.write
        hypercall_exit, packed_msr = self.hypercall_exit, self.msr_exit or self._packed_msr
        # Bus port accesses seen before, by their packed form above bit 32 (port, size,
        # direction): the device's own read/write with its offset bound, or None for a port no
        # device holds (Bus.cache_route).
        routes = pio.route_cache()
        # Without observers, C hands hypercall, MSR and routed port exits to their handlers
        # itself (Vcpu.exit_runner) and returns only with the rest; observers see every exit.
        run_packed = vcpu.packed_runner() if observers else \
            vcpu.exit_runner(routes, hypercall_exit, packed_msr)
        while True:
            packed = run_packed()
            if packed > 0 and not observers:
                # A port access of 1, 2 or 4 bytes that C found no route for, decoded into one
                # int (Vcpu.exit_runner; hypercall and MSR exits never come back here). No
                # exit object is built.
                if packed & PACKED_IO:
                    port = (packed >> 32) & 0xFFFF
                    if port not in vcpu_ports:
                        size = (packed >> 48) & 0xFF
                        if packed & PACKED_OUT:
                            pio_write(port, size, packed & 0xFFFF_FFFF)
                        else:
                            complete_in(packed & 0xFFFF_FFFF, size, pio_read(port, size))
                        pio.cache_route(routes, packed >> 32, port, size, packed & PACKED_OUT)
                        continue
            exit = last_exit(packed)
            if observers:
                for observer in observers:
                    observer(self.index, exit)
            kind = type(exit)
            if kind is IoExit:
                handler = vcpu_ports.get(exit.port)
                if handler is not None:
                    handler.handle_port(self, exit)
                elif exit.count == 1:
                    # The common case, kept inline: one access of 1, 2 or 4 bytes.
                    if exit.is_write:
                        pio.write(exit.port, exit.size, int.from_bytes(exit.data, "little"))
                    else:
                        exit.data[:] = pio.read(exit.port, exit.size).to_bytes(exit.size,
                                                                               "little")
                else:
                    self.bus_io(exit)
            elif kind is InterruptedExit:
                if machine.stopping:
                    return
                vcpu.leave_python_gate()  # parking may block: nobody should wait for it
                machine.park_if_requested(self.index)
                work = self._work
                while work:
                    work.popleft()()
            elif kind is MmioExit:
                self._mmio(exit)
            elif kind is MsrExit:
                self._msr(exit)
            elif kind is HltExit:
                # Only without an in-kernel LAPIC, which hvvmm always creates.
                continue
            else:
                if kind is InternalErrorExit and exit.is_emulation_failure \
                        and self.complete_instruction is not None:
                    failure = self.complete_instruction(self, exit)
                    if failure is None:
                        continue
                    stop = StopRequest("error", failure, self.index, self._safe_rip(),
                                       exit.reason_name)
                else:
                    stop = self._terminal_exit(exit)
                if machine.request_stop(stop):
                    continue
                return

    def bus_io(self, exit: IoExit) -> None:
        """Any port access on the PIO bus: ``count`` accesses of ``size`` bytes, data back to
        back (``rep ins``/``rep outs``). The loop inlines the single-access case."""
        size, port, data, pio = exit.size, exit.port, exit.data, self.pio_bus
        for i in range(exit.count):
            item = data[i * size:(i + 1) * size]
            if exit.is_write:
                pio.write(port, size, int.from_bytes(item, "little"))
            else:
                item[:] = pio.read(port, size).to_bytes(size, "little")

    def _mmio(self, exit: MmioExit) -> None:
        if exit.is_write:
            hook = self._mmio_write_hook
            if hook is not None and hook(self.index, exit.address, exit.size):
                return
            self.mmio_bus.write(exit.address, exit.size, int.from_bytes(exit.data, "little"))
        else:
            exit.data[:] = self.mmio_bus.read(exit.address, exit.size).to_bytes(exit.size,
                                                                                "little")

    def _packed_msr(self, packed: int) -> None:
        handler, vcpu, index = self.msr_handler, self.vcpu, packed & 0xFFFF_FFFF
        if handler is None:
            vcpu.complete_msr(False)
        elif packed & PACKED_WRMSR:
            vcpu.complete_msr(handler.write_msr(self.index, index, vcpu.msr_value()))
        else:
            value = handler.read_msr(self.index, index)
            if value is None:
                vcpu.complete_msr(False)
            else:
                vcpu.complete_rdmsr(value)

    def _msr(self, exit: MsrExit) -> None:
        handler = self.msr_handler
        if handler is None:
            exit.fail()
        elif exit.is_write:
            if handler.write_msr(self.index, exit.index, exit.value):
                exit.complete()
            else:
                exit.fail()
        else:
            value = handler.read_msr(self.index, exit.index)
            if value is None:
                exit.fail()
            else:
                exit.complete(value)

    def _terminal_exit(self, exit: VcpuExit) -> StopRequest:
        """The exits that end the VM, each with a message a user can act on."""
        rip = self._safe_rip()
        where = f" at rip {rip:#x}" if rip is not None else ""
        name = exit.reason_name
        if isinstance(exit, ShutdownExit):
            return StopRequest("shutdown", f"guest triple fault on vCPU {self.index}{where}",
                               self.index, rip, name)
        if isinstance(exit, SystemEventExit):
            kinds = {constants.KVM_SYSTEM_EVENT_SHUTDOWN: "poweroff",
                     constants.KVM_SYSTEM_EVENT_RESET: "reset",
                     constants.KVM_SYSTEM_EVENT_CRASH: "error"}
            return StopRequest(kinds.get(exit.type, "error"),
                               f"system event {exit.type_name} from vCPU {self.index}{where}",
                               self.index, rip, name)
        if isinstance(exit, (InternalErrorExit, FailEntryExit, UnknownExit)):
            return StopRequest("error", f"vCPU {self.index}{where}: {exit.describe()}",
                               self.index, rip, name)
        return StopRequest("error", f"vCPU {self.index}{where}: unhandled exit {exit!r}",
                           self.index, rip, name)
