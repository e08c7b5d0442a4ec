"""SMBIOS tables for the firmware (hvvmm.smbios): what SeaBIOS's romfile path accepts, checked
by our own parser and independently by dmidecode reading them as a dump file."""

import re
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm import firmware
from hvvmm.layout import PC, GiB, MiB
from hvvmm.smbios import (ENTRY_POINT_LENGTH, SMBIOS_ANCHOR_FILE, SMBIOS_TABLES_FILE,
                          SmbiosError, build_smbios, dmidecode_dump)


def structures(table: bytes) -> list[tuple[int, int, bytes, list[bytes]]]:
    """(type, handle, formatted area, strings) of each structure, as DSP0134 §6.1.2 lays them."""
    found = []
    offset = 0
    while offset < len(table):
        kind, length, handle = struct.unpack_from("<BBH", table, offset)
        assert length >= 4
        end = table.index(b"\0\0", offset + length) + 2
        text = table[offset + length:end - 2]
        found.append((kind, handle, table[offset + 4:offset + length],
                      text.split(b"\0") if text else []))
        offset = end
    assert offset == len(table)
    return found


def test_entry_point_is_what_seabios_takes_from_fw_cfg():
    tables = build_smbios(256 * MiB, 2)
    anchor = tables.entry_point()
    # SeaBIOS smbios_romfile_setup: the anchor is exactly the 2.1 entry point, and the table
    # file exactly as long as it says; copy_smbios then checks both checksums.
    assert len(anchor) == ENTRY_POINT_LENGTH == 0x1F
    assert anchor[:4] == b"_SM_" and anchor[0x10:0x15] == b"_DMI_"
    assert sum(anchor[:0x10]) & 0xFF == 0
    assert sum(anchor[0x10:]) & 0xFF == 0
    length, address, count, bcd = struct.unpack_from("<HIHB", anchor, 0x16)
    assert (length, address, count) == (len(tables.table), 0, len(structures(tables.table)))
    assert (anchor[6], anchor[7], bcd) == (2, 8, 0x28)
    assert struct.unpack_from("<H", anchor, 8)[0] == max(
        4 + len(formatted) + sum(len(s) + 1 for s in strings) + (1 if strings else 2)
        for _, _, formatted, strings in structures(tables.table))


def test_structures_and_handles_as_qemu_numbers_them():
    found = structures(build_smbios(512 * MiB, 3).table)
    assert [(kind, handle) for kind, handle, _, _ in found] == [
        (1, 0x100), (3, 0x300), (4, 0x400), (4, 0x401), (4, 0x402), (16, 0x1000),
        (17, 0x1100), (19, 0x1300), (32, 0x2000), (127, 0x7F00)]
    # No type 0: SeaBIOS adds its own, naming its real version, as it does under QEMU.
    system = found[0]
    assert system[3] == [b"hvvmm", b"Standard PC (i440FX + PIIX, 1996)"]


@settings(max_examples=60, deadline=None)
@given(memory=st.integers(min_value=1, max_value=1 << 13).map(lambda n: n * 16 * MiB),
       cpus=st.integers(min_value=1, max_value=PC.max_vcpus))
def test_memory_and_processors_match_the_machine(memory, cpus):
    found = structures(build_smbios(memory, cpus).table)
    assert sum(1 for kind, *_ in found if kind == 4) == cpus
    dimm_mib = [struct.unpack_from("<H", formatted, 8)[0]
                for kind, _, formatted, _ in found if kind == 17]
    assert sum(dimm_mib) * MiB == memory
    ranges = [struct.unpack_from("<II", formatted) for kind, _, formatted, _ in found
              if kind == 19]
    assert [(start * 1024, (end + 1) * 1024 - start * 1024) for start, end in ranges] == \
        PC.memory_layout(memory)
    (array,) = [formatted for kind, _, formatted, _ in found if kind == 16]
    assert struct.unpack_from("<IxxH", array, 3) == (memory // 1024, len(dimm_mib))


def test_bad_machines_are_refused():
    with pytest.raises(SmbiosError):
        build_smbios(256 * MiB, 0)
    with pytest.raises(SmbiosError):
        build_smbios(256 * MiB, 1, uuid=b"short")
    with pytest.raises(SmbiosError):
        build_smbios(0, 1)


class RecordingFwCfg:
    def __init__(self):
        self.files = {}

    def add_file(self, name, data):
        self.files[name] = data

    def set_item(self, key, data):
        pass


def test_firmware_boots_are_offered_the_tables():
    fw_cfg = RecordingFwCfg()
    firmware.configure_fw_cfg(fw_cfg, 1 * GiB, [3], cpu_count=4)
    tables = build_smbios(1 * GiB, 4)
    assert fw_cfg.files[SMBIOS_ANCHOR_FILE] == tables.entry_point()
    assert fw_cfg.files[SMBIOS_TABLES_FILE] == tables.table


def dmidecode(host_tool, tmp_path, memory: int, cpus: int) -> str:
    dump = tmp_path / "smbios.bin"
    dump.write_bytes(dmidecode_dump(build_smbios(memory, cpus)))
    result = subprocess.run([host_tool("dmidecode", "dmidecode"), "--from-dump", str(dump)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("memory, cpus", [(128 * MiB, 1), (4 * GiB, 4), (40 * GiB, 255)])
def test_dmidecode_reads_the_tables_without_complaint(host_tool, tmp_path, memory, cpus):
    out = dmidecode(host_tool, tmp_path, memory, cpus)
    for complaint in ("Invalid", "wrong", "truncated", "<OUT OF SPEC>", "Bad", "bad"):
        assert complaint not in out
    assert "SMBIOS 2.8 present." in out
    count = 2 + cpus + 1 + -(-memory // (16 * GiB)) + len(PC.memory_layout(memory)) + 2
    assert f"{count} structures occupying" in out
    assert out.count("Processor Information") == cpus
    assert "Manufacturer: hvvmm" in out
    assert "Product Name: Standard PC (i440FX + PIIX, 1996)" in out
    assert "End Of Table" in out
    sizes = [int(n) * (GiB if unit == "GB" else MiB)
             for n, unit in re.findall(r"^\tSize: (\d+) ([MG]B)$", out, re.M)]
    assert sum(sizes) == memory
    ranges = re.findall(r"Starting Address: (0x[0-9A-F]+)\n\tEnding Address: (0x[0-9A-F]+)", out)
    assert [(int(start, 16), int(end, 16) + 1 - int(start, 16)) for start, end in ranges] == \
        PC.memory_layout(memory)
