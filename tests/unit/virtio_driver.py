"""A minimal virtio driver for unit tests: a split virtqueue laid out in bytearray guest memory,
requests posted as direct or indirect chains, completions read from the used ring."""

from __future__ import annotations

import struct

from hvvmm.memory import GuestMemory
from hvvmm.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                VirtQueue)

MEMORY_SIZE = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
INDIRECT_BASE = 0x4000
DATA_BASE = 0x10000


class Driver:
    def __init__(self, size: int = 16, memory: GuestMemory | None = None, *, desc: int = DESC,
                 avail: int = AVAIL, used: int = USED):
        self.memory = memory or GuestMemory.from_bytes(MEMORY_SIZE)
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.queue = VirtQueue(256)
        queue = self.queue
        queue.size, queue.desc, queue.avail, queue.used = size, desc, avail, used
        self.queue.check(self.memory)
        self.queue.ready = True
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.next_indirect = INDIRECT_BASE
        self.next_data = DATA_BASE

    def alloc(self, length: int, fill: bytes = b"") -> int:
        address = self.next_data
        self.next_data += (length + 15) & ~15
        if fill:
            self.memory.write(address, fill)
        return address

    def write_desc(self, table: int, index: int, address: int, length: int, flags: int,
                   next_index: int = 0) -> None:
        self.memory.write(table + 16 * index, struct.pack("<QIHH", address, length, flags,
                                                          next_index))

    def post(self, buffers: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Post a chain of (address, length, device_writable); returns its head."""
        if indirect:
            table = self.next_indirect
            self.next_indirect += 16 * len(buffers)
            for i, (address, length, writable) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | \
                        (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_desc(table, i, address, length, flags, i + 1)
            head = self.next_desc % self.size
            self.next_desc += 1
            self.write_desc(self.desc, head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
        else:
            indices = [(self.next_desc + i) % self.size for i in range(len(buffers))]
            self.next_desc += len(buffers)
            for i, (address, length, writable) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | \
                        (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_desc(self.desc, indices[i], address, length, flags,
                                indices[i + 1] if i + 1 < len(buffers) else 0)
            head = indices[0]
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def completions(self) -> list[tuple[int, int]]:
        done = []
        used_idx = self.memory.read_u16(self.used + 2)
        while self.used_seen != used_idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            done.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return done
