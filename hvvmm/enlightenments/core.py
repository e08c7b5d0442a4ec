"""The HV#1 core: GUEST_OS_ID, the HYPERCALL MSR and the hypercall page (always on).

TLFS ``hypercall-interface.md`` "Reporting the Guest OS Identity" and "Establishing the Hypercall
Interface"; Linux ``arch/x86/hyperv/hv_init.c`` ``hyperv_init()`` (the guest side of both).

* HV_X64_MSR_GUEST_OS_ID (partition-wide, initially 0). Writing 0 disables the hypercall page.
  Each distinct non-zero value is decoded and logged once (it tells Linux from Windows).
* HV_X64_MSR_HYPERCALL (partition-wide): bit 0 Enable, bit 1 Locked, 11:2 RsvdP, 63:12 GPFN. Enable
  stays 0 while GUEST_OS_ID is 0 ("The enable bit will remain zero even if a one is written to it").
  Once Locked is set "only a system reset can clear the bit": later writes are ignored (the TLFS
  names no fault; Propolis ignores them too; KVM stores the bit but does not enforce it, Linux
  ``arch/x86/kvm/hyperv.c`` ``kvm_hv_set_msr_pw()``). A GPFN outside the guest-physical address
  space raises #GP ("If the guest attempts to move the hypercall page beyond the bounds of the GPA
  space, a #GP fault will result when the MSR is written"); the platform decides by refusing the
  overlay.
* The hypercall page is a read-only overlay (TLFS: writes to it raise #GP): ``endbr64; out
  HYPERCALL_PORT, al; ret`` and int3 to the end of the page. An OUT to :data:`HYPERCALL_PORT` is a
  hypercall only while the page is enabled (TLFS "Establishing the Hypercall Interface").
* HV_X64_MSR_VP_ASSIST_PAGE is accepted and stored per VP although nothing advertises it
  (AccessIntrCtrlRegs belongs to hv-vapic, which hvvmm refuses with KVM's in-kernel LAPIC, see
  ``vapic.py``). This deviates from the TLFS gate on purpose: Linux 6.1 writes it on every CPU
  without looking at CPUID, and a #GP there prints an "unchecked MSR access error" stack dump at
  every boot (Linux ``arch/x86/hyperv/hv_init.c`` ``hv_cpu_init()``). No overlay is placed and
  nothing is ever written into the page. Should hv-vapic become possible (a user-space LAPIC), it
  takes the MSR over.

CPUID: AccessHypercallMsrs (0x40000003 EAX bit 5; QEMU sets it whenever any hv flag is on) and
HypercallMsrLockAvailable (EDX bit 18), since the Locked bit is implemented. The identification
leaves themselves (vendor, "Hv#1", version, limits) are built by :mod:`hvvmm.cpuid`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, features, privileges
from hvvmm.hv.hvdef import (
    HV_PAGE_MASK,
    HV_PAGE_SIZE,
    HV_X64_MSR_GUEST_OS_ID,
    HV_X64_MSR_HYPERCALL,
    HV_X64_MSR_HYPERCALL_ENABLE,
    HV_X64_MSR_HYPERCALL_LOCKED,
    HV_X64_MSR_VP_ASSIST_PAGE,
    HvFeatures,
    HvPartitionPrivilege,
    decode_guest_os_id,
)
from hvvmm.hv.msr import MsrAccessFault
from hvvmm.hv.platform import OverlayError, OverlaySlot

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

log = logging.getLogger(__name__)

NAME = "hv-core"

# One port below 0x100 (so ``out imm8, al`` needs no DX, which carries a hypercall input) that no
# device or common guest driver uses. That excludes 0x20/0x21, 0x40-0x43,
# 0x60-0x64, 0x70/0x71, 0x7E (KVM's OUT_7E_INC_RIP quirk), 0x80, 0x92, 0xA0/0xA1, 0xB2/0xB3,
# 0xE9, 0xED, 0xF0/0xF1 and 0xF4; also avoided: 0x00-0x1F/0x81-0x8F/0xC0-0xDF (DMA), 0x2E/0x2F
# and 0x4E/0x4F (Super I/O probing), 0x50-0x53 (PIT aliases on Intel chipsets), 0x62/0x66
# (ACPI EC) and 0x72/0x73 (extended CMOS). The VMM reserves it on its port-I/O bus.
HYPERCALL_PORT = 0x56

ENDBR64 = bytes((0xF3, 0x0F, 0x1E, 0xFA))  # hint NOP; IBT-enabled guests check for it
OUT_IMM8_AL = 0xE6
RET = 0xC3
INT3 = 0xCC


def hypercall_page_bytes(port: int = HYPERCALL_PORT) -> bytes:
    """The 4096-byte hypercall page: ``endbr64; out port, al; ret``, then int3 (OpenVMM fills its
    hypercall page with int3 too). The same bytes decode identically in 32-bit and 64-bit mode, so
    one page serves both calling conventions; the page never changes while the guest runs
    (PatchGuard; Microsoft's "Requirements for Implementing the Microsoft Hypervisor Interface")."""
    if not 0 <= port <= 0xFF:
        raise ValueError(f"hypercall port {port:#x} does not fit ``out imm8, al``")
    stub = ENDBR64 + bytes((OUT_IMM8_AL, port, RET))
    return stub + bytes([INT3]) * (HV_PAGE_SIZE - len(stub))


HYPERCALL_PAGE = hypercall_page_bytes()


MAX_IDENTITIES_LOGGED = 8  # distinct GUEST_OS_ID values logged per boot


class CoreState:
    """Partition-wide GUEST_OS_ID / HYPERCALL state, the hypercall overlay, per-VP assist MSRs.

    ``lock`` guards the MSR values; the overlay is changed through an
    :class:`~hvvmm.hv.platform.OverlaySlot`, never with the lock held across the platform call.
    """

    def __init__(self, partition: "Partition"):
        self._log_once = partition.log_once
        self.lock = threading.Lock()
        self.slot = OverlaySlot(partition.platform, "hypercall page", readonly=True,
                                lock=self.lock)
        self.guest_os_id = 0
        self._logged_identity = 0
        self._identities_logged = 0
        self.hypercall_msr = 0
        self.vp_assist_page = [0] * partition.vp_count

    @property
    def page_enabled(self) -> bool:
        """The hypercall page is mapped (HYPERCALL.Enable = 1 and GUEST_OS_ID != 0)."""
        return self.slot.page is not None

    @property
    def page_gpa(self) -> int | None:
        return self.slot.gpa

    # -- GUEST_OS_ID --------------------------------------------------------------------------

    def read_guest_os_id(self, vp_index: int) -> int:
        return self.guest_os_id

    def write_guest_os_id(self, vp_index: int, value: int) -> None:
        with self.lock:
            self.guest_os_id = value
        if value == 0:
            # TLFS: "if the guest OS identity is cleared to zero after the hypercall page has
            # been enabled, it will become disabled" -- whatever the Locked bit says.
            self.slot.remove(commit=self._clear_enable)
            return
        # Each new identity is logged, a few per boot: the guest picks the values, so neither
        # the log nor the partition's shared log-once budget may grow with them.
        with self.lock:
            new_identity = value != self._logged_identity and \
                self._identities_logged < MAX_IDENTITIES_LOGGED
            if new_identity:
                self._logged_identity = value
                self._identities_logged += 1
        if new_identity:
            log.info("vp%d: guest OS identity %#018x: %s", vp_index, value,
                     decode_guest_os_id(value))

    def _clear_enable(self) -> None:
        self.hypercall_msr &= ~HV_X64_MSR_HYPERCALL_ENABLE

    # -- HYPERCALL ----------------------------------------------------------------------------

    def read_hypercall(self, vp_index: int) -> int:
        return self.hypercall_msr

    def write_hypercall(self, vp_index: int, value: int) -> None:
        with self.lock:
            if self.hypercall_msr & HV_X64_MSR_HYPERCALL_LOCKED:
                self._log_once("hypercall_locked", logging.INFO,
                               "vp%d: write %#x to the locked HYPERCALL MSR ignored (TLFS: only a "
                               "reset clears Locked)", vp_index, value)
                return
            new = value
            if not self.guest_os_id:
                # TLFS: enabling fails while no guest OS identity has been reported.
                new &= ~HV_X64_MSR_HYPERCALL_ENABLE
        if value & HV_X64_MSR_HYPERCALL_ENABLE and not new & HV_X64_MSR_HYPERCALL_ENABLE:
            self._log_once("hypercall_without_guest_os_id", logging.INFO,
                           "vp%d: HYPERCALL enable before GUEST_OS_ID was written; the page "
                           "stays disabled (TLFS)", vp_index)

        def commit() -> None:
            # RsvdP bits 11:2 are kept as written, so a read returns what the guest wrote.
            self.hypercall_msr = new

        if not new & HV_X64_MSR_HYPERCALL_ENABLE:
            self.slot.remove(commit=commit)
            return
        gpa = new & HV_PAGE_MASK
        try:
            self.slot.place(gpa, HYPERCALL_PAGE, commit=commit)
        except OverlayError as error:
            raise MsrAccessFault(HV_X64_MSR_HYPERCALL, write=True, value=value,
                                 reason=f"the hypercall page cannot be placed at {gpa:#x}: "
                                        f"{error}") from error
        log.debug("vp%d: hypercall page at %#x", vp_index, gpa)

    # -- VP_ASSIST_PAGE (accepted, not advertised; see the module docstring) ------------------

    def read_vp_assist_page(self, vp_index: int) -> int:
        return self.vp_assist_page[vp_index]

    def write_vp_assist_page(self, vp_index: int, value: int) -> None:
        self.vp_assist_page[vp_index] = value

    # -- lifecycle ----------------------------------------------------------------------------

    def reset(self) -> None:
        """VM reset: every MSR back to 0 (Locked included) and the overlay removed."""

        def commit() -> None:
            self.guest_os_id = 0
            self._logged_identity = 0
            self._identities_logged = 0
            self.hypercall_msr = 0
            self.vp_assist_page = [0] * len(self.vp_assist_page)

        self.slot.remove(commit=commit)


def attach(partition: "Partition") -> CoreState:
    state = CoreState(partition)
    partition.register_msr(HV_X64_MSR_GUEST_OS_ID, read=state.read_guest_os_id,
                           write=state.write_guest_os_id, scope="partition")
    partition.register_msr(HV_X64_MSR_HYPERCALL, read=state.read_hypercall,
                           write=state.write_hypercall, scope="partition")
    partition.register_msr(HV_X64_MSR_VP_ASSIST_PAGE, read=state.read_vp_assist_page,
                           write=state.write_vp_assist_page, scope="vp")
    return state


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="guest OS identity, the hypercall MSR and the port-I/O hypercall page",
    tlfs="hypercall-interface.md: Reporting the Guest OS Identity; Establishing the Hypercall "
         "Interface",
    attach=attach,
    always_on=True,
    cpuid=(*privileges(HvPartitionPrivilege.AccessHypercallMsrs),
           *features(HvFeatures.HV_X64_HYPERCALL_MSR_LOCK_AVAILABLE)),
    msrs=(HV_X64_MSR_GUEST_OS_ID, HV_X64_MSR_HYPERCALL, HV_X64_MSR_VP_ASSIST_PAGE),
)
