"""The split virtqueue, device side (Virtio 1.2, §2.7).

Three areas in guest RAM: the descriptor table (16-byte ``{le64 addr, le32 len, le16 flags,
le16 next}``), the driver ("available") ring ``{le16 flags, le16 idx, le16 ring[size],
le16 used_event}`` and the device ("used") ring ``{le16 flags, le16 idx, {le32 id, le32
len}[size], le16 avail_event}``.

Everything the driver wrote is guest-controlled and checked: a head or ``next`` index past the
table, a chain longer than the table (a loop), an indirect table that is empty, misaligned, longer
than the queue, nested or combined with ``NEXT`` (§2.7.5.3.1), a buffer outside RAM, a device-readable buffer after a
device-writable one (§2.7.4.2), or more new entries than the ring holds all raise
:class:`VirtqueueError`; the device then reports DEVICE_NEEDS_RESET instead of touching memory.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from ..memory import GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESCRIPTOR = struct.Struct("<QIHH")
USED_ELEMENT = struct.Struct("<II")
MAX_QUEUE_SIZE = 32768
MAX_CHAIN_BYTES = 1 << 32  # a chain's buffers together; each device has its own, lower limit


_BARRIER_LOCK = threading.Lock()


def store_load_barrier() -> None:
    """Make this thread's earlier stores to guest RAM visible before its later loads. x86 may
    satisfy a load ahead of an earlier store to another address (Intel SDM Vol. 3A §8.2.3.4);
    a locked instruction orders them (§8.2.3.9), and taking a CPython lock is one (an atomic
    compare-and-swap). The driver places the matching barrier on its side (Linux
    ``virtio_mb``); without the pair, a notification or an interrupt can be lost."""
    with _BARRIER_LOCK:
        pass


class VirtqueueError(Exception):
    """The driver broke the virtqueue format; the device must not go on using the queue."""


@dataclass(frozen=True)
class Buffer:
    address: int
    length: int
    writable: bool


@dataclass
class Chain:
    """One request: the head index (returned in the used ring) and its buffers in order."""

    head: int
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]


def split_queue_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, driver ring and device ring for ``size`` entries."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class VirtQueue:
    """One split virtqueue. Configure ``size`` and the three addresses, then set ``ready``."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.desc = self.avail = self.used = 0
        self.ready = False
        self.msix_vector = 0xFFFF
        self.event_idx = False
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used: int | None = None  # used idx at the last interrupt

    # -- validation ----------------------------------------------------------------------------

    def check(self, memory: GuestMemory) -> None:
        """Refuse a queue whose size or areas are invalid (§2.7: size a power of 2; alignment
        16/2/4; each area inside RAM)."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to "
                                 f"{self.max_size}")
        desc_bytes, avail_bytes, used_bytes = split_queue_sizes(size)
        for name, address, length, align in (("descriptor table", self.desc, desc_bytes, 16),
                                             ("driver ring", self.avail, avail_bytes, 2),
                                             ("device ring", self.used, used_bytes, 4)):
            if address % align or not memory.contains(address, length):
                raise VirtqueueError(f"{name} at {address:#x}+{length:#x} is misaligned or "
                                     "outside RAM")

    # -- the driver ring -----------------------------------------------------------------------

    def _avail_idx(self, memory: GuestMemory) -> int:
        return memory.read_u16(self.avail + 2)

    def has_work(self, memory: GuestMemory) -> bool:
        return self._avail_idx(memory) != self.last_avail

    def pop(self, memory: GuestMemory) -> Chain | None:
        """The next available chain, or None when the driver has posted nothing new."""
        try:
            avail_idx = self._avail_idx(memory)
            pending = (avail_idx - self.last_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise VirtqueueError(f"driver ring index moved {pending} entries in a ring of "
                                     f"{self.size}")
            head = memory.read_u16(self.avail + 4 + 2 * (self.last_avail % self.size))
            chain = self._walk(memory, head)
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, memory: GuestMemory, head: int) -> Chain:
        if head >= self.size:
            raise VirtqueueError(f"head {head} is outside the table of {self.size}")
        chain = Chain(head)
        table, table_size, index = self.desc, self.size, head
        indirect = False
        seen = 0
        total = 0
        while True:
            seen += 1
            if seen > table_size:
                raise VirtqueueError(f"descriptor chain from {head} loops or exceeds its table")
            address, length, flags, next_index = DESCRIPTOR.unpack(
                memory.read(table + 16 * index, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError("nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor with NEXT set")
                if length == 0 or length % 16 or address % 16 \
                        or not memory.contains(address, length):
                    raise VirtqueueError(f"indirect table at {address:#x}+{length:#x} is empty, "
                                         "misaligned or outside RAM")
                if length // 16 > self.max_size:
                    # §2.7.5.3.1: no chain is longer than the queue size. Unbounded, a 4 GiB
                    # table would hold the worker for minutes and its buffers gigabytes of host
                    # memory; the device maximum still admits a driver that shrank its queue.
                    raise VirtqueueError(f"indirect table of {length // 16} descriptors is "
                                         f"longer than the queue ({self.max_size})")
                if chain.buffers:
                    # Allowed in principle, but then it must be the only descriptor; drivers
                    # (Linux, SeaBIOS) never mix them.
                    raise VirtqueueError("indirect descriptor after direct ones")
                table, table_size, index, indirect, seen = address, length // 16, 0, True, 0
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if not writable and chain.buffers and chain.buffers[-1].writable:
                raise VirtqueueError("device-readable buffer after a device-writable one")
            if length:
                if not memory.contains(address, length):
                    raise VirtqueueError(f"buffer {address:#x}+{length:#x} is outside RAM")
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError("descriptor chain longer than 4 GiB")
                chain.buffers.append(Buffer(address, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if next_index >= table_size:
                raise VirtqueueError(f"next index {next_index} is outside the table of "
                                     f"{table_size}")
            index = next_index

    # -- the device ring -----------------------------------------------------------------------

    def push(self, memory: GuestMemory, head: int, written: int) -> None:
        """Return a chain: ``written`` bytes were written into its device-writable buffers."""
        try:
            slot = self.used + 4 + 8 * (self.used_idx % self.size)
            memory.write(slot, USED_ELEMENT.pack(head, written))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            memory.write_u16(self.used + 2, self.used_idx)  # after the element (x86: in order)
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None

    def enable_notifications(self, memory: GuestMemory) -> None:
        """Ask the driver to notify for the next entry: with EVENT_IDX, avail_event = the next
        index we will read (§2.7.10); else clear NO_NOTIFY."""
        try:
            if self.event_idx:
                memory.write_u16(self.used + 4 + 8 * self.size, self.last_avail)
            else:
                memory.write_u16(self.used, 0)
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None
        store_load_barrier()  # before the caller re-reads the driver's index

    def needs_interrupt(self, memory: GuestMemory, old_used: int) -> bool:
        """Whether the driver wants an interrupt for the entries from ``old_used`` to now
        (§2.7.10: ``vring_need_event``; without EVENT_IDX, the NO_INTERRUPT flag)."""
        new = self.used_idx
        if new == old_used:
            return False
        store_load_barrier()  # the used index is visible before the driver's event is read
        try:
            if self.event_idx:
                used_event = memory.read_u16(self.avail + 4 + 2 * self.size)
                return (new - used_event - 1) & 0xFFFF < (new - old_used) & 0xFFFF
            return not memory.read_u16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None

    # -- data ----------------------------------------------------------------------------------

    @staticmethod
    def gather(memory: GuestMemory, buffers: list[Buffer], skip: int, length: int) -> bytes:
        """``length`` bytes from the buffers, starting ``skip`` bytes in."""
        parts = []
        for buffer in buffers:
            if length <= 0:
                break
            if skip >= buffer.length:
                skip -= buffer.length
                continue
            take = min(buffer.length - skip, length)
            parts.append(memory.read(buffer.address + skip, take))
            length -= take
            skip = 0
        return b"".join(parts)

    @staticmethod
    def scatter(memory: GuestMemory, buffers: list[Buffer], data: bytes) -> None:
        view = memoryview(data)
        for buffer in buffers:
            if not view:
                break
            take = min(buffer.length, len(view))
            memory.write(buffer.address, view[:take])
            view = view[take:]
