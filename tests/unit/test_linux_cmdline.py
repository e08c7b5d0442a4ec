"""The command line a kernel gets: on a host whose KVM emulates guest ring 0 a Linux kernel
(bzImage, PVH, ELF vmlinux) gets hvvmm's emulator-safe options after --append, said once on
stderr; a Multiboot kernel, a hardware-virtualization host or --keep-cmdline leave --append as
it is (hvvmm/machine.py kernel_append, hvvmm/boot linux_command_line)."""

import logging

import pytest

from hvvmm import boot, machine
from hvvmm.kvm import KvmCpuidEntry
from hvvmm.machine import MachineConfig, kernel_append, warn_kernel_append

# What Kvm.supported_cpuid() returns (KvmCpuidEntry, not hvvmm.cpuid.CpuidEntry): leaf 1 ECX
# with SSSE3 (bit 9) and POPCNT (bit 23).
SUPPORTED = [KvmCpuidEntry(1, 0, 0, 0, 0, (1 << 9) | (1 << 23), 0)]
ADDED = "noxsave clearcpuid=137,151"  # X86_FEATURE_SSSE3 4*32+9, X86_FEATURE_POPCNT 4*32+23


@pytest.fixture(autouse=True)
def fresh_warning(monkeypatch):
    monkeypatch.setattr(machine, "_emulator_cmdline_warned", False)


@pytest.mark.parametrize("fmt", boot.LINUX_FORMATS)
def test_linux_on_an_emulating_host_gets_the_options_after_append(fmt):
    config = MachineConfig(append="console=ttyS0")
    assert kernel_append(config, fmt, SUPPORTED, emulates_ring0=True, host_flags=()) == \
        (f"console=ttyS0 {ADDED}", ADDED)


def test_one_warning_line_names_why_and_what(caplog):
    with caplog.at_level(logging.WARNING, logger="hvvmm"):
        for _ in range(3):  # --on-reset restart builds the machine again
            warn_kernel_append(ADDED)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "emulates guest ring 0" in record.getMessage() and ADDED in record.getMessage()


def test_nothing_added_nothing_said(caplog):
    with caplog.at_level(logging.WARNING, logger="hvvmm"):
        warn_kernel_append("")
    assert not caplog.records


def test_empty_append_gets_only_the_options():
    assert kernel_append(MachineConfig(), "bzimage", SUPPORTED, emulates_ring0=True,
                         host_flags=()) == (ADDED, ADDED)


@pytest.mark.parametrize("fmt", boot.LINUX_FORMATS)
def test_hardware_virtualization_hosts_leave_append_alone(fmt):
    assert kernel_append(MachineConfig(append="console=ttyS0"), fmt, SUPPORTED,
                         emulates_ring0=False, host_flags=("ssse3",)) == ("console=ttyS0", "")


def test_multiboot_kernels_get_append_as_given():
    assert kernel_append(MachineConfig(append="a b"), "multiboot", SUPPORTED,
                         emulates_ring0=True, host_flags=()) == ("a b", "")


def test_keep_cmdline_turns_it_off():
    config = MachineConfig(append="console=ttyS0", emulator_safe_cmdline=False)
    assert kernel_append(config, "bzimage", SUPPORTED, emulates_ring0=True,
                         host_flags=()) == ("console=ttyS0", "")


def test_cli_keep_cmdline_reaches_the_config():
    from hvvmm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run"]).emulator_safe_cmdline is True
    assert parser.parse_args(["run", "--keep-cmdline"]).emulator_safe_cmdline is False


def test_linux_command_line_only_for_linux_formats():
    assert boot.linux_command_line("multiboot", "x", "noxsave") == "x"
    assert boot.linux_command_line("vmlinux", "x", "") == "x"
    assert boot.linux_command_line("vmlinux", "", "noxsave") == "noxsave"
    assert boot.linux_command_line("pvh", "x", "noxsave") == "x noxsave"
