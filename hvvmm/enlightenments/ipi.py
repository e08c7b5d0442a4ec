"""hv-ipi: HvCallSendSyntheticClusterIpi (0x000B) and HvCallSendSyntheticClusterIpiEx (0x0015).

TLFS ``hypercalls/HvCallSendSyntheticClusterIpi.md`` and ``HvCallSendSyntheticClusterIpiEx.md``
("sends a virtual fixed interrupt to the specified virtual processor set. It does not support
NMIs"); Linux ``arch/x86/hyperv/hv_apic.c`` (the guest side) and ``arch/x86/kvm/hyperv.c``
``kvm_hv_send_ipi()``; QEMU's ``hv-ipi`` requires ``hv-vpindex``.

Inputs (both simple calls; fast and memory forms):

* 0x000B, 16 bytes: ``u32 Vector`` @0, ``HV_INPUT_VTL TargetVtl`` @4, 3 bytes padding @5,
  ``u64 ProcessorMask`` @8. Fast: RDX = Vector | TargetVtl << 32, R8 = ProcessorMask. Linux 6.1
  always issues it fast (``hv_do_fast_hypercall16(HVCALL_SEND_IPI, vector, mask)``) and so does
  Windows ("Windows always uses 'fast'", V. Kuznetsov's Linux commit d8e6b232cfdd).
* 0x0015, 24-byte fixed header: Vector, TargetVtl, padding as above, then the HV_VP_SET's Format
  @8 and ValidBanksMask @16; the bank contents are the variable header (:mod:`hvvmm.hv.vpset`).
  Linux sends it in memory form with rep count 0 and var-header size = number of banks, or
  HV_GENERIC_SET_ALL (no banks) when the targets are every present CPU. Its fast form needs
  more than RDX/R8, i.e. XMM fast input (CPUID 0x40000003 EDX bit 4, hv-xmm-input); without it
  the dispatcher raises #UD (TLFS) -- KVM takes XMM input for exactly this call and the flushes.

Checks (the TLFS leaves their order open; only the first failing one is reported):

* The processor set's shape: Ex variable header size vs ValidBanksMask ->
  HV_STATUS_INVALID_HYPERCALL_INPUT (KVM), before anything else is looked at.
* The set's format and members (:mod:`hvvmm.hv.vpset`): an unknown format, or a VP index the
  partition does not have (a ProcessorMask bit included) -> HV_STATUS_INVALID_PARAMETER.
* TargetVtl / padding: hvvmm partitions have VTL 0 only. TargetVtl 0 (or UseTargetVtl with
  VTL 0) is the caller's own VTL; anything else, and non-zero padding (RsvdZ), ->
  HV_STATUS_INVALID_PARAMETER. (KVM answers INVALID_HYPERCALL_INPUT for RDX 63:32 != 0 in the
  fast form and ignores the field in the memory form; OpenHCL answers INVALID_VTL_STATE for a
  VTL other than 0 and INVALID_PARAMETER for flags.)
* Vector outside 0x10..0xFF ("Must be between >= 0x10 and <= 0xFF", TLFS) ->
  HV_STATUS_INVALID_PARAMETER, as OpenHCL (``cvm_send_synthetic_cluster_ipi``). KVM answers
  HV_STATUS_INVALID_HYPERCALL_INPUT (``kvm_hv_send_ipi()``); Linux never sends such a vector
  (``__send_ipi_mask()`` takes the native path for vector < HV_IPI_LOW_VECTOR).

Delivery: each target gets a fixed, edge-triggered interrupt through
``platform.signal_interrupt(vp, vector)`` (KVM_SIGNAL_MSI to the target's APIC ID, KVM api.rst);
the caller may be among the targets (Linux ``hv_send_ipi_self``). A target whose LAPIC refuses
it (software-disabled) simply does not get it, as on hardware and in KVM ("We fail only when
APIC is disabled"); the call still succeeds. An empty set sends nothing and succeeds (KVM).

CPUID: 0x40000004 EAX bit 10 (HV_X64_CLUSTER_IPI_RECOMMENDED: Linux 6.1 then routes every IPI
with a vector >= 0x10 through 0x000B, and enables PV spinlocks with hv-idle) and bit 11
(HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED: Linux uses 0x0015 when a target is VP 64 or above,
with HV_GENERIC_SET_ALL if the targets are every present CPU; without the bit those IPIs go
native). Bit 11 is shared with hv-tlbflush. Both calls exist
while hv-ipi is off and answer ACCESS_DENIED there, as KVM's ``hv_check_hypercall_access()``
does when the recommendation is missing (KVM selftest ``hyperv_features.c``).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Iterable

from hvvmm.enlightenments import AttachError, Enlightenment, recommendations
from hvvmm.hv.hvdef import HvEnlightenmentInformation, HvStatus, HypercallCode
from hvvmm.hv.hypercall import HypercallError, HypercallRequest, HypercallResult, HypercallSpec
from hvvmm.hv.vpset import HV_VP_SET_HEADER_SIZE, decode_vp_set, processor_mask_vps
from hvvmm.hv.platform import raise_interrupt

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

log = logging.getLogger(__name__)

NAME = "hv-ipi"
IPI_VECTOR_MIN = 0x10  # HV_IPI_LOW_VECTOR
IPI_VECTOR_MAX = 0xFF  # HV_IPI_HIGH_VECTOR
IPI_INPUT_SIZE = 16  # Vector, TargetVtl, padding, ProcessorMask
IPI_EX_INPUT_SIZE = 24  # Vector, TargetVtl, padding, Format, ValidBanksMask
HV_INPUT_VTL_USE_TARGET = 1 << 4  # HV_INPUT_VTL: TargetVtl 3:0, UseTargetVtl 4, reserved 7:5


def check_vector_and_vtl(header: bytes) -> int:
    """The TargetVtl, padding and vector checks of the module docstring on the first 8 bytes of
    either input; returns the vector."""
    vector, target_vtl, pad0, pad1, pad2 = struct.unpack_from("<IBBBB", header)
    if target_vtl not in (0, HV_INPUT_VTL_USE_TARGET) or pad0 or pad1 or pad2:
        raise HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER,
                             message=f"TargetVtl {target_vtl:#x} / padding "
                                     f"{bytes((pad0, pad1, pad2)).hex()}: hvvmm partitions have "
                                     "VTL 0 only")
    if not IPI_VECTOR_MIN <= vector <= IPI_VECTOR_MAX:
        raise HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER,
                             message=f"vector {vector:#x} outside {IPI_VECTOR_MIN:#x}.."
                                     f"{IPI_VECTOR_MAX:#x}")
    return vector


class IpiState:
    """Counters and the two handlers. Stateless otherwise: nothing to reset."""

    def __init__(self, partition: "Partition"):
        self._platform = partition.platform
        self._log_once = partition.log_once
        self.vp_count = partition.vp_count
        self.sent = 0  # interrupts a LAPIC accepted
        self.refused = 0  # interrupts a LAPIC refused (software-disabled)

    def send_ipi(self, request: HypercallRequest) -> HypercallResult:
        header = request.header
        (mask,) = struct.unpack_from("<Q", header, 8)
        # Linux sends every IPI through this call: the mask's VPs go straight to delivery.
        targets = sorted(processor_mask_vps(mask, self.vp_count))
        vector = check_vector_and_vtl(header)
        self._deliver(request.vp_index, vector, targets)
        return HypercallResult()

    def send_ipi_ex(self, request: HypercallRequest) -> HypercallResult:
        header = request.header
        targets = decode_vp_set(header[IPI_EX_INPUT_SIZE - HV_VP_SET_HEADER_SIZE:]
                                + request.variable_header, self.vp_count).members(self.vp_count)
        vector = check_vector_and_vtl(header)
        self._deliver(request.vp_index, vector, targets)
        return HypercallResult()

    def _deliver(self, caller: int, vector: int, targets: Iterable[int]) -> None:
        for vp in targets:
            if raise_interrupt(self._platform, vp, vector, self._log_once, "IPI"):
                self.sent += 1
                continue
            self.refused += 1
            self._log_once(("ipi_refused", vp), logging.INFO,
                           "vp%d: IPI vector %#x to vp%d not accepted (its local APIC is "
                           "disabled); dropped, as on hardware (per target)",
                           caller, vector, vp)


def attach(partition: "Partition") -> IpiState:
    if not callable(getattr(partition.platform, "signal_interrupt", None)):
        raise AttachError(f"{NAME} needs a platform that can raise an interrupt on a VP "
                          "(signal_interrupt)")
    state = IpiState(partition)
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallSendSyntheticClusterIpi, handler=state.send_ipi,
        input_size=IPI_INPUT_SIZE, fast_allowed=True))
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvCallSendSyntheticClusterIpiEx, handler=state.send_ipi_ex,
        input_size=IPI_EX_INPUT_SIZE, fast_allowed=True, xmm_fast_allowed=True,
        variable_header_allowed=True))
    return state


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="HvCallSendSyntheticClusterIpi(Ex): fixed IPIs to a VP mask or HV_VP_SET",
    tlfs="hypercalls/HvCallSendSyntheticClusterIpi.md, HvCallSendSyntheticClusterIpiEx.md",
    attach=attach,
    requires=("hv-vpindex",),
    cpuid=recommendations(HvEnlightenmentInformation.HV_X64_CLUSTER_IPI_RECOMMENDED
                          | HvEnlightenmentInformation.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED),
    hypercalls=(HypercallCode.HvCallSendSyntheticClusterIpi,
                HypercallCode.HvCallSendSyntheticClusterIpiEx),
    denied_when_off=True,
)
