"""Virtio over PCI, transitional (Virtio 1.2, §4.1): the modern capability layout and the legacy
I/O BAR, so both a 1.x driver (Linux, SeaBIOS) and a 0.9.5 driver can drive one device.

BARs, as QEMU lays out a transitional virtio-pci device:
- BAR0, I/O, 64 bytes: the legacy header (§4.1.4.8), device configuration after it;
- BAR1, memory, 4 KiB: the MSI-X table (at 0) and pending-bit array (at 0x800);
- BAR4, 64-bit memory, 16 KiB: common configuration (0x0000), ISR (0x1000), device configuration
  (0x2000), notifications (0x3000, ``notify_off_multiplier`` 4, queue N at 4*N).

The device's queues are served by a worker thread: a guest notification only wakes it, so the
vCPU returns to the guest at once while the backend does the I/O. Given ``ioeventfd`` (KVM's
``KVM_IOEVENTFD``), each queue's notification address is an eventfd wherever the guest places
the BARs, and a notification does not leave the kernel at all. Completions raise MSI-X through
``signal_msi`` when the driver enabled it, INTx (through the PIIX3's routing) otherwise.

A guest that breaks the virtqueue format gets DEVICE_NEEDS_RESET (§2.1.2) and a configuration
change interrupt; the device then ignores the queue until the driver resets it.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from typing import Callable, Protocol

from ..logonce import LogOnce
from ..memory import GuestMemory, GuestMemoryError
from ..pci.config import BarKind, PciFunction
from .queue import Chain, VirtQueue, VirtqueueError

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
TRANSITIONAL_DEVICE_BASE = 0x1000  # §4.1.2.3: transitional ID = 0x1000 + virtio device ID - 1

# Device status bits (§2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Feature bits (§6).
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

ISR_QUEUE = 1
ISR_CONFIG = 2
NO_VECTOR = 0xFFFF

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
PCI_CAP_VENDOR = 0x09
PCI_CAP_MSIX = 0x11
MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
MSIX_ENTRY_MASKED = 1

LEGACY_BAR, MSIX_BAR, MODERN_BAR = 0, 1, 4
LEGACY_SIZE = 0x40
MSIX_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
MODERN_SIZE = 0x4000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
COMMON_SIZE = 0x38


class VirtioDevice(Protocol):
    """A device type (block, ...) behind a transport."""

    device_id: int          # Virtio 1.2 §5: 2 is block
    pci_class: int
    features: int           # device feature bits (the transport adds VERSION_1 and ring ones)
    queue_count: int
    queue_max_size: int

    def config_bytes(self) -> bytes: ...

    def handle(self, memory: GuestMemory, chain: Chain) -> int:
        """Serve one request; returns the bytes written into its device-writable buffers.
        Raises VirtqueueError for a request that breaks the format."""

    def close(self) -> None: ...


class _MsixTable:
    """The MSI-X table and PBA in BAR1 (PCI 3.0 §6.8.2): 16-byte entries {addr lo, addr hi,
    data, vector control}; a masked vector's message waits as a pending bit."""

    def __init__(self, vectors: int, transport: "VirtioPciTransport"):
        self.vectors = vectors
        self.table = bytearray(16 * vectors)
        self._transport = transport
        self.reset()

    def reset(self) -> None:
        self.table[:] = bytes(len(self.table))
        for vector in range(self.vectors):
            self.table[16 * vector + 12] = MSIX_ENTRY_MASKED
        self.pending = 0

    def masked(self, vector: int) -> bool:
        return bool(self.table[16 * vector + 12] & MSIX_ENTRY_MASKED)

    def message(self, vector: int) -> tuple[int, int]:
        low, high, data, _ = struct.unpack_from("<IIII", self.table, 16 * vector)
        return high << 32 | low, data

    def read(self, offset: int, size: int) -> int:
        if offset < len(self.table) and offset + size <= len(self.table):
            return int.from_bytes(self.table[offset:offset + size], "little")
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + 8:
            shift = 8 * (offset - MSIX_PBA_OFFSET)
            return (self.pending >> shift) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset + size > len(self.table):
            return  # the PBA is read-only
        with self._transport.lock:
            self.table[offset:offset + size] = value.to_bytes(size, "little")
            self._transport.msix_changed()


class VirtioPciTransport(PciFunction):
    """A transitional virtio-pci function for ``device``; interrupts go out through
    ``signal_msi(address, data)`` (KVM_SIGNAL_MSI) or the function's INTx pin."""

    def __init__(self, name: str, device: VirtioDevice, memory: GuestMemory,
                 signal_msi: Callable[[int, int], object],
                 ioeventfd: Callable[..., None] | None = None):
        """``ioeventfd(fd, address, length, pio=, datamatch=, deassign=)`` is
        ``Vm.ioeventfd``; without it every notification is a bus write."""
        super().__init__(name, VIRTIO_VENDOR, TRANSITIONAL_DEVICE_BASE + device.device_id - 1,
                         device.pci_class, subsystem_vendor=VIRTIO_VENDOR,
                         subsystem=device.device_id, interrupt_pin=1)
        self.device = device
        self.memory = memory
        self._signal_msi = signal_msi
        self._log_once = LogOnce(log)
        self.queues = [VirtQueue(device.queue_max_size) for _ in range(device.queue_count)]
        self.msix = _MsixTable(device.queue_count + 1, self)
        legacy = self.add_bar(LEGACY_BAR, BarKind.IO, LEGACY_SIZE, _LegacyBar(self))
        self.add_bar(MSIX_BAR, BarKind.MEM32, MSIX_SIZE, self.msix)
        modern = self.add_bar(MODERN_BAR, BarKind.MEM64, MODERN_SIZE, _ModernBar(self),
                              prefetchable=True)
        # The worker sleeps on these: one eventfd per queue (KVM signals it when ioeventfds are
        # in use) and one for everything else (a notification through the bus, close).
        self._kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._queue_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                           for _ in self.queues]
        self._ioeventfd = ioeventfd
        if ioeventfd is not None:
            modern.on_move = self._move_modern_notify
            legacy.on_move = self._move_legacy_notify
        self._msix_cap = self.add_capability(
            PCI_CAP_MSIX, struct.pack("<HII", self.msix.vectors - 1, MSIX_BAR,
                                      MSIX_PBA_OFFSET | MSIX_BAR),
            writable=struct.pack("<H", MSIX_ENABLE | MSIX_FUNCTION_MASK))
        for cfg_type, offset, length in ((CAP_COMMON, COMMON_OFFSET, COMMON_SIZE),
                                         (CAP_ISR, ISR_OFFSET, 1),
                                         (CAP_DEVICE, DEVICE_OFFSET, 0x1000)):
            self.add_capability(PCI_CAP_VENDOR, struct.pack("<BBB3xII", 16, cfg_type, MODERN_BAR,
                                                            offset, length))
        self.add_capability(PCI_CAP_VENDOR, struct.pack(
            "<BBB3xIII", 20, CAP_NOTIFY, MODERN_BAR, NOTIFY_OFFSET,
            NOTIFY_MULTIPLIER * device.queue_count, NOTIFY_MULTIPLIER))
        # Register state. The worker does not hold it during I/O, so a vCPU touching registers
        # never waits for the disk; a device reset waits for the batch in flight (``_busy``).
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)  # the worker's batch ends (see set_status)
        self._busy = False
        self._draining = 0  # vCPUs waiting in drain()
        self._closing = False
        self._reset_state()
        self._worker = threading.Thread(target=self._work, name=f"hvvmm-{name}", daemon=True)
        self._worker.start()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.config_generation = 0
        self.isr = 0
        for queue in self.queues:
            queue.reset()
        self.set_intx(False)

    @property
    def device_features(self) -> int:
        return self.device.features | F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX

    @property
    def msix_enabled(self) -> bool:
        control = struct.unpack_from("<H", self.config, self._msix_cap + 2)[0]
        return bool(control & MSIX_ENABLE)

    @property
    def _selected(self) -> VirtQueue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    # -- status and reset ----------------------------------------------------------------------

    def set_status(self, value: int) -> None:
        with self.lock:
            if value == 0:
                self.drain()  # requests in flight finish before the reset (as QEMU drains)
                self._reset_state()
                return
            if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
                if self.driver_features & ~self.device_features:
                    value &= ~STATUS_FEATURES_OK  # §3.1.1: the device refuses the subset
            if value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK:
                for queue in self.queues:
                    queue.event_idx = bool(self.driver_features & F_RING_EVENT_IDX)
            self.status = (value & 0xFF) | (self.status & STATUS_NEEDS_RESET)

    def drain(self) -> None:
        """With the lock held: wait until the worker is between batches. The worker stops
        taking new requests meanwhile, or a driver posting from another vCPU could keep it busy,
        and this vCPU waiting, for ever."""
        self._draining += 1
        try:
            while self._busy:
                self._wake.wait()
        finally:
            self._draining -= 1

    def needs_reset(self, why: str) -> None:
        """The driver broke the protocol: report DEVICE_NEEDS_RESET (§2.1.2)."""
        self._log_once(why.split(" at ")[0], logging.WARNING, "%s: %s; the device needs a reset",
                       self.name, why)
        with self.lock:
            self.status |= STATUS_NEEDS_RESET
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._interrupt(ISR_CONFIG, self.config_vector)

    # -- interrupts ----------------------------------------------------------------------------

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        if self.msix_enabled:
            if vector == NO_VECTOR or vector >= self.msix.vectors:
                return
            control = struct.unpack_from("<H", self.config, self._msix_cap + 2)[0]
            if control & MSIX_FUNCTION_MASK or self.msix.masked(vector):
                self.msix.pending |= 1 << vector
                return
            self._send_msi(vector)
            return
        self.isr |= isr_bit
        self.set_intx(True)

    def msix_changed(self) -> None:
        """A vector was unmasked, or the function mask cleared: send what waited (§6.8.3.4)."""
        control = struct.unpack_from("<H", self.config, self._msix_cap + 2)[0]
        if control & MSIX_FUNCTION_MASK or not control & MSIX_ENABLE:
            return
        for vector in range(self.msix.vectors):
            if self.msix.pending >> vector & 1 and not self.msix.masked(vector):
                self.msix.pending &= ~(1 << vector)
                self._send_msi(vector)

    def _send_msi(self, vector: int) -> None:
        address, data = self.msix.message(vector)
        try:
            self._signal_msi(address, data)
        except OSError as exc:
            # The guest wrote the message: one aimed at no CPU (KVM_SIGNAL_MSI fails with
            # EPERM) or with a malformed address is dropped, as a PC's bus would drop it.
            self._log_once(("msi", vector), logging.WARNING,
                           "%s: MSI-X vector %d (address %#x, data %#x) not delivered: %s",
                           self.name, vector, address, data, exc)

    def config_written(self, offset: int, size: int, old: bytes) -> None:
        if offset < self._msix_cap + 4 and self._msix_cap + 2 < offset + size:
            self.msix_changed()
            if self.msix_enabled:
                self.set_intx(False)

    def read_isr(self) -> int:
        with self.lock:
            value, self.isr = self.isr, 0
            self.set_intx(False)
            return value

    # -- notifications and the worker ----------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        if queue_index < len(self.queues):
            os.eventfd_write(self._kick_fd, 1)

    def _move_modern_notify(self, old: int | None, new: int | None) -> None:
        for index, fd in enumerate(self._queue_fds):
            offset = NOTIFY_OFFSET + NOTIFY_MULTIPLIER * index
            self._register(fd, old, new, offset, pio=False, datamatch=None)

    def _move_legacy_notify(self, old: int | None, new: int | None) -> None:
        for index, fd in enumerate(self._queue_fds):  # one port for every queue: match the index
            self._register(fd, old, new, 0x10, pio=True, datamatch=index)

    def _register(self, fd: int, old: int | None, new: int | None, offset: int, *, pio: bool,
                  datamatch: int | None) -> None:
        try:
            if old is not None:
                self._ioeventfd(fd, old + offset, 2, pio=pio, datamatch=datamatch, deassign=True)
            if new is not None:
                self._ioeventfd(fd, new + offset, 2, pio=pio, datamatch=datamatch)
        except OSError as exc:  # the write then exits to the bus as without ioeventfds
            self._log_once(("ioeventfd", pio), logging.INFO,
                           "%s: no ioeventfd for its notifications (%s)", self.name, exc)

    def _work(self) -> None:
        fds = [self._kick_fd, *self._queue_fds]
        while True:
            ready, _, _ = select.select(fds, [], [])
            for fd in ready:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
            with self.lock:
                if self._closing:
                    return
                self._busy = True
                active = [(index, queue) for index, queue in enumerate(self.queues)
                          if queue.ready and self.status & STATUS_DRIVER_OK
                          and not self.status & STATUS_NEEDS_RESET]
            try:
                for index, queue in active:
                    self._serve(index, queue)
            except Exception:  # a bug must not kill the worker silently and hang the guest
                log.exception("%s: request handling failed", self.name)
                self.needs_reset("internal error")
            finally:
                with self.lock:
                    self._busy = False
                    self._wake.notify_all()

    def _serve(self, index: int, queue: VirtQueue) -> None:
        memory = self.memory
        old_used = queue.used_idx
        try:
            while True:
                batch = []
                while True:  # every request posted so far is in flight at once
                    chain = queue.pop(memory)
                    if chain is None:
                        break
                    batch.append(chain)
                for chain in batch:
                    written = self.device.handle(memory, chain)
                    queue.push(memory, chain.head, written)
                if self._draining or self._closing:
                    break  # what is left waits for after the reset (or is dropped by it)
                queue.enable_notifications(memory)
                if not queue.has_work(memory):  # re-check after re-enabling (§2.7.10)
                    break
            if queue.needs_interrupt(memory, old_used):
                with self.lock:
                    self._interrupt(ISR_QUEUE, queue.msix_vector)
        except (VirtqueueError, GuestMemoryError) as exc:
            self.needs_reset(f"queue {index}: {exc}")

    def close(self) -> None:
        with self.lock:
            self._closing = True
        os.eventfd_write(self._kick_fd, 1)
        self._worker.join()
        for fd in (self._kick_fd, *self._queue_fds):
            os.close(fd)
        self.device.close()

    def reset(self) -> None:
        """Platform reset: configuration space, then the device (after its requests in flight)
        and the MSI-X table (every vector masked)."""
        super().reset()
        self.set_status(0)
        with self.lock:
            self.msix.reset()


class _ModernBar:
    """BAR4: common configuration, ISR, device configuration, notifications."""

    # (offset, size, name) of the common configuration fields (§4.1.4.3).
    FIELDS = ((0x00, 4, "device_feature_select"), (0x04, 4, "device_feature"),
              (0x08, 4, "driver_feature_select"), (0x0C, 4, "driver_feature"),
              (0x10, 2, "config_msix_vector"), (0x12, 2, "num_queues"),
              (0x14, 1, "device_status"), (0x15, 1, "config_generation"),
              (0x16, 2, "queue_select"), (0x18, 2, "queue_size"),
              (0x1A, 2, "queue_msix_vector"), (0x1C, 2, "queue_enable"),
              (0x1E, 2, "queue_notify_off"), (0x20, 8, "queue_desc"),
              (0x28, 8, "queue_driver"), (0x30, 8, "queue_device"))

    def __init__(self, transport: VirtioPciTransport):
        self.t = transport

    def _get(self, name: str) -> int:
        t = self.t
        q = t._selected
        if name == "device_feature":
            return (t.device_features >> (32 * t.device_feature_select)) & 0xFFFF_FFFF \
                if t.device_feature_select < 2 else 0
        if name == "driver_feature":
            return (t.driver_features >> (32 * t.driver_feature_select)) & 0xFFFF_FFFF \
                if t.driver_feature_select < 2 else 0
        if name in ("device_feature_select", "driver_feature_select", "queue_select"):
            return getattr(t, name)
        if name == "config_msix_vector":
            return t.config_vector
        if name == "num_queues":
            return len(t.queues)
        if name == "device_status":
            return t.status
        if name == "config_generation":
            return t.config_generation
        if q is None:
            return 0
        return {"queue_size": q.size, "queue_msix_vector": q.msix_vector,
                "queue_enable": int(q.ready), "queue_notify_off": t.queue_select,
                "queue_desc": q.desc, "queue_driver": q.avail, "queue_device": q.used}[name]

    def _set(self, name: str, value: int) -> None:
        t = self.t
        q = t._selected
        if name == "device_feature_select":
            t.device_feature_select = value
        elif name == "driver_feature_select":
            t.driver_feature_select = value
        elif name == "driver_feature":
            if t.driver_feature_select < 2 and not t.status & STATUS_FEATURES_OK:
                shift = 32 * t.driver_feature_select
                t.driver_features = (t.driver_features & ~(0xFFFF_FFFF << shift)) | value << shift
        elif name == "config_msix_vector":
            t.config_vector = value if value < t.msix.vectors else NO_VECTOR
        elif name == "device_status":
            t.set_status(value)
        elif name == "queue_select":
            t.queue_select = value
        elif q is None or q.ready and name != "queue_msix_vector":
            return  # §4.1.4.3.2: queue fields are fixed once the queue is enabled
        elif name == "queue_size":
            q.size = value
        elif name == "queue_msix_vector":
            q.msix_vector = value if value < t.msix.vectors else NO_VECTOR
        elif name == "queue_enable":
            if value == 1:
                try:
                    q.check(t.memory)
                except VirtqueueError as exc:
                    t.needs_reset(str(exc))
                    return
                q.ready = True
        elif name in ("queue_desc", "queue_driver", "queue_device"):
            setattr(q, {"queue_desc": "desc", "queue_driver": "avail",
                        "queue_device": "used"}[name], value)

    def _common_read(self, offset: int, size: int) -> int:
        raw = bytearray(COMMON_SIZE)
        for start, length, name in self.FIELDS:
            if start < offset + size and offset < start + length:
                raw[start:start + length] = self._get(name).to_bytes(length, "little")
        return int.from_bytes(raw[offset:offset + size], "little")

    def _common_write(self, offset: int, size: int, value: int) -> None:
        for start, length, name in self.FIELDS:
            if start < offset + size and offset < start + length:
                raw = bytearray(self._get(name).to_bytes(length, "little"))
                data = value.to_bytes(size, "little")
                for i in range(size):
                    if 0 <= offset + i - start < length:
                        raw[offset + i - start] = data[i]
                self._set(name, int.from_bytes(raw, "little"))

    def read(self, offset: int, size: int) -> int:
        t = self.t
        with t.lock:
            if offset + size <= COMMON_SIZE:
                return self._common_read(offset, size)
            if offset == ISR_OFFSET:
                return t.read_isr()
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + 0x1000:
                config = t.device.config_bytes()
                start = offset - DEVICE_OFFSET
                return int.from_bytes(config[start:start + size].ljust(size, b"\0"), "little")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        t = self.t
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(t.queues):
            t.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
            return
        with t.lock:
            if offset + size <= COMMON_SIZE:
                self._common_write(offset, size, value)


class _LegacyBar:
    """BAR0: the legacy (0.9.5) register block (Virtio 1.2, §4.1.4.8). Queues are placed by a
    page frame number with the legacy layout (§2.7.2, 4096-byte alignment)."""

    def __init__(self, transport: VirtioPciTransport):
        self.t = transport

    def _config_offset(self) -> int:
        return 24 if self.t.msix_enabled else 20

    def read(self, offset: int, size: int) -> int:
        t = self.t
        with t.lock:
            q = t._selected
            if offset == 0x13:
                return t.read_isr()
            base = self._config_offset()
            if offset >= base:
                config = t.device.config_bytes()
                return int.from_bytes(config[offset - base:offset - base + size]
                                      .ljust(size, b"\0"), "little")
            raw = struct.pack("<IIIHHHBBHH", t.device_features & 0xFFFF_FFFF,
                              t.driver_features & 0xFFFF_FFFF,
                              (q.desc >> 12) if q is not None and q.ready else 0,
                              q.size if q is not None else 0, t.queue_select, 0, t.status, 0,
                              t.config_vector, q.msix_vector if q is not None else NO_VECTOR)
            return int.from_bytes(raw[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        t = self.t
        if offset == 0x10:
            t.notify(value)
            return
        with t.lock:
            q = t._selected
            if offset == 0x04 and size == 4:
                t.driver_features = value  # low 32 bits only: legacy drivers have no VERSION_1
            elif offset == 0x08 and size == 4 and q is not None:
                self._set_pfn(q, value)
            elif offset == 0x0E and size == 2:
                t.queue_select = value
            elif offset == 0x12 and size == 1:
                t.set_status(value)
            elif offset == 0x14 and size == 2 and t.msix_enabled:
                t.config_vector = value if value < t.msix.vectors else NO_VECTOR
            elif offset == 0x16 and size == 2 and t.msix_enabled and q is not None:
                q.msix_vector = value if value < t.msix.vectors else NO_VECTOR

    def _set_pfn(self, q: VirtQueue, pfn: int) -> None:
        """Called with the transport's lock held."""
        self.t.drain()  # not while the worker walks the queue
        if pfn == 0:  # the legacy way to stop a queue
            q.reset()
            return
        q.size = q.max_size
        q.desc = pfn << 12
        q.avail = q.desc + 16 * q.size
        q.used = (q.avail + 6 + 2 * q.size + 4095) & ~4095
        try:
            q.check(self.t.memory)
        except VirtqueueError as exc:
            self.t.needs_reset(str(exc))
            return
        q.ready = True
