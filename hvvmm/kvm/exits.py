"""The one place that decodes ``struct kvm_run`` after ``KVM_RUN`` returns.

Every exit becomes a small value object; an exit reason we do not know is a value too
(:class:`UnknownExit`), never an exception (as rust-vmm's ``VcpuExit::Unsupported``). Data that the
VMM must fill in before the next ``KVM_RUN`` (port-I/O IN, MMIO read, RDMSR) is a writable
``memoryview`` into the shared ``kvm_run`` page, or a completion method, so an exit cannot be
answered in the wrong place.
"""

from __future__ import annotations

import struct

from ._kvm import ffi, lib

# Internal-error suberrors, named for the readable message (linux/kvm.h).
_INTERNAL_ERROR_NAMES = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
}

_SYSTEM_EVENT_NAMES = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    lib.KVM_SYSTEM_EVENT_RESET: "reset",
    lib.KVM_SYSTEM_EVENT_CRASH: "crash",
}

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_"):].lower()
    for name in dir(lib) if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
    for value in [getattr(lib, name)]
}


class VcpuExit:
    """Base of all decoded exits."""

    __slots__ = ()
    reason_name = "exit"

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                           if name not in ("data", "_run"))
        return f"{type(self).__name__}({fields})"


class IoExit(VcpuExit):
    """Port I/O. ``data`` holds ``count`` items of ``size`` bytes; fill it for an IN."""

    __slots__ = ("port", "size", "count", "is_write", "data")
    reason_name = "io"

    def __init__(self, port: int, size: int, count: int, is_write: bool, data: memoryview):
        self.port = port
        self.size = size
        self.count = count
        self.is_write = is_write
        self.data = data


class MmioExit(VcpuExit):
    """An access to guest-physical memory no memslot backs (or a write to a read-only slot)."""

    __slots__ = ("address", "size", "is_write", "data")
    reason_name = "mmio"

    def __init__(self, address: int, size: int, is_write: bool, data: memoryview):
        self.address = address
        self.size = size
        self.is_write = is_write
        self.data = data


class MsrExit(VcpuExit):
    """RDMSR/WRMSR sent to user space (KVM_CAP_X86_USER_SPACE_MSR). Answer with :meth:`complete`
    or :meth:`fail` (the guest then gets #GP)."""

    __slots__ = ("index", "is_write", "value", "reason", "_run")
    reason_name = "msr"

    def __init__(self, run, index: int, is_write: bool, value: int, reason: int):
        self._run = run
        self.index = index
        self.is_write = is_write
        self.value = value
        self.reason = reason

    def complete(self, value: int = 0) -> None:
        """Finish the access; for RDMSR ``value`` is what the guest reads."""
        msr = self._run.msr
        msr.error = 0
        if not self.is_write:
            msr.data = value & 0xFFFF_FFFF_FFFF_FFFF

    def fail(self) -> None:
        """Refuse the access: KVM injects #GP into the guest."""
        self._run.msr.error = 1


class HltExit(VcpuExit):
    __slots__ = ()
    reason_name = "hlt"


class ShutdownExit(VcpuExit):
    """Triple fault."""

    __slots__ = ()
    reason_name = "shutdown"


class IrqWindowOpenExit(VcpuExit):
    __slots__ = ()
    reason_name = "irq_window_open"


class InterruptedExit(VcpuExit):
    """``KVM_RUN`` returned EINTR: a signal or ``immediate_exit`` kicked the vCPU out."""

    __slots__ = ()
    reason_name = "interrupted"


class FailEntryExit(VcpuExit):
    __slots__ = ("hardware_reason", "cpu")
    reason_name = "fail_entry"

    def __init__(self, hardware_reason: int, cpu: int):
        self.hardware_reason = hardware_reason
        self.cpu = cpu

    def describe(self) -> str:
        return (f"KVM could not enter the guest (hardware entry failure reason "
                f"{self.hardware_reason:#x} on host CPU {self.cpu})")


class InternalErrorExit(VcpuExit):
    __slots__ = ("suberror", "data")
    reason_name = "internal_error"

    def __init__(self, suberror: int, data: tuple[int, ...]):
        self.suberror = suberror
        self.data = data

    @property
    def is_emulation_failure(self) -> bool:
        """KVM's instruction emulator met an instruction it cannot run."""
        return self.suberror == _INTERNAL_ERROR_EMULATION

    @property
    def instruction_bytes(self) -> bytes | None:
        """The bytes KVM fetched at the guest's RIP for a failed emulation, or None if the exit
        does not carry them. ``struct kvm_run``'s ``emulation_failure`` overlays ``internal``:
        data[0] is ``flags``; with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, data[1]
        and data[2] hold ``u8 insn_size`` then ``u8 insn_bytes[15]`` (Linux
        Documentation/virt/kvm/api.rst, KVM_EXIT_INTERNAL_ERROR)."""
        data = self.data
        if (self.suberror != _INTERNAL_ERROR_EMULATION or len(data) < 3
                or not data[0] & _EMULATION_FLAG_INSTRUCTION_BYTES):
            return None
        raw = data[1].to_bytes(8, "little") + data[2].to_bytes(8, "little")
        return raw[1:1 + min(raw[0], 15)]

    def describe(self) -> str:
        what = _INTERNAL_ERROR_NAMES.get(self.suberror, f"suberror {self.suberror}")
        insn = self.instruction_bytes
        if insn is not None:
            return f"KVM internal error: {what} (instruction bytes {insn.hex(' ')})"
        extra = " ".join(f"{word:#x}" for word in self.data)
        return f"KVM internal error: {what}" + (f" (data {extra})" if extra else "")


class SystemEventExit(VcpuExit):
    __slots__ = ("type", "data")
    reason_name = "system_event"

    def __init__(self, type: int, data: tuple[int, ...]):
        self.type = type
        self.data = data

    @property
    def type_name(self) -> str:
        return _SYSTEM_EVENT_NAMES.get(self.type, f"type {self.type}")


class UnknownExit(VcpuExit):
    __slots__ = ("reason",)
    reason_name = "unknown"

    def __init__(self, reason: int):
        self.reason = reason

    def describe(self) -> str:
        name = EXIT_REASON_NAMES.get(self.reason, "not known to hvvmm")
        return f"unhandled KVM exit reason {self.reason} ({name})"


_EXIT_IO = lib.KVM_EXIT_IO
_EXIT_IO_OUT = lib.KVM_EXIT_IO_OUT
_EXIT_MMIO = lib.KVM_EXIT_MMIO
_EXIT_RDMSR = lib.KVM_EXIT_X86_RDMSR
_EXIT_WRMSR = lib.KVM_EXIT_X86_WRMSR
_EXIT_HLT = lib.KVM_EXIT_HLT
_EXIT_SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
_EXIT_FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
_EXIT_INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
_EXIT_SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
_EXIT_IRQ_WINDOW_OPEN = lib.KVM_EXIT_IRQ_WINDOW_OPEN
_EXIT_INTR = lib.KVM_EXIT_INTR
_INTERNAL_ERROR_EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
_EMULATION_FLAG_INSTRUCTION_BYTES = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES


# Port I/O is the hot exit: its fields are read with one unpack at the compiler's offsets rather
# than through cffi's nested-struct proxies (about 1.5 us less per exit).
_REASON_OFFSET = ffi.offsetof("struct kvm_run", "exit_reason")
_IO_OFFSET = ffi.offsetof("struct kvm_run", "io")
# exit_reason, then (after padding) io.direction, size, port, count, data_offset: one unpack.
_REASON_AND_IO = struct.Struct(f"<{_REASON_OFFSET}xI{_IO_OFFSET - _REASON_OFFSET - 4}xBBHIQ")
if tuple(ffi.offsetof("struct kvm_run", "io", name) - _IO_OFFSET
         for name in ("direction", "size", "port", "count", "data_offset")) != (0, 1, 2, 4, 8):
    raise ImportError("struct kvm_run.io does not have the layout hvvmm reads")


def decode_exit(run, run_view: memoryview) -> VcpuExit:
    """Decode the exit in ``run`` (a ``struct kvm_run *``) whose page is ``run_view``."""
    reason, direction, size, port, count, offset = _REASON_AND_IO.unpack_from(run_view)
    if reason == _EXIT_IO:
        end = offset + size * count
        if end > run_view.nbytes:  # never trust an offset, even the kernel's
            return UnknownExit(reason)
        return IoExit(port, size, count, direction == _EXIT_IO_OUT, run_view[offset:end])
    if reason == _EXIT_MMIO:
        mmio = run.mmio
        size = min(mmio.len, 8)
        data = ffi.buffer(mmio.data, size)
        return MmioExit(mmio.phys_addr, size, bool(mmio.is_write), memoryview(data))
    if reason == _EXIT_RDMSR or reason == _EXIT_WRMSR:
        msr = run.msr
        is_write = reason == _EXIT_WRMSR
        return MsrExit(run, msr.index, is_write, msr.data if is_write else 0, msr.reason)
    if reason == _EXIT_HLT:
        return HltExit()
    if reason == _EXIT_SHUTDOWN:
        return ShutdownExit()
    if reason == _EXIT_SYSTEM_EVENT:
        event = run.system_event
        return SystemEventExit(event.type, tuple(event.data[i] for i in range(min(event.ndata, 16))))
    if reason == _EXIT_INTERNAL_ERROR:
        internal = run.internal
        return InternalErrorExit(internal.suberror,
                                 tuple(internal.data[i] for i in range(min(internal.ndata, 16))))
    if reason == _EXIT_FAIL_ENTRY:
        return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == _EXIT_IRQ_WINDOW_OPEN:
        return IrqWindowOpenExit()
    if reason == _EXIT_INTR:
        return InterruptedExit()
    return UnknownExit(reason)


# The packed forms of a single port access and of an MSR exit (``Vcpu.packed_runner``;
# hvvmm_run_packed in _build.py).
PACKED_IO = lib.HVVMM_PACKED_IO
PACKED_OUT = lib.HVVMM_PACKED_OUT
PACKED_MSR = lib.HVVMM_PACKED_MSR
PACKED_WRMSR = lib.HVVMM_PACKED_WRMSR
PACKED_HYPERCALL = lib.HVVMM_PACKED_HYPERCALL  # with PACKED_IO | PACKED_OUT; AL in bits 7:0
# With PACKED_HYPERCALL: a legal-environment call whose control is code | fast bit only, that
# control in bits 24:8; its register pair is handed over by Vcpu.exit_runner.
PACKED_HC_SIMPLE = lib.HVVMM_PACKED_HC_SIMPLE
PACKED_HC_LONG = lib.HVVMM_PACKED_HC_LONG  # with PACKED_HC_SIMPLE: a 64-bit call
# What the hypercall exit answers (Vcpu.exit_runner) to have the success result of a 32-bit or
# a 64-bit call written before the next entry.
HC_SUCCESS_32, HC_SUCCESS_64 = lib.HVVMM_HC_SUCCESS_32, lib.HVVMM_HC_SUCCESS_64

