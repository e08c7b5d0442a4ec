"""The QEMU front end's parser (hvvmm/qemu.py): every accepted form, the hv-* -> SPEC mapping, the
errors with their exact messages. No /dev/kvm needed."""

import re

import pytest

from hvvmm import qemu
from hvvmm.cli import main as cli_main
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.qemu import QemuError, parse_args

MiB, GiB = 1 << 20, 1 << 30
KUT = ["--no-reboot", "-nodefaults", "-device", "pc-testdev", "-device",
       "isa-debug-exit,iobase=0xf4,iosize=0x4", "-vnc", "none", "-serial", "stdio",
       "-machine", "accel=kvm", "-kernel", "x86/msr.flat"]
# kvm-unit-tests' x86/run today: "${qemu} --no-reboot -nodefaults $pit $pc_testdev -display none
# -serial stdio $pci_testdev -accel $ACCEL$ACCEL_PROPS -kernel", with
# pit="-global kvm-pit.lost_tick_policy=discard"; run_tests.sh adds the test's -smp and
# extra_params (hyperv_synic: -cpu host,hv_passthrough -device hyperv-testdev). $pci_testdev is
# empty: `hvvmm qemu -device ?` does not list pci-testdev.
KUT_RUN_SCRIPT = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
                  "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
                  "-display", "none", "-serial", "stdio", "-accel", "kvm",
                  "-kernel", "x86/hyperv_synic.flat", "-smp", "2",
                  "-cpu", "host,hv_passthrough", "-device", "hyperv-testdev"]


def parse(*args, kernel=True):
    return parse_args([*args, *(["-kernel", "k.elf"] if kernel else [])])


def error(*args, kernel=True) -> str:
    with pytest.raises(QemuError) as info:
        parse(*args, kernel=kernel)
    return str(info.value)


# -- the command line kvm-unit-tests' x86/run builds ------------------------------------------

def test_kvm_unit_tests_command_line():
    opts = parse_args([*KUT, "-smp", "2", "-cpu", "host,hv_relaxed,hv_vpindex", "-append",
                       "a b", "-initrd", "/tmp/env"])
    assert opts.action == "run"
    assert opts.kernel == "x86/msr.flat" and opts.append == "a b" and opts.initrd == ("/tmp/env",)
    assert opts.smp == 2 and opts.memory == 128 * MiB
    assert opts.debug_exit == (0xF4, 4)
    assert opts.no_reboot and opts.serial == "stdio"
    assert opts.hyperv == "hv-relaxed,hv-vpindex"
    assert opts.warnings == ["qemu-system-x86_64: -device pc-testdev: warning: hvvmm: pc-testdev "
                             "is not emulated; ignored"]


def test_kvm_unit_tests_run_script_command_line():
    opts = parse_args(KUT_RUN_SCRIPT)
    assert opts.action == "run" and opts.kernel == "x86/hyperv_synic.flat"
    assert opts.smp == 2 and opts.hyperv_testdev and opts.debug_exit == (0xF4, 4)
    assert opts.serial == "stdio"  # -serial stdio wins over -display none
    assert opts.pit_reinject is False  # lost_tick_policy=discard: KVM_REINJECT_CONTROL off
    assert qemu.machine_config(opts).pit_reinject is False
    # kvm-unit-tests fails a run whose stderr has lines other than warnings
    assert all("warning:" in line for line in opts.warnings), opts.warnings


@pytest.mark.parametrize("arg,reinject", [
    ("kvm-pit.lost_tick_policy=discard", False),
    ("kvm-pit.lost_tick_policy=delay", True),
    ("driver=kvm-pit,property=lost_tick_policy,value=discard", False),
])
def test_global_pit_policy_is_honoured(arg, reinject):
    opts = parse("-global", arg)
    assert opts.pit_reinject is reinject and opts.warnings == []


def test_global_properties_that_change_nothing_are_accepted():
    opts = parse("-global", "PIIX4_PM.disable_s3=1", "-global", "ICH9-LPC.disable_s4=on",
                 "-global", "kvm-apic.vapic=false")
    assert opts.warnings == []


def test_global_properties_hvvmm_ignores_warn():
    opts = parse("-global", "kvm-apic.vapic=on", "-global", "mc146818rtc.lost_tick_policy=slew")
    assert len(opts.warnings) == 2
    assert all("warning:" in w and "ignored" in w for w in opts.warnings), opts.warnings


@pytest.mark.parametrize("arg,message", [
    ("kvm-pit.lost_tick_policy=slew", "cannot be honoured"),
    ("PIIX4_PM.disable_s3=0", "no ACPI S3/S4 sleep states"),
    ("e1000.mac=52:54:00:12:34:56", "-global e1000.mac is not supported"),
    ("nodot=1", "Invalid format"),
    ("driver=kvm-pit,property=lost_tick_policy", "Parameter 'value' is missing"),
])
def test_global_properties_that_cannot_be_honoured_are_refused(arg, message):
    text = error("-global", arg)
    assert text.startswith(f"qemu-system-x86_64: -global {arg}: ") and message in text, text


def test_defaults():
    opts = parse()
    assert (opts.smp, opts.memory, opts.hyperv, opts.cpu_features, opts.debug_exit,
            opts.no_reboot, opts.serial, opts.append, opts.initrd, opts.panic_action) == (
        1, 128 * MiB, "none", None, None, False, "stdio", None, (), "shutdown")


@pytest.mark.parametrize("single", ["-kernel", "-append", "-initrd", "-smp", "-m", "-cpu",
                                    "-serial", "-machine", "-name", "-vnc", "-monitor",
                                    "-display", "-accel", "-action", "-device"])
def test_double_dash_is_the_same_option(single):
    value = {"-kernel": "k.elf", "-append": "x", "-initrd": "m", "-smp": "2", "-m": "64",
             "-cpu": "host,hv-relaxed", "-serial": "null", "-machine": "q35", "-name": "t",
             "-vnc": "none", "-monitor": "none", "-display": "none", "-accel": "kvm",
             "-action": "reboot=shutdown", "-device": "isa-debug-exit"}[single]
    one, two = parse(single, value), parse("-" + single, value)
    assert one == two


@pytest.mark.parametrize("flag", ["no-reboot", "nodefaults", "nographic", "enable-kvm",
                                  "no-hpet"])
def test_flags_both_spellings(flag):
    assert parse("-" + flag) == parse("--" + flag)


def test_no_reboot_forms():
    assert parse("-no-reboot").no_reboot
    assert parse("--no-reboot").no_reboot
    assert parse("-action", "reboot=shutdown").no_reboot
    assert not parse("-no-reboot", "-action", "reboot=reset").no_reboot


def test_action_panic():
    assert parse("-action", "panic=exit-failure").panic_action == "exit-failure"
    assert parse("-action", "panic=none,shutdown=poweroff").panic_action == "none"
    assert error("-action", "panic=pause").startswith(
        "qemu-system-x86_64: -action panic=pause: hvvmm: panic=pause is not supported")
    assert error("-action", "reboot=later") == (
        "qemu-system-x86_64: -action reboot=later: Parameter 'reboot' does not accept value "
        "'later'")
    assert error("-action", "explode=now") == (
        "qemu-system-x86_64: -action explode=now: Invalid parameter 'explode'")


# -- syntax errors: QEMU's messages ------------------------------------------------------------

def test_unknown_option():
    assert error("-foo") == "qemu-system-x86_64: -foo: invalid option"
    assert error("--foo") == "qemu-system-x86_64: --foo: invalid option"


def test_no_equals_form_as_qemu():
    assert error("-kernel=k.elf", kernel=False) == (
        "qemu-system-x86_64: -kernel=k.elf: invalid option")


def test_missing_argument():
    assert error("-kernel", kernel=False) == "qemu-system-x86_64: -kernel: requires an argument"
    assert error("-m", kernel=False) == "qemu-system-x86_64: -m: requires an argument"


def test_known_but_unsupported_qemu_option():
    assert error("-chardev", "file,id=x,path=y") == (
        "qemu-system-x86_64: -chardev: hvvmm: -chardev is not supported (see qemu-system-x86_64 "
        "-help for the options hvvmm accepts)")


def test_bare_word_is_a_disk_as_hda():
    from hvvmm.devices.virtio_blk import DriveSpec

    opts = parse("disk.img", kernel=False)
    assert opts.drives == [DriveSpec("disk.img")] and opts.kernel is None
    assert qemu.machine_config(opts).drives == (DriveSpec("disk.img"),)


def test_drive_forms():
    from hvvmm.devices.virtio_blk import DriveSpec

    opts = parse("-drive", "file=a.img,if=virtio,format=raw", "-hda", "b.img",
                 "-drive", "file=c.vhd,if=none,id=d0,format=vpc,readonly=on,cache=none",
                 "-device", "virtio-blk-pci,drive=d0,bootindex=1", "-bios", "bios.bin",
                 "-boot", "order=c,menu=off", kernel=False)
    assert opts.drives == [DriveSpec("a.img", "raw"), DriveSpec("b.img"),
                           DriveSpec("c.vhd", "vhd", True, "none")]
    assert opts.bios == "bios.bin" and opts.warnings == []
    config = qemu.machine_config(opts)
    assert config.bios == "bios.bin" and len(config.drives) == 3


def test_default_drive_interface_is_attached_as_virtio_with_a_warning():
    opts = parse("-drive", "file=a.img", kernel=False)
    assert len(opts.drives) == 1
    assert opts.warnings == ["qemu-system-x86_64: -drive file=a.img: warning: hvvmm: there is no "
                             "IDE controller; the disk is attached as virtio-blk"]


@pytest.mark.parametrize("args,message", [
    (("-drive", "file=a,format=qcow2"), "image format 'qcow2' is not supported"),
    (("-drive", "file=a,if=scsi"), "if=scsi is not supported"),
    (("-drive", "file=a,snapshot=on"), "'snapshot' is not supported"),
    (("-drive", "if=virtio"), "without file="),
    (("-drive", "file=a,if=none"), "needs id="),
    (("-drive", "file=a,if=virtio,readonly=maybe"), "'readonly' expects"),
    (("-drive", "file=a,if=virtio,cache=unsafe"), "cache=unsafe is not supported"),
    (("-device", "virtio-blk-pci,drive=nope"), "can't find value 'nope'"),
    (("-device", "virtio-blk-pci"), "Device needs media"),
    (("-boot", "order=x"), "Invalid boot device 'x'"),
    (("-boot", "bogus=1"), "Invalid parameter 'bogus'"),
])
def test_drive_errors(args, message):
    assert message in error(*args)


def test_kernel_required():
    assert error(kernel=False).startswith("qemu-system-x86_64: hvvmm: nothing to boot")
    assert error("-append", "x", kernel=False) == (
        "qemu-system-x86_64: -append only allowed with -kernel option")
    assert error("-initrd", "m", kernel=False) == (
        "qemu-system-x86_64: -initrd only allowed with -kernel option")


def test_help_and_version_answer_at_once():
    for word in ("-h", "-help", "--help"):
        assert parse_args([word, "-foo"]).action == "help"
    for word in ("-version", "--version"):
        assert parse_args([word]).action == "version"
    # Like QEMU, options before it are still checked.
    with pytest.raises(QemuError):
        parse_args(["-foo", "-h"])


# -- -initrd: Multiboot modules ----------------------------------------------------------------

@pytest.mark.parametrize("text,modules", [
    ("m1", ("m1",)),
    ("m1 arg1 arg2,m2", ("m1 arg1 arg2", "m2")),
    ("m1 a,,b", ("m1 a,b",)),
    ("m1 a,,,m2", ("m1 a,", "m2")),
    ("m1,,,,x", ("m1,,x",)),
    ("m1,", ("m1", "")),
])
def test_initrd_modules(text, modules):
    assert parse("-initrd", text).initrd == modules



def test_initrd_for_a_linux_kernel_is_one_file(tmp_path):
    # QEMU's Linux loader takes -initrd whole; its Multiboot loader splits modules at commas.
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(bytes(0x202) + b"HdrS" + bytes(0x400))
    opts = parse_args(["-kernel", str(bzimage), "-initrd", "a,b c"])
    assert qemu.boot_initrd(opts) == ("a,b c",)
    assert qemu.machine_config(opts).initrd == ("a,b c",)
    multiboot = parse_args(["-kernel", str(tmp_path / "missing.elf"), "-initrd", "a,b c"])
    assert qemu.boot_initrd(multiboot) == ("a", "b c")

def test_split_commas():
    assert qemu.split_commas("a,,b,c") == ["a,b", "c"]
    assert qemu.split_commas("") == [""]


# -- -smp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cpus", [
    ("4", 4), ("cpus=4", 4), ("4,sockets=1,cores=4,threads=1", 4), ("cores=3", 3),
    ("2,maxcpus=2", 2), ("0x2", 2), ("8,dies=1,clusters=1", 8), ("255", 255),
])
def test_smp(text, cpus):
    assert parse("-smp", text).smp == cpus


def test_smp_options_merge():
    assert parse("-smp", "2", "-smp", "cores=2").smp == 2


@pytest.mark.parametrize("text,message", [
    ("0", "Invalid CPU topology: CPU topology parameters must be greater than zero"),
    ("2,sockets=2", "hvvmm: sockets=2 is not supported: hvvmm presents one socket of "
                    "single-thread cores (use -smp N or cores=N)"),
    ("2,threads=2", "hvvmm: threads=2 is not supported"),
    ("4,cores=2", "hvvmm: cores (2) must equal cpus (4)"),
    ("2,maxcpus=4", "hvvmm: maxcpus (4) above cpus (2) needs CPU hotplug"),
    ("4,maxcpus=2", "maxcpus must be equal to or greater than smp"),
    ("300", "Invalid SMP CPUs 300. The max CPUs supported by machine 'pc' is 255"),
    ("many", "Parameter 'cpus' expects a number"),
    ("2,frobs=1", "Invalid parameter 'frobs'"),
])
def test_smp_errors(text, message):
    assert error("-smp", text).startswith(f"qemu-system-x86_64: -smp {text}: {message}")


# -- -m ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,size", [
    ("256", 256 * MiB), ("256M", 256 * MiB), ("256m", 256 * MiB), ("1G", GiB), ("1g", GiB),
    ("1.5G", 1536 * MiB), ("size=64M", 64 * MiB), ("size=64", 64 * MiB), ("6000K", 6000 << 10),
    ("6000001K", 6000008 << 10), ("8388608B", 8 * MiB), ("0.25G", 256 * MiB),
])
def test_memory(text, size):
    assert parse("-m", text).memory == size


@pytest.mark.parametrize("text,message", [
    ("lots", "Parameter 'size' expects a non-negative number below 2^64"),
    ("1.5", "Parameter 'size' expects a non-negative number below 2^64"),
    ("-5", "Parameter 'size' expects a non-negative number below 2^64"),
    ("size=", "missing 'size' option value"),
    ("1M", "hvvmm: 1M of RAM is below hvvmm's minimum of 4 MiB"),
    ("256M,slots=2,maxmem=1G", "hvvmm: slots is not supported: hvvmm has no memory hotplug"),
    ("256M,colour=blue", "Invalid parameter 'colour'"),
])
def test_memory_errors(text, message):
    assert error("-m", text) == f"qemu-system-x86_64: -m {text}: {message}"


# -- -cpu: Hyper-V flags -> hvvmm's --hyperv SPEC ------------------------------------------------

@pytest.mark.parametrize("text,spec", [
    ("host", "none"),
    ("host,hv_relaxed,hv-vpindex,hv_spinlocks=0x1fff", "hv-relaxed,hv-vpindex,hv-spinlocks=0x1fff"),
    ("host,+hv-relaxed,+hv_vpindex", "hv-relaxed,hv-vpindex"),
    ("host,hv-relaxed=on,hv-time=off,hv-vpindex=yes", "hv-relaxed,hv-vpindex"),
    ("host,hv-relaxed,-hv-relaxed", "none"),
    ("host,hv-relaxed,hv-relaxed=off,hv-vpindex", "hv-vpindex"),
    ("host,HV_Time,hv_vpindex", "hv-time,hv-vpindex"),
    ("host,hv-passthrough", "hv-passthrough"),
    ("host,hv_passthrough,hv-reset=off", "hv-passthrough,hv-reset=off"),
    ("host,hv-spinlocks=0xfff,hv-spinlocks=0x2000", "hv-spinlocks=0x2000"),
    ("host,hv-enforce-cpuid,hv-vpindex", "hv-vpindex"),
    ("host,hv-vpindex,hv-vendor-id=Microsoft Hv", "hv-vpindex,hv-vendor-id=Microsoft Hv"),
    ("host,hv-extended-hypercalls,hv-vpindex", "hv-ext-hypercalls,hv-vpindex"),
])
def test_hyperv_flags_to_spec(text, spec):
    opts = parse("-cpu", text)
    assert opts.hyperv == spec
    parse_hyperv_spec(spec)  # and hvvmm takes it


def test_no_hv_flags_means_no_hyperv_as_qemu():
    assert parse_hyperv_spec(parse("-cpu", "host").hyperv).enabled is False
    assert parse_hyperv_spec(parse().hyperv).enabled is False
    config = parse_hyperv_spec(parse("-cpu", "host,hv-passthrough,hv-reset=off").hyperv)
    assert config.enabled and "hv-reset" not in config.features and "hv-vpindex" in config.features


def test_hv_values_alone_leave_hyperv_off_with_a_warning():
    opts = parse("-cpu", "host,hv-vendor-id=KVMtest")
    assert opts.hyperv == "none"
    assert opts.warnings == ["qemu-system-x86_64: -cpu host,hv-vendor-id=KVMtest: warning: hvvmm: "
                             "hv-vendor-id without a Hyper-V feature leaves Hyper-V off (as in "
                             "QEMU)"]


def test_cpu_features():
    opts = parse("-cpu", "host,+x2apic,-la57,tsc-deadline=on,avx=off,check,enforce")
    assert opts.cpu_features == "+x2apic,-la57,+tsc-deadline,-avx"
    assert opts.hyperv == "none"
    assert parse("-cpu", "host,hv-time,-xsave").cpu_features == "-xsave"


@pytest.mark.parametrize("model", ["max", "kvm64", "qemu64"])
def test_cpu_models_run_as_host_with_a_warning(model):
    opts = parse("-cpu", f"{model},hv_time")
    assert opts.cpu_model == model and opts.hyperv == "hv-time"
    assert opts.warnings == [f"qemu-system-x86_64: -cpu {model},hv_time: warning: hvvmm: CPU "
                             f"model '{model}' runs as 'host': hvvmm gives the guest the host "
                             "CPU (less what -cpu hides)"]
    assert parse("-cpu", "host").warnings == []


@pytest.mark.parametrize("text,message", [
    ("Skylake-Client", "qemu-system-x86_64: unable to find CPU model 'Skylake-Client'"),
    ("host,hv-bogus", "qemu-system-x86_64: -cpu host,hv-bogus: hvvmm: unknown Hyper-V option "
                      "'hv-bogus'"),
    ("host,hv-relaxed=maybe", "qemu-system-x86_64: -cpu host,hv-relaxed=maybe: hvvmm: "
                              "hv-relaxed takes on or off, not 'maybe'"),
    ("host,hv-spinlocks=0x10", "qemu-system-x86_64: -cpu host,hv-spinlocks=0x10: hvvmm: "
                               "hv-spinlocks=0x10 is out of range"),
    ("host,hv-enforce-cpuid=off", "qemu-system-x86_64: -cpu host,hv-enforce-cpuid=off: hvvmm: "
                                  "hv-enforce-cpuid=off is not supported"),
    ("host,level=7", "qemu-system-x86_64: -cpu host,level=7: hvvmm: CPU property 'level=7' is "
                     "not supported"),
    ("host,+frobnicator", "qemu-system-x86_64: -cpu host,+frobnicator: hvvmm: unknown CPU "
                          "feature 'frobnicator'"),
])
def test_cpu_errors(text, message):
    assert error("-cpu", text).startswith(message)


def test_cpu_help():
    assert parse_args(["-cpu", "help"]).action == "cpu-help"
    assert parse_args(["-cpu", "?"]).action == "cpu-help"
    assert "x86 host" in qemu.cpu_help_text()


# -- -device -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ports", [
    ("isa-debug-exit,iobase=0xf4,iosize=0x4", (0xF4, 4)),
    ("isa-debug-exit,iobase=0xf4,iosize=0x04", (0xF4, 4)),
    ("isa-debug-exit", (0x501, 2)),  # QEMU's defaults
    ("isa-debug-exit,iobase=244,iosize=010", (244, 8)),  # decimal and octal, as QEMU
    ("isa-debug-exit,id=dbg,iobase=0x501", (0x501, 2)),
    ("driver=isa-debug-exit,iobase=0xf4", (0xF4, 2)),
])
def test_isa_debug_exit(text, ports):
    assert parse("-device", text).debug_exit == ports


def test_no_isa_debug_exit_means_no_device():
    assert parse().debug_exit is None
    assert parse("-device", "pc-testdev").debug_exit is None


@pytest.mark.parametrize("text,message", [
    ("isa-debug-exit,iobase=0xf4,colour=red", "Property 'isa-debug-exit.colour' not found"),
    ("isa-debug-exit,iobase=port", "Parameter 'iobase' expects uint32_t"),
    ("isa-debug-exit,iosize=0", "hvvmm: isa-debug-exit ports 0x501+0x0 are not a range"),
    ("isa-debug-exit,iobase=0xffff,iosize=2", "hvvmm: isa-debug-exit ports 0xffff+0x2 are not"),
    ("frobnicator", "'frobnicator' is not a valid device model name"),
    ("virtio-net-pci", "'virtio-net-pci' is not a valid device model name"),
])
def test_device_errors(text, message):
    assert error("-device", text).startswith(f"qemu-system-x86_64: -device {text}: {message}")


def test_second_isa_debug_exit_refused():
    assert error("-device", "isa-debug-exit", "-device", "isa-debug-exit,iobase=0xf4") == (
        "qemu-system-x86_64: -device isa-debug-exit,iobase=0xf4: hvvmm: only one isa-debug-exit "
        "device is supported")


@pytest.mark.parametrize("device", ["pc-testdev", "pci-testdev"])
def test_testdevs_ignored_with_a_warning(device):
    opts = parse("-device", device)
    assert opts.warnings == [f"qemu-system-x86_64: -device {device}: warning: hvvmm: {device} is "
                             "not emulated; ignored"]


def test_hyperv_testdev():
    assert not parse().hyperv_testdev
    assert 'name "hyperv-testdev", bus ISA' in qemu.device_help_text()
    assert error("-device", "hyperv-testdev", "-cpu", "host,hv-vpindex") == (
        "qemu-system-x86_64: -device hyperv-testdev: hvvmm: hyperv-testdev needs the guest to "
        "have hv-synic (-cpu host,hv-vpindex,hv-synic or -cpu host,hv-passthrough)")
    opts = parse("-cpu", "host,hv_passthrough", "-device", "hyperv-testdev")
    assert opts.hyperv_testdev
    assert qemu.machine_config(opts).hyperv_testdev


@pytest.mark.parametrize("text", ["?", "help"])
def test_device_help(text):
    assert parse_args(["-device", text]).action == "device-help"


def test_device_help_format():
    assert qemu.device_help_text() == (
        "Storage devices:\n"
        'name "virtio-blk-pci", bus PCI\n'
        "\n"
        "Misc devices:\n"
        'name "hyperv-testdev", bus ISA\n'
        'name "isa-debug-exit", bus ISA\n'
        'name "pc-testdev", bus ISA, desc "accepted and ignored: hvvmm does not emulate it"\n')


def test_device_properties_help():
    opts = parse_args(["-device", "isa-debug-exit,help"])
    assert (opts.action, opts.help_subject) == ("device-props", "isa-debug-exit")
    text = qemu.device_props_text("isa-debug-exit")
    assert text.startswith("isa-debug-exit options:\n  iobase=<uint32>")
    assert qemu.device_props_text("pc-testdev") == "There are no options for pc-testdev.\n"


# -- serial and display: QEMU's defaults ---------------------------------------------------------

@pytest.mark.parametrize("args,serial", [
    ([], "stdio"),
    (["-serial", "stdio"], "stdio"),
    (["-serial", "mon:stdio"], "stdio"),
    (["-serial", "none"], "none"),
    (["-serial", "null"], "none"),
    (["-serial", "file:/tmp/out.txt"], "file:/tmp/out.txt"),
    (["-serial", "none", "-serial", "stdio"], "stdio"),  # "none" does not use up COM1
    (["-nographic"], "stdio"),
    (["-nodefaults"], "none"),
    (["-nodefaults", "-nographic"], "none"),  # QEMU: -nodefaults drops the default serial
    (["-nodefaults", "-serial", "stdio"], "stdio"),
    (["-display", "none"], "none"),
    (["-display", "none", "-serial", "stdio"], "stdio"),
])
def test_serial(args, serial):
    assert parse(*args).serial == serial


@pytest.mark.parametrize("args,message", [
    (["-serial", "tcp::4444"], "qemu-system-x86_64: -serial tcp::4444: hvvmm: -serial takes "
                               "stdio, mon:stdio, file:PATH, null or none"),
    (["-serial", "file:"], "qemu-system-x86_64: -serial file:: hvvmm: -serial takes"),
    (["-serial", "stdio", "-serial", "null"], "qemu-system-x86_64: -serial null: hvvmm: the "
                                              "machine has one serial port (COM1)"),
    (["-display", "gtk"], "qemu-system-x86_64: -display gtk: hvvmm: there is no display"),
    (["-vnc", ":0"], "qemu-system-x86_64: -vnc :0: hvvmm: there is no VNC server"),
    (["-monitor", "stdio"], "qemu-system-x86_64: -monitor stdio: hvvmm: there is no monitor"),
])
def test_serial_display_errors(args, message):
    assert error(*args).startswith(message)


def test_accepted_and_ignored():
    assert parse("-name", "guest=t,debug-threads=on", "-vnc", "none", "-monitor", "none",
                 "-display", "none", "-no-hpet").action == "run"


# -- machine and accelerator ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["-machine", "accel=kvm"], ["-machine", "q35,accel=kvm"], ["-machine", "pc"],
    ["-M", "q35"], ["-machine", "type=pc-q35-8.2,accel=kvm:tcg"], ["-machine", "pc-i440fx-7.1"],
    ["-machine", "q35,kernel_irqchip=on,usb=off,vmport=off,smm=off,dump-guest-core=off"],
    ["-accel", "kvm"], ["-accel", "kvm,kernel-irqchip=on"], ["-enable-kvm"], ["--enable-kvm"],
])
def test_machine_and_accel_accepted(args):
    assert parse(*args).action == "run"


@pytest.mark.parametrize("args,message", [
    (["-machine", "accel=tcg"], "qemu-system-x86_64: -machine accel=tcg: hvvmm: accelerator "
                                "'tcg' is not available: hvvmm runs guests only under KVM "
                                "(accel=kvm)"),
    (["-machine", "q35,accel=tcg:kvm"], "qemu-system-x86_64: -machine q35,accel=tcg:kvm: hvvmm: "
                                        "accelerator 'tcg' is not available"),
    (["-accel", "tcg"], "qemu-system-x86_64: -accel tcg: hvvmm: accelerator 'tcg' is not "
                        "available"),
    (["-accel", "warp"], "qemu-system-x86_64: -accel warp: invalid accelerator warp"),
    (["-machine", "kernel_irqchip=split"], "qemu-system-x86_64: -machine kernel_irqchip=split: "
                                           "hvvmm: kernel_irqchip=split is not supported"),
    (["-machine", "microvm"], 'qemu-system-x86_64: -machine microvm: unsupported machine type '
                              '"microvm"'),
    (["-machine", "q35,usb=on"], "qemu-system-x86_64: -machine q35,usb=on: hvvmm: usb=on is not "
                                 "supported: the machine has no USB"),
    (["-machine", "q35,frob=1"], "qemu-system-x86_64: -machine q35,frob=1: Property "
                                 "'q35-machine.frob' not found"),
])
def test_machine_and_accel_errors(args, message):
    assert error(*args).startswith(message)


@pytest.mark.parametrize("args,action", [
    (["-machine", "help"], "machine-help"), (["-accel", "help"], "accel-help"),
    (["-display", "help"], "display-help"),
])
def test_other_help_options(args, action):
    assert parse_args(args).action == action


# -- to MachineConfig and the outputs ------------------------------------------------------------

def test_machine_config_mapping():
    opts = parse_args([*KUT, "-smp", "cpus=3", "-m", "1G", "-append", "x=1",
                       "-initrd", "a 1,b", "-cpu", "max,hv-vpindex,-avx", "-action",
                       "panic=none"])
    config = qemu.machine_config(opts)
    assert (config.kernel, config.initrd, config.append, config.smp, config.memory) == (
        "x86/msr.flat", ("a 1", "b"), "x=1", 3, GiB)
    assert (config.hyperv, config.cpu_features, config.debug_exit, config.timeout,
            config.on_crash) == ("hv-vpindex", "-avx", (0xF4, 4), None, "continue")
    assert qemu.machine_config(parse()).debug_exit is None
    assert qemu.machine_config(parse()).hyperv == "none"
    assert qemu.machine_config(parse()).on_crash == "stop"


def test_missing_kernel_message(tmp_path):
    missing = tmp_path / "nope.flat"
    with pytest.raises(QemuError) as info:
        qemu.run(parse_args(["-kernel", str(missing)]))
    assert str(info.value) == (
        f"qemu: could not open kernel file '{missing}': No such file or directory")


def test_missing_module_message(tmp_path):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\0")
    with pytest.raises(QemuError) as info:
        qemu.run(parse_args(["-kernel", str(kernel), "-initrd", f"{kernel} x,{tmp_path}/m2 y"]))
    assert str(info.value) == f"Failed to open file '{tmp_path}/m2'"


def test_help_text_is_what_harnesses_parse():
    text = qemu.help_text()
    first = text.splitlines()[0]
    # kvm-unit-tests: `$qemu --help | grep -q QEMU`, then `-h | head -1` split on ' ' and '.'.
    assert "QEMU" in text
    fields = re.split(r"[ .]", first)
    assert fields[:3] == ["QEMU", "emulator", "version"] and all(f.isdigit() for f in fields[3:6])
    assert "hvvmm" in first
    for option in ("-kernel", "-initrd", "-append", "-smp", "-m ", "-cpu", "-device",
                   "-serial", "-no-reboot", "-nodefaults", "-nographic", "-machine", "-accel"):
        assert option in text


def test_main_outputs(capsys):
    assert qemu.main(["-version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"QEMU emulator version {qemu.QEMU_VERSION} (hvvmm ")
    assert "not QEMU" in out
    assert qemu.main(["-device", "?"]) == 0
    assert 'name "isa-debug-exit", bus ISA' in capsys.readouterr().out
    assert qemu.main(["-foo"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "qemu-system-x86_64: -foo: invalid option\n")


def test_hvvmm_qemu_subcommand(capsys):
    assert cli_main(["qemu", "-version"]) == 0
    assert capsys.readouterr().out.startswith("QEMU emulator version")
    assert cli_main(["qemu", "--help"]) == 0
    assert "usage: qemu-system-x86_64 [options]" in capsys.readouterr().out
    assert cli_main(["qemu", "-kernel"]) == 1
    assert capsys.readouterr().err == "qemu-system-x86_64: -kernel: requires an argument\n"


def test_missing_bios_and_disk_have_qemu_messages(tmp_path):
    opts = qemu.parse_args(["-hda", str(tmp_path / "none.img"), "-bios", str(tmp_path / "x")])
    with pytest.raises(QemuError) as info:
        qemu._check_files(opts)
    assert str(info.value) == f"qemu: could not load PC BIOS '{tmp_path / 'x'}'"
    opts = qemu.parse_args(["-hda", str(tmp_path / "none.img")])
    with pytest.raises(QemuError) as info:
        qemu._check_files(opts)
    assert str(info.value) == (f"qemu-system-x86_64: -hda {tmp_path / 'none.img'}: Could not open "
                               f"'{tmp_path / 'none.img'}': No such file or directory")
