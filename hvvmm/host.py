"""Facts about the host: hardware virtualization, the KVM flavour, /dev/kvm access."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class HostVirtualization:
    hardware: str | None   # "vmx" (Intel VT-x), "svm" (AMD-V) or None
    kvm_modules: tuple[str, ...]

    @property
    def ring0_on_hardware(self) -> bool:
        """Whether KVM runs guest ring-0 code on VT-x/AMD-V. Emulating KVMs (e.g. the PVM-based
        one of some cloud sandboxes) run it through KVM's instruction emulator instead: stock
        kernels still boot there (hvvmm completes the instructions the emulator lacks,
        :mod:`hvvmm.x86`), only far more slowly, and guest TLBs do not behave as hardware's. On
        the PVM host measured, a guest's first user-mode SYSCALL arrives at LSTAR still in user
        mode and faults, so Linux reaches /init but cannot run it."""
        return self.hardware is not None and "kvm_pvm" not in self.kvm_modules

    # The earlier name (stock kernels do boot on emulating hosts now); kept for callers.
    can_boot_stock_kernels = ring0_on_hardware

    def describe(self) -> str:
        emulating = ("KVM is PVM-based and runs guest ring-0 code in its instruction emulator "
                     "(hvvmm completes what it lacks): stock kernels boot, slowly; on the PVM host "
                     "measured, guest user space's first SYSCALL faults")
        if self.hardware:
            kind = {"vmx": "Intel VT-x", "svm": "AMD-V"}[self.hardware]
            if "kvm_pvm" in self.kvm_modules:
                return f"{kind} present, but {emulating}"
            return f"{kind}: KVM runs guest ring-0 code on hardware"
        if "kvm_pvm" in self.kvm_modules:
            return f"none: {emulating}"
        return "none visible (no vmx/svm CPU flag): KVM, if present, cannot run guests at speed"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _kvm_modules() -> tuple[str, ...]:
    try:
        lines = Path("/proc/modules").read_text().splitlines()
    except OSError:
        lines = []
    names = {line.split()[0] for line in lines if line.startswith("kvm")}
    names |= {p.name for p in Path("/sys/module").glob("kvm*")} if Path("/sys/module").is_dir() \
        else set()
    return tuple(sorted(names))


def host_virtualization() -> HostVirtualization:
    flags = _cpu_flags()
    hardware = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    return HostVirtualization(hardware, _kvm_modules())


def kvm_access_problem(path: str = "/dev/kvm") -> str | None:
    """Why /dev/kvm cannot be opened read-write, or None if it can."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no read-write permission on {path}"
    return None


def kvm_device() -> str:
    """The KVM device to open: ``$HVVMM_KVM_DEVICE``, else /dev/kvm."""
    return os.environ.get("HVVMM_KVM_DEVICE", "/dev/kvm")


def open_console(target: str) -> tuple[BinaryIO | None, int | None, BinaryIO | None]:
    """``(output stream, input fd, file to close)`` for a guest console sent to ``"stdio"``,
    ``"none"`` or a file path (``"file:PATH"``). Standard input feeds the guest only if this
    process has one (a caller may have closed it). OSError if the file cannot be opened; any
    other target is ValueError. Both front ends (``hvvmm run``, ``hvvmm qemu``) use this."""
    if target == "stdio":
        try:
            os.fstat(0)
            stdin: int | None = 0
        except OSError:
            stdin = None
        return sys.stdout.buffer, stdin, None
    if target == "none":
        return None, None, None
    if target.startswith("file:") and len(target) > 5:
        stream = open(target[5:], "wb")
        return stream, None, stream
    raise ValueError(f"not a console target: {target!r}")
