"""hv-idle (hvvmm name; QEMU has no flag): HV_X64_MSR_GUEST_IDLE, the guest idle state.

TLFS ``vp-properties.md`` "Virtual Processor Idle Sleep State": reading the MSR puts the VP in the
idle state, and it is "woken when an interrupt arrives, regardless of whether the interrupt is
enabled"; Linux ``arch/x86/hyperv/hv_spinlock.c`` is its user. CPUID 0x40000003 EAX bit 10
(AccessGuestIdleReg) with EDX bit 5 (guest idle state available).

KVM's HLT emulation does not wake with IF = 0, so the platform implements the wait
(:meth:`hvvmm.hv.platform.HvPlatform.idle_vp`): block until an interrupt is pending for that vCPU,
or a short bounded sleep. Returning early is harmless because callers re-check (Linux PV
qspinlock ``hv_qlock_wait``). The read returns 0; the MSR is read-only (a write raises #GP).
Linux uses it only together with the cluster-IPI recommendation (PV spinlocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, features, privileges
from hvvmm.hv.hvdef import HV_X64_MSR_GUEST_IDLE, HvFeatures, HvPartitionPrivilege

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-idle"


def attach(partition: "Partition") -> None:
    platform = partition.platform

    def read_guest_idle(vp_index: int) -> int:
        platform.idle_vp(vp_index)
        return 0

    # Per-VP scope: the partition lock is not held while the VP idles.
    partition.register_msr(HV_X64_MSR_GUEST_IDLE, read=read_guest_idle, scope="vp")


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    aliases=("hv-guest-idle",),
    summary="GUEST_IDLE MSR: a read idles the VP until the next interrupt, even with IF=0",
    tlfs="vp-properties.md: Virtual Processor Idle Sleep State",
    attach=attach,
    cpuid=(*privileges(HvPartitionPrivilege.AccessGuestIdleReg),
           *features(HvFeatures.HV_X64_GUEST_IDLE_STATE_AVAILABLE)),
    msrs=(HV_X64_MSR_GUEST_IDLE,),
)
