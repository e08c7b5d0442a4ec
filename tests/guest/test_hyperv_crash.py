"""The guest crash MSRs end to end (tests/guests/hv_crash.c): the library's ExitKind.CRASH and
``machine.crash_reports``, and ``hvvmm run --crash-report FILE`` / ``--on-crash continue``."""

import json
import subprocess
import sys

import pytest

from hvvmm import ExitKind, Machine, MachineConfig
from procutil import describe

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30
STATUS_CRASH = 14
LINUX_6_1_192_GUEST_ID = 0x8100000601C00000
# hv_crash.c
PANIC_PARAMETERS = (0x9, LINUX_6_1_192_GUEST_ID, 0xFFFFFFFF81ABCDEF, 0x1234567890ABCDEF,
                    0xFFFFC90000123F58)
MESSAGE = ("Kernel panic - not syncing: sysrq triggered crash\n"
           "CPU: 0 PID: 1 Comm: hv_crash\n"
           "---[ end Kernel panic - not syncing: sysrq triggered crash ]---\n")
NOTIFY, NOTIFY_MSG = 1 << 63, 1 << 62


def run_crash(guest_image, append="", on_crash="stop", smp=1):
    with Machine(MachineConfig(kernel=guest_image("hv_crash"), append=append, smp=smp,
                               on_crash=on_crash)) as machine:
        seen = []
        machine.crash_listeners.append(seen.append)
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
    assert seen == machine.crash_reports
    return result, machine, counters


def assert_guest_checks_passed(console):
    assert "FAIL" not in console, console
    for line in ("crash MSRs advertised", "CRASH_CTL reads the supported bits 0xc000000000000000",
                 "CRASH_P0..P4 read back what was written", "CRASH_CTL = 0 accepted, no report"):
        assert f"PASS: {line}" in console, line


def test_crash_report_without_message(guest_image):
    result, machine, counters = run_crash(guest_image)
    console = machine.console_text
    assert_guest_checks_passed(console)
    assert result.kind is ExitKind.CRASH and result.status == STATUS_CRASH, result
    assert result.vcpu == 0
    assert "still running" not in console  # the run ended at the CRASH_CTL write

    (report,) = machine.crash_reports
    assert report.vp_index == 0
    assert report.crash_ctl == NOTIFY and report.crash_notify and not report.crash_message
    assert report.parameters == PANIC_PARAMETERS
    assert report.guest_os_id == LINUX_6_1_192_GUEST_ID
    assert report.guest_os.is_linux and report.guest_os.linux_version == (6, 1, 192)
    assert report.message is None and report.message_gpa is None and report.message_error is None
    assert report.reference_time_100ns is not None and report.reference_time_100ns > 0
    assert "P2=0xffffffff81abcdef" in result.message
    assert counters["vp0"]["msr_writes"]["HV_X64_MSR_CRASH_CTL"] == 2


def test_crash_report_with_message(guest_image):
    result, machine, _ = run_crash(guest_image, append="msg")
    assert_guest_checks_passed(machine.console_text)
    assert result.kind is ExitKind.CRASH and result.status == STATUS_CRASH, result
    (report,) = machine.crash_reports
    assert report.crash_ctl == NOTIFY | NOTIFY_MSG and report.crash_message
    assert report.parameters[:3] == (0, 0, 0)
    assert report.message == MESSAGE
    assert report.message_length == len(MESSAGE) == report.parameters[4]
    assert report.message_gpa == report.parameters[3] and report.message_gpa % 4096 == 0
    assert report.message_error is None
    assert report.guest_os.is_linux
    assert "sysrq triggered crash ]---" in result.message  # the last line, in the summary


def test_on_crash_continue_lets_the_guest_finish(guest_image):
    result, machine, _ = run_crash(guest_image, append="msg", on_crash="continue")
    console = machine.console_text
    assert_guest_checks_passed(console)
    assert "INFO: still running after the crash report" in console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, result
    (report,) = machine.crash_reports
    assert report.message == MESSAGE


def hvvmm_run(*args):
    return subprocess.run([sys.executable, "-m", "hvvmm", "run", *args, "--timeout",
                           str(RUN_TIMEOUT)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT + 30, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("with_message", [False, True])
def test_cli_crash_report_file(guest_image, tmp_path, with_message):
    path = tmp_path / "crash.json"
    args = ["--kernel", str(guest_image("hv_crash")), "--crash-report", str(path)]
    if with_message:
        args += ["--append", "msg"]
    proc = hvvmm_run(*args)
    assert proc.returncode == STATUS_CRASH, describe(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hvvmm: crash: guest crash reported by vp0 (Linux 6.1.192"), last
    assert "still running" not in proc.stdout
    data = json.loads(path.read_text())
    assert data["vp_index"] == 0
    assert data["guest_os_id"] == f"{LINUX_6_1_192_GUEST_ID:#018x}"
    assert data["guest_os"].startswith("Linux 6.1.192")
    if with_message:
        assert data["crash_ctl"] == f"{NOTIFY | NOTIFY_MSG:#018x}"
        assert data["message"] == MESSAGE
        assert data["message_length"] == len(MESSAGE)
        assert int(data["message_gpa"], 16) == int(data["parameters"][3], 16)
    else:
        assert data["crash_ctl"] == f"{NOTIFY:#018x}"
        assert data["parameters"] == [f"{p:#018x}" for p in PANIC_PARAMETERS]
        assert data["message"] is None
    assert "bugcheck_code" not in data  # only for Windows guests


def test_cli_on_crash_continue(guest_image, tmp_path):
    path = tmp_path / "crash.json"
    proc = hvvmm_run("--kernel", str(guest_image("hv_crash")), "--append", "msg",
                     "--crash-report", str(path), "--on-crash", "continue")
    assert proc.returncode == 0, describe(proc)  # debug-exit 0: hvvmm run exits 0
    assert "INFO: still running after the crash report" in proc.stdout
    assert "SUMMARY: " in proc.stdout and "FAIL" not in proc.stdout
    assert json.loads(path.read_text())["message"] == MESSAGE


def test_cli_crash_is_one_line_on_stderr(guest_image):
    proc = hvvmm_run("--kernel", str(guest_image("hv_crash")))
    assert proc.returncode == STATUS_CRASH
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
