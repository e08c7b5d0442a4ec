"""The split virtqueue against guest-written rings: chains, indirect tables, event index, and
every malformed layout a guest can write."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvvmm.memory import GuestMemory
from hvvmm.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                VIRTQ_DESC_F_NEXT, Buffer, VirtQueue,
                                VirtqueueError)

from virtio_driver import AVAIL, DESC, MEMORY_SIZE, USED, Driver


def test_direct_chain_is_walked_in_order():
    d = Driver()
    head = d.post([(0x10000, 16, False), (0x11000, 512, True), (0x12000, 1, True)])
    chain = d.queue.pop(d.memory)
    assert chain.head == head
    assert chain.buffers == [Buffer(0x10000, 16, False), Buffer(0x11000, 512, True),
                             Buffer(0x12000, 1, True)]
    assert d.queue.pop(d.memory) is None


def test_indirect_chain_is_walked():
    d = Driver()
    d.post([(0x10000, 16, False), (0x11000, 4096, True)], indirect=True)
    chain = d.queue.pop(d.memory)
    assert [b.length for b in chain.buffers] == [16, 4096]
    assert chain.writable == [Buffer(0x11000, 4096, True)]


def test_several_chains_pop_in_posting_order_and_complete_in_any_order():
    d = Driver()
    heads = [d.post([(0x10000 + 0x100 * i, 16, False)]) for i in range(5)]
    chains = [d.queue.pop(d.memory) for _ in range(5)]
    assert [c.head for c in chains] == heads
    for chain in reversed(chains):
        d.queue.push(d.memory, chain.head, 7)
    assert d.completions() == [(h, 7) for h in reversed(heads)]


def test_ring_wraps_around_the_16_bit_index():
    d = Driver(size=4)
    d.queue.last_avail = d.avail_idx = 0xFFFE
    d.queue.used_idx = d.used_seen = 0xFFFE
    d.memory.write_u16(USED + 2, 0xFFFE)
    for i in range(4):
        d.post([(0x10000, 1, True)])
        chain = d.queue.pop(d.memory)
        d.queue.push(d.memory, chain.head, 1)
    assert len(d.completions()) == 4
    assert d.queue.last_avail == 2


@pytest.mark.parametrize("corrupt,match", [
    (lambda d: d.write_desc(DESC, 0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 0), "loops"),
    (lambda d: d.write_desc(DESC, 0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 99), "next index"),
    # one past the last entry (16 descriptors): the boundary itself
    (lambda d: d.write_desc(DESC, 0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 16), "next index"),
    (lambda d: (d.write_desc(0x4000, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 2),
                d.write_desc(DESC, 0, 0x4000, 32, VIRTQ_DESC_F_INDIRECT)), "next index"),
    (lambda d: d.write_desc(DESC, 0, MEMORY_SIZE - 8, 16, 0), "outside RAM"),
    (lambda d: d.write_desc(DESC, 0, 1 << 40, 16, 0), "outside RAM"),
    (lambda d: d.write_desc(DESC, 0, 0x10000, 0xFFFF_FFFF, 0), "outside RAM"),
    (lambda d: d.write_desc(DESC, 0, 0x4000, 0, VIRTQ_DESC_F_INDIRECT), "indirect table"),
    (lambda d: d.write_desc(DESC, 0, 0x4008, 32, VIRTQ_DESC_F_INDIRECT), "indirect table"),
    (lambda d: d.write_desc(DESC, 0, 0x4000, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1),
     "NEXT"),
    (lambda d: d.write_desc(DESC, 0, MEMORY_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT),
     "indirect table"),
    # Zero-length entries that end in a loop-free chain: only the table's size stops them.
    (lambda d: d.write_desc(DESC, 0, 0x20000, 16 * 257, VIRTQ_DESC_F_INDIRECT),
     "longer than the queue"),
])
def test_malformed_chains_are_refused(corrupt, match):
    d = Driver()
    corrupt(d)
    d.publish(0)
    with pytest.raises(VirtqueueError, match=match):
        d.queue.pop(d.memory)


def test_nested_indirect_and_indirect_loops_are_refused():
    d = Driver()
    d.write_desc(0x4000, 0, 0x4100, 16, VIRTQ_DESC_F_INDIRECT)
    d.write_desc(DESC, 0, 0x4000, 16, VIRTQ_DESC_F_INDIRECT)
    d.publish(0)
    with pytest.raises(VirtqueueError, match="nested"):
        d.queue.pop(d.memory)
    d = Driver()
    d.write_desc(0x4000, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(0x4000, 1, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0)
    d.write_desc(DESC, 0, 0x4000, 32, VIRTQ_DESC_F_INDIRECT)
    d.publish(0)
    with pytest.raises(VirtqueueError, match="loops"):
        d.queue.pop(d.memory)


def test_readable_after_writable_is_refused():
    d = Driver()
    d.post([(0x10000, 1, True), (0x10010, 1, False)])
    with pytest.raises(VirtqueueError, match="after a device-writable"):
        d.queue.pop(d.memory)


def test_head_outside_the_table_and_runaway_index_are_refused():
    d = Driver()
    d.publish(16)
    with pytest.raises(VirtqueueError, match="head"):
        d.queue.pop(d.memory)
    d = Driver()
    d.memory.write_u16(AVAIL + 2, 17)  # 17 new entries in a ring of 16
    with pytest.raises(VirtqueueError, match="moved"):
        d.queue.pop(d.memory)


@pytest.mark.parametrize("size,desc,avail,used", [(3, DESC, AVAIL, USED), (0, DESC, AVAIL, USED),
                                                  (512, DESC, AVAIL, USED),
                                                  (16, DESC + 8, AVAIL, USED),
                                                  (16, DESC, AVAIL, MEMORY_SIZE - 8)])
def test_bad_queue_configuration_is_refused(size, desc, avail, used):
    q = VirtQueue(256)
    q.size, q.desc, q.avail, q.used = size, desc, avail, used
    with pytest.raises(VirtqueueError):
        q.check(GuestMemory.from_bytes(MEMORY_SIZE))


def test_event_index_interrupt_suppression():
    d = Driver()
    d.queue.event_idx = True
    for _ in range(3):
        d.post([(0x10000, 1, True)])
        chain = d.queue.pop(d.memory)
        d.queue.push(d.memory, chain.head, 1)
    # used_event = 1: the driver wants an interrupt once entry 1 is used (here 0..2 were).
    d.memory.write_u16(AVAIL + 4 + 2 * d.size, 1)
    assert d.queue.needs_interrupt(d.memory, 0)
    d.memory.write_u16(AVAIL + 4 + 2 * d.size, 5)
    assert not d.queue.needs_interrupt(d.memory, 0)
    d.queue.enable_notifications(d.memory)
    assert d.memory.read_u16(USED + 4 + 8 * d.size) == 3  # avail_event


def test_no_interrupt_flag_without_event_index():
    d = Driver()
    d.post([(0x10000, 1, True)])
    d.queue.push(d.memory, d.queue.pop(d.memory).head, 1)
    assert d.queue.needs_interrupt(d.memory, 0)
    d.memory.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not d.queue.needs_interrupt(d.memory, 0)


descriptor = st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1),
                       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(descriptor, min_size=16, max_size=16), st.lists(descriptor, max_size=8),
       st.integers(0, 0xFFFF), st.lists(st.integers(0, 0xFFFF), min_size=16, max_size=16))
def test_arbitrary_rings_never_escape_ram_or_raise_anything_else(table, indirect, avail_idx,
                                                                  ring):
    d = Driver()
    for i, (address, length, flags, nxt) in enumerate(table):
        # Steer some descriptors at the indirect table so those paths are reached.
        if flags & VIRTQ_DESC_F_INDIRECT and i % 2:
            address, length = 0x4000, 16 * max(len(indirect), 1)
        d.memory.write(DESC + 16 * i, struct.pack("<QIHH", address, length, flags, nxt))
    for i, (address, length, flags, nxt) in enumerate(indirect):
        d.memory.write(0x4000 + 16 * i, struct.pack("<QIHH", address, length, flags, nxt))
    for i, head in enumerate(ring):
        d.memory.write_u16(AVAIL + 4 + 2 * i, head)
    d.memory.write_u16(AVAIL + 2, avail_idx)
    for _ in range(4):
        try:
            chain = d.queue.pop(d.memory)
        except VirtqueueError:
            return
        if chain is None:
            return
        assert len(chain.buffers) <= 16 + 8
        for buffer in chain.buffers:
            assert d.memory.contains(buffer.address, buffer.length)
        d.queue.push(d.memory, chain.head, 0)


@given(st.lists(st.tuples(st.integers(1, 600), st.booleans()), min_size=1, max_size=12),
       st.booleans())
def test_any_valid_chain_round_trips(shapes, indirect):
    d = Driver()
    shapes = sorted(shapes, key=lambda s: s[1])  # readable first
    buffers = [(d.alloc(length), length, writable) for length, writable in shapes]
    if not indirect and len(buffers) > d.size:
        buffers = buffers[:d.size]
    head = d.post(buffers, indirect=indirect)
    chain = d.queue.pop(d.memory)
    assert chain.head == head
    assert [(b.address, b.length, b.writable) for b in chain.buffers] == buffers


def test_gather_and_scatter_cross_buffer_boundaries():
    memory = GuestMemory.from_bytes(0x10000)
    buffers = [Buffer(0x1000, 3, True), Buffer(0x2000, 5, True)]
    VirtQueue.scatter(memory, buffers, b"abcdefgh")
    assert memory.read(0x1000, 3) == b"abc" and memory.read(0x2000, 5) == b"defgh"
    assert VirtQueue.gather(memory, buffers, 2, 4) == b"cdef"
