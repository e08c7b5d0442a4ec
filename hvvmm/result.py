"""How a run ended (:class:`MachineResult`) and the process exit status each outcome gives."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .devices.debug_exit import exit_status


class ExitKind(str, enum.Enum):
    """How a guest run ended."""

    DEBUG_EXIT = "debug-exit"  # isa-debug-exit write; ``code`` holds the value
    POWEROFF = "poweroff"      # ACPI soft-off
    SHUTDOWN = "shutdown"      # triple fault
    RESET = "reset"            # the guest asked for a reset (i8042, Hyper-V reset MSR, ...)
    CRASH = "crash"            # the guest reported a crash (Hyper-V crash MSRs)
    ERROR = "error"            # KVM error, unhandled exit, VMM exception
    TIMEOUT = "timeout"
    STOPPED = "stopped"        # stopped by the host (Machine.stop, a signal)


# Process exit statuses of ``hvvmm run``. A debug-exit of 0 (the test guests' "every check
# passed") is 0, as a powered-off guest; any other value v gives QEMU's (v << 1) | 1, always odd,
# and the other outcomes use even numbers, so the two never collide.
STATUS_POWEROFF = 0
STATUS_USAGE = 2
STATUS_BAD_IMAGE = 4
STATUS_KVM_UNAVAILABLE = 6
STATUS_SHUTDOWN = 8
STATUS_RESET = 10
STATUS_VM_ERROR = 12
STATUS_CRASH = 14
STATUS_TIMEOUT = 124  # as coreutils timeout(1)
_SIGNAL_STATUS_BASE = 128


@dataclass(frozen=True)
class MachineResult:
    kind: ExitKind
    message: str
    code: int | None = None        # debug-exit value
    signal: int | None = None      # for STOPPED by a signal
    vcpu: int | None = None
    rip: int | None = None
    exit_reason: str | None = None

    @property
    def status(self) -> int:
        """The process exit status ``hvvmm run`` uses for this outcome (``hvvmm qemu`` keeps
        QEMU's rule: :attr:`qemu_status`)."""
        if self.kind is ExitKind.DEBUG_EXIT:
            return 0 if not self.code else self.qemu_status
        if self.kind is ExitKind.STOPPED:
            return _SIGNAL_STATUS_BASE + self.signal if self.signal else STATUS_POWEROFF
        return {ExitKind.POWEROFF: STATUS_POWEROFF, ExitKind.SHUTDOWN: STATUS_SHUTDOWN,
                ExitKind.RESET: STATUS_RESET, ExitKind.ERROR: STATUS_VM_ERROR,
                ExitKind.CRASH: STATUS_CRASH,
                ExitKind.TIMEOUT: STATUS_TIMEOUT}[self.kind]

    @property
    def qemu_status(self) -> int:
        """For a debug-exit: QEMU's status ``(v << 1) | 1`` (1 for v = 0)."""
        assert self.kind is ExitKind.DEBUG_EXIT
        return exit_status(self.code or 0) & 0xFF
