"""Block backends: what a disk device (virtio-blk, ...) reads and writes.

A backend is a disk of ``size`` bytes in 512-byte sectors. Devices call it from their I/O worker
thread, never from a vCPU thread, so a slow disk cannot stall a vCPU; every method of a backend is
safe to call from one worker thread while another thread only reads ``size``/``read_only``.

Formats register themselves in :data:`FORMATS`; :func:`open_image` picks one from the file's bytes
(``probe``) unless the caller names it. Raw files are the first format; VHD (``vhd.py``) plugs
in the same way.

Probing is dangerous for raw images: a guest that owns a raw disk can write a VHD footer into it,
and the next probe would take the file for a VHD, perhaps a differencing one that names a host
file as its parent. So, as QEMU does (``block.c`` warns "probing guessed raw", ``raw-format.c``
``raw_co_pwritev`` refuses writes to sector 0 of a probed raw image that would change the probe's
answer), a raw image opened writable without a named format logs a warning, and a write to its
first or last sector (the bytes the probes read) that would make it probe as another format fails
with EPERM. Naming ``format=raw`` lifts the restriction.

Images are locked as QEMU locks them (QEMU ``block/file-posix.c``, ``raw_apply_lock_bytes``): open
file description locks on byte 100 + permission ("I use it") and 200 + permission ("I do not let
others use it"), so two processes, hvvmm or QEMU, cannot both open one image writable, and nobody
writes an image that someone reads.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Protocol

SECTOR_SIZE = 512

log = logging.getLogger(__name__)

__all__ = ["SECTOR_SIZE", "BlockBackend", "BlockError", "ImageFormatError", "ImageLockedError",
           "RawBackend", "ImageFormat", "FORMATS", "open_image", "probe_format", "lock_image",
           "open_file"]


class BlockError(OSError):
    """An I/O request that cannot be served: out of range, read-only, a failed host I/O."""


class ImageFormatError(ValueError):
    """The file is not a valid image of its format; the message says what is wrong."""


class ImageLockedError(BlockError):
    """Another process (hvvmm or QEMU) holds the image in a way this open conflicts with."""


class BlockBackend(Protocol):
    """A disk. Offsets and lengths are in sectors of :data:`SECTOR_SIZE` bytes."""

    size: int          # bytes, a multiple of SECTOR_SIZE
    read_only: bool

    def read(self, sector: int, count: int) -> bytes: ...

    def write(self, sector: int, data: bytes) -> None: ...

    def flush(self) -> None:
        """Everything written so far reaches stable storage before this returns."""

    def discard(self, sector: int, count: int) -> None:
        """The range's contents may be dropped; reads then return zeros or the old data."""

    def close(self) -> None: ...


# -- locking -----------------------------------------------------------------------------------

# QEMU's permission bits (include/block/block-common.h, BLK_PERM_*) and lock byte bases.
_PERM_CONSISTENT_READ = 0
_PERM_WRITE = 1
_LOCK_USE_BASE = 100
_LOCK_DENY_BASE = 200
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def _ofd_lock(fd: int, command: int, lock_type: int, byte: int) -> int:
    packed = _FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0)
    result = fcntl.fcntl(fd, command, packed)
    return _FLOCK.unpack(result)[0]


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take QEMU-compatible locks on the open image ``fd``; raise :class:`ImageLockedError` if
    another open (any process, or this one through another open) conflicts."""
    used = [_PERM_CONSISTENT_READ] + ([_PERM_WRITE] if writable else [])
    denied = [_PERM_WRITE]  # nobody else may write what we read or write
    try:
        for perm in used:
            _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_USE_BASE + perm)
        for perm in denied:
            _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_DENY_BASE + perm)
        # Conflicts: someone denies what we use, or uses what we deny. A read lock there from
        # another open file description makes a write-lock test fail.
        conflicts = [_LOCK_DENY_BASE + perm for perm in used]
        conflicts += [_LOCK_USE_BASE + perm for perm in denied]
        for byte in conflicts:
            if _ofd_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK:
                what = "write" if byte % 100 == _PERM_WRITE else "read"
                raise ImageLockedError(errno.EAGAIN, f"{path} is in use: another process holds "
                                       f"a conflicting \"{what}\" lock (is it open in another "
                                       "hvvmm or QEMU?)")
    except OSError as exc:
        if isinstance(exc, ImageLockedError):
            raise
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(exc.errno, f"{path} is in use by another process") from None
        raise BlockError(exc.errno, f"cannot lock {path}: {exc.strerror}") from None


def open_file(path: str, writable: bool, cache: str = "writeback", lock: bool = True,
              create: bool = False) -> int:
    """Open an image file and return its descriptor: O_DSYNC for ``cache="none"``, QEMU-style
    locks, and only a regular file or a block device (opening a FIFO for reading would wait for
    a writer). Any failure is one :class:`BlockError` line, with no descriptor left open."""
    if cache not in ("writeback", "none"):
        raise ValueError(f"cache must be 'writeback' or 'none' (got {cache!r})")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
    if create:
        flags |= os.O_CREAT
    if cache == "none" and writable:
        flags |= os.O_DSYNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise BlockError(exc.errno, f"cannot {'create' if create else 'open'} {path}: "
                                    f"{exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise BlockError(errno.EINVAL, f"{path} is not a regular file or a block device")
        if lock:
            lock_image(fd, path, writable=writable)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- raw files ---------------------------------------------------------------------------------

class RawBackend:
    """A raw image file: sector N is at byte N * 512. ``cache="none"`` makes every write reach
    stable storage before it completes (O_DSYNC); ``"writeback"`` leaves that to :meth:`flush`.
    ``probed``: the format was guessed, so writes may not make the file probe as another format
    (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike, read_only: bool = False, cache: str = "writeback",
                 lock: bool = True, probed: bool = False):
        self.path = os.fspath(path)
        self.read_only = read_only
        self.probed = probed
        self._fd = open_file(self.path, not read_only, cache, lock)
        try:
            length = os.fstat(self._fd).st_size
            if length % SECTOR_SIZE:
                raise ImageFormatError(f"{self.path}: raw image size {length} is not a multiple "
                                       f"of {SECTOR_SIZE} bytes")
            self.size = length
        except BaseException:
            os.close(self._fd)
            raise

    def _check(self, sector: int, count: int) -> int:
        if sector < 0 or count < 0 or (sector + count) * SECTOR_SIZE > self.size:
            raise BlockError(errno.EINVAL, f"sectors {sector}+{count} are outside the disk "
                                           f"({self.size // SECTOR_SIZE} sectors)")
        return sector * SECTOR_SIZE

    def read(self, sector: int, count: int) -> bytes:
        offset = self._check(sector, count)
        data = os.pread(self._fd, count * SECTOR_SIZE, offset)
        if len(data) != count * SECTOR_SIZE:  # the file shrank under us
            data += bytes(count * SECTOR_SIZE - len(data))
        return data

    def write(self, sector: int, data: bytes) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.path} is read-only")
        if len(data) % SECTOR_SIZE:
            raise BlockError(errno.EINVAL, "a write must be whole sectors")
        offset = self._check(sector, len(data) // SECTOR_SIZE)
        view = memoryview(data).cast("B")
        if self.probed and view:
            self._refuse_format_change(sector, view)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def _refuse_format_change(self, sector: int, view: memoryview) -> None:
        """A probed raw image: refuse a write to the first or last sector after which the file
        would probe as another format (QEMU ``block/raw-format.c``, ``raw_co_pwritev``, guards
        sector 0; our VHD probe also reads the last sector, so that one is guarded too)."""
        last = self.size // SECTOR_SIZE - 1
        end = sector + len(view) // SECTOR_SIZE - 1
        if sector > 0 and end < last:
            return
        head = view[:SECTOR_SIZE] if sector == 0 else os.pread(self._fd, SECTOR_SIZE, 0)
        tail = view[-SECTOR_SIZE:] if end == last else \
            os.pread(self._fd, SECTOR_SIZE, last * SECTOR_SIZE)
        format = _probe(bytes(head), bytes(tail), self.size)
        if format != "raw":
            raise BlockError(errno.EPERM, f"{self.path}: refused a write that would make this "
                                          f"probed raw image look like a {format} image (name "
                                          "format=raw to allow it)")

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self._fd)

    def discard(self, sector: int, count: int) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.path} is read-only")
        offset = self._check(sector, count)
        try:  # punch a hole; reads of it then return zeros
            _fallocate_punch_hole(self._fd, offset, count * SECTOR_SIZE)
        except OSError:
            pass  # discard is advisory

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the OFD locks
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.cache
def _fallocate():
    """libc's fallocate(2), looked up once: ``ctypes.util.find_library`` runs ldconfig, a few
    milliseconds that a guest's every discard request would otherwise pay."""
    import ctypes

    function = ctypes.CDLL(None, use_errno=True).fallocate   # the libc Python runs on
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function


def _fallocate_punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes

    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02   # linux/falloc.h
    if _fallocate()(fd, falloc_fl_keep_size | falloc_fl_punch_hole, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- formats -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageFormat:
    """An image format: ``probe(head, tail, size)`` says whether the file is one (``head`` is its
    first 512 bytes, ``tail`` its last 512 bytes, as QEMU probes 512 bytes: ``block.c``
    ``BLOCK_PROBE_BUF_SIZE``); ``open(path, read_only, cache)`` opens it."""

    name: str
    probe: Callable[[bytes, bytes, int], bool]
    open: Callable[..., BlockBackend]


FORMATS: dict[str, ImageFormat] = {
    "raw": ImageFormat("raw", lambda head, tail, size: True,
                       lambda path, read_only=False, cache="writeback":
                       RawBackend(path, read_only, cache)),
}


def _probe(head: bytes, tail: bytes, size: int) -> str:
    return next((name for name, fmt in FORMATS.items()
                 if name != "raw" and fmt.probe(head, tail, size)), "raw")


def probe_format(path: str) -> str:
    """The format of the image at ``path``: any format but raw that claims it, else raw."""
    fd = open_file(path, writable=False, lock=False)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, SECTOR_SIZE, 0)
        tail = os.pread(fd, SECTOR_SIZE, max(size - SECTOR_SIZE, 0))
    except OSError as exc:
        raise BlockError(exc.errno, f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _probe(head, tail, size)


def open_image(path: str | os.PathLike, format: str | None = None, read_only: bool = False,
               cache: str = "writeback") -> BlockBackend:
    """Open a disk image, its format named or probed (any format but raw that claims the file
    wins; raw takes the rest, restricted as the module's docstring says)."""
    path = os.fspath(path)
    if format is None:
        format = probe_format(path)
        if format == "raw":
            backend = RawBackend(path, read_only, cache, probed=True)
            if not read_only:   # once open: a refused open says one line, not two
                log.warning("%s: no format was given and probing guessed raw; writes that would "
                            "make it look like another format are refused (name format=raw to "
                            "allow them)", path)
            return backend
    if format not in FORMATS:
        raise ImageFormatError(f"unknown image format {format!r} (known: "
                               f"{', '.join(sorted(FORMATS))})")
    return FORMATS[format].open(path, read_only=read_only, cache=cache)


# Formats other than raw live in their own modules and register here.
from . import vhd as _vhd  # noqa: E402  (vhd.py imports the names above)

FORMATS["vhd"] = _vhd.FORMAT
