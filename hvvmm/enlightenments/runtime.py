"""hv-runtime: HV_X64_MSR_VP_RUNTIME, how long each virtual processor has run.

TLFS ``vp-properties.md`` "Virtual Processor Run Time Register"; Linux
``include/hyperv/hvgdk_mini.h`` (``HV_X64_MSR_VP_RUNTIME``). Read-only, per VP, in 100 ns units;
QEMU's documentation says it "gives guest OS an idea of how much time was 'stolen'". The value comes
from the platform (the vCPU thread's CPU time). AccessVpRunTimeReg is CPUID 0x40000003 EAX bit 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, privileges
from hvvmm.hv.hvdef import HV_U64_MASK, HV_X64_MSR_VP_RUNTIME, HvPartitionPrivilege

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-runtime"


def attach(partition: "Partition") -> None:
    platform = partition.platform

    def read_runtime(vp_index: int) -> int:
        return max(0, int(platform.vp_runtime_100ns(vp_index))) & HV_U64_MASK

    partition.register_msr(HV_X64_MSR_VP_RUNTIME, read=read_runtime, scope="vp")


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="VP_RUNTIME MSR: virtual processor run time in 100 ns units",
    tlfs="vp-properties.md: Virtual Processor Run Time Register",
    attach=attach,
    cpuid=privileges(HvPartitionPrivilege.AccessVpRunTimeReg),
    msrs=(HV_X64_MSR_VP_RUNTIME,),
)
