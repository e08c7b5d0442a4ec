"""``Machine``: one VM, assembled from the KVM layer, guest memory, buses, devices and a loader.

Library use (the shape a test harness wants)::

    with Machine(MachineConfig(kernel="guest.elf", smp=2)) as machine:
        result = machine.run(timeout=10)
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0
    print(machine.console_text)

The machine owns every resource it creates (fds, guest RAM, threads) and frees them in
:meth:`Machine.close`, also after errors; 50 create/run/destroy cycles leak nothing.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from . import boot, firmware
from .acpi import build_acpi_tables, provide_tables
from .bus import Bus, BusDevice, mmio_bus, pio_bus
# ConsoleBuffer, the exit statuses, ExitKind and MachineResult are also imported from here.
from .console import ConsoleBuffer, InputPump
from .cpuid import CpuidError, build_cpuid, parse_cpu_features_mask, physical_address_bits
from .devices.acpi_pm import AcpiPm
from .devices.cmos import Cmos
from .devices.debug_exit import DebugExit
from .devices.fw_cfg import FwCfg, FwCfgDma
from .devices.i8042 import I8042
from .devices.port80 import PostCodePort
from .devices.port92 import SystemControlPortA
from .devices.reset_control import ResetControl
from .devices.serial import Serial
from .devices.virtio_blk import attach_drives
from .host import host_virtualization
from .hv.features import HyperVConfigError, parse_hyperv_spec
from .kvm import Kvm, KvmUnavailableError, PinnedBuffer, PythonGate, Vm, install_kick_handler
from .kvm import constants as kvmc
from .layout import PC, KiB, MemoryMapEntry, MiB
from .memory import GuestMemory
from .memslots import MemslotManager
from .pci.acpi import pci_dsdt_devices
from .pci.pc import PcPci
from .result import (STATUS_BAD_IMAGE, STATUS_CRASH, STATUS_KVM_UNAVAILABLE,  # noqa: F401
                     STATUS_POWEROFF, STATUS_RESET, STATUS_SHUTDOWN, STATUS_TIMEOUT,
                     STATUS_USAGE, STATUS_VM_ERROR, ExitKind, MachineResult)
from .sizes import format_size, parse_size
from .vcpu import ExitObserver, StopRequest, VcpuThread, current_vcpu_index
from .x86.kvm_adapter import instruction_completion

log = logging.getLogger(__name__)

# The PC layout (addresses, ports, IRQs, limits) is data in hvvmm.layout; these names stay for
# library users that imported them from here.
LOW_RAM_LIMIT = PC.low_ram_limit
HIGH_RAM_BASE = PC.high_ram_base
MIN_MEMORY = PC.min_memory
MAX_VCPUS_XAPIC = PC.max_vcpus

DEFAULT_MEMORY = 256 * MiB
# Disks, one virtio-blk function per slot: bus 0's 32 slots less the host and ISA bridges'.
MAX_DRIVES = 32 - PC.pci_first_free_slot
# The longest timeout a wait can take (threading's limit; longer ones overflow).
MAX_TIMEOUT = threading.TIMEOUT_MAX


def vcpu_limit(kvm_max_vcpus: int | None = None) -> tuple[int, str]:
    """The most vCPUs a machine can have, and why: 255, since hvvmm's LAPICs are xAPICs and
    APIC ID 0xFF is the broadcast ID (Intel SDM Vol. 3A §10.6.2.1), or fewer where this host's
    KVM allows fewer (KVM_CAP_MAX_VCPUS)."""
    if kvm_max_vcpus and kvm_max_vcpus < MAX_VCPUS_XAPIC:
        return kvm_max_vcpus, f"this host's KVM allows at most {kvm_max_vcpus} (KVM_CAP_MAX_VCPUS)"
    return MAX_VCPUS_XAPIC, (f"hvvmm supports at most {MAX_VCPUS_XAPIC}: xAPIC IDs 0-254, 255 is "
                             "the broadcast ID")


def check_smp(smp, kvm_max_vcpus: int | None = None) -> None:
    """ConfigError unless ``smp`` is a vCPU count this host and hvvmm can run."""
    if isinstance(smp, bool) or not isinstance(smp, int) or smp < 1:
        raise ConfigError(f"--smp must be at least 1 (got {smp})")
    limit, why = vcpu_limit(kvm_max_vcpus)
    if smp > limit:
        raise ConfigError(f"--smp {smp} is too many: {why}")


def check_timeout(timeout) -> None:
    """ConfigError unless ``timeout`` (seconds) is None or a positive time a wait can take."""
    if timeout is None:
        return
    if not timeout > 0:
        raise ConfigError(f"timeout must be positive (got {timeout})")
    if not math.isfinite(timeout) or timeout > MAX_TIMEOUT:
        raise ConfigError(f"timeout {timeout:g} s is too long: at most {MAX_TIMEOUT:.0f} s; "
                          "leave the timeout out to run without a limit")


def host_memory_limit(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of RAM plus swap on this host: Linux's heuristic overcommit refuses one mapping
    larger than that (Documentation/mm/overcommit-accounting.rst). Read from ``MemTotal`` and
    ``SwapTotal`` (Documentation/filesystems/proc.rst), not through psutil, whose import alone
    costs a firmware boot some 25 ms before the first instruction."""
    totals = {}
    with open(meminfo, encoding="ascii") as stream:
        for line in stream:
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "SwapTotal"):
                totals[name] = int(rest.split()[0]) * KiB  # the file's "kB" are KiB
    return totals["MemTotal"] + totals.get("SwapTotal", 0)


_NOBODY = object()
_HOST = "host"


class ConfigError(ValueError):
    """A machine configuration that cannot work (bad size, vCPU count, ...)."""


class ImageError(ValueError):
    """A kernel or module that cannot be read or loaded."""


@dataclass(frozen=True)
class MachineConfig:
    """Everything that defines a machine. ``kernel=None`` boots the built-in default guest."""

    kernel: str | os.PathLike | None = None
    initrd: Sequence[str] = ()      # Linux: one initrd file; Multiboot: "PATH [args...]" each
    append: str = ""
    kernel_decompress: str = "host"  # where a bzImage's kernel is unpacked: "host" or "guest"
    smp: int = 1
    memory: int | str = DEFAULT_MEMORY  # bytes, or a size string as on the command line: "1G"
    console: BinaryIO | None = None  # where guest serial output also goes (captured anyway)
    console_input: BinaryIO | int | None = None  # a readable file (or fd) fed to the UART
    console_capture_limit: int = 16 * MiB
    timeout: float | None = None
    kvm_device: str = "/dev/kvm"
    # Hyper-V: a --hyperv SPEC (QEMU's hv-* names and presets); None gives everything hvvmm
    # implements, "none" a plain KVM machine.
    hyperv: str | None = None
    cpu_features: str | None = None  # host CPUID features to hide, e.g. "-cx16,-xsave"
    on_crash: str = "stop"           # "stop": a guest crash report ends the run; "continue"
    # isa-debug-exit (iobase, iosize); None: none
    debug_exit: tuple[int, int] | None = (PC.device("isa-debug-exit").port,
                                           PC.device("isa-debug-exit").ports)
    hyperv_testdev: bool = False     # QEMU's hyperv-testdev at port 0x3000 (needs hv-synic)
    acpi: bool = True                # ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) in 0xE0000
    pit_reinject: bool = True        # the PIT re-injects lost ticks (False: QEMU's "discard")
    # Disks (hvvmm.devices.virtio_blk.DriveSpec), each a virtio-blk PCI device; firmware boot: a BIOS image
    # started at the reset vector instead of a kernel (the default BIOS when only disks are given).
    drives: Sequence = ()
    bios: str | os.PathLike | None = None
    on_reset: str = "exit"           # "restart": a firmware boot restarts in place on a reset
    # Linux kernels on a host whose KVM emulates guest ring 0: add "noxsave clearcpuid=..." to
    # the command line (hvvmm.x86.features); False passes --append to the kernel as it is.
    emulator_safe_cmdline: bool = True

    def __post_init__(self):
        if isinstance(self.memory, str):  # "1G", as --memory takes it
            try:
                object.__setattr__(self, "memory", parse_size(self.memory))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        elif isinstance(self.memory, bool) or not isinstance(self.memory, int):
            raise ConfigError(f"memory must be a number of bytes or a size such as '512M' (got "
                              f"{self.memory!r})")

    @property
    def firmware(self) -> str | os.PathLike | None:
        """The BIOS image this machine boots: ``bios``, or the default BIOS when only disks
        are given; None for a kernel boot."""
        if self.bios is None and self.drives and self.kernel is None:
            return firmware.DEFAULT_BIOS
        return self.bios

    def validated(self, max_vcpus: int | None = None) -> "MachineConfig":
        """This config, or ConfigError saying what is wrong; ``max_vcpus`` is KVM's
        KVM_CAP_MAX_VCPUS where known."""
        check_smp(self.smp, max_vcpus)
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"memory size {self.memory} bytes is below the minimum of "
                              f"{MIN_MEMORY // MiB} MiB")
        if self.memory % (4 * KiB):
            raise ConfigError("memory size must be a multiple of 4 KiB")
        host_limit = host_memory_limit()
        if self.memory > host_limit:
            raise ConfigError(f"memory size {format_size(self.memory)} is more than this host's "
                              f"RAM and swap ({format_size(host_limit)})")
        if self.kernel_decompress not in boot.DECOMPRESS:
            raise ConfigError(f"kernel_decompress must be 'host' or 'guest' (got "
                              f"{self.kernel_decompress!r})")
        if self.on_reset not in ("exit", "restart"):
            raise ConfigError(f"on_reset must be 'exit' or 'restart' (got {self.on_reset!r})")
        if self.on_crash not in ("stop", "continue"):
            raise ConfigError(f"on_crash must be 'stop' or 'continue' (got {self.on_crash!r})")
        if len(self.drives) > MAX_DRIVES:
            raise ConfigError(f"{len(self.drives)} disks are too many: each is a PCI device on "
                              f"bus 0, which has room for {MAX_DRIVES}")
        if self.firmware is not None and (self.kernel is not None or self.initrd or self.append):
            raise ConfigError("a BIOS boot takes no kernel, initrd or kernel command line (hvvmm "
                              "hands none to the firmware): leave out the BIOS to boot the kernel "
                              "directly")
        check_timeout(self.timeout)
        return self


_emulator_cmdline_warned = False


def kernel_append(config: MachineConfig, kernel_format: str, supported, *, emulates_ring0: bool,
                  host_flags=None) -> tuple[str, str]:
    """``(command line, added)``: the command line the kernel gets, and what hvvmm added to
    ``config.append``. A Linux kernel on a host whose KVM emulates guest ring 0
    (``emulates_ring0``) gets the options that keep it off the instructions KVM's emulator
    lacks, unless ``config.emulator_safe_cmdline`` is off; anything else gets ``append``."""
    if not config.emulator_safe_cmdline or kernel_format not in boot.LINUX_FORMATS:
        return config.append, ""
    from .x86.features import emulator_safe_linux_options

    added = emulator_safe_linux_options(supported, emulates_ring0, host_flags)
    return boot.linux_command_line(kernel_format, config.append, added), added


def warn_kernel_append(added: str) -> None:
    """Says once per process (a restart boots the same kernel again) what :func:`kernel_append`
    added: a warning, since it changes what the guest runs."""
    global _emulator_cmdline_warned
    if added and not _emulator_cmdline_warned:
        _emulator_cmdline_warned = True
        log.warning("KVM on this host emulates guest ring 0 and lacks SIMD and other "
                    "instructions Linux uses; added to the kernel command line: %s "
                    "(--keep-cmdline: leave it as given)", added)


def memory_layout(size: int) -> list[tuple[int, int]]:
    """The RAM regions ``(gpa, size)`` for ``size`` bytes of guest memory."""
    return PC.memory_layout(size)


def memory_map(size: int) -> list[MemoryMapEntry]:
    """The e820 memory map a PC reports for ``size`` bytes of RAM."""
    return PC.memory_map(size)


def _cpu_options(config: MachineConfig):
    """The parsed ``hyperv`` and ``cpu_features`` options (ConfigError if either is wrong)."""
    try:
        hyperv_config = parse_hyperv_spec(config.hyperv)
        cpu_mask = parse_cpu_features_mask(config.cpu_features)
    except (HyperVConfigError, CpuidError) as exc:
        raise ConfigError(str(exc)) from None
    if config.hyperv_testdev and not hyperv_config.has("hv-synic"):
        raise ConfigError("the hyperv-testdev needs Hyper-V with hv-synic (e.g. --hyperv "
                          "hv-vpindex,hv-synic, or the default)")
    return hyperv_config, cpu_mask


def _check_capabilities(kvm: Kvm) -> None:
    """KvmUnavailableError unless this host's KVM has what every machine needs."""
    for cap, name in ((kvmc.KVM_CAP_IRQCHIP, "in-kernel irqchip"),
                      (kvmc.KVM_CAP_USER_MEMORY, "user memory"),
                      (kvmc.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"),
                      (kvmc.KVM_CAP_SET_TSS_ADDR, "TSS address")):
        if not kvm.check_extension(cap):
            raise KvmUnavailableError(f"KVM on this host lacks the {name} capability hvvmm "
                                      "needs")


@dataclass
class _Resources:
    kvm: Kvm | None = None
    vm: Vm | None = None
    memory: GuestMemory | None = None
    host_buffers: list = field(default_factory=list)
    memslots: MemslotManager | None = None


class Machine:
    """A virtual machine. Use as a context manager, or call :meth:`close` yourself."""

    def __init__(self, config: MachineConfig | None = None, **overrides):
        config = config or MachineConfig()
        if overrides:
            config = replace(config, **overrides)
        self.config = config
        self.pio_bus: Bus = pio_bus()
        self.mmio_bus: Bus = mmio_bus()
        self.vcpus: list[VcpuThread] = []
        self.stopping = False
        self._result: MachineResult | None = None
        self._result_lock = threading.RLock()  # re-entered from a signal handler
        self._done = threading.Event()
        self._res = _Resources()
        self._input_pump: InputPump | None = None
        self._started = False
        self._closed = False
        self._dead_halt_reported = False
        self.console = ConsoleBuffer(config.console_capture_limit, config.console)
        self.hyperv = None  # hvvmm.hyperv.HyperV when the guest gets the Hyper-V interface
        self.hyperv_testdev = None  # hvvmm.devices.hyperv_testdev.HypervTestDev if configured
        self.crash_reports: list = []
        self.crash_listeners: list[Callable] = []
        self.instruction_completer = None  # hvvmm.x86.Completer, see emulation_counters()
        self.boot: boot.BootState | None = None
        self.acpi_rsdp: int | None = None  # the RSDP's guest-physical address, when ACPI is on
        self.firmware: firmware.FirmwareRom | None = None  # the BIOS of a firmware boot
        self.resets = 0  # in-place resets of a firmware boot so far
        self.disks: list = []
        # The exclusive section (see exclusive()): who holds it and how many vCPUs are parked.
        self._pause = threading.Condition()
        self._pause_owner: object = _NOBODY
        self._parked = 0
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------------------

    def _create(self) -> None:
        """Assemble the machine, in the order each part needs the ones before it."""
        install_kick_handler()
        res = self._res
        res.kvm = kvm = Kvm(self.config.kvm_device)
        config = self.config.validated(kvm.check_extension(kvmc.KVM_CAP_MAX_VCPUS))
        hyperv_config, cpu_mask = _cpu_options(config)
        firmware_path = config.firmware
        if firmware_path is None:  # a bad kernel is reported before any VM exists
            kernel_image, kernel_name = self._read_kernel(config)
            try:
                kernel_format = boot.detect_format(kernel_image)
                modules = boot.read_modules(config.initrd, kernel_format, config.memory)
            except boot.KernelImageError as exc:
                raise ImageError(f"{kernel_name}: {exc}") from None
            except OSError as exc:
                raise ImageError(f"cannot read initrd {exc.filename}: {exc.strerror}") from None
        _check_capabilities(kvm)
        vm = self._create_vm(kvm, config)
        supported = kvm.supported_cpuid()
        memory = self._create_memory(vm, config, supported)
        # Firmware probes a PS/2 keyboard and waits a second when none answers.
        self._add_platform_devices(vm, config, keyboard=firmware_path is not None)
        if config.acpi:
            self._add_acpi_tables(config, in_memory=firmware_path is None)
        self._add_pci_and_firmware(vm, config, firmware_path)

        if firmware_path is None:
            try:
                append, added = kernel_append(
                    config, kernel_format, supported,
                    emulates_ring0=not host_virtualization().can_boot_stock_kernels)
                self.boot = boot.load(
                    memory, kernel_image, fmt=kernel_format, name=kernel_name, append=append,
                    modules=modules, memory_map=memory_map(config.memory),
                    rsdp=self.acpi_rsdp, decompress=config.kernel_decompress)
            except boot.KernelImageError as exc:
                raise ImageError(f"{kernel_name}: {exc}") from None
            warn_kernel_append(added)  # after the load: bad input stays one line

        self.instruction_completer, self._vcpu_completer = instruction_completion(
            kvm, vm, memory, supported, exclusive=lambda: self.exclusive(current_vcpu_index()),
            log=log)
        self._create_vcpus(vm, config, supported, hyperv_config, cpu_mask)
        if hyperv_config.enabled:
            self._add_hyperv(config, hyperv_config)

    def _create_vm(self, kvm: Kvm, config: MachineConfig) -> Vm:
        """The VM with KVM's in-kernel PIC, IOAPIC, LAPICs and PIT."""
        self._res.vm = vm = kvm.create_vm()
        vm.set_identity_map_address(PC.kvm_identity_map)
        vm.set_tss_address(PC.kvm_tss)
        vm.create_irqchip()
        vm.create_pit2()
        if not config.pit_reinject:
            vm.set_pit_reinject(False)
        return vm

    def _create_memory(self, vm: Vm, config: MachineConfig, supported) -> GuestMemory:
        """Guest RAM as the layout places it, pinned, and the memslots that map it."""
        res = self._res
        try:
            res.memory = memory = GuestMemory.anonymous(memory_layout(config.memory))
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise ConfigError(f"this host cannot give the guest {format_size(config.memory)} of "
                              "RAM (out of memory); ask for less") from None
        for region in memory:
            res.host_buffers.append(PinnedBuffer(region.buffer))
        res.memslots = MemslotManager(
            vm.set_user_memory_region, memory, [pinned.address for pinned in res.host_buffers],
            lambda: self.exclusive(current_vcpu_index()),
            physical_address_bits=physical_address_bits(supported))
        return memory

    def _add_acpi_tables(self, config: MachineConfig, *, in_memory: bool) -> None:
        """The ACPI tables, with PCI0 in the DSDT; written to RAM too when no firmware will."""
        tables = build_acpi_tables(
            PC, config.smp, extra_dsdt_devices=pci_dsdt_devices(PC, config.memory))
        self.acpi_rsdp = provide_tables(tables, self.fw_cfg,
                                        self.memory if in_memory else None)

    def _create_vcpus(self, vm: Vm, config: MachineConfig, supported, hyperv_config,
                      cpu_mask) -> None:
        """The vCPUs with their CPUID tables; the boot CPU in the kernel's entry state, or
        every vCPU's power-on state kept for a firmware's in-place reset."""
        for index in range(config.smp):
            vcpu = vm.create_vcpu(index)
            self.vcpus.append(VcpuThread(self, vcpu, self.pio_bus, self.mmio_bus,
                                         self.memslots.take_overlay_write))
            try:
                table = build_cpuid(supported, vcpu_index=index, vcpu_count=config.smp,
                                    hyperv=hyperv_config, cpu_features_mask=cpu_mask)
            except CpuidError as exc:
                raise ConfigError(str(exc)) from None
            vcpu.set_cpuid(table)
            self.vcpus[-1].complete_instruction = self._vcpu_completer
        if 1 < config.smp <= len(os.sched_getaffinity(0)):
            # Each vCPU thread can have a host CPU: one back from KVM_RUN spins briefly rather
            # than sleep on the GIL another one holds (hvvmm.kvm.PythonGate).
            gate = PythonGate()
            for vcpu_thread in self.vcpus:
                vcpu_thread.vcpu.join_python_gate(gate)
        if self.boot is not None:  # firmware starts at the reset vector: KVM's initial state
            boot.apply_entry_state(self.vcpus[0].vcpu, self.boot)
        else:
            self._power_on = [firmware.PowerOnState(v.vcpu) for v in self.vcpus]

    def _add_hyperv(self, config: MachineConfig, hyperv_config) -> None:
        """The Hyper-V interface (hvvmm.hyperv) and, if asked for, QEMU's hyperv-testdev."""
        from .hyperv import HyperV

        self.hyperv = HyperV(self, hyperv_config)
        if config.hyperv_testdev:
            from .devices.hyperv_testdev import (HYPERV_TESTDEV_BASE, HYPERV_TESTDEV_PORT_COUNT,
                                                 HypervTestDev)

            self.hyperv_testdev = HypervTestDev(
                self.hyperv.partition.state["hv-synic"].connections)
            self.pio_bus.register(HYPERV_TESTDEV_BASE, HYPERV_TESTDEV_PORT_COUNT,
                                  self.hyperv_testdev, "hyperv-testdev")

    def emulation_counters(self) -> dict[str, int]:
        """Instructions hvvmm completed for KVM's instruction emulator, by mnemonic (empty on
        hosts where KVM runs guest ring 0 on hardware)."""
        completer = self.instruction_completer
        return dict(completer.counts) if completer is not None else {}

    def _read_kernel(self, config: MachineConfig) -> tuple[bytes, str]:
        if config.kernel is None:
            from .guestbuild import GuestBuildError, default_guest_path

            try:
                path, name = Path(default_guest_path()), "default-guest"
            except GuestBuildError as exc:  # no prebuilt image and no compiler
                first_line = str(exc).splitlines()[0]
                raise ImageError(f"cannot build the built-in guest: {first_line}") from None
        else:
            path = Path(config.kernel)
            name = path.name
        try:
            image = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read kernel {path}: {exc.strerror}") from None
        if len(image) > config.memory:
            raise ImageError(f"kernel {path} ({len(image) // KiB} KiB) is larger than guest RAM "
                             f"({config.memory // MiB} MiB)")
        return image, name

    def _add_platform_devices(self, vm: Vm, config: MachineConfig, *,
                              keyboard: bool = False) -> None:
        """The legacy devices, each at the ports and IRQ the PC layout table gives it."""
        def place(name: str, device: BusDevice) -> None:
            slot = PC.device(name)
            self.pio_bus.register(slot.port, slot.ports, device, name)

        self.serial = Serial(vm.irq_line(PC.device("serial0").irq), self.console)
        place("serial0", self.serial)
        self.debug_exit = DebugExit(self._on_debug_exit)
        if config.debug_exit is not None:
            base, size = config.debug_exit
            self.pio_bus.register(base, size, self.debug_exit, "isa-debug-exit")
        self.fw_cfg = FwCfg(config.memory, config.smp, memory=self.memory)
        place("fw_cfg", self.fw_cfg)
        place("fw_cfg-dma", FwCfgDma(self.fw_cfg))
        self.cmos = Cmos(config.memory, low_ram_limit=PC.low_ram_limit)
        place("cmos", self.cmos)
        self.i8042 = I8042(self._on_reset, keyboard=keyboard)
        place("i8042-data", self.i8042.data_port)
        place("i8042-command", self.i8042.command_port)
        self.post_code = PostCodePort()
        place("post-code", self.post_code)
        place("port92", SystemControlPortA(
            lambda: self.request_reset("the guest set the fast-reset bit of port 0x92")))
        self.acpi_pm = AcpiPm(self._on_poweroff, vm.irq_line(PC.device("acpi-pm").irq))
        place("acpi-pm", self.acpi_pm)
        # Decoded inside the PCI configuration ports (see _add_pci_and_firmware).
        self.reset_control = ResetControl(
            lambda: self.request_reset("the guest wrote the reset register (port 0xcf9)"))

    def _add_pci_and_firmware(self, vm: Vm, config: MachineConfig, firmware_path) -> None:
        """PCI bus 0, the disks on it, and the firmware when booting one (hvvmm.firmware)."""
        if firmware_path is not None:
            try:
                self.firmware = firmware.FirmwareRom(firmware_path)
            except firmware.FirmwareError as exc:
                raise ImageError(str(exc)) from None
        self.legacy_window = firmware.LegacyWindow(
            self.memslots, self.memory, self._res.host_buffers[0].address, self.firmware)
        self.pci = PcPci(self.pio_bus, self.mmio_bus, config.memory,
                         vm.irq_line, reset_control=self.reset_control,
                         on_pam_change=self.legacy_window.apply_pam,
                         pam_ram=self.firmware is None)
        self.legacy_window.apply_pam(self.pci.host_bridge.pam)
        self.mmio_bus.register(PC.pam_window[0], PC.pam_window[1] - PC.pam_window[0],
                               self.legacy_window, "pam-window")
        self.disks = attach_drives(self, config.drives)
        if self.firmware is None:
            self.pci.route_pirqs_as_firmware_would()
            return
        self.debugcon = firmware.install(self.firmware, self.memslots, self.fw_cfg, self.pio_bus,
                                         config.memory, [d.slot for d in self.disks],
                                         cpu_count=config.smp)

    # -- devices and observers for library users ----------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        assert self._res.memory is not None
        return self._res.memory

    @property
    def memslots(self) -> MemslotManager:
        assert self._res.memslots is not None
        return self._res.memslots

    @property
    def kvm(self) -> Kvm:
        assert self._res.kvm is not None
        return self._res.kvm

    @property
    def vm(self) -> Vm:
        assert self._res.vm is not None
        return self._res.vm

    def add_pio_device(self, base: int, length: int, device: BusDevice,
                       name: str | None = None) -> None:
        """Put ``device`` on the port-I/O bus at ``[base, base+length)``."""
        self.pio_bus.register(base, length, device, name)

    def add_mmio_device(self, base: int, length: int, device: BusDevice,
                        name: str | None = None) -> None:
        """Put ``device`` at guest-physical ``[base, base+length)``; the range must not be RAM."""
        for region in self.memory:
            if base < region.end and region.gpa < base + length:
                raise ValueError(f"MMIO range {base:#x}+{length:#x} overlaps guest RAM")
        self.mmio_bus.register(base, length, device, name)

    def add_exit_observer(self, observer: ExitObserver) -> None:
        """Call ``observer(vcpu_index, exit)`` on the vCPU thread for every exit, before it is
        handled. Must be added before :meth:`start`; it costs time on every exit."""
        if self._started:
            raise RuntimeError("exit observers must be added before the machine starts")
        for vcpu in self.vcpus:
            vcpu.observers.append(observer)

    @property
    def console_output(self) -> bytes:
        return self.console.getvalue()

    @property
    def console_text(self) -> str:
        return self.console.getvalue().decode("utf-8", errors="replace")

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            raise RuntimeError("this machine has already run: a Machine runs its guest once; "
                               "create a new Machine (with the same MachineConfig) to run again")
        self._started = True
        if self.config.console_input is not None:
            self._input_pump = InputPump(self.config.console_input, self.serial.enqueue_input)
        for vcpu in self.vcpus:
            vcpu.start()

    def wait(self, timeout: float | None = None) -> MachineResult:
        """Wait until the guest ends or ``timeout`` (default: the config's) passes."""
        if not self._started:
            raise RuntimeError("wait() on a machine that was not started (use run() or start())")
        if timeout is None:
            timeout = self.config.timeout
        try:
            check_timeout(timeout)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if not self._wait_watching_for_a_dead_halt(timeout):
            self.request_stop(StopRequest("timeout", f"the guest did not finish within "
                                                     f"{timeout:g} s"))
        self._join_vcpus()
        assert self._result is not None
        return self._result

    # How often wait() looks for a guest that halted for good.
    HALT_PROBE_INTERVAL = 1.0

    def _wait_watching_for_a_dead_halt(self, timeout: float | None) -> bool:
        """Wait for the end of the run (False: ``timeout`` passed). Meanwhile, say once when
        every vCPU sits in HLT with interrupts disabled: a guest that ended without
        isa-debug-exit or power-off idles for ever, and the user should know why."""
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = None
        while True:
            step = self.HALT_PROBE_INTERVAL
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return self._done.is_set()
            if self._done.wait(step):
                return True
            if self._dead_halt_reported:
                continue
            states = self._halt_states()
            if states is not None and states == previous:  # twice the same: settled
                self._dead_halt_reported = True
                halted = ", ".join(f"vCPU {index} at RIP {rip:#x}" for index, rip in
                                   enumerate(states) if rip is not None)
                log.warning("the guest halted with interrupts disabled (%s) and nothing can "
                            "wake it: it wrote no isa-debug-exit and did not power off, so it "
                            "idles until stopped (Ctrl-C, or a timeout)", halted)
            previous = states

    def _halt_states(self) -> list[int | None] | None:
        """Each vCPU's RIP if it is halted with RFLAGS.IF clear and no NMI pending, None for an
        AP waiting for INIT/SIPI; None in all if any vCPU could still run. Read on each vCPU's own
        thread (KVM serializes vCPU ioctls with KVM_RUN): a halted vCPU with the in-kernel LAPIC
        stays in KVM_RUN in KVM_MP_STATE_HALTED, and only INIT, SIPI or an NMI wakes it with
        interrupts disabled (Intel SDM Vol. 2A, HLT)."""
        count = len(self.vcpus)
        states: list = [False] * count
        answered = threading.Semaphore(0)

        def probe(vcpu_thread: VcpuThread) -> None:
            try:
                vcpu = vcpu_thread.vcpu
                mp_state = vcpu.get_mp_state()
                if mp_state in (kvmc.KVM_MP_STATE_UNINITIALIZED,
                                kvmc.KVM_MP_STATE_INIT_RECEIVED):  # an AP waiting for INIT/SIPI
                    states[vcpu_thread.index] = None
                elif mp_state == kvmc.KVM_MP_STATE_HALTED:
                    regs = vcpu.get_regs()
                    events = vcpu.get_vcpu_events()
                    if not regs.rflags & 0x200 and not (events.nmi.pending or events.nmi.injected):
                        states[vcpu_thread.index] = regs.rip
            except OSError:
                pass  # left False: not known to be halted
            finally:
                answered.release()

        for vcpu_thread in self.vcpus:
            vcpu_thread.run_soon(lambda v=vcpu_thread: probe(v))
        for _ in range(count):
            if not answered.acquire(timeout=0.5):
                return None  # a vCPU busy elsewhere is not halted
        if any(state is False for state in states) or all(state is None for state in states):
            return None
        return states

    def run(self, timeout: float | None = None) -> MachineResult:
        """Start the guest and wait for it to end (or time out)."""
        try:
            check_timeout(self.config.timeout if timeout is None else timeout)
        except ConfigError as exc:  # before the guest starts
            raise ValueError(str(exc)) from None
        self.start()
        return self.wait(timeout)

    def stop(self, signal_number: int | None = None) -> None:
        """Stop the guest from the host (e.g. on SIGTERM)."""
        what = f"stopped by signal {signal_number}" if signal_number else "stopped by the host"
        self._finish(MachineResult(ExitKind.STOPPED, what, signal=signal_number))

    @property
    def result(self) -> MachineResult | None:
        return self._result

    def request_stop(self, request: StopRequest) -> bool:
        """Called by vCPU threads and devices: end the run with ``request``'s outcome. A triple
        fault of a firmware boot that restarts on reset is a reset, as on a PC (the chipset
        turns the shutdown cycle into INIT; QEMU resets): returns True, the vCPU runs on."""
        if request.kind == ExitKind.SHUTDOWN.value and self._resets_in_place() \
                and request.vcpu is not None:
            self.request_reset(request.message)
            return True
        self._finish(MachineResult(ExitKind(request.kind), request.message, vcpu=request.vcpu,
                                   rip=request.rip, exit_reason=request.exit_reason))
        return False

    def _finish(self, result: MachineResult) -> None:
        with self._result_lock:
            if self._result is not None:
                return  # the first outcome wins
            self._result = result
            self.stopping = True
        log.info("guest ended: %s", result.message)
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._pause:
            self._pause.notify_all()  # parked vCPUs see `stopping` and leave
        self._done.set()

    def _on_debug_exit(self, value: int) -> None:
        self._finish(MachineResult(ExitKind.DEBUG_EXIT, f"isa-debug-exit wrote {value:#x}",
                                   code=value))

    def _on_poweroff(self) -> None:
        self._finish(MachineResult(ExitKind.POWEROFF, "guest powered off"))

    def _on_reset(self) -> None:
        self.request_reset("the guest pulsed the i8042 reset line")

    def request_reset(self, why: str) -> None:
        """The guest asked for a reset. A firmware boot with ``on_reset="restart"`` restarts the
        firmware in place; otherwise the run ends with ExitKind.RESET (``hvvmm run --on-reset
        restart`` then boots a fresh machine)."""
        if self._resets_in_place():
            vcpu = self.vcpus[current_vcpu_index() or 0]
            vcpu.run_after_exit(lambda: self._reset_in_place(why))
            return
        self._finish(MachineResult(ExitKind.RESET, why))  # the CLI prefixes "reset:"

    def _resets_in_place(self) -> bool:
        return self.config.on_reset == "restart" and self.firmware is not None and \
            not self.stopping

    def _reset_in_place(self, why: str) -> None:
        """A platform reset with the machine kept: devices to their power-on state (PCI
        configuration, the PAM window back to the ROM, virtio devices drained and reset), the
        Hyper-V partition reset (every synthetic MSR back to the reset value the TLFS gives it,
        the overlay pages removed), and the vCPUs back at the reset vector. RAM is kept, as a
        PC's is; the APs wait for INIT/SIPI again. Runs on a vCPU thread with no exit pending;
        the other vCPUs are parked outside KVM_RUN meanwhile, so their state can be set from
        here."""
        log.info("reset (%s): restarting the firmware", why)
        with self.exclusive(current_vcpu_index()):
            self.pci.reset()  # includes the virtio functions
            if self.hyperv is not None:
                self.hyperv.partition.reset()
            for vcpu, state in zip(self.vcpus, self._power_on):
                state.restore(vcpu.vcpu)
            self.resets += 1

    def report_crash(self, report) -> None:
        """The guest reported a crash (Hyper-V crash MSRs): record it, tell the listeners, and
        end the run unless ``on_crash == "continue"``."""
        self.crash_reports.append(report)
        for listener in list(self.crash_listeners):
            listener(report)
        if self.config.on_crash == "stop":
            self._finish(MachineResult(ExitKind.CRASH, report.summary(), vcpu=report.vp_index))
        else:  # the run goes on, so nothing else would tell the user
            log.warning("%s", report.summary())

    def _join_vcpus(self) -> None:
        for vcpu in self.vcpus:
            thread = vcpu.thread
            while thread is not None and thread.is_alive():
                vcpu.kick()
                thread.join(0.05)

    # -- the exclusive section: every other vCPU parked outside KVM_RUN -------------------------

    @contextmanager
    def exclusive(self, vcpu_index: int | None = None):
        """Run the body while every vCPU except ``vcpu_index`` (the caller's own, which is outside
        ``KVM_RUN`` because it is handling an exit; None for the host) is parked. Used to change
        memslots without a window in which a running vCPU finds no RAM."""
        owner = _HOST if vcpu_index is None else vcpu_index
        if not self._started or self._pause_owner == owner:  # not running yet, or re-entered
            yield
            return
        with self._pause:
            while self._pause_owner is not _NOBODY and not self.stopping:
                if vcpu_index is None:
                    self._pause.wait()
                else:  # another vCPU is pausing everyone: take part, then try again
                    self._park_locked(vcpu_index)
            self._pause_owner = owner
        try:
            others = [v for v in self.vcpus if v.index != vcpu_index]
            for vcpu in others:
                vcpu.kick()
            with self._pause:
                while not self.stopping:
                    running = sum(1 for v in others if v.thread is not None and
                                  v.thread.is_alive())
                    if self._parked >= running:
                        break
                    if not self._pause.wait(0.05):
                        for vcpu in others:  # a kick can race a vCPU's entry: kick again
                            vcpu.kick()
            yield
        finally:
            with self._pause:
                self._pause_owner = _NOBODY
                self._pause.notify_all()

    def park_if_requested(self, vcpu_index: int) -> None:
        """Called by a vCPU thread after ``KVM_RUN`` was interrupted."""
        if self._pause_owner is _NOBODY:
            return
        with self._pause:
            self._park_locked(vcpu_index)

    def _park_locked(self, vcpu_index: int) -> None:
        if self._pause_owner is _NOBODY or self._pause_owner == vcpu_index:
            return
        self._parked += 1
        self._pause.notify_all()
        try:
            while (self._pause_owner is not _NOBODY and self._pause_owner != vcpu_index
                   and not self.stopping):
                self._pause.wait()
        finally:
            self._parked -= 1

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the guest if it runs and free every resource. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._finish(MachineResult(ExitKind.STOPPED, "machine closed"))
            self._join_vcpus()
        for disk in self.disks:
            disk.close()  # its worker may still complete a request: before RAM and the VM go
        if self._input_pump is not None:
            self._input_pump.close()
        self.console.flush()
        res = self._res
        if self.hyperv is not None:
            self.hyperv.close()
        for vcpu in self.vcpus:
            vcpu.vcpu.close()
        if res.vm is not None:
            res.vm.close()
        if res.memslots is not None:
            res.memslots.close()
        if self.firmware is not None:
            self.firmware.close()
        for pinned in res.host_buffers:
            pinned.release()
        res.host_buffers.clear()
        if res.memory is not None:
            res.memory.close()
        if res.kvm is not None:
            res.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
