"""The ``hvvmm`` command line: ``hvvmm run``, ``hvvmm info``, ``hvvmm cpuid`` (``hvvmm qemu`` and
``hvvmm img`` live in their own modules).

Every error is one line on stderr and a distinct exit status (see ``hvvmm run --help``); a
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import BinaryIO, Sequence

from . import __version__
from .firmware import DEFAULT_BIOS
from .host import kvm_device, open_console
from .layout import MiB
from .machine import DEFAULT_MEMORY, MAX_TIMEOUT, ConfigError, ImageError, check_smp
from .result import (STATUS_BAD_IMAGE, STATUS_KVM_UNAVAILABLE, STATUS_USAGE, STATUS_VM_ERROR,
                     ExitKind)
from .sizes import parse_size  # noqa: F401  (hvvmm.cli.parse_size: kept for library users)

log = logging.getLogger("hvvmm")

EXIT_STATUS_HELP = """\
exit status:
  0          the guest powered off (ACPI PM1a control, port 0x604), or wrote 0 to
             isa-debug-exit (port 0xf4: the test guests' "every check passed")
  odd N      the guest wrote v != 0 to isa-debug-exit: N = (v << 1) | 1, as QEMU
             (--qemu-exit-status: QEMU's rule for v = 0 too, so 0 gives 1)
  2          bad command line (unknown flag, --smp 0, bad size, a BIOS with --kernel, ...)
  4          bad kernel, initrd, disk image or firmware (missing, unreadable, of no known
             format, does not fit, an image another process holds)
  6          /dev/kvm missing or not usable
  8          the guest triple-faulted (a BIOS boot resets in place instead, unless
             --on-reset exit)
  10         the guest asked for a reset (with --on-reset exit; the default for kernels)
  12         the VM failed (KVM error, unhandled exit, internal error)
  14         the guest reported a crash (Hyper-V crash MSRs; see --on-crash)
  124        --timeout expired
  128+SIG    stopped by a signal (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP; 141 when
             the reader of the guest's output went away, as in `hvvmm run | head`)

environment:
  HVVMM_KVM_DEVICE   the KVM device to open (default /dev/kvm)
"""

class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and raises instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    if not math.isfinite(value) or value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text} seconds is too long (at most {MAX_TIMEOUT:.0f}); leave --timeout out to "
            "run without a limit")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hvvmm", description="A KVM virtual machine monitor that implements "
                     "the Microsoft Hyper-V guest interface.")
    parser.add_argument("--version", action="version", version=f"hvvmm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run", help="boot a disk image, a Linux or Multiboot kernel, or the built-in guest",
        description="Boot a disk image through the BIOS (hvvmm run disk.img), or a kernel: a "
                    "Linux bzImage, an ELF vmlinux (PVH or 64-bit entry) or a Multiboot v1 "
                    "kernel, told apart by their bytes; with neither, a built-in guest that "
                    "prints what it sees (vCPUs, memory, CPUID hypervisor leaves) and powers "
                    "off.",
        epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("disk", metavar="DISK", nargs="?",
                     help="a disk image to boot: short for --drive file=DISK, first in boot order")
    run.add_argument("--drive", metavar="file=F[,format=raw|vhd][,readonly=on][,cache=...]",
                     action="append", default=[],
                     help="a virtio-blk disk (cache=writeback, the default, or none: every "
                          "write reaches the disk before it completes); repeat for more disks")
    run.add_argument("--bios", metavar="FILE",
                     help=f"BIOS image to boot (default when booting a disk: {DEFAULT_BIOS}); "
                          "it takes no --kernel, --initrd or --append")
    run.add_argument("--kernel", metavar="FILE",
                     help="Linux bzImage or ELF vmlinux, or a Multiboot v1 kernel (ELF or a.out "
                          "kludge)")
    run.add_argument("--initrd", metavar="'FILE [ARGS]'", action="append", default=[],
                     help="Linux: the initrd (one FILE); Multiboot: a module with its command "
                          "line, repeat for more modules")
    run.add_argument("--append", metavar="STR", default="",
                     help="kernel command line (Multiboot: after the kernel's name)")
    run.add_argument("--keep-cmdline", dest="emulator_safe_cmdline", action="store_false",
                     help="give a Linux kernel --append as it is: on a host whose KVM emulates "
                          "guest ring 0, hvvmm otherwise adds noxsave and clearcpuid= for the "
                          "instructions KVM's emulator lacks (and says so)")
    run.add_argument("--kernel-decompress", choices=("host", "guest"), default="host",
                     help="where a bzImage's compressed kernel is unpacked: host (default; "
                          "gzip, bzip2, lzma, xz, lz4, zstd) or guest (the kernel's own "
                          "decompressor)")
    run.add_argument("--smp", metavar="N", type=_positive_int, default=1,
                     help="number of vCPUs (default 1; at most 255, the xAPIC IDs, or fewer "
                          "where KVM_CAP_MAX_VCPUS says so)")
    run.add_argument("--memory", "-m", metavar="SIZE", type=_size, default=DEFAULT_MEMORY,
                     help=f"guest RAM, e.g. 512M or 2G (default {DEFAULT_MEMORY // MiB}M)")
    run.add_argument("--serial", metavar="stdio|none|file:PATH", default="stdio",
                     help="where the guest's COM1 output goes (default stdio; stdin feeds it)")
    run.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                     help="stop the guest after this long (exit status 124)")
    _add_machine_options(run)
    run.add_argument("--trace", metavar="FILE",
                     help="write every synthetic MSR access and hypercall as a JSON line")
    run.add_argument("--crash-report", metavar="FILE",
                     help="write the guest's Hyper-V crash report (JSON) here")
    run.add_argument("--on-crash", choices=("stop", "continue"), default="stop",
                     help="when the guest reports a crash: end the run (status 14, default) or "
                          "let it go on")
    run.add_argument("--on-reset", choices=("exit", "restart"),
                     help="when the guest resets: exit (status 10) or boot it again (a BIOS "
                          "boot restarts in place). Default: restart for a BIOS boot, else exit")
    run.add_argument("--no-acpi", dest="acpi", action="store_false",
                     help="no ACPI tables (the guest finds no RSDP, MADT or FADT)")
    run.add_argument("--hyperv-testdev", action="store_true",
                     help="QEMU's hyperv-testdev at port 0x3000 (SynIC test device of "
                          "kvm-unit-tests; needs hv-synic)")
    run.add_argument("--qemu-exit-status", action="store_true",
                     help="exit with QEMU's (v << 1) | 1 for every isa-debug-exit value v, also "
                          "for 0 (which otherwise exits 0)")
    _add_common(run)

    cpuid = commands.add_parser(
        "cpuid", help="print the CPUID table a guest would get, each Hyper-V bit named",
        description="Print the CPUID table of vCPU 0 (from this host's KVM_GET_SUPPORTED_CPUID "
                    "and the Hyper-V features), with each Hyper-V bit named.")
    _add_machine_options(cpuid)
    cpuid.add_argument("--smp", metavar="N", type=_positive_int, default=1,
                       help="number of vCPUs (topology and limits leaves)")
    _add_common(cpuid)

    info = commands.add_parser("info", help="report the host: KVM, capabilities, virtualization")
    _add_common(info)

    # Listed here for --help only: main() hands "hvvmm qemu ..." to hvvmm.qemu before argparse.
    commands.add_parser("qemu", add_help=False,
                        help="run a qemu-system-x86_64 command line (a subset of QEMU's options; "
                             "see hvvmm qemu -help)")
    commands.add_parser("img", add_help=False,
                        help="create, inspect, check, convert, compare and commit disk images "
                             "(raw, VHD; see hvvmm img --help)")
    # The top-level help shows each command's options, so `hvvmm --help` is enough to start.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("options of each command (`hvvmm COMMAND --help` explains them):\n"
                     + "".join(commands.choices[name].format_usage().replace("usage: ", "  ")
                               for name in ("run", "cpuid", "info"))
                     + "  hvvmm qemu QEMU-OPTIONS...  (see hvvmm qemu -help)\n"
                     + "  hvvmm img SUBCOMMAND ...  (see hvvmm img --help)\n")
    parser.commands = commands.choices  # name -> subparser, for errors that name the command
    return parser


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hyperv", metavar="SPEC",
        help="Hyper-V features: QEMU's names, comma-separated (hv-relaxed, hv-vpindex, hv-time, "
             "hv-spinlocks=N, hv-crash, hv-reset, ...), or a preset: none, minimal, linux, "
             "windows, all. Default: everything hvvmm implements; 'none' gives a plain KVM "
             "machine")
    parser.add_argument("--cpu-features", metavar="LIST",
                        help="host CPU features to hide from the guest, e.g. -cx16,-xsave (the "
                             "leading '-' may follow a space: --cpu-features -cx16)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="log what the VMM does")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, and tracebacks for errors")


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hvvmm: %(name)s: %(message)s" if args.debug
                                           else "hvvmm: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _console_streams(spec: str) -> tuple[BinaryIO | None, int | None, BinaryIO | None]:
    """(output stream, input source, file to close) for ``--serial``."""
    try:
        return open_console(spec)
    except OSError as exc:
        raise UsageError(f"hvvmm run: cannot open serial output {spec[5:]}: "
                         f"{exc.strerror}") from None
    except ValueError:
        raise UsageError(f"hvvmm run: bad --serial {spec!r}: use stdio, none or file:PATH") \
            from None


# Signals that stop a run: the guest is stopped, the status is 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _ConsoleOut:
    """The guest console's copy to stdout. When the reader goes away (``hvvmm run | head``),
    the run ends quietly with status 128 + SIGPIPE, as a tool that writes to a closed pipe."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.on_broken_pipe = lambda: None
        self.broken = False

    def _guard(self, operation, *args):
        if self.broken:
            return None
        try:
            return operation(*args)
        except BrokenPipeError:
            self.broken = True
            _silence_stdout()
            self.on_broken_pipe()
            return None

    def write(self, data: bytes) -> int:
        self._guard(self._stream.write, data)
        return len(data)

    def flush(self) -> None:
        self._guard(self._stream.flush)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so nothing (not even Python's flush at exit) writes to a
    closed pipe again (the Python manual's advice for SIGPIPE, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _check_writable(path: str, what: str) -> None:
    """UsageError unless a file can be written at ``path`` later (without creating it now)."""
    import errno

    directory = os.path.dirname(path) or "."
    problem = None
    if os.path.isdir(path):
        problem = os.strerror(errno.EISDIR)
    elif not os.path.isdir(directory):
        problem = os.strerror(errno.ENOENT)
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        problem = os.strerror(errno.EACCES)
    elif not os.path.exists(path) and not os.access(directory, os.W_OK | os.X_OK):
        problem = os.strerror(errno.EACCES)
    if problem:
        raise UsageError(f"hvvmm run: cannot write {what} {path}: {problem}")


class TraceWriter:
    """Writes each Hyper-V event as one JSON line. Every vCPU thread calls it, and a text file
    is not safe for concurrent writes (lines came out interleaved and cut mid-character with
    Linux on two vCPUs), so one lock orders whole lines."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._stream.write(line)


def cmd_run(args) -> int:
    from .kvm import KvmUnavailableError
    from .machine import Machine, MachineConfig

    from .devices.virtio_blk import DriveSpec, DriveSpecError, parse_drive_spec

    try:
        drives = ([DriveSpec(args.disk)] if args.disk else []) + \
            [parse_drive_spec(text) for text in args.drive]
    except DriveSpecError as exc:
        raise UsageError(f"hvvmm run: {exc}") from None
    if args.disk and args.kernel:
        raise UsageError("hvvmm run: give a DISK to boot or --kernel, not both (attach disks "
                         "to a kernel with --drive)")
    if args.on_reset is None:
        firmware_boot = args.bios is not None or (drives and args.kernel is None)
        args.on_reset = "restart" if firmware_boot else "exit"
    try:
        config = MachineConfig(kernel=args.kernel, drives=tuple(drives), bios=args.bios,
                               on_reset=args.on_reset, initrd=tuple(args.initrd),
                               append=args.append,
                               kernel_decompress=args.kernel_decompress, smp=args.smp,
                               memory=args.memory, timeout=args.timeout,
                               kvm_device=kvm_device(),
                               hyperv=args.hyperv, cpu_features=args.cpu_features,
                               on_crash=args.on_crash,
                               hyperv_testdev=args.hyperv_testdev, acpi=args.acpi,
                               emulator_safe_cmdline=args.emulator_safe_cmdline).validated()
    except ConfigError as exc:  # what is known before KVM is asked: checked first
        raise UsageError(f"hvvmm run: {exc}") from None
    if args.crash_report:
        _check_writable(args.crash_report, "the crash report to")
    output, console_input, to_close = _console_streams(args.serial)
    console_out = _ConsoleOut(output) if output is sys.stdout.buffer else None
    config = replace(config, console=console_out or output, console_input=console_input)
    trace = None
    try:
        if args.trace:
            try:
                trace = open(args.trace, "w", buffering=1 << 16)
            except OSError as exc:
                raise UsageError(f"hvvmm run: cannot open trace file {args.trace}: "
                                 f"{exc.strerror}") from None
        boots = 0
        while True:
            boots += 1
            try:
                machine = Machine(config)
            except ConfigError as exc:
                raise UsageError(f"hvvmm run: {exc}") from None
            except ImageError as exc:
                print(f"hvvmm: {exc}", file=sys.stderr)
                return STATUS_BAD_IMAGE
            except KvmUnavailableError as exc:
                print(f"hvvmm: {exc}", file=sys.stderr)
                return STATUS_KVM_UNAVAILABLE
            with machine:
                if console_out is not None:
                    console_out.on_broken_pipe = lambda: machine.stop(signal.SIGPIPE)
                if trace is not None and machine.hyperv is not None:
                    machine.hyperv.add_listener(TraceWriter(trace))
                if args.crash_report:
                    machine.crash_listeners.append(
                        lambda report: _write_crash_report(args.crash_report, report))
                previous = {sig: signal.signal(sig, lambda signum, _frame: machine.stop(signum))
                            for sig in STOP_SIGNALS}
                try:
                    result = machine.run()
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)
                if machine.hyperv is not None:
                    log.info("Hyper-V counters: %s", machine.hyperv.counters())
                if machine.emulation_counters():
                    log.info("instructions completed for KVM's emulator: %s",
                             machine.emulation_counters())
            if result.kind is ExitKind.RESET and args.on_reset == "restart":
                log.warning("%s; booting again (boot %d)", result.message, boots + 1)
                continue
            break
    finally:
        if to_close is not None:
            to_close.close()
        if trace is not None:
            trace.close()
    if result.kind is ExitKind.STOPPED and result.signal == signal.SIGPIPE:
        pass  # the reader went away: quiet, as any tool writing to a closed pipe
    elif result.kind is ExitKind.STOPPED and result.signal:
        print(f"hvvmm: stopped by {signal.Signals(result.signal).name}", file=sys.stderr)
    elif result.kind not in (ExitKind.DEBUG_EXIT, ExitKind.POWEROFF):
        print(f"hvvmm: {result.kind.value}: {result.message}", file=sys.stderr)
    if result.kind is ExitKind.DEBUG_EXIT and args.qemu_exit_status:
        return result.qemu_status
    return result.status


def _write_crash_report(path: str, report) -> None:
    try:
        with open(path, "w") as stream:
            stream.write(report.to_json() + "\n")
    except OSError as exc:
        log.error("cannot write the crash report to %s: %s", path, exc.strerror)


def _open_kvm():
    """The KVM system fd, or None after printing why it cannot be opened."""
    from .kvm import Kvm, KvmUnavailableError

    try:
        return Kvm(kvm_device())
    except KvmUnavailableError as exc:
        print(f"hvvmm: {exc}", file=sys.stderr)
        return None


def cmd_cpuid(args) -> int:
    from .cpuid import CpuidError, build_cpuid, format_cpuid_table
    from .hv.features import HyperVConfigError, parse_hyperv_spec
    from .kvm import constants as kvmc

    try:
        config = parse_hyperv_spec(args.hyperv)
        check_smp(args.smp)
    except (HyperVConfigError, ConfigError) as exc:
        raise UsageError(f"hvvmm cpuid: {exc}") from None
    kvm = _open_kvm()
    if kvm is None:
        return STATUS_KVM_UNAVAILABLE
    with kvm:
        try:
            check_smp(args.smp, kvm.check_extension(kvmc.KVM_CAP_MAX_VCPUS))
            table = build_cpuid(kvm.supported_cpuid(), vcpu_index=0, vcpu_count=args.smp,
                                hyperv=config, cpu_features_mask=args.cpu_features)
        except (CpuidError, ConfigError) as exc:
            raise UsageError(f"hvvmm cpuid: {exc}") from None
    print(f"# Hyper-V: {config.describe()}")
    print(format_cpuid_table(table))
    return 0


def cmd_info(args) -> int:
    from .host import host_virtualization
    from .kvm import constants as kvmc

    virt = host_virtualization()
    print(f"hvvmm {__version__}")
    print(f"hardware virtualization: {virt.describe()}")
    print(f"KVM modules: {', '.join(virt.kvm_modules) or 'none found'}")
    kvm = _open_kvm()
    if kvm is None:
        return STATUS_KVM_UNAVAILABLE
    with kvm:
        print(f"KVM API version: {kvm.api_version}")
        print("capabilities hvvmm uses:")
        for name, needed in CAPABILITIES:
            value = kvm.check_extension(getattr(kvmc, name))
            state = "absent" if not value else "present" if value == 1 else f"present ({value})"
            print(f"  {name:<34} {state:<18} {needed}")
        print(instruction_completion_line(virt, kvm.check_extension(
            kvmc.KVM_CAP_EXIT_ON_EMULATION_FAILURE)))
    return 0


def instruction_completion_line(virt, exits_on_failure: int) -> str:
    """What ``hvvmm info`` says about hvvmm.x86 (completing what KVM's emulator cannot run)."""
    from .x86 import COMPLETED_INSTRUCTIONS

    if virt.ring0_on_hardware:
        state = "idle here (KVM runs guest ring 0 on hardware)"
    else:
        state = "active here: KVM emulates guest ring 0"
    exits = "" if exits_on_failure else "; KVM_CAP_EXIT_ON_EMULATION_FAILURE absent"
    return (f"instruction completion: {state}{exits}; completes "
            f"{', '.join(COMPLETED_INSTRUCTIONS)} (only on hosts whose KVM reports emulation "
            "failures)")


CAPABILITIES = (
    ("KVM_CAP_IRQCHIP", "required: in-kernel PIC/IOAPIC/LAPIC"),
    ("KVM_CAP_USER_MEMORY", "required: guest RAM"),
    ("KVM_CAP_IMMEDIATE_EXIT", "required: stopping vCPUs"),
    ("KVM_CAP_SET_TSS_ADDR", "required on Intel"),
    ("KVM_CAP_PIT2", "in-kernel PIT"),
    ("KVM_CAP_MAX_VCPUS", "limit for --smp (hvvmm's own limit: 255, the xAPIC IDs)"),
    ("KVM_CAP_NR_VCPUS", "recommended vCPU count"),
    ("KVM_CAP_SIGNAL_MSI", "SynIC interrupts"),
    ("KVM_CAP_X86_USER_SPACE_MSR", "Hyper-V synthetic MSRs in user space"),
    ("KVM_CAP_X86_MSR_FILTER", "Hyper-V synthetic MSRs in user space"),
    ("KVM_CAP_SYNC_REGS", "fewer ioctls per hypercall"),
    ("KVM_CAP_READONLY_MEM", "hypercall and TSC overlay pages; the BIOS ROM"),
    ("KVM_CAP_IOEVENTFD", "virtio notifications without an exit"),
    ("KVM_CAP_VCPU_EVENTS", "exception injection"),
    ("KVM_CAP_GET_TSC_KHZ", "reference TSC page"),
    ("KVM_CAP_TSC_DEADLINE_TIMER", "guest timers"),
    ("KVM_CAP_HYPERV", "never used: hvvmm implements Hyper-V itself"),
    ("KVM_CAP_EXIT_ON_EMULATION_FAILURE", "instruction completion without a queued #UD"),
    ("KVM_CAP_XSAVE", "x87/SSE/XSAVE state for instruction completion"),
    ("KVM_CAP_XCRS", "XCR0 for completing xsave/xrstor/xgetbv"),
)


# Options whose value may begin with '-' (``--cpu-features -cx16``); argparse alone would take
# such a value for an option.
_DASH_VALUE_OPTIONS = ("--cpu-features", "--append")


def _prepare_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--cpu-features -cx16`` as ``--cpu-features=-cx16``; a QEMU-style ``-kernel`` is refused
    with the right spelling."""
    command = parser.commands.get(argv[0]) if argv else None
    known = set(command._option_string_actions) if command is not None else set()
    prepared: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            prepared += [word, *words]
            break
        if word in _DASH_VALUE_OPTIONS:
            value = next(words, None)
            if value is not None and value.startswith("-") and value not in known:
                prepared.append(f"{word}={value}")
                continue
            prepared.append(word)
            if value is not None:
                prepared.append(value)
            continue
        name = word.split("=", 1)[0]
        if (command is not None and len(name) > 2 and name[0] == "-" and name[1] != "-"
                and f"-{name}" in known):
            raise UsageError(f"{command.prog}: unrecognized option {name}: did you mean -{name}? "
                             f"(hvvmm {argv[0]} takes --long options; `hvvmm qemu` takes QEMU's "
                             "command line)")
        prepared.append(word)
    return prepared


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["qemu"]:  # QEMU's syntax, not argparse's: see hvvmm/qemu.py
        from .qemu import main as qemu_main

        return qemu_main(argv[1:])
    if argv[:1] == ["img"]:  # its own subcommands and exit statuses: see hvvmm/img.py
        from .img import main as img_main

        return img_main(argv[1:])
    parser = build_parser()
    args = None
    try:
        args, extra = parser.parse_known_args(_prepare_argv(parser, argv))
        if args.command is None:
            parser.print_help()
            return STATUS_USAGE
        if extra:  # the command's own parser names it: "hvvmm run: unrecognized arguments"
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        _setup_logging(args)
        return {"run": cmd_run, "info": cmd_info, "cpuid": cmd_cpuid}[args.command](args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return STATUS_USAGE
    except BrokenPipeError:  # `hvvmm cpuid | head -2`: quiet, as any tool writing to a closed pipe
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C before the guest started
        print("hvvmm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # the last line of defence: one line unless --debug
        if args is not None and getattr(args, "debug", False):
            raise
        print(f"hvvmm: error: {exc or type(exc).__name__} (--debug shows where)",
              file=sys.stderr)
        return STATUS_VM_ERROR
