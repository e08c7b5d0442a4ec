"""hv-reset: HV_X64_MSR_RESET, a system reset requested through an MSR.

TLFS ``partition-properties.md`` (AccessResetReg); QEMU ``docs/system/i386/hyperv.rst``
``hv-reset``; Linux ``arch/x86/kvm/hyperv.c`` (``HV_X64_MSR_RESET``). Partition-wide. Writing a
value with bit 0 set asks the platform to reset the VM (KVM: ``KVM_SYSTEM_EVENT_RESET``); other bits
are RsvdP and ignored; reads return 0. AccessResetReg is CPUID 0x40000003 EAX bit 7. As in QEMU's
``hv-reset``, the "use the RESET MSR" recommendation (0x40000004 EAX bit 4) is not set: QEMU's
documentation calls this "not a recommended way for Windows to perform system reboot", and modern
Hyper-V does not expose it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, privileges
from hvvmm.hv.hvdef import HV_X64_MSR_RESET, HvPartitionPrivilege

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

log = logging.getLogger(__name__)

NAME = "hv-reset"
RESET_BIT = 1 << 0


def attach(partition: "Partition") -> None:
    platform = partition.platform

    def write_reset(vp_index: int, value: int) -> None:
        if value & RESET_BIT:
            log.info("vp%d: guest requested a system reset through HV_X64_MSR_RESET", vp_index)
            platform.request_reset()

    partition.register_msr(HV_X64_MSR_RESET, read=lambda vp_index: 0, write=write_reset,
                           scope="partition")


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="RESET MSR: the guest can reset the VM",
    tlfs="partition-properties.md: AccessResetReg",
    attach=attach,
    cpuid=privileges(HvPartitionPrivilege.AccessResetReg),
    msrs=(HV_X64_MSR_RESET,),
)
