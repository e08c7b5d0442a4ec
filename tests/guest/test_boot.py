"""Tiny guests under /dev/kvm: boot, serial, debug-exit, SMP, exceptions, devices, timeouts."""

import pathlib
import time

import pytest

from hvvmm import ExitKind, Machine, MachineConfig

pytestmark = pytest.mark.guest

GUEST_SOURCES = pathlib.Path(__file__).resolve().parents[1] / "guests"

RUN_TIMEOUT = 30  # seconds; every run is bounded (the machine interrupts KVM_RUN)


def run_guest(image, **config):
    with Machine(MachineConfig(kernel=image, **config)) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        return result, machine.console_text


def test_hello_over_serial(guest_image):
    result, console = run_guest(guest_image("hello"))
    assert "Hello from hvvmm guest" in console
    assert "SUMMARY: 1 tests, 0 failures" in console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0
    assert result.status == 0 and result.qemu_status == 1  # hvvmm run: 0; hvvmm qemu: 1


@pytest.mark.parametrize("code", [0, 1, 5, 0x7F])
def test_debug_exit_code_reaches_the_result(guest_image, code):
    result, _ = run_guest(guest_image("exit_code"), append=f"code={code}")
    assert result.kind is ExitKind.DEBUG_EXIT
    assert result.code == code
    assert result.qemu_status == ((code << 1) | 1) & 0xFF
    assert result.status == (result.qemu_status if code else 0)


@pytest.mark.parametrize("smp", [2, 4])
def test_smp_bring_up_each_ap_reports_its_apic_id(guest_image, smp):
    result, console = run_guest(guest_image("smp"), smp=smp)
    for cpu in range(1, smp):
        assert f"PASS: cpu {cpu}: APIC ID {cpu}" in console
    assert f"PASS: {smp} of {smp} vCPUs online" in console
    assert "FAIL" not in console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, console


def test_unexpected_exception_is_reported(guest_image):
    result, console = run_guest(guest_image("unexpected_exception"))
    assert "UNEXPECTED EXCEPTION: vector 13 (#GP)" in console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0x7F and result.status == 255


def test_expected_faults_are_caught(guest_image):
    result, console = run_guest(guest_image("expected_faults"))
    assert "FAIL" not in console
    assert "PASS: wrmsr to a non-existent MSR: #GP" in console
    assert result.code == 0, console


def test_timeout_ends_a_spinning_guest(guest_image):
    with Machine(MachineConfig(kernel=guest_image("spin"), smp=2)) as machine:
        machine.start()
        deadline = time.monotonic() + 30  # the guest is spinning once it says so
        while "spinning" not in machine.console_text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "spinning" in machine.console_text
        result = machine.wait(timeout=1.0)
    assert result.kind is ExitKind.TIMEOUT and result.status == 124


def test_default_guest_reports_what_it_sees():
    result, console = run_guest(None, smp=2, memory=128 << 20)
    assert "vCPUs: 2" in console
    assert "cpu 1 (APIC ID 1) online" in console
    assert "RAM: 128 MiB" in console
    assert "CPUID 0x40000000" in console
    assert result.kind is ExitKind.POWEROFF and result.status == 0


def test_memory_above_the_32bit_hole_is_reported():
    # 3.25 GiB: 3 GiB below the hole, 256 MiB at 4 GiB (the memory map shows both).
    result, console = run_guest(None, memory=(3 << 30) + (256 << 20))
    assert "0x0000000100000000-0x000000010fffffff available" in console
    assert result.kind is ExitKind.POWEROFF


class Scratch:
    """A plain device: a 4 KiB register file."""

    def __init__(self):
        self.data = bytearray(0x1000)

    def read(self, offset, size):
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset, size, value):
        self.data[offset:offset + size] = value.to_bytes(size, "little")


def test_pio_and_mmio_devices_from_python(guest_image):
    echo = Scratch()
    exits = []
    with Machine(MachineConfig(kernel=guest_image("device_echo"), append="mmio")) as machine:
        machine.add_pio_device(0x5E0, 8, echo, "echo")
        machine.add_mmio_device(0xD000_0000, 0x1000, Scratch(), "scratch")
        machine.add_exit_observer(lambda vcpu, exit: exits.append(exit.reason_name))
        result = machine.run(timeout=RUN_TIMEOUT)
    console = machine.console_text
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, console
    assert "PASS: PIO device returns the 32-bit value written" in console
    assert "PASS: unclaimed port reads as all ones" in console
    assert "PASS: MMIO 8-byte access" in console
    assert exits.count("mmio") >= 4


def test_mmio_device_may_not_overlap_ram(guest_image):
    with Machine(MachineConfig(kernel=guest_image("hello"))) as machine:
        with pytest.raises(ValueError, match="overlaps guest RAM"):
            machine.add_mmio_device(0x100000, 0x1000, Scratch())


def test_stop_from_another_thread(guest_image):
    import threading

    with Machine(MachineConfig(kernel=guest_image("spin"), smp=2)) as machine:
        machine.start()
        threading.Timer(0.3, machine.stop).start()
        result = machine.wait(timeout=RUN_TIMEOUT)
    assert result.kind is ExitKind.STOPPED


def test_wait_without_start_is_an_error_not_a_hang(guest_image):
    with Machine(MachineConfig(kernel=guest_image("hello"))) as machine:
        with pytest.raises(RuntimeError, match="not started"):
            machine.wait(timeout=1)


def test_memory_as_a_size_string():
    result, console = run_guest(None, memory="96M")
    assert "RAM: 96 MiB" in console and result.kind is ExitKind.POWEROFF


def test_a_second_run_says_what_to_do(guest_image):
    with Machine(MachineConfig(kernel=guest_image("hello"))) as machine:
        machine.run(timeout=RUN_TIMEOUT)
        with pytest.raises(RuntimeError, match="create a new Machine"):
            machine.run(timeout=RUN_TIMEOUT)


def test_guest_runtime_says_when_it_uses_fewer_vcpus_than_present(tmp_path):
    from hvvmm.guestbuild import build_guest

    image = build_guest([GUEST_SOURCES / "smp.c"], output_dir=tmp_path, name="smp_max2",
                        extra_cflags=["-DMAX_CPUS=2"])
    result, console = run_guest(image, smp=3)
    assert ("guest runtime: 3 vCPUs present, but this guest was built for at most 2 (MAX_CPUS"
            in console), console
    assert result.kind is ExitKind.DEBUG_EXIT, console  # and ended (the third AP just halts)


def test_ram_the_host_refuses_is_a_sentence(monkeypatch):
    import errno

    from hvvmm.machine import ConfigError
    from hvvmm.memory import GuestMemory

    def refuse(cls, layout):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(GuestMemory, "anonymous", classmethod(refuse))
    with pytest.raises(ConfigError, match="cannot give the guest 256 MiB of RAM"):
        Machine(MachineConfig())


def test_a_timeout_no_wait_can_take_is_refused_before_the_guest_starts(guest_image):
    with Machine(MachineConfig(kernel=guest_image("hello"))) as machine:
        with pytest.raises(ValueError, match="too long"):
            machine.run(timeout=float("inf"))
        assert machine.result is None and not machine.vcpus[0].thread
