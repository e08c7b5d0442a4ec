"""virtio-blk (Virtio 1.2, §5.2): a block backend (:mod:`hvvmm.block`) as a virtio device.

A request is a chain: a 16-byte header ``{le32 type, le32 reserved, le64 sector}`` the device
reads, then data buffers (read for writes, written for reads), then one status byte the device
writes. Types served: IN (read), OUT (write), FLUSH, GET_ID (a 20-byte serial) and DISCARD when the
backend is writable. A request the device cannot serve ends with status IOERR (past the disk's end,
a write to a read-only disk, not whole sectors, larger than :data:`MAX_REQUEST_BYTES`, a failed host
I/O) or UNSUPP (an unknown type); a chain without room for the status byte breaks the virtqueue
format (the device then needs a reset).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from ..block import SECTOR_SIZE, BlockBackend, BlockError, open_image
from ..logonce import LogOnce
from ..memory import GuestMemory
from ..virtio.queue import Buffer, Chain, VirtQueue, VirtqueueError

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
PCI_CLASS_STORAGE_SCSI = 0x010000  # what QEMU's virtio-blk-pci reports

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
SIZE_MAX = 1 << 20          # advertised per-segment limit
MAX_REQUEST_BYTES = 32 << 20  # one request's data; larger ones get IOERR
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEGMENTS = 16

_HEADER = struct.Struct("<IIQ")
_DISCARD_SEGMENT = struct.Struct("<QII")


class VirtioBlk:
    """The block device logic behind a virtio transport
    (:class:`hvvmm.virtio.pci.VirtioPciTransport`)."""

    device_id = VIRTIO_ID_BLOCK
    pci_class = PCI_CLASS_STORAGE_SCSI
    queue_count = 1
    queue_max_size = QUEUE_SIZE

    def __init__(self, backend: BlockBackend, serial: str = ""):
        self.backend = backend
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self._log_once = LogOnce(log)
        self.features = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                         | VIRTIO_BLK_F_FLUSH)
        if backend.read_only:
            self.features |= VIRTIO_BLK_F_RO
        elif hasattr(backend, "discard"):
            self.features |= VIRTIO_BLK_F_DISCARD

    def config_bytes(self) -> bytes:
        """struct virtio_blk_config (§5.2.4) up to the discard fields."""
        return struct.pack("<QIIHBBIBBHIBBHIII", self.backend.size // SECTOR_SIZE, SIZE_MAX,
                           SEG_MAX, 0, 0, 0, SECTOR_SIZE, 0, 0, 0, 0, 0, 0, 0,
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1)

    def handle(self, memory: GuestMemory, chain: Chain) -> int:
        readable, writable = chain.readable, chain.writable
        if not writable or sum(b.length for b in readable) < _HEADER.size:
            raise VirtqueueError(f"virtio-blk request {chain.head} has no header or no status "
                                 "byte")
        kind, _, sector = _HEADER.unpack(VirtQueue.gather(memory, readable, 0, _HEADER.size))
        # The status byte is the last device-writable byte; data buffers are the rest.
        status_buffer = writable[-1]
        status_address = status_buffer.address + status_buffer.length - 1
        data_out = sum(b.length for b in readable) - _HEADER.size
        data_in = sum(b.length for b in writable) - 1
        written = 0
        try:
            status, written = self._serve(memory, kind, sector, readable, writable, data_out,
                                          data_in)
        except OSError as exc:  # BlockError, or a host I/O error (EIO, ENOSPC) from the backend
            self._log_once(("ioerr", kind, exc.errno), logging.WARNING,
                           "virtio-blk: request type %d at sector %d failed: %s", kind, sector,
                           exc)
            status = VIRTIO_BLK_S_IOERR
        memory.write_u8(status_address, status)
        return written + 1

    def _serve(self, memory: GuestMemory, kind: int, sector: int, readable, writable,
               data_out: int, data_in: int) -> tuple[int, int]:
        backend = self.backend
        if kind == VIRTIO_BLK_T_IN:
            if data_in % SECTOR_SIZE or data_in > MAX_REQUEST_BYTES or not self._fits(
                    sector, data_in):
                return VIRTIO_BLK_S_IOERR, 0
            data = backend.read(sector, data_in // SECTOR_SIZE)
            VirtQueue.scatter(memory, _without_status(writable), data)
            return VIRTIO_BLK_S_OK, data_in
        if kind == VIRTIO_BLK_T_OUT:
            if backend.read_only or data_out % SECTOR_SIZE or data_out > MAX_REQUEST_BYTES \
                    or not self._fits(sector, data_out):
                return VIRTIO_BLK_S_IOERR, 0
            backend.write(sector, VirtQueue.gather(memory, readable, _HEADER.size, data_out))
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_FLUSH:
            backend.flush()
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_GET_ID:
            serial = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:max(data_in, 0)]
            VirtQueue.scatter(memory, _without_status(writable), serial)
            return VIRTIO_BLK_S_OK, len(serial)
        if kind == VIRTIO_BLK_T_DISCARD and self.features & VIRTIO_BLK_F_DISCARD:
            if data_out % _DISCARD_SEGMENT.size or \
                    data_out // _DISCARD_SEGMENT.size > MAX_DISCARD_SEGMENTS:
                return VIRTIO_BLK_S_IOERR, 0
            segments = VirtQueue.gather(memory, readable, _HEADER.size, data_out)
            for start, count, flags in _DISCARD_SEGMENT.iter_unpack(segments):
                if flags or count > MAX_DISCARD_SECTORS or not self._fits(start,
                                                                         count * SECTOR_SIZE):
                    return VIRTIO_BLK_S_IOERR, 0
            for start, count, _ in _DISCARD_SEGMENT.iter_unpack(segments):
                backend.discard(start, count)
            return VIRTIO_BLK_S_OK, 0
        self._log_once(("unsupported", kind), logging.INFO,
                       "virtio-blk: unsupported request type %d", kind)
        return VIRTIO_BLK_S_UNSUPP, 0

    def _fits(self, sector: int, length: int) -> bool:
        return sector * SECTOR_SIZE + length <= self.backend.size

    def close(self) -> None:
        self.backend.close()


def _without_status(writable):
    """The device-writable buffers less the final status byte."""
    last = writable[-1]
    trimmed = list(writable[:-1])
    if last.length > 1:
        trimmed.append(Buffer(last.address, last.length - 1, True))
    return trimmed


@dataclass(frozen=True)
class DriveSpec:
    """One ``--drive``: an image file and how to open it."""

    file: str
    format: str | None = None   # None: probed
    read_only: bool = False
    cache: str = "writeback"


class DriveSpecError(ValueError):
    pass


def parse_drive_spec(text: str) -> DriveSpec:
    """``file=F[,format=raw|vhd][,readonly=on|off][,cache=writeback|none]`` (QEMU's -drive
    syntax: a doubled comma is a literal comma in a value)."""
    fields: dict[str, str] = {}
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == "," and text[i + 1:i + 2] == ",":
            current += ","
            i += 2
            continue
        if text[i] == ",":
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if index == 0 and part:
                key, value = "file", part
            else:
                raise DriveSpecError(f"--drive {text!r}: {part!r} is not KEY=VALUE")
        if key in fields:
            raise DriveSpecError(f"--drive {text!r}: {key} given twice")
        fields[key] = value
    unknown = set(fields) - {"file", "format", "readonly", "cache"}
    if unknown:
        raise DriveSpecError(f"--drive {text!r}: unknown option(s) {', '.join(sorted(unknown))} "
                             "(known: file, format, readonly, cache)")
    if not fields.get("file"):
        raise DriveSpecError(f"--drive {text!r}: file= is required")
    readonly = fields.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise DriveSpecError(f"--drive {text!r}: readonly must be on or off")
    cache = fields.get("cache", "writeback")
    if cache not in ("writeback", "none"):
        raise DriveSpecError(f"--drive {text!r}: cache must be writeback or none")
    return DriveSpec(fields["file"], fields.get("format"), readonly == "on", cache)


@dataclass
class AttachedDisk:
    slot: int
    transport: object

    def close(self) -> None:
        self.transport.close()


def attach_drives(machine, drives) -> list[AttachedDisk]:
    """Open each drive and plug a virtio-blk PCI function for it into the machine's PCI bus.
    Image errors raise ``hvvmm.machine.ImageError``."""
    from ..block import ImageFormatError
    from ..kvm import constants as kvmc
    from ..machine import ImageError
    from ..virtio.pci import VirtioPciTransport

    ioeventfd = machine.vm.ioeventfd if machine.kvm.check_extension(kvmc.KVM_CAP_IOEVENTFD) \
        else None

    seen: dict[str, str] = {}
    for spec in drives:  # the image lock would refuse the second open with a misleading message
        real = os.path.realpath(spec.file)
        if real in seen:
            raise ImageError(f"{spec.file}: the same image is given twice (as {seen[real]})")
        seen[real] = spec.file
    disks: list[AttachedDisk] = []
    try:
        for index, spec in enumerate(drives):
            try:
                backend = open_image(spec.file, spec.format, read_only=spec.read_only,
                                     cache=spec.cache)
            except (BlockError, ImageFormatError) as exc:
                message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ImageError(message) from None
            try:
                transport = VirtioPciTransport(f"virtio-blk{index}",
                                               VirtioBlk(backend, f"hvvmm{index}"),
                                               machine.memory, machine.vm.signal_msi, ioeventfd)
            except BaseException:
                backend.close()
                raise
            try:
                slot = machine.pci.add(transport)
            except ValueError as exc:  # more drives than free slots
                transport.close()
                raise ImageError(f"{spec.file}: {exc}") from None
            disks.append(AttachedDisk(slot, transport))
    except BaseException:
        for disk in disks:  # their workers and image locks
            disk.close()
        raise
    return disks
