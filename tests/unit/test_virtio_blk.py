"""virtio-blk request handling on bytearray guest memory, and the virtio-pci transport's
registers, interrupts and error handling (no /dev/kvm)."""

import struct
import threading
import time

import pytest

from hvvmm.block import SECTOR_SIZE, BlockError, RawBackend
from hvvmm.devices.virtio_blk import (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
                                      VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
                                      VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                      DriveSpec, DriveSpecError, VirtioBlk, parse_drive_spec)
from hvvmm.memory import GuestMemory
from hvvmm.virtio.pci import (F_RING_EVENT_IDX, F_VERSION_1, STATUS_DRIVER, STATUS_DRIVER_OK,
                              STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VirtioPciTransport)
from hvvmm.virtio.queue import VirtqueueError

from virtio_driver import AVAIL, DESC, MEMORY_SIZE, USED, Driver

SECTORS = 64


class MemoryBackend:
    def __init__(self, sectors=SECTORS, read_only=False):
        self.data = bytearray(bytes(range(256)) * (sectors * SECTOR_SIZE // 256))
        self.size = len(self.data)
        self.read_only = read_only
        self.flushes = 0
        self.discarded = []
        self.closed = False

    def read(self, sector, count):
        if (sector + count) * SECTOR_SIZE > self.size:
            raise BlockError(22, "out of range")
        return bytes(self.data[sector * SECTOR_SIZE:(sector + count) * SECTOR_SIZE])

    def write(self, sector, data):
        if self.read_only:
            raise BlockError(30, "read-only")
        self.data[sector * SECTOR_SIZE:sector * SECTOR_SIZE + len(data)] = data

    def flush(self):
        self.flushes += 1

    def discard(self, sector, count):
        self.discarded.append((sector, count))

    def close(self):
        self.closed = True


def request(d, kind, sector=0, out=b"", in_length=0, indirect=False, split_header=False):
    """Post a request; returns (head, data address, status address)."""
    header = struct.pack("<IIQ", kind, 0, sector)
    buffers = []
    if split_header:
        buffers += [(d.alloc(8, header[:8]), 8, False), (d.alloc(8, header[8:]), 8, False)]
    else:
        buffers.append((d.alloc(16, header), 16, False))
    if out:
        buffers.append((d.alloc(len(out), out), len(out), False))
    data = None
    if in_length:
        data = d.alloc(in_length)
        buffers.append((data, in_length, True))
    status = d.alloc(1, b"\xee")
    buffers.append((status, 1, True))
    head = d.post(buffers, indirect=indirect)
    return head, data, status


def serve(d, blk):
    chain = d.queue.pop(d.memory)
    written = blk.handle(d.memory, chain)
    d.queue.push(d.memory, chain.head, written)
    return written


@pytest.mark.parametrize("indirect", [False, True])
def test_read_returns_the_sectors(indirect):
    d, backend = Driver(), MemoryBackend()
    blk = VirtioBlk(backend)
    head, data, status = request(d, VIRTIO_BLK_T_IN, sector=3, in_length=2 * SECTOR_SIZE,
                                 indirect=indirect)
    assert serve(d, blk) == 2 * SECTOR_SIZE + 1
    assert d.memory.read(data, 2 * SECTOR_SIZE) == backend.read(3, 2)
    assert d.memory.read_u8(status) == VIRTIO_BLK_S_OK
    assert d.completions() == [(head, 2 * SECTOR_SIZE + 1)]


def test_write_with_split_header_reaches_the_backend():
    d, backend = Driver(), MemoryBackend()
    payload = b"\xab" * SECTOR_SIZE
    _, _, status = request(d, VIRTIO_BLK_T_OUT, sector=5, out=payload, split_header=True)
    assert serve(d, VirtioBlk(backend)) == 1
    assert d.memory.read_u8(status) == VIRTIO_BLK_S_OK
    assert backend.read(5, 1) == payload
    assert backend.read(4, 1) == MemoryBackend().read(4, 1)


def test_flush_get_id_discard():
    d, backend = Driver(), MemoryBackend()
    blk = VirtioBlk(backend, serial="disk-serial")
    _, _, status = request(d, VIRTIO_BLK_T_FLUSH)
    serve(d, blk)
    assert backend.flushes == 1 and d.memory.read_u8(status) == VIRTIO_BLK_S_OK
    _, data, status = request(d, VIRTIO_BLK_T_GET_ID, in_length=20)
    assert serve(d, blk) == 21
    assert d.memory.read(data, 20) == b"disk-serial".ljust(20, b"\0")
    _, _, status = request(d, VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 8, 4, 0))
    serve(d, blk)
    assert backend.discarded == [(8, 4)] and d.memory.read_u8(status) == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("kind,sector,out,in_length,expected", [
    (VIRTIO_BLK_T_IN, SECTORS - 1, b"", 2 * SECTOR_SIZE, VIRTIO_BLK_S_IOERR),   # past the end
    (VIRTIO_BLK_T_IN, (1 << 64) - 1, b"", SECTOR_SIZE, VIRTIO_BLK_S_IOERR),    # huge sector
    (VIRTIO_BLK_T_IN, 0, b"", 100, VIRTIO_BLK_S_IOERR),                        # not whole sectors
    (VIRTIO_BLK_T_OUT, SECTORS, b"x" * SECTOR_SIZE, 0, VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_OUT, 0, b"x" * 100, 0, VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", SECTORS, 1, 0), 0, VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 0, 1, 1), 0, VIRTIO_BLK_S_IOERR),
    (99, 0, b"", 0, VIRTIO_BLK_S_UNSUPP),
])
def test_bad_requests_get_an_error_status_and_change_nothing(kind, sector, out, in_length,
                                                            expected):
    d, backend = Driver(), MemoryBackend()
    _, _, status = request(d, kind, sector=sector, out=out, in_length=in_length)
    serve(d, VirtioBlk(backend))
    assert d.memory.read_u8(status) == expected
    assert backend.data == MemoryBackend().data and not backend.discarded


def test_read_only_drive_refuses_writes_and_offers_no_discard():
    d, backend = Driver(), MemoryBackend(read_only=True)
    blk = VirtioBlk(backend)
    assert blk.features & (1 << 5) and not blk.features & (1 << 13)
    _, _, status = request(d, VIRTIO_BLK_T_OUT, out=b"x" * SECTOR_SIZE)
    serve(d, blk)
    assert d.memory.read_u8(status) == VIRTIO_BLK_S_IOERR
    _, _, status = request(d, VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 1, 0))
    serve(d, blk)
    assert d.memory.read_u8(status) == VIRTIO_BLK_S_UNSUPP
    assert backend.data == MemoryBackend().data


@pytest.mark.parametrize("error", [BlockError(5, "EIO"), OSError(28, "ENOSPC")])
def test_host_io_error_becomes_ioerr(error):
    class Failing(MemoryBackend):
        def read(self, sector, count):
            raise error

    d = Driver()
    _, _, status = request(d, VIRTIO_BLK_T_IN, in_length=SECTOR_SIZE)
    serve(d, VirtioBlk(Failing()))
    assert d.memory.read_u8(status) == VIRTIO_BLK_S_IOERR


def test_request_without_status_byte_breaks_the_format():
    d = Driver()
    d.post([(d.alloc(16, struct.pack("<IIQ", 0, 0, 0)), 16, False)])
    with pytest.raises(VirtqueueError):
        VirtioBlk(MemoryBackend()).handle(d.memory, d.queue.pop(d.memory))


def test_config_space_reports_capacity_and_block_size():
    config = VirtioBlk(MemoryBackend()).config_bytes()
    assert struct.unpack_from("<Q", config, 0)[0] == SECTORS
    assert struct.unpack_from("<I", config, 20)[0] == SECTOR_SIZE


def test_raw_backend_through_the_device(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(8 * SECTOR_SIZE))
    with RawBackend(path) as backend:
        d = Driver()
        request(d, VIRTIO_BLK_T_OUT, sector=2, out=b"\x42" * SECTOR_SIZE)
        serve(d, VirtioBlk(backend))
        request(d, VIRTIO_BLK_T_FLUSH)
        serve(d, VirtioBlk(backend))
    data = path.read_bytes()
    assert data[2 * SECTOR_SIZE:3 * SECTOR_SIZE] == b"\x42" * SECTOR_SIZE
    assert data[:2 * SECTOR_SIZE] == bytes(2 * SECTOR_SIZE) and data[3 * SECTOR_SIZE:] == bytes(
        5 * SECTOR_SIZE)


# -- the PCI transport ------------------------------------------------------------------------

# The device works on its own thread: a loaded CI machine may schedule it late, so the waits are
# generous (they only bound a failure; a passing test returns as soon as the condition holds).
WAIT_LIMIT = 30.0


def wait_until(condition, what: str = "the device did not get there") -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


class Transport:
    """Drive a VirtioPciTransport's modern BAR directly, as a 1.x driver would."""

    def __init__(self, backend=None):
        self.memory = GuestMemory.from_bytes(MEMORY_SIZE)
        self.msis = []
        self.backend = backend or MemoryBackend()
        self.t = VirtioPciTransport("vblk", VirtioBlk(self.backend), self.memory,
                                    lambda address, data: self.msis.append((address, data)))
        self.bar = self.t.bars[4].device
        self.intx = []
        self.t.set_intx = lambda level: self.intx.append(level)

    def common(self, offset, size, value=None):
        if value is None:
            return self.bar.read(offset, size)
        self.bar.write(offset, size, value)

    def setup(self, features=F_VERSION_1, size=16):
        self.common(0x14, 1, 0)
        self.common(0x14, 1, 1 | STATUS_DRIVER)
        self.common(0x08, 4, 0)
        self.common(0x0C, 4, features & 0xFFFF_FFFF)
        self.common(0x08, 4, 1)
        self.common(0x0C, 4, features >> 32)
        self.common(0x14, 1, 1 | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.common(0x14, 1) & STATUS_FEATURES_OK
        self.common(0x16, 2, 0)
        self.common(0x18, 2, size)
        for offset, address in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
            self.common(offset, 4, address)
            self.common(offset + 4, 4, 0)
        self.common(0x1C, 2, 1)
        self.common(0x14, 1, 1 | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        driver = Driver(size, self.memory)
        driver.queue = self.t.queues[0]
        return driver

    def kick(self):
        self.bar.write(0x3000, 2, 0)

    def wait_used(self, driver, count):
        wait_until(lambda: self.memory.read_u16(USED + 2) == count,
                   "the device did not complete the requests")


@pytest.fixture
def transport():
    tr = Transport()
    yield tr
    tr.t.close()


def test_identity_and_features(transport):
    t = transport.t
    assert t.config_read(0, 4) == 0x1001_1AF4
    assert t.config_read(0x2C, 4) == 0x0002_1AF4
    transport.common(0x00, 4, 1)
    assert transport.common(0x04, 4) & 1  # VERSION_1 (bit 32)
    assert transport.common(0x12, 2) == 1  # one queue
    transport.common(0x16, 2, 0)
    assert transport.common(0x18, 2) == 256


def test_requests_complete_off_the_calling_thread_with_intx(transport):
    d = transport.setup()
    for sector in range(4):
        request(d, VIRTIO_BLK_T_IN, sector=sector, in_length=SECTOR_SIZE)
    caller = threading.current_thread()
    transport.kick()
    transport.wait_used(d, 4)
    assert [length for _, length in d.completions()] == [SECTOR_SIZE + 1] * 4
    wait_until(lambda: True in transport.intx)
    assert transport.bar.read(0x1000, 1) == 1  # ISR: queue interrupt; reading clears it
    assert transport.bar.read(0x1000, 1) == 0
    assert transport.intx[-1] is False
    assert threading.current_thread() is caller


def test_feature_negotiation_refuses_unknown_bits(transport):
    transport.common(0x14, 1, 3)
    transport.common(0x08, 4, 0)
    transport.common(0x0C, 4, 1 << 31 | 1 << 30)  # bits the device does not offer
    transport.common(0x08, 4, 1)
    transport.common(0x0C, 4, 1 << 20)
    transport.common(0x14, 1, 3 | STATUS_FEATURES_OK)
    assert not transport.common(0x14, 1) & STATUS_FEATURES_OK


def test_broken_ring_sets_needs_reset_and_reset_recovers(transport):
    d = transport.setup()
    d.write_desc(DESC, 0, 0x10000, 16, 1, 0)  # NEXT to itself: a loop
    d.publish(0)
    transport.kick()
    wait_until(lambda: transport.common(0x14, 1) & STATUS_NEEDS_RESET)
    assert transport.common(0x15, 1) == 1  # config generation moved
    transport.common(0x14, 1, 0)
    assert transport.common(0x14, 1) == 0
    d = transport.setup()
    request(d, VIRTIO_BLK_T_IN, in_length=SECTOR_SIZE)
    transport.kick()
    transport.wait_used(d, 1)


def test_queue_outside_ram_is_refused_when_enabled(transport):
    transport.common(0x14, 1, 3)
    transport.common(0x16, 2, 0)
    transport.common(0x20, 4, 0xFFFF_0000)
    transport.common(0x1C, 2, 1)
    assert transport.common(0x1C, 2) == 0
    assert transport.common(0x14, 1) & STATUS_NEEDS_RESET


def test_msix_delivers_the_queue_vector_and_holds_it_while_masked(transport):
    t = transport.t
    cap = t._msix_cap
    t.config_write(cap + 2, 2, 0x8000)  # MSI-X enable
    msix = t.bars[1].device
    msix.write(16 * 1, 4, 0xFEE0_0000)
    msix.write(16 * 1 + 8, 4, 0x41)
    msix.write(16 * 1 + 12, 4, 1)  # masked
    d = transport.setup(features=F_VERSION_1 | F_RING_EVENT_IDX)
    transport.common(0x16, 2, 0)
    transport.common(0x1A, 2, 1)  # queue 0 -> vector 1
    assert transport.common(0x1A, 2) == 1
    d.memory.write_u16(AVAIL + 4 + 2 * 16, 0)  # used_event 0: interrupt for the first entry
    request(d, VIRTIO_BLK_T_IN, in_length=SECTOR_SIZE)
    transport.kick()
    transport.wait_used(d, 1)
    wait_until(lambda: msix.read(0x800, 8) & 2)
    assert transport.msis == []
    msix.write(16 * 1 + 12, 4, 0)  # unmask: the pending message goes out
    assert transport.msis == [(0xFEE0_0000, 0x41)]
    assert msix.read(0x800, 8) == 0


def test_an_msi_kvm_refuses_is_dropped_and_the_device_goes_on(transport):
    """KVM_SIGNAL_MSI fails (EPERM) for a message aimed at no CPU; the guest wrote it, so
    neither the vCPU unmasking the vector nor the worker completing requests may fail."""
    t = transport.t
    refused = []

    def signal_msi(address, data):
        refused.append((address, data))
        raise PermissionError(1, "Operation not permitted")

    t._signal_msi = signal_msi
    t.config_write(t._msix_cap + 2, 2, 0x8000)
    msix = t.bars[1].device
    msix.write(16 * 1, 4, 0xFEE5_5000)  # destination APIC 0x55: no such CPU
    d = transport.setup()
    transport.common(0x1A, 2, 1)
    msix.write(16 * 1 + 12, 4, 0)  # unmask: nothing pending yet
    for count in (1, 2):
        request(d, VIRTIO_BLK_T_IN, in_length=SECTOR_SIZE)
        transport.kick()
        transport.wait_used(d, count)
    deadline = time.monotonic() + 5
    while len(refused) < 2:
        assert time.monotonic() < deadline, refused
        time.sleep(0.001)
    assert not t.status & STATUS_NEEDS_RESET
    assert t._worker.is_alive()


def test_reset_returns_while_another_vcpu_keeps_posting(transport):
    """A driver that posts a new request for every one completed keeps the worker's loop
    going; a reset from another vCPU must still get its turn."""
    header = 0x20000
    status = 0x20100
    transport.memory.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    d = transport.setup()
    backend = transport.backend
    posting = threading.Event()
    posting.set()
    flush = backend.flush

    def flush_and_post_another():
        flush()
        if posting.is_set():  # "the other vCPU" posts the next request meanwhile
            d.post([(header, 16, False), (status, 1, True)])

    backend.flush = flush_and_post_another
    d.post([(header, 16, False), (status, 1, True)])
    transport.kick()
    deadline = time.monotonic() + 5
    while backend.flushes < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    resetter = threading.Thread(target=transport.common, args=(0x14, 1, 0), daemon=True)
    resetter.start()
    resetter.join(5)
    stuck = resetter.is_alive()
    posting.clear()
    resetter.join(5)
    assert not stuck, "the reset waited for a driver that never stops posting"
    assert transport.common(0x14, 1) == 0


def test_legacy_bar_drives_the_same_queue():
    tr = Transport()
    try:
        legacy = tr.t.bars[0].device
        legacy.write(0x12, 1, 0)
        legacy.write(0x12, 1, 3)
        assert legacy.read(0x0C, 2) == 256
        legacy.write(0x0E, 2, 0)
        legacy.write(0x08, 4, DESC >> 12)
        legacy.write(0x12, 1, 7)
        q = tr.t.queues[0]
        assert q.ready and q.avail == DESC + 16 * 256 and q.used % 4096 == 0
        assert legacy.read(0x14, 4) == SECTORS  # device config after the 20-byte header
        d = Driver(256, tr.memory, desc=q.desc, avail=q.avail, used=q.used)
        d.queue = q
        head, data, status = request(d, VIRTIO_BLK_T_IN, sector=1, in_length=SECTOR_SIZE)
        legacy.write(0x10, 2, 0)
        wait_until(lambda: tr.memory.read_u16(q.used + 2) == 1)
        assert tr.memory.read(data, SECTOR_SIZE) == tr.backend.read(1, 1)
    finally:
        tr.t.close()


def test_close_closes_the_backend():
    tr = Transport()
    tr.t.close()
    assert tr.backend.closed


# -- --drive parsing --------------------------------------------------------------------------

def test_drive_spec_parsing():
    assert parse_drive_spec("file=a.img") == DriveSpec("a.img")
    assert parse_drive_spec("file=a,,b.img,format=raw,readonly=on,cache=none") == DriveSpec(
        "a,b.img", "raw", True, "none")
    assert parse_drive_spec("disk.vhd,format=vhd") == DriveSpec("disk.vhd", "vhd")
    for bad in ("format=raw", "file=a,bogus=1", "file=a,readonly=yes", "file=a,cache=unsafe",
                "file=a,file=b", "file=a,junk"):
        with pytest.raises(DriveSpecError):
            parse_drive_spec(bad)


# -- guest-hostile register traffic ------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

access = st.tuples(st.sampled_from(["modern", "legacy", "msix", "config"]),
                   st.booleans(), st.integers(0, 0x3FFF), st.sampled_from([1, 2, 4]),
                   st.integers(0, 0xFFFF_FFFF))


@settings(max_examples=60, deadline=None)
@given(st.lists(access, max_size=60))
def test_any_register_traffic_never_raises_and_the_device_still_resets(accesses):
    tr = Transport()
    try:
        bars = {"modern": tr.t.bars[4].device, "legacy": tr.t.bars[0].device,
                "msix": tr.t.bars[1].device}
        limits = {"modern": 0x4000, "legacy": 0x40, "msix": 0x1000, "config": 0x100}
        for target, write, offset, size, value in accesses:
            offset %= limits[target]
            offset -= offset % size
            value &= (1 << (8 * size)) - 1
            if target == "config":
                if write:
                    tr.t.config_write(offset, size, value)
                else:
                    tr.t.config_read(offset, size)
            elif write:
                bars[target].write(offset, size, value)
            else:
                bars[target].read(offset, size)
        tr.common(0x14, 1, 0)
        assert tr.common(0x14, 1) == 0
        d = tr.setup()
        request(d, VIRTIO_BLK_T_IN, in_length=SECTOR_SIZE)
        tr.kick()
        tr.wait_used(d, 1)
    finally:
        tr.t.close()


def test_ioeventfds_follow_the_bars():
    from hvvmm.bus import mmio_bus, pio_bus
    from hvvmm.layout import MiB
    from hvvmm.pci.pc import PcPci

    calls = []

    def ioeventfd(fd, address, length, *, pio, datamatch=None, deassign=False):
        calls.append((address, length, pio, datamatch, deassign))

    memory = GuestMemory.from_bytes(MEMORY_SIZE)
    t = VirtioPciTransport("vblk", VirtioBlk(MemoryBackend()), memory, lambda a, d: None,
                           ioeventfd)
    try:
        pio, mmio = pio_bus(), mmio_bus()
        pc = PcPci(pio, mmio, 256 * MiB, lambda irq: None, pam_ram=True)
        pc.add(t)
        t.config_write(0x20, 4, 0xC000_0000)
        t.config_write(0x10, 4, 0xC040)
        assert calls == []  # not decoded yet
        t.config_write(0x04, 2, 0x3)
        assert sorted(calls) == sorted([(0xC000_3000, 2, False, None, False),
                                        (0xC050, 2, True, 0, False)])
        calls.clear()
        t.config_write(0x20, 4, 0xC001_0000)  # moved: the old one goes, the new one comes
        assert calls == [(0xC000_3000, 2, False, None, True), (0xC001_3000, 2, False, None, False)]
        calls.clear()
        t.config_write(0x04, 2, 0)
        assert sorted(calls) == sorted([(0xC001_3000, 2, False, None, True),
                                        (0xC050, 2, True, 0, True)])
    finally:
        t.close()


def test_attaching_more_drives_than_slots_closes_every_one(tmp_path):
    """The drive that finds no free slot is refused with ImageError, and the drives attached
    before it are closed (workers joined, images unlocked), not leaked."""
    from types import SimpleNamespace

    from hvvmm.devices.virtio_blk import attach_drives
    from hvvmm.machine import ImageError

    class TwoSlots:
        def __init__(self):
            self.plugged = []

        def add(self, function):
            if len(self.plugged) == 2:
                raise ValueError("no free PCI slot")
            self.plugged.append(function)
            return 3 + len(self.plugged)

    pci = TwoSlots()
    machine = SimpleNamespace(kvm=SimpleNamespace(check_extension=lambda cap: 0),
                              vm=SimpleNamespace(signal_msi=lambda address, data: 1),
                              memory=GuestMemory.from_bytes(MEMORY_SIZE), pci=pci)
    drives = []
    for index in range(3):
        path = tmp_path / f"d{index}.img"
        path.write_bytes(bytes(SECTOR_SIZE * 8))
        drives.append(DriveSpec(str(path), "raw"))
    before = threading.active_count()
    with pytest.raises(ImageError, match="no free PCI slot"):
        attach_drives(machine, drives)
    assert threading.active_count() == before
    assert len(pci.plugged) == 2 and not any(t._worker.is_alive() for t in pci.plugged)
    from hvvmm.block import open_image
    for spec in drives:  # every image lock was released
        open_image(spec.file, "raw").close()
