import pytest
from hypothesis import given, strategies as st

from hvvmm.bus import Bus, BusError, pio_bus


class Register:
    """An 8-byte register file that records accesses."""

    def __init__(self):
        self.data = bytearray(8)
        self.accesses = []

    def read(self, offset, size):
        self.accesses.append(("r", offset, size))
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset, size, value):
        self.accesses.append(("w", offset, size, value))
        self.data[offset:offset + size] = value.to_bytes(size, "little")


def test_access_is_routed_with_offset_relative_to_base():
    bus = pio_bus()
    dev = Register()
    bus.register(0x3F8, 8, dev)
    bus.write(0x3FB, 1, 0x80)
    assert dev.accesses == [("w", 3, 1, 0x80)]
    assert bus.read(0x3FB, 1) == 0x80


@pytest.mark.parametrize("base,length", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 8), (0x3FC, 2),
                                         (0x3F0, 0x20)])
def test_overlapping_ranges_are_refused(base, length):
    bus = pio_bus()
    bus.register(0x3F8, 8, Register(), "serial")
    with pytest.raises(BusError, match="overlaps serial"):
        bus.register(base, length, Register(), "other")


def test_adjacent_ranges_are_fine():
    bus = pio_bus()
    bus.register(0x3F8, 8, Register())
    bus.register(0x3F0, 8, Register())
    bus.register(0x400, 8, Register())
    assert [r.base for r in bus.ranges] == [0x3F0, 0x3F8, 0x400]


@pytest.mark.parametrize("base,length", [(-1, 4), (0xFFFF, 2), (0, 0), (0x10, -4)])
def test_bad_ranges_are_refused(base, length):
    with pytest.raises(BusError, match="bad range"):
        pio_bus().register(base, length, Register())


def test_access_must_fit_wholly_inside_the_device():
    bus = pio_bus()
    dev = Register()
    bus.register(0x100, 8, dev)
    assert bus.read(0x106, 4) == 0xFFFF_FFFF  # straddles the end: nobody claims it
    bus.write(0x107, 2, 0x1234)
    assert dev.accesses == []


def test_unclaimed_reads_are_all_ones_and_logged_once(caplog):
    bus = pio_bus()
    caplog.set_level("INFO", logger="hvvmm.bus")
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 2) == 0xFFFF
    assert bus.read(0x80, 4) == 0xFFFF_FFFF
    bus.write(0x80, 1, 5)
    bus.write(0x80, 1, 6)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "unhandled read" in m]) == 1
    assert len([m for m in messages if "unhandled write" in m]) == 1


def test_unregister_frees_the_range():
    bus = pio_bus()
    bus.register(0x60, 1, Register())
    bus.unregister(0x60)
    assert bus.find(0x60) is None
    bus.register(0x60, 1, Register())
    with pytest.raises(BusError):
        bus.unregister(0x61)


@given(st.lists(st.tuples(st.integers(0, 0x200), st.integers(1, 0x40)), max_size=20),
       st.integers(0, 0x260), st.sampled_from([1, 2, 4]))
def test_lookup_agrees_with_a_linear_scan(ranges, address, size):
    bus = Bus("test", 0x1000)
    placed = []
    for base, length in ranges:
        try:
            bus.register(base, length, Register())
            placed.append((base, length))
        except BusError:
            assert any(base < b + l and b < base + length for b, l in placed)
    found = bus.find(address, size)
    expected = [(b, l) for b, l in placed if b <= address and address + size <= b + l]
    assert (found.base, found.length) == expected[0] if expected else found is None


def test_unclaimed_address_memory_is_bounded():
    # The guest chooses the addresses: remembering every one it probed would let it grow the
    # VMM's memory without limit.
    bus = Bus("mmio", 1 << 40)
    for address in range(0, 50_000 * 8, 8):
        bus.read(address, 4)
    assert len(bus._log_once._seen) <= 1024


def test_lookups_stay_consistent_while_devices_come_and_go():
    # The host may add or remove devices while vCPU threads route accesses.
    import threading

    bus = pio_bus()
    device_b = Register()
    bus.register(0x200, 8, device_b, "b")
    stop = threading.Event()
    errors = []

    def churn():
        while not stop.is_set():
            bus.register(0x100, 8, Register(), "a")
            bus.unregister(0x100)

    def route():
        try:
            for _ in range(50_000):
                entry = bus.find(0x204, 2)
                assert entry is not None and entry.device is device_b
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        route()
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_cached_routes_reach_the_device_with_its_offset_and_go_when_devices_change():
    bus = pio_bus()
    reg = Register()
    bus.register(0x3F8, 8, reg, "uart")
    routes = bus.route_cache()
    bus.cache_route(routes, "out", 0x3FA, 1, write=True)
    bus.cache_route(routes, "in", 0x3FA, 1, write=False)
    # No device holds these: None, which the run loop answers as the bus does.
    bus.cache_route(routes, "nobody", 0x80, 1, write=True)
    bus.cache_route(routes, "straddles", 0x3FF, 2, write=True)  # not wholly inside the device
    assert set(routes) == {"out", "in", "nobody", "straddles"}
    assert routes["nobody"] is None and routes["straddles"] is None
    routes["out"](0x41)
    assert reg.accesses[-1] == ("w", 2, 1, 0x41)
    assert routes["in"]() == bus.read(0x3FA, 1)
    bus.register(0x60, 1, Register(), "kbd")  # any change empties every cache
    assert routes == {}
    bus.cache_route(routes, "out", 0x3FA, 1, write=True)
    bus.unregister(0x3F8)
    assert routes == {}


def test_the_route_cache_is_bounded():
    bus = pio_bus()
    bus.register(0, 0x10000, Register(), "everything")
    routes = bus.route_cache()
    for port in range(5000):
        bus.cache_route(routes, port, port, 1, write=True)
    assert len(routes) == 4096
