"""MachineConfig as a library user writes it, and the limits every front end shares (no /dev/kvm
needed)."""

import pytest

from hvvmm import MachineConfig
from hvvmm.cli import main as cli_main
from hvvmm.machine import (ConfigError, check_smp, check_timeout, host_memory_limit,
                           vcpu_limit)
from hvvmm.sizes import format_size, parse_size

MiB, GiB = 1 << 20, 1 << 30


@pytest.mark.parametrize("text,size", [("512M", 512 * MiB), ("1G", GiB), ("2048K", 2 * MiB),
                                       ("256", 256 * MiB), ("1GiB", GiB), ("1T", 1 << 40)])
def test_memory_takes_the_command_lines_sizes(text, size):
    assert parse_size(text) == size
    assert MachineConfig(memory=text).memory == size


def test_memory_in_bytes_still_works():
    assert MachineConfig(memory=64 * MiB).memory == 64 * MiB


@pytest.mark.parametrize("memory", ["lots", "1.5G", None, 1.5])
def test_bad_memory_says_what_is_accepted(memory):
    with pytest.raises(ConfigError, match="size|memory must be"):
        MachineConfig(memory=memory)


def test_memory_beyond_the_host_is_refused_before_anything_starts():
    too_much = (host_memory_limit() // GiB + 1) * GiB
    with pytest.raises(ConfigError, match="more than this host's RAM and swap"):
        MachineConfig(memory=too_much).validated()


def test_one_vcpu_limit_with_its_reason():
    assert vcpu_limit() == (255, "hvvmm supports at most 255: xAPIC IDs 0-254, 255 is the "
                                 "broadcast ID")
    assert vcpu_limit(1024)[0] == 255  # KVM_CAP_MAX_VCPUS above 255: hvvmm's limit holds
    limit, why = vcpu_limit(16)
    assert limit == 16 and "KVM_CAP_MAX_VCPUS" in why
    check_smp(255)
    for bad in (0, -1, 256, True, "2"):
        with pytest.raises(ConfigError):
            check_smp(bad)
    with pytest.raises(ConfigError,
                       match="--smp 17 is too many: this host's KVM allows at most 16"):
        check_smp(17, 16)


@pytest.mark.parametrize("timeout", [float("inf"), 1e12, float("nan"), 0, -1])
def test_timeouts_a_wait_cannot_take_are_refused(timeout):
    with pytest.raises(ConfigError):
        check_timeout(timeout)
    with pytest.raises(ConfigError):
        MachineConfig(timeout=timeout).validated()


def test_format_size():
    assert format_size(1 << 40) == "1 TiB" and format_size(1536 * MiB) == "1.5 GiB"


# -- the command line before anything starts (no KVM is opened for these) -----------------------

@pytest.mark.parametrize("argv,message", [
    (["run", "-kernel", "x.elf"], "hvvmm run: unrecognized option -kernel: did you mean --kernel?"),
    (["run", "-memory=2G"], "did you mean --memory?"),
    (["cpuid", "-hyperv", "none"], "hvvmm cpuid: unrecognized option -hyperv: did you mean "
                                   "--hyperv?"),
    (["run", "--bogus"], "hvvmm run: unrecognized arguments: --bogus"),
    (["run", "--cpu-features"], "expected one argument"),
])
def test_usage_errors_name_the_command(capsys, argv, message):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cpu_features_value_may_follow_a_space(monkeypatch):
    from hvvmm import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_cpuid", lambda args: seen.setdefault("args", args) and 0)
    assert cli_main(["cpuid", "--cpu-features", "-cx16,-xsave"]) == 0
    assert seen["args"].cpu_features == "-cx16,-xsave"
    seen.clear()
    monkeypatch.setattr(cli, "cmd_run", lambda args: seen.setdefault("args", args) and 0)
    assert cli_main(["run", "--append", "-v quiet", "--cpu-features", "-cx16", "--smp", "2"]) == 0
    args = seen["args"]
    assert (args.append, args.cpu_features, args.smp) == ("-v quiet", "-cx16", 2)


@pytest.mark.parametrize("extra", [{"kernel": "vmlinuz"}, {"initrd": ("initrd.img",)},
                                   {"append": "console=ttyS0"}])
def test_a_bios_boot_refuses_what_it_would_ignore(extra):
    # The firmware is started at the reset vector; a kernel, initrd or command line given
    # with it would silently go unused.
    with pytest.raises(ConfigError, match="BIOS boot takes no kernel"):
        MachineConfig(bios="bios.bin", **extra).validated()


def test_disks_without_a_kernel_boot_the_default_bios():
    from hvvmm.devices.virtio_blk import DriveSpec

    assert MachineConfig(drives=(DriveSpec("disk.img"),)).firmware is not None
    assert MachineConfig(drives=(DriveSpec("disk.img"),), kernel="vmlinuz").firmware is None
    assert MachineConfig(bios="bios.bin").firmware == "bios.bin"


def test_more_disks_than_pci_slots_are_refused_before_anything_starts():
    from hvvmm.devices.virtio_blk import DriveSpec
    from hvvmm.machine import MAX_DRIVES

    assert MAX_DRIVES == 30
    drives = tuple(DriveSpec(f"d{i}.img") for i in range(MAX_DRIVES + 1))
    with pytest.raises(ConfigError, match="31 disks are too many"):
        MachineConfig(drives=drives).validated()


def test_host_memory_limit_is_ram_plus_swap_as_psutil_counts_them():
    psutil = pytest.importorskip("psutil", reason="psutil gives the reference figures")
    assert host_memory_limit() == psutil.virtual_memory().total + psutil.swap_memory().total


def test_host_memory_limit_reads_kib_and_allows_no_swap_line(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2048 kB\nMemFree:          100 kB\n")
    assert host_memory_limit(str(meminfo)) == 2048 * 1024
    meminfo.write_text("MemTotal:        2048 kB\nSwapTotal:       1024 kB\n")
    assert host_memory_limit(str(meminfo)) == 3072 * 1024
