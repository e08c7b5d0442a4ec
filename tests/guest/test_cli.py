"""``hvvmm`` as a user runs it: exit statuses, one-line errors, signals."""

import os
import signal
import subprocess
import sys
import time

import pytest
from procutil import read_line

pytestmark = pytest.mark.guest

HVVMM = [sys.executable, "-m", "hvvmm"]


def hvvmm(*args, env=None, timeout=60):
    return subprocess.run([*HVVMM, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


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


@pytest.mark.parametrize("code", [0, 3, 100])
def test_debug_exit_code_reaches_the_process_status(guest_image, code):
    proc = hvvmm("run", "--kernel", str(guest_image("exit_code")), "--append", f"code={code}")
    assert proc.returncode == ((code << 1) | 1) & 0xFF
    assert f"exiting with code {code}" in proc.stdout


def test_serial_to_file_and_none(guest_image, tmp_path):
    out = tmp_path / "console.txt"
    proc = hvvmm("run", "--kernel", str(guest_image("hello")), "--serial", f"file:{out}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Hello from hvvmm guest" in out.read_text()
    proc = hvvmm("run", "--kernel", str(guest_image("hello")), "--serial", "none")
    assert proc.returncode == 1 and proc.stdout == ""


def test_timeout_ends_a_spinning_guest(guest_image):
    started = time.monotonic()
    proc = hvvmm("run", "--kernel", str(guest_image("spin")), "--timeout", "1")
    assert time.monotonic() - started < 20
    assert_one_line_error(proc, 124, "timeout")


def test_unexpected_guest_exception_status(guest_image):
    proc = hvvmm("run", "--kernel", str(guest_image("unexpected_exception")))
    assert proc.returncode == 255
    assert "UNEXPECTED EXCEPTION" in proc.stdout


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
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
    assert stderr.strip() == f"hvvmm: stopped: stopped by {signal.Signals(signum).name}"


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
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_command_line(args, fragment):
    assert_one_line_error(hvvmm("run", *args), 2, fragment)


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


def test_help_lists_exit_statuses():
    proc = hvvmm("run", "--help")
    assert proc.returncode == 0
    assert "exit status:" in proc.stdout and "--timeout" in proc.stdout
