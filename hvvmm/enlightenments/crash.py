"""hv-crash: the guest crash MSRs CRASH_P0..P4 and CRASH_CTL, and the crash-message channel.

TLFS ``partition-properties.md`` "Partition Crash Enlightenment" and
``datatypes/hv_crash_ctl_reg_contents.md``; the guest side is Linux ``drivers/hv/hv_common.c`` and
``arch/x86/hyperv/hv_init.c`` (``hyperv_report_panic()``, ``hv_kmsg_dump()``). CPUID 0x40000003 EDX
bit 10. All six MSRs are partition-wide.

* CRASH_P0..P4 (0x40000100-0x40000104): read/write, any value; reset to 0.
* CRASH_CTL (0x40000105): bit 63 CrashNotify, bit 62 CrashMessage (P3 = GPA of a message, P4 = its
  length). **Reads return the supported bits**, 63 | 62: Linux checks bit 62 at boot and only then
  registers its kmsg dumper (KVM masks reads to bit 63, so Linux on KVM never sends the message,
  Linux ``arch/x86/kvm/hyperv.c``). The other bits are reserved in the TLFS (OpenVMM names 61
  no_crash_dump and 60:58 pre-OS id); writes ignore them, as KVM does, so a guest setting them still
  reports.
* A write with CrashNotify builds a :class:`~hvvmm.hv.platform.CrashReport` from P0..P4 and the
  decoded GuestOsId and hands it to the platform, which keeps the VM running (Windows writes its
  dump afterwards; QEMU's default "panic=shutdown" prevents that). With CrashMessage, the message
  is read from guest RAM at P3, at most one page (Linux sends at most ``HV_HYP_PAGE_SIZE``), only
  if wholly inside RAM, and decoded leniently; a bad GPA or length becomes ``message_error``,
  never an exception.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, features
from hvvmm.hv.hvdef import (
    HV_CRASH_CTL_CRASH_NOTIFY,
    HV_CRASH_CTL_CRASH_NOTIFY_MSG,
    HV_X64_MSR_CRASH_CTL,
    HV_X64_MSR_CRASH_P0,
    HV_X64_MSR_CRASH_PARAMS,
    HvFeatures,
)
from hvvmm.hv.platform import CRASH_MESSAGE_MAX_BYTES, CrashReport
from hvvmm.memory import GuestMemoryError

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

log = logging.getLogger(__name__)

NAME = "hv-crash"
SUPPORTED_CRASH_CTL = HV_CRASH_CTL_CRASH_NOTIFY | HV_CRASH_CTL_CRASH_NOTIFY_MSG


MAX_REPORTS_PER_BOOT = 8


class CrashState:
    """P0..P4 and the reports sent so far."""

    def __init__(self, partition: "Partition"):
        self._partition = partition
        self._platform = partition.platform
        self._lock = partition.lock
        self.parameters = [0] * HV_X64_MSR_CRASH_PARAMS
        self.reports_this_boot = 0  # up to MAX_REPORTS_PER_BOOT; later ones are only counted
        self.repeated_notifications = 0

    def reader(self, number: int):
        return lambda vp_index: self.parameters[number]

    def writer(self, number: int):
        def write(vp_index: int, value: int) -> None:
            with self._lock:
                self.parameters[number] = value
        return write

    def read_crash_ctl(self, vp_index: int) -> int:
        return SUPPORTED_CRASH_CTL

    def write_crash_ctl(self, vp_index: int, value: int) -> None:
        if not value & HV_CRASH_CTL_CRASH_NOTIFY:
            return  # nothing to log without CrashNotify (TLFS)
        with self._lock:
            # A guest in a loop of CrashNotify writes must not make the VMM re-read its message
            # and pile up reports without end: a few per boot are reported (several VPs may
            # crash), the rest only counted.
            if self.reports_this_boot >= MAX_REPORTS_PER_BOOT:
                self.repeated_notifications += 1
                log.debug("vp%d: CrashNotify again (%d beyond the reported ones this boot)",
                          vp_index, self.repeated_notifications)
                return
            self.reports_this_boot += 1
            parameters = tuple(self.parameters)
        # Outside the partition lock: the report reads guest RAM and the guest TSC, and the
        # platform may write files or stop the VM.
        report = self._build_report(vp_index, value, parameters)
        log.info("%s", report.summary())  # the VMM reports it to the user
        try:
            self._platform.report_crash(report)
        except Exception:  # noqa: BLE001 -- a platform failure must not become a guest #GP
            self._partition.log_once("report_crash_failed", logging.ERROR,
                                     "the platform failed to record a guest crash report",
                                     exc_info=True)

    def _build_report(self, vp_index: int, crash_ctl: int,
                      parameters: tuple[int, ...]) -> CrashReport:
        message = gpa = length = error = None
        if crash_ctl & HV_CRASH_CTL_CRASH_NOTIFY_MSG:
            gpa, length = parameters[3], parameters[4]
            message, error = self._read_message(gpa, length)
        return CrashReport(
            vp_index=vp_index, crash_ctl=crash_ctl, parameters=parameters,  # type: ignore[arg-type]
            guest_os_id=self._partition.guest_os_id, message=message, message_gpa=gpa,
            message_length=length, message_error=error,
            reference_time_100ns=self._partition.reference_time_100ns(vp_index))

    def _read_message(self, gpa: int, length: int) -> tuple[str | None, str | None]:
        """The message text and/or why it is incomplete or missing; never raises."""
        note = None
        size = length
        if length > CRASH_MESSAGE_MAX_BYTES:
            size = CRASH_MESSAGE_MAX_BYTES
            note = f"length {length} exceeds one page; the first {size} bytes were read"
        try:
            data = self._partition.memory.read(gpa, size) if size else b""
        except GuestMemoryError:
            return None, f"message {gpa:#x}+{size:#x} is not in guest RAM"
        text = data.decode("utf-8", errors="replace").rstrip("\0")
        return text, note

    def reset(self) -> None:
        with self._lock:
            self.parameters = [0] * HV_X64_MSR_CRASH_PARAMS
            self.reports_this_boot = 0
            self.repeated_notifications = 0


def attach(partition: "Partition") -> CrashState:
    state = CrashState(partition)
    for number in range(HV_X64_MSR_CRASH_PARAMS):
        partition.register_msr(HV_X64_MSR_CRASH_P0 + number, read=state.reader(number),
                               write=state.writer(number), scope="partition")
    partition.register_msr(HV_X64_MSR_CRASH_CTL, read=state.read_crash_ctl,
                           write=state.write_crash_ctl, scope="partition")
    return state


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="crash MSRs: the guest reports bugchecks/panics (and Linux its kernel log) to the VMM",
    tlfs="partition-properties.md: Partition Crash Enlightenment",
    attach=attach,
    cpuid=features(HvFeatures.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE),
    msrs=(*(HV_X64_MSR_CRASH_P0 + n for n in range(HV_X64_MSR_CRASH_PARAMS)), HV_X64_MSR_CRASH_CTL),
)
