"""``hvvmm qemu``: QEMU command lines as kvm-unit-tests and other harnesses write them, run on tiny
guests, checked for QEMU's exit statuses and messages."""

import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from procutil import read_line

pytestmark = pytest.mark.guest

QEMU = [sys.executable, "-m", "hvvmm", "qemu"]
# kvm-unit-tests' x86/run: "${qemu} --no-reboot -nodefaults $pc_testdev -vnc none -serial stdio
# $pci_testdev -machine accel=$ACCEL -kernel"
KUT = ["--no-reboot", "-nodefaults", "-device", "pc-testdev", "-device",
       "isa-debug-exit,iobase=0xf4,iosize=0x4", "-vnc", "none", "-serial", "stdio",
       "-machine", "accel=kvm", "-kernel"]
# kvm-unit-tests' x86/run today (scripts/arch-run.bash's run_test gets it): "${qemu} --no-reboot
# -nodefaults $pit $pc_testdev -display none -serial stdio $pci_testdev -accel $ACCEL -kernel",
# pit="-global kvm-pit.lost_tick_policy=discard"; $pci_testdev is empty for hvvmm (its device
# list has no pci-testdev).
KUT_RUN_SCRIPT = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
                  "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
                  "-display", "none", "-serial", "stdio", "-accel", "kvm", "-kernel"]

# A guest that resets through the i8042 (or triple-faults with "triple"), for -no-reboot.
RESET_GUEST = r"""
#include "guest.h"

int main(void)
{
    puts("booted");
    if (cmdline_has("triple")) {
        struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idt = { 0, 0 };
        asm volatile("lidt %0; ud2" :: "m"(idt));
    }
    outb(0x64, 0xFE);   /* i8042: pulse the CPU reset line */
    for (;;)
        pause();
}
"""


def qemu(*args, timeout=30):
    return subprocess.run([*QEMU, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def only_warnings(stderr: str) -> bool:
    """kvm-unit-tests' run_qemu: status 1 is a pass only if every stderr line is a warning."""
    return all("warning" in line.lower() for line in stderr.splitlines())


@pytest.fixture(scope="module")
def reset_guest(hvvmm_build_guest):
    return hvvmm_build_guest(source=RESET_GUEST, name="qemu_reset")


@pytest.fixture(scope="module")
def default_guest():
    from hvvmm.guestbuild import default_guest_path

    return str(default_guest_path())


@pytest.mark.parametrize("code", [0, 5])
def test_kvm_unit_tests_command_line_status(guest_image, code):
    proc = qemu(*KUT, str(guest_image("exit_code")), "-smp", "1", "-append", f"code={code}")
    assert proc.returncode == (code << 1) | 1, proc.stderr
    assert f"exiting with code {code}" in proc.stdout
    assert only_warnings(proc.stderr), proc.stderr  # the pc-testdev warning only
    assert "pc-testdev" in proc.stderr


def test_kvm_unit_tests_run_script_command_line(guest_image):
    proc = qemu(*KUT_RUN_SCRIPT, str(guest_image("smp")), "-smp", "2")
    assert proc.returncode == 1, proc.stderr  # debug-exit 0: QEMU's (0 << 1) | 1
    assert "PASS: 2 of 2 vCPUs online" in proc.stdout
    assert only_warnings(proc.stderr), proc.stderr


def test_options_reach_the_guest(default_guest, guest_image, tmp_path):
    module = tmp_path / "mod,ule.bin"
    module.write_bytes(b"module data")
    proc = qemu("-nodefaults", "-serial", "stdio", "-kernel", default_guest, "-smp", "cpus=2",
                "-m", "192", "-append", "hello=1", "-cpu", "host,hv_relaxed,hv-vpindex",
                "-initrd", f"{str(module).replace(',', ',,')} arg,{guest_image('hello')}")
    assert proc.returncode == 0, proc.stderr  # the default guest powers off: QEMU's 0
    assert "vCPUs: 2" in proc.stdout and "RAM: 192 MiB" in proc.stdout
    assert re.search(r"command line: \S+ hello=1", proc.stdout)
    assert 'vendor "Microsoft Hv"' in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("cpu", ["host", "kvm64"])
def test_no_hv_flags_no_hyperv(default_guest, cpu):
    proc = qemu("-nographic", "-kernel", default_guest, "-cpu", cpu)
    assert proc.returncode == 0, proc.stderr
    assert "hypervisor bit set" in proc.stdout
    assert "Microsoft Hv" not in proc.stdout
    assert only_warnings(proc.stderr)


@pytest.mark.parametrize("device", [[], ["-device", "isa-debug-exit"]])
def test_without_isa_debug_exit_at_0xf4_the_write_goes_nowhere(guest_image, device):
    # No device at 0xf4 (none at all, or QEMU's default iobase 0x501): the guest's exit() write
    # is lost and the guest halts; the harness' timeout ends the run with SIGTERM, which QEMU
    # (and hvvmm) report on stderr and answer with status 0.
    proc = subprocess.Popen([*QEMU, "-nodefaults", "-serial", "stdio", *device, "-kernel",
                             str(guest_image("exit_code")), "-append", "code=5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert read_line(proc).strip() == "exiting with code 5"
        time.sleep(0.5)
        assert proc.poll() is None, "the debug-exit write ended the run"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert stderr == "qemu-system-x86_64: terminating on signal 15\n"


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout(1)")
def test_under_timeout_like_kvm_unit_tests(guest_image):
    # kvm-unit-tests' runner: timeout(1) sends SIGTERM when the test's time is up. Its time is
    # made up here by SIGALRM, which timeout(1) takes as its own expiry, once the guest spins:
    # a fixed 2 s could run out on a loaded host before the guest had even started.
    proc = subprocess.Popen(["timeout", "-k", "1s", "--foreground", "120s", *QEMU, *KUT,
                             str(guest_image("spin"))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert "spinning" in read_line(proc)
        proc.send_signal(signal.SIGALRM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 124
    assert "qemu-system-x86_64: terminating on signal 15" in stderr


@pytest.mark.parametrize("how", [["--no-reboot"], ["-no-reboot", "-append", "triple"],
                                 ["-action", "reboot=shutdown"]])
def test_reset_with_no_reboot_exits_zero(reset_guest, how):
    proc = qemu("-nodefaults", "-serial", "stdio", "-kernel", str(reset_guest), *how)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("booted") == 1
    assert proc.stderr == ""


def test_reset_without_no_reboot_boots_again(reset_guest):
    proc = subprocess.Popen([*QEMU, "-nographic", "-kernel", str(reset_guest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        for _ in range(3):
            assert read_line(proc).strip() == "booted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert stderr == "qemu-system-x86_64: terminating on signal 2\n"


def test_missing_kernel(tmp_path):
    missing = tmp_path / "nope.flat"
    proc = qemu(*KUT, str(missing))
    assert proc.returncode == 1
    assert proc.stderr.endswith(
        f"qemu: could not open kernel file '{missing}': No such file or directory\n")
    assert proc.stdout == ""


def test_invalid_option():
    proc = qemu("-frobnicate", "-kernel", "x")
    assert (proc.returncode, proc.stderr) == (
        1, "qemu-system-x86_64: -frobnicate: invalid option\n")


def test_device_list_as_kvm_unit_tests_probes_it():
    proc = qemu("-device", "?")
    assert proc.returncode == 0
    # x86/run: grep -F -e '"testdev"' -e '"pc-testdev"', then grep -F "pci-testdev"
    assert '"pc-testdev"' in proc.stdout
    assert 'name "isa-debug-exit", bus ISA' in proc.stdout
    assert "pci-testdev" not in proc.stdout


def test_help_as_harnesses_read_it():
    proc = qemu("--help")
    assert proc.returncode == 0
    first = proc.stdout.splitlines()[0]
    assert re.fullmatch(r"QEMU emulator version \d+\.\d+\.\d+ \(hvvmm .*\)", first)
    assert "-kernel" in proc.stdout and "-device" in proc.stdout


def test_console_script_is_installed():
    import importlib.metadata

    script = pathlib.Path(sys.executable).with_name("hvvmm-qemu")
    try:
        importlib.metadata.distribution("hvvmm")
    except importlib.metadata.PackageNotFoundError:
        # The README's install line installs it (pip install -e): the suite runs after that.
        pytest.fail("hvvmm is not installed in this environment: pip install -e '.[test]'")
    assert script.exists(), "hvvmm is installed but its hvvmm-qemu console script is missing"

    proc = subprocess.run([str(script), "-version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("QEMU emulator version")


def test_memory_the_host_cannot_give(guest_image):
    # Checked before the guest starts, one QEMU-style line, no Python exception name.
    proc = qemu("-m", "1T", "-kernel", str(guest_image("hello")))
    assert proc.returncode == 1
    assert proc.stderr == ("qemu-system-x86_64: hvvmm: memory size 1 TiB is more than this "
                           f"host's RAM and swap ({proc.stderr.rsplit('(', 1)[1]}")
    assert "Error" not in proc.stderr and proc.stdout == ""
