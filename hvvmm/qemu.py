"""``hvvmm qemu`` and ``hvvmm-qemu``: run a ``qemu-system-x86_64`` command line on hvvmm.

Test harnesses (kvm-unit-tests' ``run_tests.sh`` / ``scripts/arch-run.bash``, Hyper-V test
suites, CI scripts) launch QEMU with a small set of options and read its exit status and its
messages. This front end accepts that subset with QEMU's syntax and QEMU's behaviour, maps it to a
:class:`~hvvmm.machine.MachineConfig` and runs it, so those command lines work unchanged::

    hvvmm-qemu --no-reboot -nodefaults -device pc-testdev \\
        -device isa-debug-exit,iobase=0xf4,iosize=0x4 -vnc none -serial stdio \\
        -machine accel=kvm -kernel x86/msr.flat -smp 1 -cpu host,hv_relaxed,hv_vpindex

Syntax, as QEMU's ``lookup_opt``: ``-opt`` and ``--opt`` are the same; an option that takes a
value takes the next word (QEMU has no ``-opt=value`` form: ``-kernel=FILE`` is an invalid option,
as in QEMU); a word without a leading ``-`` is a disk image, as ``-hda``. Comma lists use QEMU's
escaping (``,,`` is a literal comma).

Disks (``-drive``, ``-hda``, ``-device virtio-blk-pci,drive=ID``) are virtio-blk PCI devices
whatever interface QEMU would give them (``if=ide``, the default, is attached as virtio with a
warning); without ``-kernel`` the machine boots them through the BIOS (``-bios``, default SeaBIOS).

Messages always start ``qemu-system-x86_64:``, whatever name hvvmm was invoked by (``hvvmm qemu``,
``hvvmm-qemu``, a symlink), and read like QEMU's: ``qemu-system-x86_64: -foo: invalid option``,
``qemu-system-x86_64: -cpu host,hv-bogus: hvvmm: unknown Hyper-V option ...``. Messages QEMU prints
without its program name keep QEMU's text exactly: ``qemu: could not open kernel file 'F': No such
file or directory`` and ``Failed to open file 'F'`` (a Multiboot module). Anything about hvvmm
itself says ``hvvmm:``; warnings say ``warning:`` (kvm-unit-tests treats a stderr line without
"warning" as a QEMU failure).

Exit status, as QEMU's (see :data:`EXIT_STATUS_HELP`): ``(v << 1) | 1`` for an isa-debug-exit write
of ``v``; 0 for a power-off, for a reset or triple fault with ``-no-reboot`` (without it the guest
is booted again, as QEMU resets it), for a guest panic (QEMU's default ``-action panic=shutdown``;
1 with ``panic=exit-failure``) and for SIGINT/SIGTERM/SIGHUP, which print ``terminating on signal
N`` as QEMU does; 1 for every error.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

from . import __version__
from .host import kvm_device, open_console
from .layout import PC

PROG = "qemu-system-x86_64"
# The QEMU release whose option syntax this front end follows (-action, hv-* names, -smp keys).
QEMU_VERSION = "8.2.0"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
QEMU_DEFAULT_MEMORY = 128 * MiB   # QEMU's default -m
MIN_MEMORY = PC.min_memory
MAX_VCPUS = PC.max_vcpus
ISA_DEBUG_EXIT_DEFAULT = (0x501, 0x2)  # QEMU's isa-debug-exit iobase/iosize defaults

# CPU models: "host" is what hvvmm does; these are accepted as "host", with a warning.
CPU_MODELS_AS_HOST = ("max", "kvm64", "qemu64", "kvm32", "qemu32")
MACHINE_TYPES = ("pc", "q35")  # and their versioned names, pc-i440fx-X.Y / pc-q35-X.Y

EXIT_STATUS_HELP = f"""\
Exit status (as QEMU's):
  (v << 1) | 1  the guest wrote v to isa-debug-exit
  0             the guest powered off; reset or triple-faulted with -no-reboot (without it the
                guest boots again); panicked (-action panic=shutdown, the default); or
                SIGINT/SIGTERM/SIGHUP ended the run ("{PROG}: terminating on signal N")
  1             an error (bad option, missing file, no KVM, VM failure), or a panic with
                -action panic=exit-failure
"""


class QemuError(Exception):
    """A fatal error, printed as QEMU prints it: ``PROG: LOCATION: MESSAGE`` (exit status 1).

    ``where`` is the command-line words the error is about (QEMU's location); ``raw`` messages
    are printed as they are (QEMU's own un-prefixed ones)."""

    def __init__(self, message: str, where: Sequence[str] = (), *, raw: bool = False):
        super().__init__(message)
        self.message = message
        self.where = tuple(where)
        self.raw = raw

    def __str__(self) -> str:
        if self.raw:
            return self.message
        return _report(self.message, self.where)


def _report(message: str, where: Sequence[str] = (), kind: str = "") -> str:
    location = f" {' '.join(where)}:" if where else ""
    return f"{PROG}:{location} {kind}{message}"


def warning_text(message: str, where: Sequence[str] = ()) -> str:
    return _report(message, where, "warning: ")


@dataclass
class QemuOptions:
    """A parsed command line. ``action`` is what to do: run, or one of the help outputs."""

    action: str = "run"  # run | help | version | device-help | device-props | cpu-help |
    #                      machine-help | accel-help | display-help
    help_subject: str = ""  # the device of "-device NAME,help"
    kernel: str | None = None
    initrd: tuple[str, ...] = ()  # as Multiboot modules: comma-separated "path args..."
    initrd_arg: str | None = None  # -initrd as given: a Linux kernel's one initrd file
    append: str | None = None
    smp: int = 1
    memory: int = QEMU_DEFAULT_MEMORY
    cpu_model: str = "host"
    hyperv: str = "none"  # hvvmm --hyperv SPEC; QEMU: no hv-* flag = no Hyper-V
    cpu_features: str | None = None  # hvvmm --cpu-features: "+x2apic,-la57"
    debug_exit: tuple[int, int] | None = None
    hyperv_testdev: bool = False
    serial: str = "stdio"  # resolved COM1: stdio | none | file:PATH
    no_reboot: bool = False
    panic_action: str = "shutdown"  # shutdown | exit-failure | none
    pit_reinject: bool = True  # -global kvm-pit.lost_tick_policy: delay (True) or discard
    drives: list = field(default_factory=list)  # hvvmm DriveSpec, in boot order
    bios: str | None = None
    warnings: list[str] = field(default_factory=list)
    # bookkeeping for the defaults QEMU derives at the end
    _serials: list[str] = field(default_factory=list, repr=False)
    _serial_given: bool = field(default=False, repr=False)
    _nodefaults: bool = field(default=False, repr=False)
    _nographic: bool = field(default=False, repr=False)
    _display_none: bool = field(default=False, repr=False)
    _smp_props: dict[str, str] = field(default_factory=dict, repr=False)
    _machine_type: str = field(default="pc", repr=False)
    _testdev_where: tuple[str, ...] = field(default=(), repr=False)
    # -drive if=none,id=ID waiting for a -device virtio-blk-pci,drive=ID: id -> (spec, where)
    _unattached: dict = field(default_factory=dict, repr=False)
    _drive_where: dict = field(default_factory=dict, repr=False)  # file -> where, for errors


# --------------------------------------------------------------------------------------------
# QEMU's option-value syntax
# --------------------------------------------------------------------------------------------


def split_commas(text: str) -> list[str]:
    """Split at single commas; ``,,`` is a literal comma (QEMU's ``get_opt_value``)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def parse_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """``[implied-value,]key=value,flag,...`` as QEMU's option parser: the first item without
    ``=`` is the value of the ``implied`` key; a later bare ``flag`` is ``flag=on`` and
    ``noflag`` is not special-cased (QEMU deprecated that)."""
    items: list[tuple[str, str]] = []
    for index, part in enumerate(split_commas(text)):
        if "=" in part:
            key, value = part.split("=", 1)
            items.append((key, value))
        elif index == 0 and implied is not None:
            items.append((implied, part))
        elif part:
            items.append((part, "on"))
    return items


_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def _bool(value: str) -> bool | None:
    lowered = value.strip().lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else None


def _is_help(value: str) -> bool:
    return value in ("help", "?")


def parse_uint(text: str) -> int:
    """An unsigned integer as QEMU's ``qemu_strtou64(..., 0)``: decimal, 0x hex, 0 octal."""
    text = text.strip()
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]+", text):
        return int(text, 8)
    if re.fullmatch(r"[0-9]+", text):
        return int(text, 10)
    raise ValueError(text)


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmgtpe]?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_memory_size(text: str) -> int:
    """``-m``'s size: QEMU's units (B, K, M, G, T, P, E; a fraction needs a unit); a plain number
    is MiB. Rounded up to 8 KiB as QEMU does. Raises ValueError."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(text)
    number, unit = match.group(1), match.group(2).lower()
    if not unit:
        if "." in number:
            raise ValueError(text)
        unit = "m"  # QEMU's legacy suffix-less -m: MiB
    try:
        size = int(Decimal(number) * _SIZE_UNITS[unit])
    except InvalidOperation:
        raise ValueError(text) from None
    if size >= 1 << 64:
        raise ValueError(text)
    return -(-size // (8 * KiB)) * (8 * KiB)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

Handler = Callable[[QemuOptions, str, tuple[str, ...]], None]


class _Done(Exception):
    """-h / -version: QEMU answers at once, without looking at the rest of the line."""

    def __init__(self, action: str):
        self.action = action


def _opt_kernel(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts.kernel = arg


def _opt_initrd(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    # QEMU's Multiboot loader: comma-separated modules, each "path args..." (the module's
    # command line is the whole text; the path is up to the first space). QEMU's Linux loader
    # (hw/i386/x86.c) takes the argument whole as the initrd's file name; which applies depends
    # on the kernel (boot_initrd()).
    opts.initrd = tuple(split_commas(arg))
    opts.initrd_arg = arg


def _opt_append(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts.append = arg


_SMP_KEYS = ("cpus", "maxcpus", "drawers", "books", "sockets", "dies", "clusters", "modules",
             "cores", "threads")


def _opt_smp(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    props = dict(opts._smp_props)  # QEMU merges repeated -smp options
    for key, value in parse_opts(arg, implied="cpus"):
        if key not in _SMP_KEYS:
            raise QemuError(f"Invalid parameter '{key}'", where)
        props[key] = value
    opts._smp_props = props
    values: dict[str, int] = {}
    for key, value in props.items():
        try:
            values[key] = parse_uint(value)
        except ValueError:
            raise QemuError(f"Parameter '{key}' expects a number", where) from None
    if any(v == 0 for v in values.values()):
        raise QemuError("Invalid CPU topology: CPU topology parameters must be greater than zero",
                        where)
    for key in ("drawers", "books", "sockets", "dies", "clusters", "modules", "threads"):
        if values.get(key, 1) != 1:
            raise QemuError(f"hvvmm: {key}={values[key]} is not supported: hvvmm presents one "
                            "socket of single-thread cores (use -smp N or cores=N)", where)
    cpus = values.get("cpus", values.get("cores", 1))
    cores = values.get("cores", cpus)
    if cores != cpus:
        raise QemuError(f"hvvmm: cores ({cores}) must equal cpus ({cpus}): hvvmm presents one "
                        "socket of single-thread cores and has no CPU hotplug", where)
    maxcpus = values.get("maxcpus", cpus)
    if maxcpus < cpus:
        raise QemuError("maxcpus must be equal to or greater than smp", where)
    if maxcpus > cpus:
        raise QemuError(f"hvvmm: maxcpus ({maxcpus}) above cpus ({cpus}) needs CPU hotplug, "
                        "which hvvmm does not have", where)
    if cpus > MAX_VCPUS:
        raise QemuError(f"Invalid SMP CPUs {cpus}. The max CPUs supported by machine "
                        f"'{opts._machine_type}' is {MAX_VCPUS}", where)
    opts.smp = cpus


def _opt_memory(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    size_text: str | None = None
    for key, value in parse_opts(arg, implied="size"):
        if key == "size":
            size_text = value
        elif key in ("slots", "maxmem"):
            raise QemuError(f"hvvmm: {key} is not supported: hvvmm has no memory hotplug", where)
        else:
            raise QemuError(f"Invalid parameter '{key}'", where)
    if size_text is None or not size_text.strip():
        raise QemuError("missing 'size' option value", where)
    try:
        size = parse_memory_size(size_text)
    except ValueError:
        raise QemuError("Parameter 'size' expects a non-negative number below 2^64", where) \
            from None
    if size < MIN_MEMORY:
        raise QemuError(f"hvvmm: {size_text} of RAM is below hvvmm's minimum of "
                        f"{MIN_MEMORY // MiB} MiB", where)
    opts.memory = size


def _opt_cpu(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    from .cpuid import CpuidError, parse_cpu_features_mask

    parts = split_commas(arg)
    model = parts[0]
    if _is_help(model):
        opts.action = "cpu-help"
        return
    if model != "host":
        if model not in CPU_MODELS_AS_HOST:
            raise QemuError(f"unable to find CPU model '{model}' (hvvmm offers host; "
                            f"{', '.join(CPU_MODELS_AS_HOST)} are run as host)")
        opts.warnings.append(warning_text(
            f"hvvmm: CPU model '{model}' runs as 'host': hvvmm gives the guest the host CPU "
            "(less what -cpu hides)", where))
    hyperv = _HvSpecBuilder()
    features: list[str] = []
    for part in parts[1:]:
        if not part:
            continue
        if part[0] in "+-":
            name, value = part[1:], "on" if part[0] == "+" else "off"
        elif "=" in part:
            name, value = part.split("=", 1)
        else:
            name, value = part, "on"
        key = name.strip().lower().replace("_", "-")
        if key.startswith("hv-"):
            try:
                hyperv.add(key, value)
            except QemuError as exc:
                raise QemuError(exc.message, where) from None
            continue
        if key in ("check", "enforce", "migratable"):
            continue  # hvvmm never invents features: +feat already fails when the host lacks it
        switch = _bool(value)
        if switch is None:
            raise QemuError(f"hvvmm: CPU property '{name}={value}' is not supported (hvvmm takes "
                            "the host CPU; only features can be hidden: -feat or feat=off)", where)
        features.append(("+" if switch else "-") + key)
    spec, hv_warning = hyperv.spec()
    if hv_warning:
        opts.warnings.append(warning_text(hv_warning, where))
    from .hv.features import HyperVConfigError, parse_hyperv_spec

    try:
        parse_hyperv_spec(spec)
    except HyperVConfigError as exc:
        raise QemuError(f"hvvmm: {exc}", where) from None
    cpu_features = ",".join(features) or None
    try:
        parse_cpu_features_mask(cpu_features)
    except CpuidError as exc:
        raise QemuError(f"hvvmm: {exc}", where) from None
    opts.cpu_model, opts.hyperv, opts.cpu_features = model, spec, cpu_features


_HV_VALUE_OPTIONS = ("hv-spinlocks", "hv-vendor-id", "hv-version-id-build", "hv-version-id-major",
                     "hv-version-id-minor", "hv-version-id-spack", "hv-version-id-sbranch",
                     "hv-version-id-snumber")


class _HvSpecBuilder:
    """Collects ``-cpu`` hv-* flags, in order, into an hvvmm ``--hyperv`` SPEC with QEMU's
    meaning: a feature ``=off`` just switches it off again, and without any feature (or
    hv-spinlocks, or hv-passthrough) there is no Hyper-V at all."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []  # (canonical name, spec text)
        self.passthrough = False

    def add(self, key: str, value: str) -> None:
        from .enlightenments import REGISTRY
        from .hv.features import HyperVConfigError, parse_hyperv_spec

        if key in _HV_VALUE_OPTIONS:
            self._drop(key)
            self.items.append((key, f"{key}={value}"))
            return
        switch = _bool(value)
        if switch is None:
            raise QemuError(f"hvvmm: {key} takes on or off, not '{value}'")
        if key == "hv-enforce-cpuid":
            if not switch:
                raise QemuError("hvvmm: hv-enforce-cpuid=off is not supported: hvvmm always "
                                "enforces the Hyper-V CPUID bits (TLFS)")
            return  # hvvmm's behaviour anyway; not a feature that turns Hyper-V on
        if key == "hv-passthrough":
            if switch:
                self.passthrough = True
                self.items.append((key, key))
            return
        feature = REGISTRY.lookup(key)
        if feature is None:
            try:
                parse_hyperv_spec(key)  # the unknown-name message, with a suggestion
            except HyperVConfigError as exc:
                raise QemuError(f"hvvmm: {exc}") from None
            raise QemuError(f"hvvmm: unknown Hyper-V option '{key}'")
        name = feature.name
        self._drop(name)
        if switch:
            self.items.append((name, name))
        elif self.passthrough and feature.implemented and feature.selectable:
            self.items.append((name, f"{name}=off"))

    def _drop(self, name: str) -> None:
        self.items = [(n, text) for n, text in self.items if n != name]

    def spec(self) -> tuple[str, str | None]:
        """(SPEC, warning or None)."""
        # QEMU's hyperv_enabled(): some feature on, hv-spinlocks set, or hv-passthrough.
        enabling = any(text == name or name == "hv-spinlocks" for name, text in self.items)
        if not enabling:
            if self.items:
                names = ", ".join(sorted({n for n, _ in self.items}))
                return "none", (f"hvvmm: {names} without a Hyper-V feature leaves Hyper-V off "
                                "(as in QEMU)")
            return "none", None
        return ",".join(text for _, text in self.items), None


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    bus: str | None
    desc: str | None
    props: tuple[tuple[str, str, str], ...] = ()  # (name, type, description with default)


DEVICES = (
    DeviceInfo("hyperv-testdev", "ISA", None),
    DeviceInfo("virtio-blk-pci", "PCI", None, (
        ("drive", "str", "the -drive if=none,id=ID to attach"),
        ("bootindex", "int32", "accepted; disks boot in command-line order"))),
    DeviceInfo("isa-debug-exit", "ISA", None, (
        ("iobase", "uint32", "I/O port base (default: 1281)"),
        ("iosize", "uint32", "number of ports (default: 2)"))),
    DeviceInfo("pc-testdev", "ISA", "accepted and ignored: hvvmm does not emulate it"),
)
IGNORED_DEVICES = ("pc-testdev", "pci-testdev")  # accepted with a warning, not emulated


def _opt_device(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    items = parse_opts(arg, implied="driver")
    driver = dict(items).get("driver", "")
    if _is_help(driver):
        opts.action = "device-help"
        return
    props = [(k, v) for k, v in items if k != "driver"]
    known = {d.name for d in DEVICES} | set(IGNORED_DEVICES)
    if driver not in known:
        raise QemuError(f"'{driver}' is not a valid device model name", where)
    if any(_is_help(k) for k, _ in props):
        opts.action, opts.help_subject = "device-props", driver
        return
    if driver in IGNORED_DEVICES:
        opts.warnings.append(warning_text(f"hvvmm: {driver} is not emulated; ignored", where))
        return
    if driver == "virtio-blk-pci":
        values = _check_props(driver, props, ("drive", "bootindex"), where)
        drive_id = values.get("drive")
        if drive_id is None:
            raise QemuError("Device needs media, but drive is empty", where)
        if drive_id not in opts._unattached:
            raise QemuError(f"Property 'virtio-blk-pci.drive' can't find value '{drive_id}'",
                            where)
        opts.drives.append(opts._unattached.pop(drive_id))
        return
    if driver == "hyperv-testdev":
        _check_props(driver, props, (), where)
        opts.hyperv_testdev = True
        opts._testdev_where = where
        return
    # isa-debug-exit
    values = _check_props(driver, props, ("iobase", "iosize"), where)
    if opts.debug_exit is not None:
        raise QemuError("hvvmm: only one isa-debug-exit device is supported", where)
    numbers = dict(zip(("iobase", "iosize"), ISA_DEBUG_EXIT_DEFAULT))
    for key, text in values.items():
        try:
            numbers[key] = parse_uint(text)
        except ValueError:
            raise QemuError(f"Parameter '{key}' expects uint32_t", where) from None
    base, size = numbers["iobase"], numbers["iosize"]
    if size == 0 or base + size > 0x10000:
        raise QemuError(f"hvvmm: isa-debug-exit ports {base:#x}+{size:#x} are not a range of the "
                        "I/O port space (0-0xffff)", where)
    opts.debug_exit = (base, size)


def _check_props(driver: str, props: list[tuple[str, str]], allowed: Sequence[str],
                 where: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in props:
        if key in ("id", "bus"):
            continue
        if key not in allowed:
            raise QemuError(f"Property '{driver}.{key}' not found", where)
        values[key] = value
    return values


_SERIAL_HELP = "stdio, mon:stdio, file:PATH, null or none"


def _opt_serial(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts._serial_given = True  # QEMU: any -serial drops the default serial port
    if arg == "none":
        return  # no port (and, as in QEMU, it does not use up COM1)
    if arg in ("stdio", "mon:stdio"):
        spec = "stdio"
    elif arg == "null":
        spec = "none"
    elif arg.startswith("file:") and len(arg) > 5:
        spec = arg
    else:
        raise QemuError(f"hvvmm: -serial takes {_SERIAL_HELP}", where)
    if opts._serials:
        raise QemuError("hvvmm: the machine has one serial port (COM1); a second -serial is not "
                        "supported", where)
    opts._serials.append(spec)


def _opt_display(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    kind = split_commas(arg)[0]
    if _is_help(kind):
        opts.action = "display-help"
    elif kind == "none":
        opts._display_none = True
    else:
        raise QemuError("hvvmm: there is no display; use -display none (or -nographic)", where)


def _global_bool(value: str) -> bool | None:
    return {"on": True, "true": True, "yes": True, "1": True,
            "off": False, "false": False, "no": False, "0": False}.get(value.lower())


def _global_pit_policy(opts: QemuOptions, value: str, where: tuple[str, ...]) -> None:
    # hvvmm's PIT is KVM's in-kernel one, as QEMU's kvm-pit: "delay" re-injects lost ticks (KVM's
    # default), "discard" drops them (KVM_REINJECT_CONTROL); KVM cannot slew.
    if value not in ("delay", "discard"):
        raise QemuError(f"hvvmm: kvm-pit.lost_tick_policy={value} cannot be honoured: KVM's PIT "
                        "offers delay or discard", where)
    opts.pit_reinject = value == "delay"


def _global_no_sleep_state(opts: QemuOptions, value: str, where: tuple[str, ...]) -> None:
    # hvvmm offers the guest no ACPI S3/S4 sleep states: disabling them changes nothing.
    if not _global_bool(value):
        raise QemuError("hvvmm: the hvvmm machine has no ACPI S3/S4 sleep states to enable",
                        where)


def _global_vapic(opts: QemuOptions, value: str, where: tuple[str, ...]) -> None:
    # QEMU's kvm-apic vapic option ROM patches TPR accesses of 32-bit Windows XP; hvvmm has no
    # option ROMs, so the guest runs the same either way.
    if _global_bool(value) is None:
        raise QemuError("Parameter 'vapic' expects 'on' or 'off'", where)
    if _global_bool(value):
        opts.warnings.append(warning_text("hvvmm: kvm-apic.vapic=on ignored: hvvmm has no TPR "
                                          "patching option ROM", where))


def _global_rtc_policy(opts: QemuOptions, value: str, where: tuple[str, ...]) -> None:
    opts.warnings.append(warning_text(f"hvvmm: mc146818rtc.lost_tick_policy={value} ignored: "
                                      "hvvmm's RTC raises no periodic interrupts", where))


# -global DRIVER.PROPERTY=VALUE that hvvmm understands: what each means for the hvvmm machine.
GLOBAL_PROPERTIES: dict[tuple[str, str], Callable[[QemuOptions, str, tuple[str, ...]], None]] = {
    ("kvm-pit", "lost_tick_policy"): _global_pit_policy,
    ("PIIX4_PM", "disable_s3"): _global_no_sleep_state,
    ("PIIX4_PM", "disable_s4"): _global_no_sleep_state,
    ("ICH9-LPC", "disable_s3"): _global_no_sleep_state,
    ("ICH9-LPC", "disable_s4"): _global_no_sleep_state,
    ("kvm-apic", "vapic"): _global_vapic,
    ("mc146818rtc", "lost_tick_policy"): _global_rtc_policy,
}


def _opt_global(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    """``-global DRIVER.PROP=VALUE`` or ``-global driver=D,property=P,value=V`` (QEMU's
    qemu_global_option): honoured, or accepted where it changes nothing the guest sees (with a
    warning where hvvmm ignores it), or refused."""
    if "=" in arg.split(",", 1)[0] and arg.split("=", 1)[0] in ("driver", "property", "value"):
        props = dict(parse_opts(arg))
        missing = [key for key in ("driver", "property", "value") if key not in props]
        if missing:
            raise QemuError(f"Parameter '{missing[0]}' is missing", where)
        driver, prop, value = props["driver"], props["property"], props["value"]
    else:
        match = re.fullmatch(r"([^.=]+)\.([^=]+)=(.*)", arg, re.DOTALL)
        if not match:
            raise QemuError(f"Invalid format '{arg}'", where)
        driver, prop, value = match.groups()
    handler = GLOBAL_PROPERTIES.get((driver, prop))
    if handler is None:
        known = ", ".join(f"{d}.{p}" for d, p in GLOBAL_PROPERTIES)
        raise QemuError(f"hvvmm: -global {driver}.{prop} is not supported (hvvmm accepts "
                        f"{known})", where)
    handler(opts, value, where)


def _opt_nographic(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts._nographic = True


def _opt_nodefaults(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts._nodefaults = True


def _opt_no_reboot(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts.no_reboot = True


def _opt_vnc(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    if arg != "none":
        raise QemuError("hvvmm: there is no VNC server; use -vnc none", where)


def _opt_monitor(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    if arg not in ("none", "null"):
        raise QemuError("hvvmm: there is no monitor; use -monitor none", where)


def _opt_ignore(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    pass


_KNOWN_ACCELS = ("kvm", "tcg", "xen", "hvf", "whpx", "nvmm", "qtest")


def _check_accel(name: str, where: tuple[str, ...]) -> None:
    if name == "kvm":
        return
    if name in _KNOWN_ACCELS:
        raise QemuError(f"hvvmm: accelerator '{name}' is not available: hvvmm runs guests only "
                        "under KVM (accel=kvm)", where)
    raise QemuError(f"invalid accelerator {name}", where)


def _check_irqchip(value: str, where: tuple[str, ...]) -> None:
    if _bool(value) is not True:
        raise QemuError(f"hvvmm: kernel_irqchip={value} is not supported: hvvmm always uses "
                        "KVM's full in-kernel irqchip", where)


def _opt_accel(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    items = parse_opts(arg, implied="accel")
    name = dict(items).get("accel", "")
    if _is_help(name):
        opts.action = "accel-help"
        return
    _check_accel(name, where)
    for key, value in items:
        if key == "accel":
            continue
        if key in ("kernel-irqchip", "kernel_irqchip"):
            _check_irqchip(value, where)
        else:
            raise QemuError(f"Property '{name}-accel.{key}' not found", where)


_MACHINE_OFF_ONLY = {"usb": "USB", "vmport": "VMware I/O port", "smm": "SMM", "hpet": "HPET"}
_MACHINE_HOST_ONLY = ("dump-guest-core", "mem-merge")


def _machine_type_ok(name: str) -> bool:
    return name in MACHINE_TYPES or bool(re.fullmatch(r"pc-(i440fx|q35)-\d+\.\d+", name))


def _opt_machine(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    items = parse_opts(arg, implied="type")
    mtype = dict(items).get("type")
    if mtype is not None:
        if _is_help(mtype):
            opts.action = "machine-help"
            return
        if not _machine_type_ok(mtype):
            raise QemuError(f"unsupported machine type \"{mtype}\" (hvvmm: pc or q35; use "
                            "-machine help to list them)", where)
        opts._machine_type = mtype
    for key, value in items:
        if key == "type":
            continue
        if key == "accel":
            accels = value.split(":")
            _check_accel(accels[0], where)  # QEMU takes the first one that works
        elif key in ("kernel_irqchip", "kernel-irqchip"):
            _check_irqchip(value, where)
        elif key in _MACHINE_OFF_ONLY:
            if _bool(value) is not False:
                raise QemuError(f"hvvmm: {key}={value} is not supported: the machine has no "
                                f"{_MACHINE_OFF_ONLY[key]}", where)
        elif key in _MACHINE_HOST_ONLY:
            if _bool(value) is None:
                raise QemuError(f"Parameter '{key}' expects 'on' or 'off'", where)
        else:
            raise QemuError(f"Property '{opts._machine_type}-machine.{key}' not found", where)


_ACTIONS = {"reboot": ("reset", "shutdown"), "shutdown": ("poweroff", "pause"),
            "panic": ("pause", "shutdown", "exit-failure", "none"),
            "watchdog": ("reset", "shutdown", "poweroff", "pause", "debug", "none",
                         "inject-nmi")}


def _opt_action(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    for key, value in parse_opts(arg):
        if key not in _ACTIONS:
            raise QemuError(f"Invalid parameter '{key}'", where)
        if value not in _ACTIONS[key]:
            raise QemuError(f"Parameter '{key}' does not accept value '{value}'", where)
        if key == "reboot":
            opts.no_reboot = value == "shutdown"
        elif key == "panic":
            if value == "pause":
                raise QemuError("hvvmm: panic=pause is not supported: hvvmm cannot pause a "
                                "guest (use shutdown, exit-failure or none)", where)
            opts.panic_action = value
        elif key == "shutdown":
            if value == "pause":
                raise QemuError("hvvmm: shutdown=pause is not supported: hvvmm cannot pause a "
                                "guest", where)
        else:
            raise QemuError("hvvmm: there is no watchdog device; -action watchdog is not "
                            "supported", where)


# QEMU's format names -> hvvmm's (hvvmm.block.FORMATS); "vpc" is QEMU's name for VHD.
DRIVE_FORMATS = {"raw": "raw", "vpc": "vhd"}
DRIVE_INTERFACES = ("virtio", "none", "ide")


def _opt_drive(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    from .devices.virtio_blk import DriveSpec

    values: dict[str, str] = {}
    for key, value in parse_opts(arg):
        values[key] = value
    allowed = {"file", "format", "if", "id", "readonly", "cache", "media", "index", "aio",
               "discard"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise QemuError(f"hvvmm: -drive option '{unknown[0]}' is not supported (file, format, "
                        "if, id, readonly, cache, media=disk, index)", where)
    if not values.get("file"):
        raise QemuError("hvvmm: -drive without file= (empty drives are not supported)", where)
    interface = values.get("if", "ide")
    if interface not in DRIVE_INTERFACES:
        raise QemuError(f"hvvmm: -drive if={interface} is not supported (virtio, or none with "
                        "-device virtio-blk-pci)", where)
    if interface == "ide":
        opts.warnings.append(warning_text("hvvmm: there is no IDE controller; the disk is "
                                          "attached as virtio-blk", where))
    fmt = values.get("format")
    if fmt is not None and fmt not in DRIVE_FORMATS:
        raise QemuError(f"hvvmm: image format '{fmt}' is not supported (raw, vpc)", where)
    if values.get("media", "disk") != "disk":
        raise QemuError("hvvmm: only media=disk is supported", where)
    readonly = _bool(values.get("readonly", "off"))
    if readonly is None:
        raise QemuError("Parameter 'readonly' expects 'on' or 'off'", where)
    cache = values.get("cache", "writeback")
    if cache not in ("writeback", "none"):
        raise QemuError(f"hvvmm: cache={cache} is not supported (writeback, none)", where)
    spec = DriveSpec(values["file"], DRIVE_FORMATS[fmt] if fmt else None, readonly, cache)
    opts._drive_where[values["file"]] = where
    if interface == "none":
        drive_id = values.get("id")
        if not drive_id:
            raise QemuError("hvvmm: -drive if=none needs id= for -device virtio-blk-pci,drive=",
                            where)
        opts._unattached[drive_id] = spec
    else:
        opts.drives.append(spec)


def _opt_hda(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    from .devices.virtio_blk import DriveSpec

    opts.drives.append(DriveSpec(arg))
    opts._drive_where[arg] = where


def _opt_bios(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    opts.bios = arg


def _opt_boot(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    # The firmware boots the disks in command-line order; the other keys are accepted.
    allowed = {"order", "once", "menu", "splash", "splash-time", "reboot-timeout", "strict"}
    for key, value in parse_opts(arg, implied="order"):
        if key not in allowed:
            raise QemuError(f"Invalid parameter '{key}'", where)
        if key in ("order", "once") and value.strip("cdn"):
            raise QemuError(f"Invalid boot device '{value.strip('cdn')[0]}'", where)


def _opt_help(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    raise _Done("help")


def _opt_version(opts: QemuOptions, arg: str, where: tuple[str, ...]) -> None:
    raise _Done("version")


# name -> (takes a value, handler)
OPTIONS: dict[str, tuple[bool, Handler]] = {
    "h": (False, _opt_help),
    "help": (False, _opt_help),
    "version": (False, _opt_version),
    "kernel": (True, _opt_kernel),
    "initrd": (True, _opt_initrd),
    "append": (True, _opt_append),
    "smp": (True, _opt_smp),
    "m": (True, _opt_memory),
    "cpu": (True, _opt_cpu),
    "device": (True, _opt_device),
    "serial": (True, _opt_serial),
    "display": (True, _opt_display),
    "global": (True, _opt_global),
    "nographic": (False, _opt_nographic),
    "nodefaults": (False, _opt_nodefaults),
    "no-reboot": (False, _opt_no_reboot),
    "action": (True, _opt_action),
    "machine": (True, _opt_machine),
    "M": (True, _opt_machine),
    "accel": (True, _opt_accel),
    "enable-kvm": (False, _opt_ignore),  # hvvmm always uses KVM
    "name": (True, _opt_ignore),
    "vnc": (True, _opt_vnc),
    "monitor": (True, _opt_monitor),
    "no-hpet": (False, _opt_ignore),  # the hvvmm machine has no HPET
    "drive": (True, _opt_drive),
    "hda": (True, _opt_hda),
    "bios": (True, _opt_bios),
    "boot": (True, _opt_boot),
}

# Real QEMU options hvvmm refuses with a clear message (anything else is an "invalid option").
UNSUPPORTED_OPTIONS = frozenset("""
    chardev hdb hdc hdd cdrom fda fdb mtdblock sd pflash blockdev netdev net nic
    object rtc icount s S gdb qmp qmp-pretty mon d D trace usb usbdevice vga
    pidfile daemonize incoming loadvm snapshot numa mem-path mem-prealloc overcommit L dtb
    fw_cfg sandbox msg semihosting semihosting-config audio audiodev soundhw k smbios acpitable
    watchdog-action parallel virtfs fsdev tpmdev iscsi no-acpi no-shutdown runas chroot run-with
    add-fd compat plugin singlestep one-insn-per-tb qtest qtest-log set spice portrait rotate
    full-screen g virtioconsole show-cursor option-rom xen-domid xen-attach machine-help
    preconfig nouserconfig readconfig writeconfig uuid sdl curses alt-grab ctrl-grab
    no-quit no-fd-bootchk enable-sync-profile async-teardown
""".split())


def parse_args(argv: Sequence[str]) -> QemuOptions:
    """Parse a QEMU command line (without the program name). Raises :class:`QemuError`."""
    opts = QemuOptions()
    argv = list(argv)
    i = 0
    try:
        while i < len(argv):
            word = argv[i]
            if not word.startswith("-"):  # QEMU: a disk image, as -hda
                _opt_hda(opts, word, (word,))
                i += 1
                continue
            name = word[2:] if word.startswith("--") else word[1:]
            if name not in OPTIONS:
                if name in UNSUPPORTED_OPTIONS:
                    raise QemuError(f"hvvmm: -{name} is not supported (see {PROG} -help for "
                                    "the options hvvmm accepts)", [word])
                raise QemuError("invalid option", [word])
            takes_value, handler = OPTIONS[name]
            if takes_value:
                if i + 1 >= len(argv):
                    raise QemuError("requires an argument", [word])
                arg = argv[i + 1]
                where: tuple[str, ...] = (word, arg)
                i += 2
            else:
                arg, where = "", (word,)
                i += 1
            handler(opts, arg, where)
    except _Done as done:
        opts.action = done.action
        return opts
    if opts.action != "run":
        return opts
    _finish(opts)
    return opts


def _finish(opts: QemuOptions) -> None:
    """QEMU's checks and defaults once the whole line is read."""
    if opts._unattached:
        drive_id = next(iter(opts._unattached))
        opts.warnings.append(warning_text(f"hvvmm: -drive id={drive_id} is not attached to a "
                                          "device; ignored"))
    if opts.kernel is None:
        if opts.append:
            raise QemuError("-append only allowed with -kernel option")
        if opts.initrd:
            raise QemuError("-initrd only allowed with -kernel option")
        if not opts.drives and opts.bios is None:
            raise QemuError("hvvmm: nothing to boot: give -kernel (a Linux or Multiboot kernel) "
                            "or a disk image (-drive, -hda)")
    if opts.hyperv_testdev:
        from .hv.features import parse_hyperv_spec

        if not parse_hyperv_spec(opts.hyperv).has("hv-synic"):
            raise QemuError("hvvmm: hyperv-testdev needs the guest to have hv-synic (-cpu "
                            "host,hv-vpindex,hv-synic or -cpu host,hv-passthrough)",
                            opts._testdev_where)
    # COM1, as QEMU: the first -serial; without one, -nodefaults leaves no serial port,
    # -nographic puts it on stdio, -display none on a console nobody sees; otherwise QEMU shows
    # it in its window, which for hvvmm (no display) is stdio.
    if opts._serials:
        opts.serial = opts._serials[0]
    elif opts._serial_given or opts._nodefaults:
        opts.serial = "none"
    elif opts._nographic:
        opts.serial = "stdio"
    elif opts._display_none:
        opts.serial = "none"
    else:
        opts.serial = "stdio"


# --------------------------------------------------------------------------------------------
# Help outputs
# --------------------------------------------------------------------------------------------


def version_line() -> str:
    return f"QEMU emulator version {QEMU_VERSION} (hvvmm {__version__})"


def version_text() -> str:
    return (f"{version_line()}\n"
            f"This is hvvmm {__version__}'s QEMU-compatible front end, not QEMU: it runs a subset "
            f"of {PROG}'s options on hvvmm (see -help).\n")


def help_text() -> str:
    return f"""{version_line()}
hvvmm's QEMU-compatible front end, not QEMU: a subset of {PROG}'s options, run on hvvmm.
usage: {PROG} [options]

Standard options:
-h or -help     display this help and exit
-version        display version information and exit
-machine [type=]pc|q35[,accel=kvm][,kernel_irqchip=on][,usb=off][,vmport=off][,smm=off]
                pc, q35, pc-i440fx-X.Y, pc-q35-X.Y: hvvmm presents its own small PC for all
-M              same as -machine
-accel kvm[,kernel-irqchip=on]
                KVM is the only accelerator (tcg and the others are refused)
-enable-kvm     same as -accel kvm
-cpu host[,hv-FEATURE[=on|off]][,hv-spinlocks=N][,hv-passthrough][,+FEATURE|-FEATURE]
                the host CPU; max, kvm64, qemu64 run as host (with a warning).
                hv-*/hv_* flags choose the Hyper-V enlightenments; without any, no Hyper-V
                (as QEMU). -FEATURE or FEATURE=off hides a host feature. -cpu help lists models
-smp [cpus=]n[,maxcpus=n][,cores=n][,sockets=1][,dies=1][,clusters=1][,threads=1]
                n vCPUs: one socket of single-thread cores, no CPU hotplug
-m [size=]megs[M|G]
                guest RAM; a plain number is MiB (default {QEMU_DEFAULT_MEMORY // MiB}M)
-name string    accepted and ignored
-action reboot=reset|shutdown,shutdown=poweroff,panic=shutdown|exit-failure|none
                what a guest reset or panic does (a Hyper-V crash report is a panic)
-no-reboot      exit instead of rebooting (-action reboot=shutdown)
-no-hpet        accepted (the machine has no HPET)

Block device options:
-drive file=F[,format=raw|vpc][,if=virtio|none|ide][,id=ID][,readonly=on][,cache=writeback|none]
                a disk, attached as virtio-blk (if=ide too, with a warning); if=none waits
                for -device virtio-blk-pci,drive=ID
-hda file       same as -drive file=file (a bare word on the command line too)
-bios file      the BIOS image (default SeaBIOS, /usr/share/seabios/bios-256k.bin)
-boot [order=]c[,menu=on|off]...
                accepted; the BIOS boots the disks in command-line order

Device options:
-device virtio-blk-pci,drive=ID
                the -drive if=none,id=ID as a virtio-blk PCI device
-device isa-debug-exit[,iobase=0x501][,iosize=0x2]
                a write of v ends the run with status (v << 1) | 1 (none without it)
-device hyperv-testdev
                the Hyper-V test device
-device pc-testdev, -device pci-testdev
                accepted and ignored, with a warning
-device help    list the devices
-nodefaults     no default devices: no serial port unless -serial says so
-global kvm-pit.lost_tick_policy=delay|discard
                whether KVM's PIT re-injects lost ticks (default delay)
-global PIIX4_PM.disable_s3=1 (and disable_s4, ICH9-LPC.*)
                accepted: hvvmm has no ACPI sleep states

Display options:
-display none   hvvmm has no display
-nographic      no display; the serial port on stdio
-vnc none       accepted (no VNC server)

Character device options:
-serial dev     COM1: {_SERIAL_HELP} (default: stdio)
-monitor none   accepted (no monitor)

Linux/Multiboot boot specific:
-kernel file    a Linux bzImage or ELF vmlinux (PVH or 64-bit entry), or a Multiboot v1
                kernel (ELF32, ELF64 or the a.out kludge)
-append cmdline the kernel command line
-initrd file    Linux: the initial ram disk
-initrd 'file [args][,file2 [args]]'
                Multiboot: modules, comma-separated (',,' is a literal comma)

{EXIT_STATUS_HELP}
Messages start "{PROG}:" as QEMU's do, however hvvmm was invoked.
"""


STORAGE_DEVICES = ("virtio-blk-pci",)


def device_help_text() -> str:
    """``-device help``, in QEMU's format (categories, then name, bus, desc; sorted by name)."""
    lines = []
    for title, members in (("Storage devices:", True), ("Misc devices:", False)):
        if lines:
            lines.append("")
        lines.append(title)
        for device in sorted(DEVICES, key=lambda d: d.name.lower()):
            if (device.name in STORAGE_DEVICES) != members:
                continue
            line = f'name "{device.name}"'
            if device.bus:
                line += f", bus {device.bus}"
            if device.desc:
                line += f', desc "{device.desc}"'
            lines.append(line)
    return "\n".join(lines) + "\n"


def device_props_text(name: str) -> str:
    device = next((d for d in DEVICES if d.name == name), None)
    if device is None or not device.props:
        return f"There are no options for {name}.\n"
    lines = [f"{name} options:"]
    for prop, kind, desc in device.props:
        lines.append(f"  {prop + '=<' + kind + '>':<24} - {desc}")
    return "\n".join(lines) + "\n"


def cpu_help_text() -> str:
    lines = ["Available CPUs:", "x86 host                  the host CPU, as KVM supports it"]
    lines += [f"x86 {m:<21} run as host by hvvmm" for m in CPU_MODELS_AS_HOST]
    return "\n".join(lines) + "\n"


def machine_help_text() -> str:
    return ("Supported machines are:\n"
            "pc                   hvvmm's small PC: i440FX, PIIX3, virtio-blk (default)\n"
            "q35                  the same machine (hvvmm has one)\n")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _is_linux_kernel(path: str | None) -> bool:
    """Whether ``path`` holds a Linux kernel (bzImage, ELF vmlinux), as opposed to Multiboot."""
    from . import boot

    try:
        with open(path, "rb") as file:
            return boot.detect_format(file.read()) in boot.LINUX_FORMATS
    except (OSError, TypeError, ValueError):
        return False


def boot_initrd(opts: QemuOptions) -> tuple[str, ...]:
    """What -initrd hands the kernel: for Linux the one file named, for Multiboot the modules."""
    if opts.initrd_arg is not None and _is_linux_kernel(opts.kernel):
        return (opts.initrd_arg,)
    return opts.initrd


def machine_config(opts: QemuOptions, console=None, console_input=None):
    from .machine import MachineConfig

    return MachineConfig(kernel=opts.kernel, initrd=boot_initrd(opts), append=opts.append or "",
                         smp=opts.smp, memory=opts.memory, timeout=None,
                         kvm_device=kvm_device(), hyperv=opts.hyperv,
                         cpu_features=opts.cpu_features,
                         on_crash="continue" if opts.panic_action == "none" else "stop",
                         debug_exit=opts.debug_exit, hyperv_testdev=opts.hyperv_testdev,
                         pit_reinject=opts.pit_reinject,
                         console=console, console_input=console_input,
                         drives=tuple(opts.drives), bios=opts.bios,
                         on_reset="exit" if opts.no_reboot else "restart")


def _check_files(opts: QemuOptions) -> None:
    """QEMU opens the kernel, then each module, before the guest starts; same messages."""
    if opts.bios is not None and not os.access(opts.bios, os.R_OK):
        raise QemuError(f"qemu: could not load PC BIOS '{opts.bios}'", raw=True)  # QEMU's text
    for drive in opts.drives:
        try:
            with open(drive.file, "rb"):
                pass
        except OSError as exc:
            raise QemuError(f"Could not open '{drive.file}': {exc.strerror}",
                            opts._drive_where.get(drive.file, ())) from None
    if opts.kernel is None:
        return
    try:
        with open(opts.kernel, "rb"):
            pass
    except OSError as exc:
        raise QemuError(f"qemu: could not open kernel file '{opts.kernel}': {exc.strerror}",
                        raw=True) from None
    if opts.initrd_arg is not None and _is_linux_kernel(opts.kernel):
        try:
            with open(opts.initrd_arg, "rb"):
                pass
        except OSError as exc:  # QEMU x86_load_linux()'s wording
            raise QemuError(f"qemu: error reading initrd {opts.initrd_arg}: {exc.strerror}",
                            raw=True) from None
        return
    for spec in opts.initrd:
        path = spec.split(" ", 1)[0]
        try:
            with open(path, "rb"):
                pass
        except OSError:
            raise QemuError(f"Failed to open file '{path}'", raw=True) from None


class _Sink:
    """The console stream shared by every boot of a run: after it fails once (a closed pipe) it
    swallows output quietly, so a guest that reboots does not repeat the serial port's
    warning on every boot."""

    def __init__(self, stream):
        self._stream = stream
        self.failed = False

    def write(self, data: bytes) -> int:
        if not self.failed:
            try:
                self._stream.write(data)
            except (OSError, ValueError):
                self.failed = True
                raise
        return len(data)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.failed = True  # the serial port reports failed writes; closing must not fail


def _console(opts: QemuOptions):
    """(output stream, input source, file to close) for the resolved COM1."""
    try:
        output, console_input, to_close = open_console(opts.serial)
    except OSError as exc:
        raise QemuError(f"Could not open '{opts.serial[5:]}': {exc.strerror}",
                        ("-serial", opts.serial)) from None
    return (_Sink(output) if output is not None else None), console_input, to_close


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"{PROG}: hvvmm: {text}"
        if record.levelno >= logging.WARNING:
            return f"{PROG}: warning: hvvmm: {text}"
        return f"{PROG}: hvvmm: {record.name}: {text}"


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = os.environ.get("HVVMM_LOG_LEVEL", "WARNING").upper()
    root.setLevel(getattr(logging, level, logging.WARNING))


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run(opts: QemuOptions) -> int:
    """Boot ``opts`` (action "run") and return QEMU's exit status."""
    from .kvm import KvmUnavailableError
    from .machine import ConfigError, ImageError, Machine
    from .result import ExitKind

    _check_files(opts)
    output, console_input, to_close = _console(opts)
    config = machine_config(opts, output, console_input)
    state: dict = {"signal": None, "running": None}

    def on_signal(signum, _frame):
        if state["signal"] is None:
            state["signal"] = signum
        machine = state["running"]
        if machine is not None:
            machine.stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    try:
        while True:
            if state["signal"] is not None:
                return _terminated(state["signal"])
            try:
                machine = Machine(config)
            except ConfigError as exc:
                raise QemuError(f"hvvmm: {exc}") from None
            except ImageError as exc:
                raise QemuError(f"hvvmm: {exc}") from None
            except KvmUnavailableError as exc:
                raise QemuError(f"failed to initialize kvm: {exc}") from None
            with machine:
                machine.start()
                state["running"] = machine
                if state["signal"] is not None:
                    machine.stop(state["signal"])
                result = machine.wait()
                state["running"] = None
            if result.kind in (ExitKind.RESET, ExitKind.SHUTDOWN) and not opts.no_reboot:
                continue  # QEMU resets the machine: boot the guest again
            break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if to_close is not None:
            to_close.close()
    return _status(opts, result)


def _terminated(signum: int) -> int:
    print(f"{PROG}: terminating on signal {signum}", file=sys.stderr)
    return 0  # as QEMU: harnesses read the signal from this message


def _status(opts: QemuOptions, result) -> int:
    from .result import ExitKind

    kind = result.kind
    if kind is ExitKind.DEBUG_EXIT:
        return result.qemu_status
    if kind is ExitKind.STOPPED:
        return _terminated(result.signal) if result.signal else 0
    if kind in (ExitKind.POWEROFF, ExitKind.RESET, ExitKind.SHUTDOWN):
        return 0
    if kind is ExitKind.CRASH:
        # Machine.report_crash logged the report (a warning line). QEMU: panic=shutdown exits 0.
        return 1 if opts.panic_action == "exit-failure" else 0
    print(f"{PROG}: hvvmm: {kind.value}: {result.message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``hvvmm qemu ARGS`` / ``hvvmm-qemu ARGS``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
        for warning in opts.warnings:
            print(warning, file=sys.stderr)
        outputs = {"help": help_text, "version": version_text, "device-help": device_help_text,
                   "cpu-help": cpu_help_text, "machine-help": machine_help_text,
                   "accel-help": lambda: "Accelerators supported in QEMU binary:\nkvm\n",
                   "display-help": lambda: "Available display backend types:\nnone\n",
                   "device-props": lambda: device_props_text(opts.help_subject)}
        if opts.action in outputs:
            sys.stdout.write(outputs[opts.action]())
            sys.stdout.flush()
            return 0
        _setup_logging()
        return run(opts)
    except QemuError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the handlers were in place
        return _terminated(signal.SIGINT)
    except Exception as exc:  # the last line of defence: one line, as everything else
        if os.environ.get("HVVMM_LOG_LEVEL", "").upper() == "DEBUG":
            raise
        print(f"{PROG}: hvvmm: error: {exc or type(exc).__name__} (HVVMM_LOG_LEVEL=DEBUG "
              "shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
