"""hv-xmm-input: XMM fast hypercall input (CPUID 0x40000003 EDX bit 4).

TLFS ``hypercall-interface.md`` "XMM Fast Hypercall Input"; Linux ``arch/x86/kvm/hyperv.c``
``kvm_hv_hypercall_read_xmm()``. With the bit advertised, a fast call whose input does not fit RDX
and R8 may pass up to 112 bytes in RDX, R8 and XMM0-XMM5; without it, such a call raises #UD. The
dispatcher (:mod:`hvvmm.hv.hypercall`) does the work; this feature switches it on. The vCPU layer
must then implement ``HypercallRegisters.get_xmm`` (``KVM_GET_XSAVE``). It only matters for calls
with more than 16 bytes of input and a fast form (the flush and IPI Ex calls, not yet implemented),
which is why the Linux and Windows presets leave it off (QEMU ``docs/system/i386/hyperv.rst`` does
not recommend ``hv-xmm-input`` either).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, features
from hvvmm.hv.hvdef import HvFeatures

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-xmm-input"


def attach(partition: "Partition") -> None:
    partition.dispatcher.xmm_fast_input = True


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="XMM fast hypercall input (up to 112 bytes in registers)",
    tlfs="hypercall-interface.md: XMM Fast Hypercall Input",
    attach=attach,
    cpuid=features(HvFeatures.HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE),
)
