"""Unpacking a bzImage's compressed kernel in the host.

A bzImage carries the kernel proper (``vmlinux``, an ELF file) compressed; the setup header's
``payload_offset``/``payload_length`` locate it (Linux ``Documentation/arch/x86/boot.rst``,
protocol 2.08). The kernel's build appends the uncompressed size as a little-endian u32 to every
payload (``scripts/Makefile.lib``: ``size_append``; gzip's own trailer ends with the same value),
so the size is known before decompressing and bounds the output.

Each format is decoded by a maintained library: the standard library's ``zlib``, ``bz2`` and
``lzma``, PyPI ``lz4`` and ``zstandard``. LZ4 is the kernel's *legacy* frame format (magic
0x184C2102 followed by blocks of at most 8 MiB, ``lib/decompress_unlz4.c``), not the LZ4 frame
format. LZO has no maintained Python library: such a payload is left to the kernel's own
decompressor (:func:`payload_format` still names it).
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib

from .state import KernelImageError

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20  # LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE in lib/decompress_unlz4.c

# (magic, name), as lib/decompress.c's compressed_formats table recognises them.
_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9e", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x89LZO", "lzo"),
    (struct.pack("<I", _LZ4_LEGACY_MAGIC), "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
HOST_FORMATS = ("gzip", "bzip2", "lzma", "xz", "lz4", "zstd")


def payload_format(payload: bytes) -> str | None:
    """The compression of ``payload`` by its magic bytes, or ``None`` if none is recognised."""
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    return None


def _stream(decompressor, payload: bytes, limit: int) -> bytes:
    """Run a zlib/bz2/lzma-style decompressor over one stream; the trailer is left unused."""
    out = decompressor.decompress(payload, limit + 1)
    if len(out) <= limit and not decompressor.eof:  # longer: the caller reports the size
        raise ValueError("the compressed stream ends early (truncated or corrupt)")
    return out


def _lz4_legacy(payload: bytes, limit: int) -> bytes:
    import lz4.block

    out = bytearray()
    pos = 4
    while len(payload) - pos > 4:  # the last 4 bytes are the size trailer
        (size,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:  # concatenated legacy frames
            continue
        if pos + size > len(payload):
            raise ValueError(f"an LZ4 block of {size} bytes runs past the end of the payload")
        out += lz4.block.decompress(payload[pos:pos + size], uncompressed_size=_LZ4_LEGACY_BLOCK)
        pos += size
        if len(out) > limit:
            break
    return bytes(out)


def _zstd(payload: bytes, limit: int) -> bytes:
    import zstandard

    # A reader, because decompressobj().decompress() has no output bound: a small frame could
    # expand to gigabytes in the host before the size check. A truncated frame reads short,
    # which the caller's trailer check reports.
    with zstandard.ZstdDecompressor().stream_reader(payload[:-4]) as reader:
        return reader.read(limit + 1)


def decompress_payload(payload: bytes, limit: int) -> bytes:
    """Decompress a bzImage payload of a :data:`HOST_FORMATS` format.

    ``limit`` bounds the output (the guest's RAM). Raises :class:`KernelImageError`, one sentence,
    if the payload is not of a format decodable here, is corrupt or truncated, decompresses to
    more than ``limit`` or to a size other than its trailer says.
    """
    name = payload_format(payload)
    if name not in HOST_FORMATS:
        raise KernelImageError("the kernel payload's compression is not one hvvmm can unpack "
                               f"({name or 'unknown magic ' + payload[:4].hex()})")
    if len(payload) < 8:
        raise KernelImageError(f"the {name} kernel payload is truncated ({len(payload)} bytes)")
    (expected,) = struct.unpack_from("<I", payload, len(payload) - 4)
    if expected > limit:
        raise KernelImageError(
            f"the kernel decompresses to {expected >> 20} MiB, more than the guest's "
            f"{limit >> 20} MiB of RAM")
    try:
        if name == "gzip":
            out = _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), payload, expected)
        elif name == "bzip2":
            out = _stream(bz2.BZ2Decompressor(), payload, expected)
        elif name == "lzma":
            out = _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload, expected)
        elif name == "xz":
            out = _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), payload, expected)
        elif name == "lz4":
            out = _lz4_legacy(payload, expected)
        else:
            out = _zstd(payload, expected)
    except Exception as exc:  # noqa: BLE001 - each library has its own error type (zlib.error,
        # lzma.LZMAError, lz4.block.LZ4BlockError, zstandard.ZstdError, ...): all mean "corrupt"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KernelImageError(f"the {name} kernel payload does not decompress: {detail}") from None
    if len(out) > expected:  # each decoder stops a byte (LZ4: a block) past the limit
        raise KernelImageError(
            f"the {name} kernel payload decompresses to more than the {expected} bytes its "
            f"trailer says")
    if len(out) != expected:
        raise KernelImageError(
            f"the {name} kernel payload decompresses to {len(out)} bytes, but its trailer says "
            f"{expected}")
    return out
