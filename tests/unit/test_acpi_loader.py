"""QEMU's linker/loader files (hvvmm.acpi.loader), run by an interpreter written here from the
firmware side's description (SeaBIOS src/fw/romfile_loader.c): the tables it installs must be
the direct boot's tables, relocated."""

from __future__ import annotations

import struct

import pytest

from hvvmm.acpi import build_acpi_tables
from hvvmm.acpi.loader import (LOADER_FILE, RSDP_FILE, TABLES_FILE, allocate,
                               build_firmware_files)
from hvvmm.acpi.tables import link
from hvvmm.layout import PC


def run_loader(files: dict[str, bytes], zones: dict[int, int]):
    """Execute etc/table-loader: allocate each file at the next address of its zone (aligned),
    patch pointers, fix checksums. Returns {file: (address, bytearray)}."""
    script = files[LOADER_FILE]
    assert len(script) % 128 == 0
    loaded: dict[str, tuple[int, bytearray]] = {}
    here = dict(zones)

    def name(raw: bytes) -> str:
        assert raw.endswith(b"\0")
        return raw.rstrip(b"\0").decode()

    for index in range(0, len(script), 128):
        command, = struct.unpack_from("<I", script, index)
        body = script[index + 4:index + 128]
        if command == 1:
            file = name(body[:56])
            align, zone = struct.unpack_from("<IB", body, 56)
            assert align and align & (align - 1) == 0 and file not in loaded
            address = -(-here[zone] // align) * align
            here[zone] = address + len(files[file])
            loaded[file] = (address, bytearray(files[file]))
        elif command == 2:
            dest, src = name(body[:56]), name(body[56:112])
            offset, size = struct.unpack_from("<IB", body, 112)
            assert size in (1, 2, 4, 8)
            data = loaded[dest][1]
            assert offset + size <= len(data)
            value = int.from_bytes(data[offset:offset + size], "little") + loaded[src][0]
            data[offset:offset + size] = value.to_bytes(size, "little")
        elif command == 3:
            file = name(body[:56])
            offset, start, length = struct.unpack_from("<III", body, 56)
            data = loaded[file][1]
            assert offset < len(data) and start + length <= len(data)
            data[offset] = (data[offset] - sum(data[start:start + length])) & 0xFF
        else:
            pytest.fail(f"unknown loader command {command}")
    return loaded


@pytest.mark.parametrize("vcpus", [1, 4])
def test_loader_installs_the_same_tables_relocated(vcpus: int) -> None:
    built = build_acpi_tables(PC, vcpus)
    files = build_firmware_files(built.tables)
    assert set(files) == {LOADER_FILE, RSDP_FILE, TABLES_FILE}
    loaded = run_loader(files, {1: 0x7FE_0010, 2: 0xF_5A04})
    tables_at, tables = loaded[TABLES_FILE]
    rsdp_at, rsdp = loaded[RSDP_FILE]
    assert tables_at % 64 == 0 and rsdp_at % 16 == 0
    # Where each table landed: find it by signature in the installed file.
    addresses = {"RSDP": rsdp_at}
    offset = 0
    for table in built.tables[1:]:
        offset = -(-offset // table.alignment) * table.alignment
        assert tables[offset:offset + 4] == table.signature.encode()
        addresses[table.signature] = tables_at + offset
        offset += len(table.data)
    expected = link(built.tables, addresses)
    assert bytes(rsdp) == expected["RSDP"]
    for table in built.tables[1:]:
        start = addresses[table.signature] - tables_at
        assert bytes(tables[start:start + len(table.data)]) == expected[table.signature], \
            table.signature
    # And every checksum holds in what the firmware installed.
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    for signature in ("FACP", "APIC", "DSDT", "XSDT", "RSDT"):
        start = addresses[signature] - tables_at
        length, = struct.unpack_from("<I", tables, start + 4)
        assert sum(tables[start:start + length]) & 0xFF == 0, signature


def test_loader_commands_allocate_first_then_pointers_before_checksums() -> None:
    files = build_firmware_files(build_acpi_tables(PC, 1).tables)
    script = files[LOADER_FILE]
    commands = [struct.unpack_from("<I", script, i)[0] for i in range(0, len(script), 128)]
    assert commands[:2] == [1, 1] and set(commands[2:]) == {2, 3}
    # 2 RSDP pointers + 4 FADT pointers + 2 XSDT + 2 RSDT entries; 2 RSDP checksums + 5 tables.
    assert commands.count(2) == 10 and commands.count(3) == 7
    zones = {script[i + 4:i + 60].rstrip(b"\0"): script[i + 64] for i in (0, 128)}
    assert zones == {TABLES_FILE.encode(): 1, RSDP_FILE.encode(): 2}


def test_a_file_name_must_leave_room_for_its_nul() -> None:
    # The loader's file name fields are 56 bytes, NUL-terminated (QEMU
    # hw/acpi/bios-linker-loader.c, BIOS_LINKER_LOADER_FILESZ): 55 characters fit, 56 do not.
    assert allocate("f" * 55, 16, 1)[4:60] == b"f" * 55 + b"\0"
    with pytest.raises(ValueError, match="too long"):
        allocate("f" * 56, 16, 1)
