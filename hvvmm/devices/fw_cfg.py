"""QEMU's firmware configuration device (fw_cfg), legacy I/O-port interface only.

The guest writes a 16-bit item key to the selector port (:data:`FW_CFG_IO_BASE`, 0x510) and reads
the item one byte at a time from the data port (0x511); selecting an item rewinds to its first byte,
reads past the end (or of an unknown key) return 0. Items: the "QEMU" signature, the interface ID
(bit 0, traditional interface; bit 1, DMA when the device was given guest memory), the UUID, the RAM
size (u64 little-endian), the CPU counts (u16 little-endian), and the file directory (key 0x19):
a big-endian u32 count followed by 64-byte entries ``{be32 size, be16 select, u16 reserved,
char name[56]}`` sorted by name. Files get keys from 0x20 up in the order they are added (the keys
returned by :meth:`FwCfg.add_file` stay valid), listed in the directory sorted by name as QEMU does.
Writes to the data port are ignored (QEMU stopped supporting them in 2.4).

The DMA interface (:class:`FwCfgDma`, port 0x514): the guest writes the guest-physical address of
a ``FWCfgDmaAccess {be32 control, be32 length, be64 address}`` as two big-endian dwords, high
(0x514) then low (0x518, which starts the transfer); control may select an item (bit 3, key in
the high 16 bits), then read (bit 1) or skip (bit 2) ``length`` bytes; the device writes control
back as 0, or with the error bit (0) set when the request is bad (an address outside RAM, a
write). Reads past an item's end give zeros. Reading the port gives the signature "QEMU CFG".

As QEMU's combined port region: a 1-byte read at either port reads data, a 16-bit write at the
selector selects; other access sizes are logged once and ignored (reads: all ones).

Sources: QEMU ``docs/specs/fw_cfg.rst``, ``include/standard-headers/linux/qemu_fw_cfg.h``,
``hw/nvram/fw_cfg.c``.
"""

from __future__ import annotations

import logging
import struct
import threading

from hvvmm.logonce import LogOnce

log = logging.getLogger(__name__)

FW_CFG_IO_BASE = 0x510
FW_CFG_PORT_COUNT = 2
FW_CFG_PORT_SEL = 0   # offset of the selector (0x510)
FW_CFG_PORT_DATA = 1  # offset of the data port (0x511)

# Selector keys.
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = ~(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL) & 0xFFFF  # 0x3fff
FW_CFG_INVALID = 0xFFFF

FW_CFG_SIGNATURE_VALUE = b"QEMU"
FW_CFG_VERSION = 0x01      # ID bit 0: traditional interface
FW_CFG_VERSION_DMA = 0x02  # ID bit 1: DMA interface
FW_CFG_MAX_FILE_PATH = 56  # name field size, NUL included

_FILE_ENTRY = struct.Struct(">IHH56s")  # FWCfgFile: size, select, reserved, name

FW_CFG_DMA_SIGNATURE = 0x51454D5520434647  # "QEMU CFG", big-endian
FW_CFG_DMA_PORT_COUNT = 8
FW_CFG_DMA_CTL_ERROR = 0x01
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SKIP = 0x04
FW_CFG_DMA_CTL_SELECT = 0x08
FW_CFG_DMA_CTL_WRITE = 0x10
_DMA_ACCESS = struct.Struct(">IIQ")  # FWCfgDmaAccess: control, length, address


class FwCfg:
    """fw_cfg with the standard items for ``ram_size`` bytes of RAM and ``cpu_count`` CPUs.

    Register at :data:`FW_CFG_IO_BASE` with length :data:`FW_CFG_PORT_COUNT`.
    """

    def __init__(self, ram_size: int, cpu_count: int, *, max_cpus: int | None = None,
                 uuid: bytes = bytes(16), memory=None):
        """``memory`` (a :class:`hvvmm.memory.GuestMemory`) enables the DMA interface."""
        if ram_size < 0 or ram_size >= 1 << 64:
            raise ValueError(f"fw_cfg: bad RAM size {ram_size:#x}")
        max_cpus = cpu_count if max_cpus is None else max_cpus
        if not 1 <= cpu_count <= max_cpus <= 0xFFFF:
            raise ValueError(f"fw_cfg: bad CPU counts {cpu_count}/{max_cpus}")
        if len(uuid) != 16:
            raise ValueError("fw_cfg: the UUID is 16 bytes")
        self._lock = threading.Lock()
        self._log_once = LogOnce(log)
        self._items: dict[int, bytes] = {}
        self._files: dict[str, int] = {}  # name -> key
        self._selected = FW_CFG_INVALID  # the item key selected, write-channel bit dropped
        self._offset = 0
        self._items[FW_CFG_SIGNATURE] = FW_CFG_SIGNATURE_VALUE
        self.memory = memory
        self._items[FW_CFG_ID] = struct.pack(
            "<I", FW_CFG_VERSION | (FW_CFG_VERSION_DMA if memory is not None else 0))
        self._items[FW_CFG_UUID] = bytes(uuid)
        self._items[FW_CFG_RAM_SIZE] = struct.pack("<Q", ram_size)
        self._items[FW_CFG_NB_CPUS] = struct.pack("<H", cpu_count)
        self._items[FW_CFG_MAX_CPUS] = struct.pack("<H", max_cpus)
        self._rebuild_file_dir()

    # -- configuration (host side) ------------------------------------------------------------

    def set_item(self, key: int, data: bytes) -> None:
        """Set (or replace) the item at ``key``; the file directory and file keys are managed by
        :meth:`add_file`."""
        if not 0 <= key <= 0xFFFF or key & FW_CFG_WRITE_CHANNEL:
            raise ValueError(f"fw_cfg: bad key {key:#x}")
        with self._lock:
            if key == FW_CFG_FILE_DIR or key in self._files.values():
                raise ValueError(f"fw_cfg: key {key:#x} is managed by add_file")
            self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file; returns its selector key (0x20 and up, in order of addition)."""
        encoded = name.encode()
        if not encoded or len(encoded) >= FW_CFG_MAX_FILE_PATH or b"\0" in encoded:
            raise ValueError(f"fw_cfg: file name {name!r} must be 1 to {FW_CFG_MAX_FILE_PATH - 1} "
                             "bytes without NUL")
        with self._lock:
            if name in self._files:
                raise ValueError(f"fw_cfg: duplicate file name {name!r}")
            key = FW_CFG_FILE_FIRST
            while key in self._items:
                key += 1
            if key > FW_CFG_ENTRY_MASK:
                raise ValueError("fw_cfg: no free file keys")
            self._items[key] = bytes(data)
            self._files[name] = key
            self._rebuild_file_dir()
        return key

    def _rebuild_file_dir(self) -> None:
        entries = [struct.pack(">I", len(self._files))]
        for name in sorted(self._files, key=str.encode):
            key = self._files[name]
            entries.append(_FILE_ENTRY.pack(len(self._items[key]), key, 0, name.encode()))
        self._items[FW_CFG_FILE_DIR] = b"".join(entries)

    # -- BusDevice ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size != 1 or offset not in (FW_CFG_PORT_SEL, FW_CFG_PORT_DATA):
            self._log_once(f"read-{offset}-{size}", logging.INFO,
                           "fw_cfg: unsupported %d-byte read at offset %d",
                           size, offset)
            return (1 << (8 * size)) - 1
        with self._lock:
            data = self._items.get(self._selected, b"")
            if self._offset < len(data):
                byte = data[self._offset]
                self._offset += 1
                return byte
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == FW_CFG_PORT_SEL and size == 2:
            self._select(value & 0xFFFF)
        elif size == 1 and offset in (FW_CFG_PORT_SEL, FW_CFG_PORT_DATA):
            self._log_once("data-write", logging.INFO,
                           "fw_cfg: data writes are not supported; ignored")
        else:
            self._log_once(f"write-{offset}-{size}", logging.INFO,
                           "fw_cfg: unsupported %d-byte write at offset "
                           "%d", size, offset)

    def _select(self, key: int) -> None:
        with self._lock:
            # The write-channel bit only matters to writes, which are not supported.
            self._selected = key & ~FW_CFG_WRITE_CHANNEL
            self._offset = 0


    # -- DMA (from FwCfgDma) --------------------------------------------------------------------

    def dma(self, access_address: int) -> None:
        """Run the FWCfgDmaAccess at guest-physical ``access_address``."""
        from hvvmm.memory import GuestMemoryError

        memory = self.memory
        if memory is None:
            return
        try:
            control, length, address = _DMA_ACCESS.unpack(memory.read(access_address,
                                                                      _DMA_ACCESS.size))
        except GuestMemoryError:
            self._log_once("dma-access", logging.INFO,
                           "fw_cfg: DMA access structure outside RAM at %#x", access_address)
            return
        status = 0
        with self._lock:
            if control & FW_CFG_DMA_CTL_SELECT:
                self._selected = (control >> 16) & ~FW_CFG_WRITE_CHANNEL & 0xFFFF
                self._offset = 0
            data = self._items.get(self._selected, b"")
            # QEMU's precedence (fw_cfg_dma_transfer): read, else write, else skip.
            if control & FW_CFG_DMA_CTL_READ:
                start = min(self._offset, len(data))
                chunk = data[start:start + length]
                try:
                    memory.view(address, length)[:len(chunk)] = chunk
                    memory.fill(address + len(chunk), length - len(chunk))
                    self._offset += length
                except GuestMemoryError:
                    status = FW_CFG_DMA_CTL_ERROR
            elif control & FW_CFG_DMA_CTL_WRITE:
                status = FW_CFG_DMA_CTL_ERROR  # no writable items
            elif control & FW_CFG_DMA_CTL_SKIP:
                self._offset += length
        try:
            memory.write(access_address, struct.pack(">I", status))
        except GuestMemoryError:
            pass


class FwCfgDma:
    """The DMA address register at 0x514: big-endian high dword at offset 0, low at 4."""

    def __init__(self, fw_cfg: FwCfg):
        self._fw_cfg = fw_cfg
        self._high = 0

    def read(self, offset: int, size: int) -> int:
        signature = FW_CFG_DMA_SIGNATURE.to_bytes(8, "big")[offset:offset + size]
        return int.from_bytes(signature.ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset not in (0, 4):
            return
        dword = int.from_bytes(value.to_bytes(4, "little"), "big")  # the guest wrote big-endian
        if offset == 0:
            self._high = dword
        else:
            address, self._high = (self._high << 32) | dword, 0
            self._fw_cfg.dma(address)
