"""hv-crash: CRASH_P0..P4, CRASH_CTL, the crash report and the message channel (TLFS
partition-properties.md "Partition Crash Enlightenment")."""

from __future__ import annotations

import json
import logging

import pytest

from hvvmm.hv import hvdef
from hvvmm.hv.features import parse_hyperv_spec
from hvvmm.hv.partition import Partition
from hvvmm.hv.platform import CrashReport

try:
    from hvfakes import FakePlatform
except ImportError:  # tests/ imported as a package
    from tests.unit.hvfakes import FakePlatform

P0 = hvdef.HV_X64_MSR_CRASH_P0
CTL = hvdef.HV_X64_MSR_CRASH_CTL
NOTIFY = 1 << 63
MESSAGE = 1 << 62
WINDOWS_2016 = 0x0001040A00003839
LINUX = hvdef.linux_guest_os_id(6, 1, 192)
MESSAGE_GPA = 0x8000


@pytest.fixture
def vm():
    platform = FakePlatform(mem_size=0x20000)
    partition = Partition(parse_hyperv_spec("minimal,hv-crash,hv-time"), platform)
    return partition, platform


def set_params(partition, *values):
    for n, value in enumerate(values):
        partition.msr_write(0, P0 + n, value)


def test_ctl_reads_the_supported_bits(vm):
    partition, _ = vm
    assert partition.msr_read(0, CTL) == NOTIFY | MESSAGE


def test_parameters_are_partition_wide(vm):
    partition, _ = vm
    set_params(partition, 1, 2, 3, 4, 5)
    assert [partition.msr_read(1, P0 + n) for n in range(5)] == [1, 2, 3, 4, 5]


def test_windows_bugcheck_report(vm, caplog):
    partition, platform = vm
    partition.msr_write(0, hvdef.HV_X64_MSR_GUEST_OS_ID, WINDOWS_2016)
    set_params(partition, 0xD1, 0x10, 2, 0, 0xFFFFF80012345678)
    platform.advance(seconds=2)
    with caplog.at_level(logging.INFO):
        partition.msr_write(1, CTL, NOTIFY)
    assert len(platform.crashes) == 1
    report: CrashReport = platform.crashes[0]
    assert report.vp_index == 1
    assert report.parameters == (0xD1, 0x10, 2, 0, 0xFFFFF80012345678)
    assert report.crash_notify and not report.crash_message
    assert report.message is None and report.message_error is None
    assert abs(report.reference_time_100ns - 20_000_000) <= 2
    data = json.loads(report.to_json())
    assert data["bugcheck_code"] == "0xd1"
    assert data["guest_os"] == "Windows NT 10.0 build 14393 (Microsoft)"
    assert data["guest_os_id"] == "0x0001040a00003839"
    assert data["parameters"][4] == "0xfffff80012345678"
    assert data["crash_ctl"] == "0x8000000000000000"
    assert "guest crash reported by vp1" in caplog.text and "P0=0xd1" in caplog.text


def test_ctl_without_notify_reports_nothing(vm):
    partition, platform = vm
    partition.msr_write(0, CTL, 0)
    partition.msr_write(0, CTL, MESSAGE)
    partition.msr_write(0, CTL, (1 << 61) | 0xFFFF)  # reserved bits: ignored, no #GP
    assert platform.crashes == []


def test_linux_kmsg_message_channel(vm):
    partition, platform = vm
    partition.msr_write(0, hvdef.HV_X64_MSR_GUEST_OS_ID, LINUX)
    text = "Kernel panic - not syncing: sysrq triggered crash\n"
    platform.memory.write(MESSAGE_GPA, text.encode())
    set_params(partition, 0, 0, 0, MESSAGE_GPA, len(text))  # hv_kmsg_dump()
    partition.msr_write(0, CTL, NOTIFY | MESSAGE)
    report = platform.crashes[0]
    assert report.message == text
    assert report.message_gpa == MESSAGE_GPA and report.message_length == len(text)
    assert report.message_error is None
    assert report.guest_os.is_linux
    assert "last message line: 'Kernel panic" in report.summary()
    assert json.loads(report.to_json())["message"] == text


@pytest.mark.parametrize("gpa, length, error", [
    (0x1F800, 0x1000, "not in guest RAM"),  # runs past the end of RAM
    (0x7FFF_0000_0000, 16, "not in guest RAM"),
    ((1 << 64) - 8, 64, "not in guest RAM"),
])
def test_message_outside_ram_is_reported_not_raised(vm, gpa, length, error):
    partition, platform = vm
    set_params(partition, 0, 0, 0, gpa, length)
    partition.msr_write(0, CTL, NOTIFY | MESSAGE)
    report = platform.crashes[0]
    assert report.message is None
    assert error in report.message_error
    assert "message unavailable" in report.summary()
    json.loads(report.to_json())


def test_oversized_message_is_bounded_to_one_page(vm):
    partition, platform = vm
    platform.memory.write(MESSAGE_GPA, b"A" * 4096 + b"B" * 4096)
    set_params(partition, 0, 0, 0, MESSAGE_GPA, (1 << 64) - 1)
    partition.msr_write(0, CTL, NOTIFY | MESSAGE)
    report = platform.crashes[0]
    assert report.message == "A" * 4096
    assert "exceeds one page" in report.message_error


def test_message_is_decoded_leniently(vm):
    partition, platform = vm
    platform.memory.write(MESSAGE_GPA, b"ok \xff\xfe bytes\0\0\0")
    set_params(partition, 0, 0, 0, MESSAGE_GPA, 15)
    partition.msr_write(0, CTL, NOTIFY | MESSAGE)
    assert platform.crashes[0].message == "ok \ufffd\ufffd bytes"


def test_empty_message(vm):
    partition, platform = vm
    set_params(partition, 0, 0, 0, 0xDEAD_BEEF_0000, 0)
    partition.msr_write(0, CTL, NOTIFY | MESSAGE)
    assert platform.crashes[0].message == "" and platform.crashes[0].message_error is None


def test_every_crash_is_reported_and_reset_clears_parameters(vm):
    partition, platform = vm
    set_params(partition, 7)
    partition.msr_write(0, CTL, NOTIFY)
    partition.msr_write(1, CTL, NOTIFY)
    assert len(platform.crashes) == 2
    partition.reset()
    assert partition.msr_read(0, P0) == 0


def test_a_failing_platform_does_not_fault_the_guest(vm, caplog):
    partition, platform = vm
    platform.fail_report_crash = True
    with caplog.at_level(logging.ERROR):
        partition.msr_write(0, CTL, NOTIFY)  # no exception
    assert "failed to record a guest crash report" in caplog.text
    assert partition.handler_failures == 0


def test_report_without_hv_time():
    platform = FakePlatform()
    partition = Partition(parse_hyperv_spec("minimal,hv-crash"), platform)
    partition.msr_write(0, CTL, NOTIFY)
    assert platform.crashes[0].reference_time_100ns is None
    assert json.loads(platform.crashes[0].to_json())["reference_time_100ns"] is None


def test_a_crash_notify_loop_is_reported_a_bounded_number_of_times(vm):
    from hvvmm.enlightenments.crash import MAX_REPORTS_PER_BOOT

    partition, platform = vm
    for _ in range(500):
        partition.msr_write(0, CTL, NOTIFY)
    assert len(platform.crashes) == MAX_REPORTS_PER_BOOT
    assert partition.state["hv-crash"].repeated_notifications == 500 - MAX_REPORTS_PER_BOOT
    partition.reset()
    partition.msr_write(0, CTL, NOTIFY)
    assert len(platform.crashes) == MAX_REPORTS_PER_BOOT + 1
