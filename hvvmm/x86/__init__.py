"""x86 instruction decoding, guest page-table walks and user-space instruction completion.

Used only where KVM's instruction emulator reports an instruction it cannot run
(``KVM_INTERNAL_ERROR_EMULATION``); see :mod:`hvvmm.x86.complete`. No KVM imports here except in
:mod:`hvvmm.x86.kvm_adapter`, which moves a :class:`~hvvmm.x86.state.CpuState` in and out of a
vCPU.
"""

from .complete import COMPLETED, COMPLETED_INSTRUCTIONS, FAULTED, Completer, Completion
from .decode import CpuMode, DecodeError, Instruction, MemoryOperand, decode
from .state import CannotComplete, CpuState, Event, FpuControl, GuestFault, Segment

__all__ = [
    "COMPLETED", "COMPLETED_INSTRUCTIONS", "FAULTED", "Completer", "Completion", "CpuMode",
    "DecodeError", "Instruction", "MemoryOperand", "decode", "CannotComplete", "CpuState",
    "Event", "FpuControl", "GuestFault", "Segment",
]
