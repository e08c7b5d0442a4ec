"""QEMU's ACPI linker/loader: the tables as fw_cfg files that firmware (SeaBIOS, OVMF) installs.

Firmware cannot take tables at fixed addresses, so QEMU hands them over as fw_cfg files plus a
script, ``etc/table-loader``, of 128-byte commands the firmware runs in order:

- ALLOCATE (1): ``{char file[56]; u32 align; u8 zone}`` copy the file into memory allocated at
  that alignment, in the high zone (1, reserved RAM below 4 GiB) or the F segment (2, where the
  RSDP must be found);
- ADD_POINTER (2): ``{char dest_file[56]; char src_file[56]; u32 offset; u8 size}`` add the
  address where ``src_file`` was loaded to the little-endian ``size``-byte field at ``offset`` of
  ``dest_file`` (so the field holds an offset into ``src_file`` beforehand);
- ADD_CHECKSUM (3): ``{char file[56]; u32 offset; u32 start; u32 length}`` subtract the byte sum
  of ``[start, start+length)`` from the byte at ``offset``, making the range sum to 0.

Everything but the RSDP goes into ``etc/acpi/tables`` (64-byte aligned, as the FACS needs); the
RSDP into ``etc/acpi/rsdp`` in the F segment. The commands come from the pointer and checksum
records of :mod:`hvvmm.acpi.tables`, so the firmware's copy is the direct boot's tables relocated.

Sources: QEMU ``hw/acpi/bios-linker-loader.c``, ``include/hw/acpi/bios-linker-loader.h``;
SeaBIOS ``src/fw/romfile_loader.c`` / ``romfile_loader.h`` (the firmware side).
"""

from __future__ import annotations

import struct
from typing import Sequence

from .tables import AcpiTable, link, place

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

COMMAND_ALLOCATE = 1
COMMAND_ADD_POINTER = 2
COMMAND_ADD_CHECKSUM = 3
ZONE_HIGH = 1
ZONE_FSEG = 2
COMMAND_SIZE = 128
FILE_NAME_SIZE = 56  # fw_cfg's file name field, NUL included
TABLES_ALIGNMENT = 64
RSDP_ALIGNMENT = 16


def _file_name(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= FILE_NAME_SIZE:
        raise ValueError(f"fw_cfg file name {name!r} is too long")
    return raw.ljust(FILE_NAME_SIZE, b"\0")


def _command(command: int, payload: bytes) -> bytes:
    return struct.pack("<I", command) + payload.ljust(COMMAND_SIZE - 4, b"\0")


def allocate(file: str, align: int, zone: int) -> bytes:
    return _command(COMMAND_ALLOCATE, _file_name(file) + struct.pack("<IB", align, zone))


def add_pointer(dest_file: str, src_file: str, offset: int, size: int) -> bytes:
    return _command(COMMAND_ADD_POINTER, _file_name(dest_file) + _file_name(src_file)
                    + struct.pack("<IB", offset, size))


def add_checksum(file: str, offset: int, start: int, length: int) -> bytes:
    return _command(COMMAND_ADD_CHECKSUM, _file_name(file) + struct.pack("<III", offset, start,
                                                                          length))


def build_firmware_files(tables: Sequence[AcpiTable]) -> dict[str, bytes]:
    """The fw_cfg files ``etc/acpi/rsdp``, ``etc/acpi/tables`` and ``etc/table-loader`` for
    ``tables`` (unplaced, as :func:`hvvmm.acpi.tables.build_table_list` or
    ``AcpiTables.tables`` give them)."""
    rsdp = [t for t in tables if t.signature == "RSDP"]
    rest = [t for t in tables if t.signature != "RSDP"]
    if len(rsdp) != 1:
        raise ValueError("the tables need exactly one RSDP")
    file_of = {t.signature: TABLES_FILE for t in rest}
    file_of["RSDP"] = RSDP_FILE
    # Each file is placed from 0 (and each file's allocation is at least as aligned as any
    # table in it), so a pointer field holds its target's offset in the target's file.
    offsets = {**place(rest), "RSDP": 0}
    if any(t.alignment > TABLES_ALIGNMENT for t in rest):
        raise ValueError("a table needs more alignment than its file gets")
    blobs = link(tables, offsets)
    blob = bytearray()
    for table in rest:
        blob += bytes(-len(blob) % table.alignment)
        blob += blobs[table.signature]
    commands = [allocate(TABLES_FILE, TABLES_ALIGNMENT, ZONE_HIGH),
                allocate(RSDP_FILE, RSDP_ALIGNMENT, ZONE_FSEG)]
    for table in tables:  # each table's pointers, then its checksums (which cover them)
        file, base = file_of[table.signature], offsets[table.signature]
        commands += [add_pointer(file, file_of[p.target], base + p.offset, p.size)
                     for p in table.pointers]
        commands += [add_checksum(file, base + c.offset, base + c.start, c.length)
                     for c in table.checksums]
    return {RSDP_FILE: blobs["RSDP"], TABLES_FILE: bytes(blob), LOADER_FILE: b"".join(commands)}
