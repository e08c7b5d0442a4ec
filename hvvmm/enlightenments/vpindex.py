"""hv-vpindex: HV_X64_MSR_VP_INDEX, the guest-visible number of each virtual processor.

TLFS ``vp-properties.md`` "Virtual Processor Index" and ``datatypes/hv_vp_index.md``; Linux
``include/hyperv/hvgdk_mini.h`` (``HV_X64_MSR_VP_INDEX``). Read-only (a write raises #GP: KVM,
OpenVMM); the value is the VP index 0 .. N-1 in the order of the MADT, so hypercalls that name VPs
(IPIs, flushes, SynIC targets) and the guest agree on who is who. AccessVpIndex is CPUID 0x40000003
EAX bit 6.

Linux does not detect Hyper-V at all without this bit (``ms_hyperv_platform()`` in
``arch/x86/kernel/cpu/mshyperv.c``), and the TLFS says the "Hv#1" signature implies this MSR, so
every preset includes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, privileges
from hvvmm.hv.hvdef import HV_X64_MSR_VP_INDEX, HvPartitionPrivilege

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-vpindex"


def attach(partition: "Partition") -> None:
    partition.register_msr(HV_X64_MSR_VP_INDEX, read=lambda vp_index: vp_index, scope="vp")


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="VP_INDEX MSR: each virtual processor's index",
    tlfs="vp-properties.md: Virtual Processor Index",
    attach=attach,
    cpuid=privileges(HvPartitionPrivilege.AccessVpIndex),
    msrs=(HV_X64_MSR_VP_INDEX,),
)
