"""``hvvmm`` as a user runs it: exit statuses, one-line errors, signals."""

import os
import signal
import subprocess
import time

import pytest
from procutil import HVVMM, read_line
from procutil import run_hvvmm as hvvmm

from hvvmm import Machine

pytestmark = pytest.mark.guest

def assert_one_line_error(proc, status, fragment):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_default_guest_runs_and_exits_zero():
    proc = hvvmm("run", "--smp", "2")
    assert proc.returncode == 0, proc.stderr
    assert "cpu 1 (APIC ID 1) online" in proc.stdout


@pytest.mark.parametrize("code,status", [(0, 0), (3, 7), (100, 201)])
def test_debug_exit_code_reaches_the_process_status(guest_image, code, status):
    # A passing guest (debug-exit 0) exits 0, as success does in a shell; other values keep
    # QEMU's (v << 1) | 1.
    proc = hvvmm("run", "--kernel", str(guest_image("exit_code")), "--append", f"code={code}")
    assert proc.returncode == status, proc.stderr
    assert f"exiting with code {code}" in proc.stdout
    assert proc.stderr == ""


def test_qemu_exit_status_flag_keeps_qemus_rule(guest_image):
    proc = hvvmm("run", "--qemu-exit-status", "--kernel", str(guest_image("exit_code")),
                 "--append", "code=0")
    assert proc.returncode == 1, proc.stderr


def test_serial_to_file_and_none(guest_image, tmp_path):
    out = tmp_path / "console.txt"
    proc = hvvmm("run", "--kernel", str(guest_image("hello")), "--serial", f"file:{out}")
    assert proc.returncode == 0 and proc.stdout == ""
    assert "Hello from hvvmm guest" in out.read_text()
    proc = hvvmm("run", "--kernel", str(guest_image("hello")), "--serial", "none")
    assert proc.returncode == 0 and proc.stdout == ""


def test_timeout_ends_a_spinning_guest(guest_image):
    started = time.monotonic()
    proc = hvvmm("run", "--kernel", str(guest_image("spin")), "--timeout", "1")
    assert time.monotonic() - started < 20
    assert_one_line_error(proc, 124, "timeout")


def test_unexpected_guest_exception_status(guest_image):
    proc = hvvmm("run", "--kernel", str(guest_image("unexpected_exception")))
    assert proc.returncode == 255
    assert "UNEXPECTED EXCEPTION" in proc.stdout


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                           (signal.SIGHUP, 129)])
def test_signals_stop_the_cli_cleanly(guest_image, signum, status):
    proc = subprocess.Popen([*HVVMM, "run", "--kernel", str(guest_image("spin")), "--smp", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        # Wait until the guest runs, then signal.
        assert read_line(proc).strip() == "spinning"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr
    assert stderr.strip() == f"hvvmm: stopped by {signal.Signals(signum).name}"


# -- bad input: one clear line and a distinct status ---------------------------------------------

def test_missing_kernel(tmp_path):
    assert_one_line_error(hvvmm("run", "--kernel", str(tmp_path / "nope.elf")), 4,
                          "cannot read kernel")


def test_kernel_without_multiboot_header(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(64 << 10).replace(b"\x02\xb0\xad\x1b", b"\0\0\0\0"))
    assert_one_line_error(hvvmm("run", "--kernel", str(junk)), 4, "no multiboot header")


def test_kernel_larger_than_ram(tmp_path, guest_image):
    big = tmp_path / "big.elf"
    big.write_bytes(guest_image("hello").read_bytes() + bytes(6 << 20))
    assert_one_line_error(hvvmm("run", "--kernel", str(big), "--memory", "4M"), 4,
                          "larger than guest RAM")


def test_missing_initrd(guest_image, tmp_path):
    assert_one_line_error(hvvmm("run", "--kernel", str(guest_image("hello")), "--initrd",
                                f"{tmp_path / 'nope.img'} arg"), 4, "cannot read initrd")


@pytest.mark.parametrize("args,fragment", [
    (["--smp", "0"], "--smp must be at least 1"),
    (["--smp", "-3"], "--smp must be at least 1"),
    (["--smp", "many"], "not a number"),
    (["--memory", "lots"], "bad size"),
    (["--memory", "1M"], "below the minimum"),
    (["--memory", "4097K"], "multiple of 4 KiB"),
    (["--timeout", "0"], "must be positive"),
    (["--serial", "tty"], "bad --serial"),
    (["--frobnicate"], "hvvmm run: unrecognized arguments: --frobnicate"),
    (["-kernel", "x.elf"], "hvvmm run: unrecognized option -kernel: did you mean --kernel?"),
    (["-smp", "2"], "did you mean --smp?"),
    (["--smp", "256"], "hvvmm supports at most 255: xAPIC IDs 0-254"),
    (["--smp", "999"], "hvvmm supports at most 255"),
    (["--memory", "1T"], "is more than this host's RAM and swap"),
    (["--timeout", "inf"], "too long"),
    (["--timeout", "1e12"], "too long"),
    (["--timeout", "nan"], "must be positive"),
    (["--crash-report", "/nonexistent/x.json"],
     "cannot write the crash report to /nonexistent/x.json: No such file or directory"),
])
def test_bad_command_line(args, fragment):
    assert_one_line_error(hvvmm("run", *args), 2, fragment)


@pytest.mark.parametrize("args,fragment", [
    (["--smp", "0"], "hvvmm cpuid: --smp must be at least 1 (got 0)"),
    (["--smp", "300"], "hvvmm supports at most 255"),
    (["-smp", "2"], "did you mean --smp?"),
])
def test_bad_cpuid_command_line(args, fragment):
    assert_one_line_error(hvvmm("cpuid", *args), 2, fragment)


def test_cpu_features_value_after_a_space():
    # The form README and --help show: "--cpu-features -cx16", the value starting with '-'.
    spaced = hvvmm("cpuid", "--cpu-features", "-cx16")
    joined = hvvmm("cpuid", "--cpu-features=-cx16")
    assert spaced.returncode == 0, spaced.stderr
    assert spaced.stdout == joined.stdout
    plain = hvvmm("cpuid")
    assert " cx16" in plain.stdout and " cx16" not in spaced.stdout
    proc = hvvmm("run", "--cpu-features", "-cx16", "--smp", "1")
    assert proc.returncode == 0, proc.stderr


def test_kvm_device_that_is_not_kvm():
    proc = hvvmm("run", env={"HVVMM_KVM_DEVICE": "/dev/null"})
    assert_one_line_error(proc, 6, "/dev/null is not a KVM device")
    assert "Error" not in proc.stderr


def test_missing_compiler_for_the_built_in_guest(tmp_path):
    # No prebuilt guest (a source checkout) and no gcc: a sentence, not "GuestBuildError".
    from hvvmm.guestbuild import shipped_default_guest

    if shipped_default_guest().is_file():
        pytest.skip("this hvvmm install ships a prebuilt default guest: no compiler is needed")
    proc = hvvmm("run", env={"HVVMM_GUEST_CC": "no-such-gcc", "XDG_CACHE_HOME": str(tmp_path)})
    assert_one_line_error(proc, 4, "cannot build the built-in guest: 'no-such-gcc' not found")
    assert "GuestBuildError" not in proc.stderr


@pytest.mark.parametrize("command", [["cpuid"], ["run", "--smp", "2"]])
def test_output_into_a_closed_pipe_is_quiet(command):
    # `hvvmm cpuid | head -2`, `hvvmm run | head -3`: the reader is gone; no traceback, no
    # warning, and SIGPIPE's status (128 + 13), as other command-line tools.
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails with EPIPE, at once: no race with a reader
    try:
        proc = subprocess.run([*HVVMM, *command], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 128 + signal.SIGPIPE


def test_output_into_head_is_quiet():
    shell = f"{' '.join(HVVMM)} cpuid | head -2 >/dev/null; echo ${{PIPESTATUS[0]}}"
    for _ in range(3):
        proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        assert proc.stderr == ""
        assert proc.stdout.strip() in ("0", "141"), proc.stdout  # 0: all fitted in the pipe


def test_no_kvm_device():
    proc = hvvmm("run", env={"HVVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert_one_line_error(proc, 6, "does not exist")
    proc = hvvmm("info", env={"HVVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert proc.returncode == 6


def test_kvm_permission_denied_message(monkeypatch):
    from hvvmm.kvm import Kvm, KvmUnavailableError

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(KvmUnavailableError, match="permission denied opening /dev/kvm"):
        Kvm()


def test_info_reports_the_host():
    proc = hvvmm("info")
    assert proc.returncode == 0, proc.stderr
    assert "KVM API version: 12" in proc.stdout
    assert "hardware virtualization:" in proc.stdout
    assert "KVM_CAP_X86_USER_SPACE_MSR" in proc.stdout
    assert "instruction completion: " in proc.stdout and "popcnt" in proc.stdout
    assert "hvvmm's own limit: 255" in proc.stdout  # beside KVM_CAP_MAX_VCPUS


def test_help_lists_exit_statuses():
    proc = hvvmm("run", "--help")
    assert proc.returncode == 0
    assert "exit status:" in proc.stdout and "--timeout" in proc.stdout
    assert "wrote 0 to" in proc.stdout and "--qemu-exit-status" in proc.stdout


def test_top_level_help_shows_each_commands_options():
    proc = hvvmm("--help")
    assert proc.returncode == 0
    for option in ("--kernel", "--smp", "--memory", "--cpu-features", "--crash-report"):
        assert option in proc.stdout
    assert "hvvmm run [-h]" in proc.stdout and "hvvmm cpuid" in proc.stdout


HALTED_FOR_GOOD = r"""
#include "guest.h"
int main(void)
{
    puts("last line");
    if (cmdline_has("sti"))
        asm volatile("sti");    /* halted, but an interrupt could wake it: not stuck */
    else
        asm volatile("cli");
    for (;;)
        asm volatile("hlt");
}
"""


@pytest.fixture(scope="module")
def halted_guest(hvvmm_build_guest):
    return str(hvvmm_build_guest(source=HALTED_FOR_GOOD, name="halted_for_good"))


@pytest.mark.parametrize("front_end", ["run", "qemu"])
def test_a_guest_halted_for_good_is_reported_once(halted_guest, front_end):
    if front_end == "run":
        command = [*HVVMM, "run", "--kernel", halted_guest, "--smp", "2", "--timeout", "120"]
    else:  # no isa-debug-exit: the guest's end is a halt (the example)
        command = [*HVVMM, "qemu", "-kernel", halted_guest, "-serial", "stdio", "-smp", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert read_line(proc) == "last line"
        # Wait for the report itself, not a fixed time (a loaded machine probes late), then
        # give a second report the time of a few probes to show up before stopping the run.
        stderr = ""
        while "halted with interrupts disabled" not in stderr:
            stderr += read_line(proc, timeout=60, stream=proc.stderr) + "\n"
        time.sleep(3 * Machine.HALT_PROBE_INTERVAL)
        proc.send_signal(signal.SIGTERM)
        stderr += proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    lines = [line for line in stderr.splitlines() if "halted with interrupts disabled" in line]
    assert len(lines) == 1, stderr
    assert "vCPU 0 at RIP" in lines[0] and "nothing can wake it" in lines[0]
    if front_end == "qemu":
        assert "warning:" in lines[0]  # kvm-unit-tests tolerates warning lines only


@pytest.mark.parametrize("kernel,append", [("spin", ""), ("halted", "sti")])
def test_a_guest_that_can_still_run_is_not_reported(guest_image, halted_guest, kernel, append):
    image = halted_guest if kernel == "halted" else str(guest_image("spin"))
    proc = hvvmm("run", "--kernel", image, "--append", append, "--timeout", "3.5")
    assert proc.returncode == 124
    assert "halted" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_more_vcpus_than_the_built_in_guest_uses_are_not_silent():
    proc = hvvmm("run", "--smp", "100", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "guest runtime: 100 vCPUs present, but this guest was built for at most 64" in \
        proc.stdout
