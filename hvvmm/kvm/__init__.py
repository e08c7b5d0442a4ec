"""The KVM layer: the only code that talks to /dev/kvm (and the only user of cffi)."""

from ._kvm import lib as constants
from .exits import (FailEntryExit, HltExit, InternalErrorExit, InterruptedExit, IoExit,
                    IrqWindowOpenExit, MmioExit, MsrExit, ShutdownExit, SystemEventExit,
                    UnknownExit, VcpuExit, decode_exit)
from .system import (KICK_SIGNAL, Kvm, KvmCpuidEntry, KvmError, KvmUnavailableError,
                     MsrFilterRange, PinnedBuffer, PythonGate, Vcpu, Vm,
                     atomic_fetch_or_u8, install_kick_handler)

__all__ = [
    "constants", "FailEntryExit", "HltExit", "InternalErrorExit", "InterruptedExit", "IoExit",
    "IrqWindowOpenExit", "MmioExit", "MsrExit", "ShutdownExit", "SystemEventExit", "UnknownExit",
    "VcpuExit", "decode_exit", "KICK_SIGNAL", "Kvm", "KvmCpuidEntry", "KvmError",
    "KvmUnavailableError", "MsrFilterRange", "PinnedBuffer", "PythonGate", "Vcpu", "Vm",
    "atomic_fetch_or_u8", "install_kick_handler",
]
