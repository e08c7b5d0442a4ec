"""Port accesses the run loop has seen before go from C straight to the device's read/write
(``Bus.cache_route`` and ``run_exits`` in ``hvvmm/kvm/_build.py``): the device sees every access
with the right offset, size and value, reads answer the guest, a device added while the guest
runs takes effect, and what a device raises ends the run as it does on the Python path.
tests/guests/port_loop.c writes 0..99 to port 0x5E0, reads it 100 times and writes the sum of
what it read to 0x5E4."""

import pytest
from procutil import assert_guest_passed

from hvvmm import ExitKind, Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30  # seconds; every run is bounded


class Port:
    """Records every access; reads answer ``answer(n)`` for the n-th read."""

    def __init__(self, answer=lambda n: n):
        self.writes, self.reads, self.answer = [], 0, answer

    def read(self, offset, size):
        self.reads += 1
        return self.answer(self.reads)

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


@pytest.mark.parametrize("observed", [False, True], ids=["routes", "exit-objects"])
def test_every_access_reaches_the_device_and_reads_answer_the_guest(guest_image, observed):
    port, total = Port(), Port()
    with Machine(MachineConfig(kernel=guest_image("port_loop"))) as machine:
        machine.add_pio_device(0x5E0, 1, port, "loop")
        machine.add_pio_device(0x5E4, 4, total, "total")
        if observed:
            machine.add_exit_observer(lambda vcpu, exit: None)
        result = machine.run(timeout=RUN_TIMEOUT)
    assert_guest_passed(result, machine.console_text)
    assert port.writes == [(0, 1, i) for i in range(100)]
    assert port.reads == 100
    assert total.writes == [(0, 4, sum(range(1, 101)))]


def test_a_device_added_while_running_takes_over_its_ports(guest_image):
    """Registering a device empties the route caches, also one a vCPU is using."""
    later = Port(answer=lambda n: 2)
    first = Port()
    with Machine(MachineConfig(kernel=guest_image("port_loop"))) as machine:
        total = Port()

        def write(offset, size, value):
            first.writes.append((offset, size, value))
            if value == 49:  # halfway through the writes: another device takes the port
                machine.pio_bus.unregister(0x5E0)
                machine.pio_bus.register(0x5E0, 1, later, "later")

        first.write = write
        machine.add_pio_device(0x5E0, 1, first, "loop")
        machine.add_pio_device(0x5E4, 4, total, "total")
        result = machine.run(timeout=RUN_TIMEOUT)
    assert_guest_passed(result, machine.console_text)
    assert [value for _, _, value in first.writes] == list(range(50))
    assert [value for _, _, value in later.writes] == list(range(50, 100))
    assert later.reads == 100 and total.writes == [(0, 4, 200)]


@pytest.mark.parametrize("how", ["write-raises", "read-too-big"])
def test_what_a_routed_device_raises_ends_the_run_with_an_error(guest_image, how):
    class Broken(Port):
        def write(self, offset, size, value):
            if value == 10 and how == "write-raises":
                raise RuntimeError("device broke on the 11th write")
            super().write(offset, size, value)

    port = Broken(answer=lambda n: 0x1FF if n == 10 and how == "read-too-big" else 0)
    with Machine(MachineConfig(kernel=guest_image("port_loop"))) as machine:
        machine.add_pio_device(0x5E0, 1, port, "broken")
        machine.add_pio_device(0x5E4, 4, Port(), "total")
        result = machine.run(timeout=RUN_TIMEOUT)
    assert result.kind is ExitKind.ERROR, result
    expected = ("RuntimeError: device broke on the 11th write" if how == "write-raises"
                else "OverflowError")
    assert expected in result.message, result.message


def test_a_port_no_device_holds_reads_all_ones_and_is_logged_once(guest_image, caplog):
    """After the first access (which the bus logs), the run loop answers a port nobody holds
    itself, as the bus does: reads all ones, writes dropped."""
    import logging

    total = Port()
    with caplog.at_level(logging.INFO, logger="hvvmm.bus"):
        with Machine(MachineConfig(kernel=guest_image("port_loop"))) as machine:
            machine.add_pio_device(0x5E4, 4, total, "total")
            bus, through_bus = machine.pio_bus, []
            bus_read, bus_write = bus.read, bus.write
            bus.read = lambda port, size: through_bus.append(port) or bus_read(port, size)
            bus.write = lambda port, size, value: (through_bus.append(port),
                                                   bus_write(port, size, value))
            result = machine.run(timeout=RUN_TIMEOUT)
    assert_guest_passed(result, machine.console_text)
    assert total.writes == [(0, 4, 100 * 0xFF)]
    assert through_bus.count(0x5E0) == 2  # the first write and the first read; then C
    unhandled = [r.getMessage() for r in caplog.records if "unhandled" in r.getMessage()
                 and "0x5e0" in r.getMessage()]
    assert len(unhandled) == 2, unhandled  # one write, one read
