"""The vCPU loop's two exit paths give the guest the same answers: port and MSR exits decoded in
C into one int (``Vcpu.packed_runner``, the path taken when no exit observer is installed) and the
exit objects of ``decode_exit`` (taken when one is)."""

import pytest

from hvvmm import ExitKind, Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30  # seconds; every run is bounded


class EchoRegisters:
    """Device registers: what is written reads back."""

    def __init__(self, size: int = 8):
        self.data = bytearray(size)
        self.writes = []

    def read(self, offset, size):
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))
        self.data[offset:offset + size] = value.to_bytes(size, "little")


def run(image, observed: bool, **config):
    exits = []
    echo = EchoRegisters()
    with Machine(MachineConfig(kernel=image, **config)) as machine:
        machine.add_pio_device(0x5E0, 8, echo, "echo")
        machine.add_mmio_device(0xD000_0000, 0x1000, EchoRegisters(0x1000), "scratch")
        if observed:
            machine.add_exit_observer(lambda vcpu, exit: exits.append(exit.reason_name))
        result = machine.run(timeout=RUN_TIMEOUT)
    return result, machine.console_text, echo, exits


@pytest.mark.parametrize("observed", [False, True], ids=["packed", "exit-objects"])
def test_port_reads_and_writes_of_every_size(guest_image, observed):
    result, console, echo, exits = run(guest_image("device_echo"), observed, append="mmio")
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, console
    assert "FAIL" not in console
    assert "PASS: PIO device returns the 32-bit value written" in console
    assert "PASS: PIO device byte register at offset 4" in console
    assert "PASS: unclaimed port reads as all ones" in console
    assert (0, 4, 0x12345678) in echo.writes
    assert ("io" in exits) is observed


def test_msr_reads_writes_and_refusals_match(guest_image):
    """hv_msr_rules reads and writes every synthetic MSR, many of which fault (#GP): both paths
    print the same console and count the same accesses and faults."""
    runs = []
    for observed in (False, True):
        exits = []
        with Machine(MachineConfig(kernel=guest_image("hv_msr_rules"))) as machine:
            if observed:
                machine.add_exit_observer(lambda vcpu, exit: exits.append(exit.reason_name))
            result = machine.run(timeout=RUN_TIMEOUT)
            counters = machine.hyperv.counters()
        assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, machine.console_text
        assert ("msr" in exits) is observed
        runs.append((machine.console_text, counters))
    (packed_console, packed_counters), (objects_console, objects_counters) = runs
    assert packed_console == objects_console
    assert packed_counters == objects_counters
    assert packed_counters["vp0"]["msr_faults"]  # the refusals went through both paths
