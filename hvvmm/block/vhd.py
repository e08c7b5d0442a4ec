"""VHD images: fixed, dynamic and differencing, read-write (Microsoft "Virtual Hard Disk Image
Format Specification", version 1.0, October 2006; the section names below are that document's).

Layout ("Hard Disk Footer Format", "Dynamic Disk Header Format", "Block Allocation Table and Data
Blocks"), all fields big-endian:

* fixed: the disk's bytes, then the 512-byte footer;
* dynamic and differencing: a copy of the footer at offset 0, the 1024-byte dynamic header
  ("cxsparse") at the footer's data offset, the BAT (one 32-bit sector offset per block,
  0xFFFFFFFF when the block is not allocated), parent locator data (differencing only), data
  blocks, and the footer at the end. A data block is a sector bitmap (one bit per sector, most
  significant bit first, padded to whole sectors) followed by ``block_size`` bytes of data.

In a dynamic image an unallocated block reads as zeros; hvvmm sets every bit of a dynamic image's
bitmap when it allocates a block (as QEMU ``block/vpc.c`` does), so readers that honour the bitmap
and readers that ignore it see the same bytes. In a differencing image a clear bit, or an
unallocated block, means "read the parent". The parent is found through the header's parent
locators (``W2ru`` relative, ``W2ku`` absolute: UTF-16LE paths) or its Unicode name (UTF-16BE), and
must carry the UUID and timestamp that the child's header records.

Allocation order, so that a VMM killed (or a host that loses power) in the middle of a write
never leaves a BAT entry pointing at garbage:

1. the footer is written at the new end of the file, past the new block. The file grows; the new
   block's bytes are a hole and read as zeros, and the file has a valid footer at its end again;
2. the block's sector bitmap and the written data (the rest of the block stays zeroed);
3. the data reaches stable storage: with ``cache="writeback"`` at the next :meth:`flush` (an
   ``fdatasync``), with ``cache="none"`` at once (the file is opened O_DSYNC);
4. the BAT entry: with ``writeback`` it is kept in memory until that flush has synced the data,
   then written; with ``none`` it is written right after step 2.

Cut short before 4, the image holds an unreferenced ("leaked") block, which reads as before and
which ``check -r`` trims. A differencing image's bitmap bits follow the same rule as BAT entries
(set in memory at once, written after the data is synced). So writes that were never flushed may
be lost, as on any disk with a write cache, but the image stays consistent. The footer never
changes after creation, so the copy at offset 0 stays valid; if the end footer is ever torn, the
copy is used and ``check -r`` rewrites the end footer.

Hostile images: everything read from the file is checked (checksums, sizes, BAT entries inside
the file and not overlapping each other or the metadata, the block size a power of two, parent
chains without loops) before the image is used; any failure is one :class:`ImageFormatError` line
and nothing is written to the file.
"""

from __future__ import annotations

import array
import collections
import datetime
import errno
import functools
import heapq
import os
import struct
import sys
import threading
import uuid as uuid_module
from dataclasses import dataclass, field

from . import SECTOR_SIZE, BlockError, ImageFormat, ImageFormatError, open_file

__all__ = ["VhdBackend", "create_vhd", "chs_size", "inspect_vhd", "check_vhd", "chs_geometry",
           "FORMAT", "DEFAULT_BLOCK_SIZE", "MAX_SIZE", "HostFile"]

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
HEADER_SIZE = 1024
VERSION = 0x00010000
FEATURES_RESERVED = 0x00000002   # "Features": the reserved bit is always set
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
DISK_TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
NO_OFFSET = 0xFFFFFFFFFFFFFFFF   # a fixed disk's "Data Offset"
UNUSED = 0xFFFFFFFF              # an unallocated BAT entry
DEFAULT_BLOCK_SIZE = 2 << 20     # "Block Size": 2 MiB by default
MAX_BLOCK_SIZE = 256 << 20       # ours: caps the memory one block's bitmap needs
MAX_BLOCKS = 1 << 22             # ours: caps the BAT (16 MiB): 2040 GiB in 512 KiB blocks
MAX_SIZE = 2040 << 30            # 65535 * 16 * 255 sectors is the largest CHS geometry
MAX_LOCATOR = 64 << 10           # ours: a parent path is short
MAX_CHAIN = 64                   # ours: differencing images deeper than this are refused
CREATOR = b"hvvm"                # QEMU takes the footer's current size for unknown creators
CREATOR_OS = b"Wi2k"
EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
BITMAP_CACHE_BLOCKS = 1024
_SECTOR_SHIFT = 9
DATA_ALIGNMENT = 4096

W2RU, W2KU = b"W2ru", b"W2ku"    # "Parent Locator Entries": Windows relative / absolute paths

# "Hard Disk Footer Format" (512 bytes)
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
# "Dynamic Disk Header Format" (1024 bytes; 8 parent locator entries at 576)
_HEADER = struct.Struct(">8sQQIIII16sI4s512s192s256s")
_LOCATOR = struct.Struct(">4sIIIQ")
_FOOTER_CHECKSUM_AT, _HEADER_CHECKSUM_AT = 64, 36


def _checksum(data: bytes, at: int) -> int:
    """One's complement of the byte sum, the checksum field counted as zero ("Checksum")."""
    return ~(sum(data) - sum(data[at:at + 4])) & 0xFFFFFFFF


def _with_checksum(raw: bytes, at: int) -> bytes:
    """``raw`` with its checksum field (4 bytes at ``at``) filled in."""
    return raw[:at] + _checksum(raw, at).to_bytes(4, "big") + raw[at + 4:]


def vhd_timestamp(when: float | None = None) -> int:
    """Seconds since 2000-01-01 00:00:00 UTC ("Time Stamp")."""
    now = datetime.datetime.now(datetime.timezone.utc) if when is None else \
        datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return max(0, int((now - EPOCH).total_seconds())) & 0xFFFFFFFF


def timestamp_text(stamp: int) -> str:
    return (EPOCH + datetime.timedelta(seconds=stamp)).strftime("%Y-%m-%d %H:%M:%S UTC")


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track for a disk of ``total_sectors`` (the algorithm of the
    specification's "CHS Calculation" appendix)."""
    total_sectors = min(total_sectors, 65535 * 16 * 255)
    if total_sectors >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cylinder_times_heads = total_sectors // sectors
    else:
        sectors = 17
        cylinder_times_heads = total_sectors // sectors
        heads = max((cylinder_times_heads + 1023) // 1024, 4)
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cylinder_times_heads = total_sectors // sectors
        if cylinder_times_heads >= heads * 1024:
            sectors, heads = 63, 16
            cylinder_times_heads = total_sectors // sectors
    return cylinder_times_heads // heads, heads, sectors


# -- on-disk structures ------------------------------------------------------------------------

@dataclass
class Footer:
    disk_type: int
    current_size: int
    uuid: bytes
    timestamp: int
    data_offset: int = NO_OFFSET
    original_size: int = 0
    creator: bytes = CREATOR
    creator_version: int = 0x00010000
    creator_os: bytes = CREATOR_OS
    geometry: tuple[int, int, int] = (0, 0, 0)
    features: int = FEATURES_RESERVED
    version: int = VERSION
    saved_state: int = 0
    checksum: int = 0

    def pack(self) -> bytes:
        cylinders, heads, sectors = self.geometry
        raw = _FOOTER.pack(FOOTER_COOKIE, self.features, self.version, self.data_offset,
                           self.timestamp, self.creator, self.creator_version, self.creator_os,
                           self.original_size, self.current_size, cylinders, heads, sectors,
                           self.disk_type, 0, self.uuid, self.saved_state, bytes(427))
        return _with_checksum(raw, _FOOTER_CHECKSUM_AT)

    @classmethod
    def parse(cls, raw: bytes) -> tuple[Footer | None, str]:
        """The footer, or None and why not."""
        if len(raw) < FOOTER_SIZE:
            return None, "the file is shorter than a VHD footer (512 bytes)"
        (cookie, features, version, data_offset, timestamp, creator, creator_version, creator_os,
         original_size, current_size, cylinders, heads, sectors, disk_type, checksum, disk_uuid,
         saved_state, _) = _FOOTER.unpack(raw)
        if cookie != FOOTER_COOKIE:
            return None, "no VHD footer (the 'conectix' cookie is missing)"
        expected = _checksum(raw, _FOOTER_CHECKSUM_AT)
        if checksum != expected:
            return None, f"bad footer checksum 0x{checksum:08x} (the footer sums to " \
                         f"0x{expected:08x})"
        if version >> 16 != 1:
            return None, f"unsupported VHD version {version >> 16}.{version & 0xFFFF}"
        if disk_type not in DISK_TYPES:
            return None, f"unknown disk type {disk_type} (2 fixed, 3 dynamic, 4 differencing)"
        if current_size % SECTOR_SIZE or current_size > MAX_SIZE:
            return None, f"bad disk size {current_size} (a multiple of 512 up to 2040 GiB)"
        return cls(disk_type, current_size, disk_uuid, timestamp, data_offset, original_size,
                   creator, creator_version, creator_os, (cylinders, heads, sectors), features,
                   version, saved_state, checksum), ""


@dataclass
class Locator:
    code: bytes
    space: int      # "Platform Data Space" (sectors in the specification; some writers use bytes)
    length: int
    offset: int


@dataclass
class Header:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: list[Locator] = field(default_factory=list)
    data_offset: int = NO_OFFSET
    version: int = VERSION
    checksum: int = 0

    def pack(self) -> bytes:
        entries = b"".join(_LOCATOR.pack(loc.code, loc.space, loc.length, 0, loc.offset)
                           for loc in self.locators)
        entries = entries.ljust(8 * _LOCATOR.size, b"\0")
        name = self.parent_name.encode("utf-16-be")[:512]
        raw = _HEADER.pack(HEADER_COOKIE, self.data_offset, self.table_offset, self.version,
                           self.max_table_entries, self.block_size, 0, self.parent_uuid,
                           self.parent_timestamp, bytes(4), name, entries, bytes(256))
        return _with_checksum(raw, _HEADER_CHECKSUM_AT)

    @classmethod
    def parse(cls, raw: bytes) -> tuple[Header | None, str]:
        if len(raw) < HEADER_SIZE:
            return None, "the dynamic header is cut short (truncated file?)"
        (cookie, data_offset, table_offset, version, entries, block_size, checksum, parent_uuid,
         parent_timestamp, _, name, locators, _) = _HEADER.unpack(raw)
        if cookie != HEADER_COOKIE:
            return None, "no dynamic header (the 'cxsparse' cookie is missing)"
        expected = _checksum(raw, _HEADER_CHECKSUM_AT)
        if checksum != expected:
            return None, f"bad dynamic header checksum 0x{checksum:08x} (the header sums to " \
                         f"0x{expected:08x})"
        if version >> 16 != 1:
            return None, f"unsupported dynamic header version {version >> 16}"
        if block_size < SECTOR_SIZE or block_size > MAX_BLOCK_SIZE or \
                block_size & (block_size - 1):
            return None, f"bad block size {block_size} (a power of two from 512 bytes to " \
                         f"{MAX_BLOCK_SIZE >> 20} MiB)"
        parsed = [Locator(*(fields[:3]), fields[4])
                  for fields in (_LOCATOR.unpack_from(locators, i * _LOCATOR.size)
                                 for i in range(8))]
        parent_name = name.decode("utf-16-be", "replace").split("\0", 1)[0]
        return cls(table_offset, entries, block_size, parent_uuid, parent_timestamp, parent_name,
                   parsed, data_offset, version, checksum), ""


# -- host file access (one place, so tests can cut writes short) --------------------------------

class HostFile:
    """The image file: positioned reads and writes on one descriptor."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def punch_hole(self, offset: int, length: int) -> None:
        from . import _fallocate_punch_hole
        try:
            _fallocate_punch_hole(self.fd, offset, length)
        except OSError:
            pass  # advisory: the bytes stay

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_host_file(path: str, writable: bool, cache: str, lock: bool) -> HostFile:
    return HostFile(open_file(path, writable, cache, lock), path)


# -- reading and checking the metadata ---------------------------------------------------------

@dataclass
class Problem:
    kind: str      # "error" (the image cannot be used), "stale" (repairable), "leak"
    message: str


@dataclass
class Metadata:
    """What an image's metadata says, and what is wrong with it."""

    path: str
    file_size: int
    footer: Footer | None = None
    header: Header | None = None
    bat: array.array = field(default_factory=lambda: array.array("I"))   # host byte order
    problems: list[Problem] = field(default_factory=list)
    end_footer_ok: bool = True
    head_footer_ok: bool = True
    used_end: int = 0           # end of the last structure or block in use
    next_free: int = 0          # where the next block goes (the end footer's offset)
    leaks: list[tuple[int, int]] = field(default_factory=list)   # (offset, length)
    locator_data: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [p.message for p in self.problems if p.kind == "error"]

    def error(self, message: str) -> None:
        self.problems.append(Problem("error", message))

    @property
    def blocks(self) -> int:
        return -(-self.footer.current_size // self.header.block_size) if self.header else 0

    @property
    def bitmap_size(self) -> int:
        # one bit per sector, padded to whole sectors ("Block Allocation Table and Data Blocks")
        return _round_up(-(-(self.header.block_size // SECTOR_SIZE) // 8))


def _round_up(value: int, unit: int = SECTOR_SIZE) -> int:
    return -(-value // unit) * unit


def _bat_from_bytes(raw: bytes) -> array.array:
    """The BAT's big-endian entries as 4 bytes each in memory, not a Python int object each."""
    bat = array.array("I", raw)
    if sys.byteorder == "little":
        bat.byteswap()
    return bat


assert array.array("I").itemsize == 4


def read_metadata(file: HostFile, path: str) -> Metadata:
    """Parse and check everything but the parent; never raises for a bad image (the problems
    say what is wrong)."""
    meta = Metadata(path, file.size())
    size = meta.file_size
    tail, why = Footer.parse(file.pread(FOOTER_SIZE, size - FOOTER_SIZE)
                             if size >= FOOTER_SIZE else b"")
    head, head_why = Footer.parse(file.pread(FOOTER_SIZE, 0))
    if tail is not None:
        meta.footer = tail
    elif head is not None and head.disk_type != FIXED:
        # The copy at offset 0 ("Hard Disk Footer Format": dynamic disks keep one there).
        meta.footer = head
        meta.end_footer_ok = False
        meta.problems.append(Problem("stale", f"the footer at the end is damaged ({why}); "
                                              "using the copy at offset 0"))
    else:
        meta.error(why)
        return meta
    footer = meta.footer
    if footer.disk_type == FIXED:
        if size - FOOTER_SIZE < footer.current_size:
            meta.error(f"the file is truncated: {size} bytes cannot hold a fixed disk of "
                       f"{footer.current_size} bytes and its footer")
        return meta
    meta.head_footer_ok = head is not None and head.pack() == footer.pack()
    if meta.end_footer_ok and not meta.head_footer_ok:
        meta.problems.append(Problem("stale", "the footer copy at offset 0 does not match the "
                                              "footer at the end"))
    footer_at = size - FOOTER_SIZE if meta.end_footer_ok else _round_up(size) - FOOTER_SIZE
    footer_at = max(footer_at, 0)
    if footer.data_offset % SECTOR_SIZE or footer.data_offset < FOOTER_SIZE or \
            footer.data_offset + HEADER_SIZE > footer_at:
        meta.error(f"the dynamic header offset {footer.data_offset} is outside the file "
                   f"({size} bytes) or not sector-aligned")
        return meta
    header, why = Header.parse(file.pread(HEADER_SIZE, footer.data_offset))
    if header is None:
        meta.error(why)
        return meta
    meta.header = header
    blocks = meta.blocks
    if blocks > MAX_BLOCKS:   # the BAT is read whole: a hostile header must not size it freely
        meta.error(f"a disk of {footer.current_size} bytes in {header.block_size}-byte blocks "
                   f"has {blocks} blocks; hvvmm takes at most {MAX_BLOCKS}")
        return meta
    if header.max_table_entries < blocks:
        meta.error(f"the BAT has {header.max_table_entries} entries; a disk of "
                   f"{footer.current_size} bytes in {header.block_size}-byte blocks needs "
                   f"{blocks}")
        return meta
    bat_bytes = blocks * 4
    if header.table_offset % SECTOR_SIZE or header.table_offset < FOOTER_SIZE or \
            header.table_offset + bat_bytes > footer_at:
        meta.error(f"the BAT (offset {header.table_offset}, {blocks} entries) is outside the "
                   f"file ({size} bytes) or not sector-aligned")
        return meta
    raw = file.pread(bat_bytes, header.table_offset)
    if len(raw) != bat_bytes:
        meta.error("the BAT is cut short (truncated file?)")
        return meta
    meta.bat = _bat_from_bytes(raw)
    # Every region in use, to find entries past the end, overlaps and leaks.
    regions = [(0, FOOTER_SIZE, "the footer copy"),
               (footer.data_offset, footer.data_offset + HEADER_SIZE, "the dynamic header"),
               (header.table_offset, header.table_offset + _round_up(max(bat_bytes, 1)),
                "the BAT")]
    if footer.disk_type == DIFFERENCING:
        for index, loc in enumerate(header.locators):
            if loc.code == bytes(4) or not loc.length:
                continue
            if loc.length > MAX_LOCATOR or loc.offset % SECTOR_SIZE or \
                    loc.offset + loc.length > footer_at:
                meta.error(f"parent locator {index} ({loc.code!r}, {loc.length} bytes at "
                           f"{loc.offset}) is outside the file or too long")
                continue
            regions.append((loc.offset, loc.offset + _round_up(loc.length),
                            f"parent locator {index}"))
            meta.locator_data.setdefault(loc.code, file.pread(loc.length, loc.offset))
    block_bytes = meta.bitmap_size + header.block_size
    # The blocks as sorted sector numbers, one int each (not a tuple and a name each: there may
    # be MAX_BLOCKS of them); a block is named only when it is wrong.
    starts = sorted(entry for entry in meta.bat if entry != UNUSED)
    if starts and starts[-1] * SECTOR_SIZE + block_bytes > footer_at:
        meta.error(f"BAT entry {meta.bat.index(starts[-1])} points past the end of the file "
                   f"(block at {starts[-1] * SECTOR_SIZE}, {block_bytes} bytes; the file is "
                   f"{size} bytes)")
    if meta.errors:
        return meta
    blocks_in_order = ((entry * SECTOR_SIZE, entry * SECTOR_SIZE + block_bytes, "")
                       for entry in starts)
    previous = None
    for region in heapq.merge(sorted(regions), blocks_in_order):
        if previous is not None:
            if region[0] < previous[1]:
                what_a, what_b = (what or f"block {meta.bat.index(start // SECTOR_SIZE)}"
                                  for start, _, what in (previous, region))
                meta.error(f"{what_b} overlaps {what_a} (at byte {region[0]})")
                return meta
            # Gaps: a whole block's worth between regions (not alignment padding) is leaked.
            if region[0] - previous[1] >= max(block_bytes, DATA_ALIGNMENT):
                meta.leaks.append((previous[1], region[0] - previous[1]))
        previous = region
    meta.used_end = previous[1]
    meta.next_free = max(_round_up(footer_at), meta.used_end)
    if footer_at > meta.used_end:   # anything between the last block and the footer is leaked
        meta.leaks.append((meta.used_end, footer_at - meta.used_end))
    for offset, length in meta.leaks:
        meta.problems.append(Problem("leak", f"{length} bytes at {offset} are not used by any "
                                             "block (leaked by a write cut short?)"))
    return meta


# -- parents -----------------------------------------------------------------------------------

def _decode_path(raw: bytes) -> str:
    text = raw.decode("utf-16-le", "replace").split("\0", 1)[0]
    return text.replace("\\", "/")


def parent_candidates(meta: Metadata) -> list[str]:
    """Where the parent may be, best first: the relative locator, the absolute one, the Unicode
    name, each also as a plain name next to the child."""
    base = os.path.dirname(os.path.abspath(meta.path))
    found: list[str] = []
    names = []
    if W2RU in meta.locator_data:
        names.append(_decode_path(meta.locator_data[W2RU]))
    if W2KU in meta.locator_data:
        names.append(_decode_path(meta.locator_data[W2KU]))
    if meta.header.parent_name:
        names.append(meta.header.parent_name.replace("\\", "/"))
    for name in names:
        if not name:
            continue
        if len(name) > 2 and name[1] == ":":   # a Windows drive letter: try the name alone
            name = name[2:]
        paths = [name if os.path.isabs(name) else os.path.join(base, name),
                 os.path.join(base, os.path.basename(name))]
        for path in paths:
            path = os.path.normpath(path)
            if path not in found:
                found.append(path)
    return found


# -- the backend -------------------------------------------------------------------------------

class VhdBackend:
    """A VHD image as a :class:`~hvvmm.block.BlockBackend`. A differencing image opens its
    parent chain read-only (``parent_read_only=False`` opens the parent writable: ``commit``)."""

    format = "vhd"

    def __init__(self, path: str | os.PathLike, read_only: bool = False,
                 cache: str = "writeback", lock: bool = True, *, parent_read_only: bool = True,
                 host_file: HostFile | None = None, _chain: tuple[str, ...] = ()):
        self.path = os.fspath(path)
        self.read_only = read_only
        self.parent: VhdBackend | None = None
        self._file = host_file or _open_host_file(self.path, not read_only, cache, lock)
        try:
            self._open(cache, lock, parent_read_only, _chain)
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()

    def _open(self, cache: str, lock: bool, parent_read_only: bool,
              chain: tuple[str, ...]) -> None:
        meta = read_metadata(self._file, self.path)
        if meta.errors:
            raise ImageFormatError(f"{self.path}: {meta.errors[0]}")
        self.meta = meta
        footer = meta.footer
        self.footer = footer
        self.subformat = DISK_TYPES[footer.disk_type]
        self.size = footer.current_size
        self.uuid = uuid_module.UUID(bytes=footer.uuid)
        # writeback: BAT entries and bitmap bits wait for flush(), which puts the data they
        # cover on stable storage first; "none" (O_DSYNC) writes each at once, in order.
        self._deferred = cache == "writeback" and not self.read_only
        self._dirty_bat: set[int] = set()
        self._dirty_bitmaps: set[int] = set()
        self._broken = ""
        self._fixed = footer.disk_type == FIXED
        file = self._file
        if type(file) is HostFile:   # the hot path calls the system directly
            self._fast_pread = functools.partial(os.pread, file.fd)
            self._fast_pwrite = functools.partial(os.pwrite, file.fd)
        else:                        # a test's wrapper sees every access
            self._fast_pread = file.pread
            self._fast_pwrite = lambda data, offset: file.pwrite(data, offset) or len(data)
        if self._fixed:
            return
        header = meta.header
        self.block_size = header.block_size
        self._block_sectors = header.block_size // SECTOR_SIZE
        self._block_shift = self._block_sectors.bit_length() - 1
        self._block_mask = self._block_sectors - 1
        self._bitmap_size = meta.bitmap_size
        self._bat = meta.bat
        self._next_free = meta.next_free
        self._footer_bytes = footer.pack()
        self._bitmaps: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._bitmap_bits = self._bitmap_size * 8
        self._full = (1 << self._bitmap_bits) - 1
        self._all_present = self._run_mask(0, self._block_sectors)
        self._full_blocks: set[int] = set()
        if footer.disk_type == DIFFERENCING:
            self.parent = self._open_parent(cache, lock, parent_read_only,
                                            chain + (os.path.realpath(self.path),))

    def _open_parent(self, cache, lock, parent_read_only, chain) -> VhdBackend:
        header = self.meta.header
        if len(chain) > MAX_CHAIN:
            raise ImageFormatError(f"{self.path}: more than {MAX_CHAIN} differencing images "
                                   "in the chain")
        candidates = parent_candidates(self.meta)
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            tried = ", ".join(candidates) or "no parent locator or name"
            raise ImageFormatError(f"{self.path}: its parent image is missing (tried {tried})")
        if os.path.realpath(path) in chain:
            loop = " -> ".join(list(chain) + [os.path.realpath(path)])
            raise ImageFormatError(f"{self.path}: the parent chain loops ({loop})")
        parent = VhdBackend(path, read_only=parent_read_only, cache=cache, lock=lock,
                            _chain=chain)
        try:
            if parent.footer.uuid != header.parent_uuid:
                raise ImageFormatError(
                    f"{self.path}: parent {path} has UUID {parent.uuid}, but the image expects "
                    f"{uuid_module.UUID(bytes=header.parent_uuid)} (not its parent, or the "
                    "parent was replaced)")
            if parent.footer.timestamp != header.parent_timestamp:
                raise ImageFormatError(
                    f"{self.path}: parent {path} has timestamp "
                    f"{timestamp_text(parent.footer.timestamp)}, but the image expects "
                    f"{timestamp_text(header.parent_timestamp)} (the parent changed)")
        except BaseException:
            parent.close()
            raise
        return parent

    # -- helpers --

    def _range(self, sector: int, count: int) -> None:
        if sector < 0 or count < 0 or (sector + count) * SECTOR_SIZE > self.size:
            raise BlockError(errno.EINVAL, f"sectors {sector}+{count} are outside the disk "
                                           f"({self.size // SECTOR_SIZE} sectors)")

    def _pread(self, length: int, offset: int) -> bytes:
        data = self._file.pread(length, offset)
        if len(data) != length:
            self._broken = f"{self.path}: the file is shorter than its metadata says"
            raise BlockError(errno.EIO, self._broken)
        return data

    def _bitmap(self, block: int) -> int:
        """The block's sector bitmap as an integer (sector 0 is its top bit); cached."""
        bits = self._bitmaps.get(block)
        if bits is None:
            raw = self._pread(self._bitmap_size, self._bat[block] * SECTOR_SIZE)
            bits = int.from_bytes(raw, "big")
            self._remember(block, bits)
        else:
            self._bitmaps.move_to_end(block)
        return bits

    def _remember(self, block: int, bits: int) -> None:
        if bits & self._all_present == self._all_present:
            self._full_blocks.add(block)   # bits are never cleared: no bitmap needed any more
        self._bitmaps[block] = bits
        self._bitmaps.move_to_end(block)
        if len(self._bitmaps) > BITMAP_CACHE_BLOCKS:
            if next(iter(self._bitmaps)) in self._dirty_bitmaps:
                self._write_back()     # a dirty bitmap leaves the cache only once written
            self._bitmaps.popitem(last=False)

    def _mark_present(self, sector: int, count: int) -> None:
        """Set the bits of sectors just written in place (one block, bitmap cached)."""
        block = sector >> self._block_shift
        if block in self._full_blocks:
            return
        bits = self._bitmaps[block]
        mask = self._run_mask(sector & self._block_mask, count)
        if bits & mask != mask:
            self._dirty_bitmaps.add(block)
            self._remember(block, bits | mask)

    def _run_mask(self, first: int, count: int) -> int:
        return ((1 << count) - 1) << (self._bitmap_size * 8 - first - count)

    # -- BlockBackend --

    def _simple_offset(self, sector: int, count: int, writing: bool = False) -> int:
        """Where the request's bytes are when they all are in one place of this file: a fixed
        image, or one allocated block (in a differencing image, with the sectors present and
        the bitmap cached); -1 for an unallocated block of a dynamic image (zeros), -2 when the
        general path must serve it. The hot path of :meth:`read` and :meth:`write`, lock-free:
        a BAT entry or a bitmap bit is set only once the data it covers is written."""
        if self._fixed:
            return sector * SECTOR_SIZE
        block = sector >> self._block_shift
        if (sector + count - 1) >> self._block_shift != block:
            return -2
        entry = self._bat[block]
        if entry == UNUSED:
            return -1 if self.parent is None else -2
        first = sector & self._block_mask
        if self.parent is not None and block not in self._full_blocks:
            bits = self._bitmaps.get(block)
            mask = ((1 << count) - 1) << (self._bitmap_bits - first - count)
            if bits is None:
                return -2
            # A write of whole bitmap bytes may go in place too: write() sets the bits after
            # the data (in the cache; written at flush()).
            if bits & mask != mask and not (writing and self._deferred and
                                            not (first | count) & 7):
                return -2
        return entry * SECTOR_SIZE + self._bitmap_size + (first << _SECTOR_SHIFT)

    def read(self, sector: int, count: int) -> bytes:
        if sector < 0 or count <= 0 or (sector + count) * SECTOR_SIZE > self.size:
            self._range(sector, count)
            if not count:
                return b""
        length = count << _SECTOR_SHIFT
        offset = self._simple_offset(sector, count)
        if offset >= 0:
            data = self._fast_pread(length, offset)
            if len(data) == length:
                return data
        elif offset == -1:
            return bytes(length)
        with self._lock:
            if self._fixed:
                return self._pread(length, sector * SECTOR_SIZE)
            parts = []
            while count:
                block = sector >> self._block_shift
                first = sector & self._block_mask
                n = min(count, self._block_sectors - first)
                parts.append(self._read_in_block(block, sector, first, n))
                sector += n
                count -= n
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_in_block(self, block: int, sector: int, first: int, n: int) -> bytes:
        entry = self._bat[block]
        if entry == UNUSED:
            return self._parent_read(sector, n)
        data_at = entry * SECTOR_SIZE + self._bitmap_size + first * SECTOR_SIZE
        if self.parent is None:
            return self._pread(n * SECTOR_SIZE, data_at)
        bits = self._bitmap(block)
        mask = self._run_mask(first, n)
        present = bits & mask
        if present == mask:
            return self._pread(n * SECTOR_SIZE, data_at)
        if not present:
            return self._parent_read(sector, n)
        parts, run_start, run_present = [], 0, None
        top = self._bitmap_size * 8 - 1
        for i in range(n + 1):
            here = None if i == n else bool(bits >> (top - first - i) & 1)
            if here != run_present:
                if run_present is not None:
                    length = i - run_start
                    parts.append(self._pread(length * SECTOR_SIZE,
                                             data_at + run_start * SECTOR_SIZE)
                                 if run_present else self._parent_read(sector + run_start,
                                                                       length))
                run_start, run_present = i, here
        return b"".join(parts)

    def _parent_read(self, sector: int, count: int) -> bytes:
        if self.parent is None:
            return bytes(count * SECTOR_SIZE)
        # A parent smaller than the child reads as zeros past its end.
        inside = max(0, min(count, self.parent.size // SECTOR_SIZE - sector))
        data = self.parent.read(sector, inside) if inside else b""
        return data + bytes((count - inside) * SECTOR_SIZE)

    def _writable(self) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.path} is read-only")
        if self._broken:
            raise BlockError(errno.EIO, f"{self._broken}; not writing to it")

    def write(self, sector: int, data) -> None:
        if self.read_only or self._broken:
            self._writable()
        length = len(data)
        if length % SECTOR_SIZE or (isinstance(data, memoryview) and data.itemsize != 1):
            data = memoryview(data).cast("B")
            length = len(data)
            if length % SECTOR_SIZE:
                raise BlockError(errno.EINVAL, "a write must be whole sectors")
        count = length >> _SECTOR_SHIFT
        if sector < 0 or (sector + count) * SECTOR_SIZE > self.size:
            self._range(sector, count)
        if not count:
            return
        try:
            offset = self._simple_offset(sector, count, writing=True)
            if offset >= 0:   # in place: nothing but the data (and cached bits) changes
                done = self._fast_pwrite(data, offset)
                if done != length:
                    self._file.pwrite(memoryview(data)[done:], offset + done)
                if self.parent is not None:
                    self._mark_present(sector, count)
                return
            view = memoryview(data).cast("B")
            with self._lock:
                if self._fixed:
                    self._file.pwrite(view, sector * SECTOR_SIZE)
                    return
                while view:
                    block = sector >> self._block_shift
                    first = sector & self._block_mask
                    n = min(len(view) // SECTOR_SIZE, self._block_sectors - first)
                    self._write_in_block(block, first, n, view[:n * SECTOR_SIZE])
                    view = view[n * SECTOR_SIZE:]
                    sector += n
        except BlockError:
            raise
        except OSError as exc:
            self._fail(exc)
            raise BlockError(exc.errno or errno.EIO, self._broken) from None
        except Exception as exc:
            self._fail(exc)
            raise

    def _write_in_block(self, block: int, first: int, n: int, chunk) -> None:
        if self.parent is not None and (first | n) & 7:
            # Widen to whole bitmap bytes (4 KiB), the rest copied from what the disk reads now:
            # libvhdi takes a bitmap byte as all-or-nothing, so every reader then agrees.
            start = first & ~7
            end = min(-(-(first + n) // 8) * 8, self._block_sectors,
                      self.size // SECTOR_SIZE - (block << self._block_shift))
            base = block << self._block_shift
            head = self._read_in_block(block, base + start, start, first - start) \
                if first > start else b""
            tail = self._read_in_block(block, base + first + n, first + n, end - first - n) \
                if end > first + n else b""
            if head or tail:
                chunk = head + bytes(chunk) + tail
                first, n = start, end - start
        entry = self._bat[block]
        if entry == UNUSED:
            self._allocate(block, first, n, chunk)
            return
        start = entry * SECTOR_SIZE
        self._file.pwrite(chunk, start + self._bitmap_size + first * SECTOR_SIZE)
        if self.parent is None:
            return  # a dynamic image's bitmaps are all set
        mask = self._run_mask(first, n)
        # A write of the whole block needs no bitmap read; the data is written before the bit.
        bits = self._full if n == self._block_sectors else self._bitmap(block)
        if bits & mask != mask or n == self._block_sectors:
            bits |= mask
            if self._bitmaps.get(block) != bits:
                if self._deferred:
                    self._dirty_bitmaps.add(block)
                else:
                    self._file.pwrite(bits.to_bytes(self._bitmap_size, "big"), start)
            self._remember(block, bits)

    def _allocate(self, block: int, first: int, n: int, chunk) -> None:
        # The data starts on a 4 KiB boundary, the bitmap right before it (a BAT entry may name
        # any sector): a guest's 4 KiB request is then one host page, not two.
        start = _round_up(self._next_free + self._bitmap_size, DATA_ALIGNMENT) - self._bitmap_size
        end = start + self._bitmap_size + self.block_size
        if end // SECTOR_SIZE > UNUSED:
            raise BlockError(errno.ENOSPC, f"{self.path}: the VHD file cannot grow past 2 TiB")
        # 1. a valid footer at the new end; the block in between is a hole (zeros)
        self._file.pwrite(self._footer_bytes, end)
        self._next_free = end
        # 2. the bitmap and the data
        bits = self._full if self.parent is None else self._run_mask(first, n)
        bitmap = bits.to_bytes(self._bitmap_size, "big")
        if first == 0:
            self._file.pwrite(bitmap + bytes(chunk), start)
        else:
            self._file.pwrite(bitmap, start)
            self._file.pwrite(chunk, start + self._bitmap_size + first * SECTOR_SIZE)
        # 3. and 4.: on stable storage before the BAT entry points at it (see flush())
        if self._deferred:
            self._dirty_bat.add(block)
        else:
            self._file.pwrite((start // SECTOR_SIZE).to_bytes(4, "big"),
                              self.meta.header.table_offset + 4 * block)
        self._bat[block] = start // SECTOR_SIZE
        if self.parent is not None:
            self._remember(block, bits)

    def _write_back(self) -> None:
        """Flush the data, then write the BAT entries and bitmaps that point at it."""
        if not (self._dirty_bat or self._dirty_bitmaps):
            return
        self._file.sync()
        for block in sorted(self._dirty_bitmaps):
            self._file.pwrite(self._bitmaps[block].to_bytes(self._bitmap_size, "big"),
                              self._bat[block] * SECTOR_SIZE)
        self._dirty_bitmaps.clear()
        table = self.meta.header.table_offset
        entries_per_sector = SECTOR_SIZE // 4
        for first in sorted({block - block % entries_per_sector for block in self._dirty_bat}):
            entries = self._bat[first:first + entries_per_sector]
            self._file.pwrite(struct.pack(f">{len(entries)}I", *entries), table + 4 * first)
        self._dirty_bat.clear()

    def flush(self) -> None:
        if self.read_only:
            return
        if self._broken:
            raise BlockError(errno.EIO, f"{self._broken}; not writing to it")
        with self._lock:
            try:
                if not self._fixed:
                    self._write_back()
                self._file.sync()
            except Exception as exc:
                self._fail(exc)
                raise

    def _fail(self, exc: BaseException) -> None:
        """After a failed write the file's state is unknown: nothing more is written to it."""
        self._broken = f"{self.path}: a write failed ({getattr(exc, 'strerror', None) or exc!r})"

    def discard(self, sector: int, count: int) -> None:
        self._writable()
        self._range(sector, count)
        if self._fixed:
            self._file.punch_hole(sector * SECTOR_SIZE, count * SECTOR_SIZE)
            return
        if self.parent is not None:
            return  # a differencing image keeps the data: it may not read as zeros
        with self._lock:
            while count:
                block = sector >> self._block_shift
                first = sector & (self._block_sectors - 1)
                n = min(count, self._block_sectors - first)
                if self._bat[block] != UNUSED:
                    self._file.punch_hole(self._bat[block] * SECTOR_SIZE + self._bitmap_size
                                          + first * SECTOR_SIZE, n * SECTOR_SIZE)
                sector += n
                count -= n

    def allocated_blocks(self) -> list[int]:
        return [i for i, entry in enumerate(getattr(self, "_bat", [])) if entry != UNUSED]

    def present_runs(self, block: int) -> list[tuple[int, int]]:
        """The (sector, count) runs this image itself holds in ``block`` (all of it unless
        differencing)."""
        base = block << self._block_shift
        count = min(self._block_sectors, self.size // SECTOR_SIZE - base)
        if self._bat[block] == UNUSED or count <= 0:
            return []
        if self.parent is None:
            return [(base, count)]
        with self._lock:
            bits = self._bitmap(block)
        runs, top, start = [], self._bitmap_size * 8 - 1, None
        for i in range(count + 1):
            here = i < count and bits >> (top - i) & 1
            if here and start is None:
                start = i
            elif not here and start is not None:
                runs.append((base + start, i - start))
                start = None
        return runs

    def close(self) -> None:
        """Write the BAT entries and bitmaps that flush() would (after syncing the data they
        cover, as flush() does), then close without a final sync."""
        try:
            if getattr(self, "_deferred", False) and not self._broken and \
                    (self._dirty_bat or self._dirty_bitmaps):
                with self._lock:
                    self._write_back()
        finally:
            if self.parent is not None:
                self.parent.close()
                self.parent = None
            if self._file is not None:
                self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- creating ----------------------------------------------------------------------------------

def _locator_path(path: str) -> bytes:
    return path.replace("/", "\\").encode("utf-16-le")


def chs_size(size: int) -> int:
    """The smallest size of at least ``size`` bytes that the CHS geometry describes exactly.

    QEMU before 10.0 (``block/vpc.c``) sizes a disk by its geometry unless the footer's creator
    is one it knows to use the current size; rounding up as QEMU's own ``vpc`` driver does makes
    every reader agree on the size. Past the largest geometry, readers use the current size."""
    sectors = _round_up(size) // SECTOR_SIZE
    for extra in range(1 << 16):
        cylinders, heads, per_track = chs_geometry(sectors + extra)
        if (cylinders, heads, per_track) == (65535, 16, 255):
            break
        if cylinders * heads * per_track >= sectors:
            return cylinders * heads * per_track * SECTOR_SIZE
    return sectors * SECTOR_SIZE


def create_vhd(path: str | os.PathLike, size: int = 0, subformat: str = "dynamic",
               block_size: int = DEFAULT_BLOCK_SIZE, parent: str | os.PathLike | None = None,
               timestamp: int | None = None, force_size: bool = False) -> int:
    """Create (or overwrite) a VHD image and return its size. With ``parent`` it is a
    differencing image of the parent's size. ``size`` is rounded up to the CHS geometry
    (:func:`chs_size`) unless ``force_size``, then only to whole sectors."""
    path = os.fspath(path)
    parent_footer = None
    if parent is not None:
        parent = os.fspath(parent)
        subformat = "differencing"
        if os.path.exists(path) and os.path.exists(parent) and os.path.samefile(path, parent):
            raise ValueError(f"{path} cannot be its own parent")
        with VhdBackend(parent, read_only=True) as backing:
            parent_footer = backing.footer
        if size and size != parent_footer.current_size:
            raise ValueError(f"{path}: a differencing image has its parent's size "
                                   f"({parent_footer.current_size} bytes), not {size}")
        size = parent_footer.current_size
    if subformat not in ("fixed", "dynamic", "differencing"):
        raise ValueError(f"unknown VHD subformat {subformat!r} (fixed or dynamic)")
    if parent is None:
        size = _round_up(size) if force_size else chs_size(size)
    if not 0 < size <= MAX_SIZE:
        raise ValueError(f"a VHD disk is 512 bytes to 2040 GiB (got {size} bytes)")
    if block_size < SECTOR_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"bad block size {block_size} (a power of two from 512 bytes to "
                         f"{MAX_BLOCK_SIZE >> 20} MiB)")
    if subformat != "fixed" and -(-size // block_size) > MAX_BLOCKS:
        raise ValueError(f"{size} bytes in {block_size}-byte blocks are more than {MAX_BLOCKS} "
                         "blocks: use larger blocks")
    disk_type = {"fixed": FIXED, "dynamic": DYNAMIC, "differencing": DIFFERENCING}[subformat]
    footer = Footer(disk_type, size, uuid_module.uuid4().bytes,
                    vhd_timestamp() if timestamp is None else timestamp,
                    data_offset=NO_OFFSET if disk_type == FIXED else FOOTER_SIZE,
                    original_size=size, geometry=chs_geometry(size // SECTOR_SIZE))
    fd = open_file(path, writable=True, create=True)   # locked: never truncate an image in use
    try:
        file = HostFile(fd, path)
        file.truncate(0)
        if disk_type == FIXED:
            file.truncate(size)
            file.pwrite(footer.pack(), size)
        else:
            _write_dynamic(file, path, footer, block_size, parent, parent_footer)
        file.sync()
    finally:
        os.close(fd)
    return size


def _write_dynamic(file: HostFile, path: str, footer: Footer, block_size: int,
                   parent: str | None, parent_footer: Footer | None) -> None:
    blocks = -(-footer.current_size // block_size)
    table_offset = FOOTER_SIZE + HEADER_SIZE
    offset = table_offset + _round_up(blocks * 4)
    header = Header(table_offset, blocks, block_size)
    locator_data = []
    if parent is not None:
        absolute = os.path.abspath(parent)
        relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(path)))
        header.parent_uuid = parent_footer.uuid
        header.parent_timestamp = parent_footer.timestamp
        header.parent_name = os.path.basename(absolute)
        for code, text in ((W2RU, ".\\" + relative if not relative.startswith("..")
                            else relative), (W2KU, absolute)):
            data = _locator_path(text)
            header.locators.append(Locator(code, _round_up(len(data)) // SECTOR_SIZE,
                                           len(data), offset))
            locator_data.append((offset, data))
            offset += _round_up(len(data))
    footer_bytes = footer.pack()
    file.pwrite(footer_bytes, 0)
    file.pwrite(header.pack(), FOOTER_SIZE)
    file.pwrite(b"\xff" * (blocks * 4), table_offset)
    for at, data in locator_data:
        file.pwrite(data.ljust(_round_up(len(data)), b"\0"), at)
    file.pwrite(footer_bytes, offset)


# -- inspecting and checking -------------------------------------------------------------------

def inspect_vhd(path: str, lock: bool = True) -> Metadata:
    """The metadata of ``path`` (read-only), problems included."""
    file = _open_host_file(path, writable=False, cache="writeback", lock=lock)
    try:
        return read_metadata(file, path)
    finally:
        file.close()


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    allocated: int = 0
    blocks: int = 0


def check_vhd(path: str, repair: bool = False) -> CheckResult:
    """Check a VHD image: checksums, the BAT (each block, its bitmap included, inside the file;
    no overlaps), the parent link. ``repair`` fixes what is safe: leaked space, a stale or
    damaged footer copy. Nothing is written when an error was found."""
    file = _open_host_file(path, writable=repair, cache="writeback", lock=True)
    result = CheckResult()
    try:
        meta = read_metadata(file, path)
        result.errors = meta.errors
        result.leaks = [p.message for p in meta.problems if p.kind == "leak"]
        result.stale = [p.message for p in meta.problems if p.kind == "stale"]
        if not result.errors and meta.header is not None:
            result.blocks = meta.blocks
            result.allocated = sum(entry != UNUSED for entry in meta.bat)
            if meta.footer.disk_type == DIFFERENCING:
                try:
                    VhdBackend(path, read_only=True, lock=False).close()
                except (ImageFormatError, BlockError) as exc:
                    result.errors.append(str(exc).removeprefix(f"{path}: "))
        if repair and not result.errors:
            _repair(file, meta, result)
    finally:
        file.close()
    return result


def _repair(file: HostFile, meta: Metadata, result: CheckResult) -> None:
    footer = meta.footer.pack()
    if meta.header is None:
        return   # fixed: nothing to repair
    trailing = [leak for leak in meta.leaks if leak[0] + leak[1] >= meta.next_free]
    for offset, length in meta.leaks:
        if (offset, length) not in trailing:
            file.punch_hole(offset, length)
            result.repaired.append(f"freed {length} leaked bytes at {offset}")
    if trailing or not meta.end_footer_ok or meta.file_size != meta.used_end + FOOTER_SIZE:
        file.pwrite(footer, meta.used_end)
        file.truncate(meta.used_end + FOOTER_SIZE)
        file.sync()
        what = "trimmed leaked space at the end" if trailing else "rewrote the end footer"
        result.repaired.append(what)
    if not meta.head_footer_ok:
        file.pwrite(footer, 0)
        file.sync()
        result.repaired.append("rewrote the footer copy at offset 0")
    if result.repaired:
        result.leaks, result.stale = [], []


# -- registration ------------------------------------------------------------------------------

def probe(head: bytes, tail: bytes, size: int) -> bool:
    """A footer at the end, or a dynamic image's footer copy at offset 0.

    A guest can write both places of a raw disk: a probed raw image refuses writes that would
    make this answer yes (``RawBackend.probed``), but an image once written with ``format=raw``
    named may hold a footer, so a drive a guest writes to should always name its format."""
    return tail[:8] == FOOTER_COOKIE or head[:8] == FOOTER_COOKIE


FORMAT = ImageFormat("vhd", probe, lambda path, read_only=False, cache="writeback":
                     VhdBackend(path, read_only, cache))
