"""hv-spinlocks=N: the spinlock retry count and HvCallNotifyLongSpinWait (always on).

TLFS ``feature-discovery.md`` "Implementation Recommendations" (0x40000004 EBX: "the recommended
number of attempts to retry a spinlock failure before notifying the hypervisor about the
failures; 0xFFFFFFFF indicates never notify") and ``hypercalls/HvCallNotifyLongSpinWait.md``;
KVM answers it with ``kvm_vcpu_on_spin()`` (Linux ``arch/x86/kvm/hyperv.c``).

HvCallNotifyLongSpinWait (0x0008) is a simple call with an 8-byte input (u32 SpinCount, u32 RsvdZ),
usually issued fast (RDX). "There is no error status for this hypercall, only HV_STATUS_SUCCESS
will be returned as this is an advisory hypercall": the handler asks the platform to yield the
vCPU (KVM: ``kvm_vcpu_on_spin``, Xen: ``vcpu_yield``) and returns SUCCESS whatever the input.
Because no privilege gates it, the call is available whenever Hyper-V is on (as in KVM); the
``hv-spinlocks=N`` option only sets the count in 0x40000004 EBX, which defaults to 0xFFFFFFFF
(never notify), QEMU's default. Windows calls it after N failed spins; Linux never does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment
from hvvmm.hv.hvdef import HypercallCode
from hvvmm.hv.hypercall import HypercallRequest, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-spinlocks"


def attach(partition: "Partition") -> None:
    platform = partition.platform

    def notify_long_spin_wait(request: HypercallRequest) -> HypercallResult:
        platform.yield_vp(request.vp_index)
        return HypercallResult()

    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallNotifyLongSpinWait, handler=notify_long_spin_wait,
        input_size=8, fast_allowed=True))


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="spinlock retry count (0x40000004 EBX) and HvCallNotifyLongSpinWait -> yield",
    tlfs="hypercalls/HvCallNotifyLongSpinWait.md",
    attach=attach,
    always_on=True,
    hypercalls=(HypercallCode.HvCallNotifyLongSpinWait,),
)
