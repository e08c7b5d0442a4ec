"""SMBIOS tables built in the VMM and handed to the firmware through fw_cfg, as QEMU does.

QEMU offers ``etc/smbios/smbios-anchor`` (an SMBIOS 2.1 32-bit entry point) and
``etc/smbios/smbios-tables`` (the structure table) (QEMU ``hw/smbios/smbios.c``,
``hw/i386/fw_cfg.c``); SeaBIOS copies them (``src/fw/biostables.c``, ``smbios_romfile_setup``)
instead of building its own in ring-0 code, which costs a boot on an emulating KVM far more than
copying. SeaBIOS takes the anchor only when it is exactly the 31-byte 2.1 entry point and the
table is exactly as long as the entry point says; it fills in the table address (left 0 here)
and, as the table has no type 0 (BIOS information), adds its own, which names the firmware's
real version: QEMU leaves type 0 to the BIOS the same way unless the user sets its fields.

Structures and field meanings: DMTF DSP0134 (SMBIOS) 2.8, §6.1.2 (structure layout, strings),
§5.2.1 (2.1 entry point), §7.2 (type 1), §7.4 (type 3), §7.5 (type 4), §7.17 (type 16), §7.18
(type 17), §7.20 (type 19), §7.33 (type 32), §7.45 (type 127). Handles follow QEMU's numbering.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from .layout import PC, KiB, MiB, GiB

SMBIOS_ANCHOR_FILE = "etc/smbios/smbios-anchor"
SMBIOS_TABLES_FILE = "etc/smbios/smbios-tables"

SMBIOS_MAJOR, SMBIOS_MINOR = 2, 8
ENTRY_POINT_LENGTH = 0x1F
_ENTRY_POINT = struct.Struct("<4sBBBBHB5s5sBHIHB")  # §5.2.1, 31 bytes

MANUFACTURER = "hvvmm"
PRODUCT = "Standard PC (i440FX + PIIX, 1996)"

# QEMU's handle bases (hw/smbios/smbios.c T1_BASE ...).
_T1, _T3, _T4, _T16, _T17, _T19, _T32, _T127 = (
    0x100, 0x300, 0x400, 0x1000, 0x1100, 0x1300, 0x2000, 0x7F00)
_DIMM_MAX = 16 * GiB  # QEMU splits the RAM into DIMMs of at most this size (type 17)
_UNKNOWN_HANDLE = 0xFFFE  # "not provided" (§7.17.4) for error information handles
_NO_HANDLE = 0xFFFF


class SmbiosError(ValueError):
    """A machine SMBIOS cannot describe; the message says why."""


def structure(kind: int, handle: int, formatted: bytes, strings: Sequence[str] = ()) -> bytes:
    """One structure (§6.1.2): header, formatted area, then its strings, each NUL-ended, and a
    final NUL; a structure without strings ends in two NULs."""
    header = struct.pack("<BBH", kind, 4 + len(formatted), handle)
    text = b"".join(s.encode("ascii") + b"\0" for s in strings)
    return header + formatted + (text or b"\0") + b"\0"


def _string_refs(*values: str | None) -> tuple[list[str], list[int]]:
    """String numbers for the formatted area (1-based, 0 = none) and the strings to append."""
    strings: list[str] = []
    refs = []
    for value in values:
        if value:
            strings.append(value)
            refs.append(len(strings))
        else:
            refs.append(0)
    return strings, refs


def type1_system(uuid: bytes) -> bytes:
    """System information (§7.2): manufacturer, product, UUID; woken by the power switch."""
    strings, (manufacturer, product) = _string_refs(MANUFACTURER, PRODUCT)
    formatted = struct.pack("<BBBB16sBBB", manufacturer, product, 0, 0, uuid,
                            0x06, 0, 0)  # wake-up type: power switch; no SKU, no family
    return structure(1, _T1, formatted, strings)


def type3_chassis() -> bytes:
    """System enclosure (§7.4): type Other, every state Safe, security Unknown; no contained
    elements, and (2.7) no SKU."""
    strings, (manufacturer,) = _string_refs(MANUFACTURER)
    formatted = struct.pack("<BBBBBBBBBIBBBBB", manufacturer, 0x01, 0, 0, 0,
                            0x03, 0x03, 0x03, 0x02, 0, 0, 0, 0, 0, 0)
    return structure(3, _T3, formatted, strings)


def type4_processor(index: int) -> bytes:
    """Processor (§7.5), one per vCPU as a socket of one core and one thread: central
    processor, family Other, socket populated and enabled, no caches described."""
    strings, (socket, manufacturer) = _string_refs(f"CPU {index}", MANUFACTURER)
    formatted = struct.pack(
        "<BBBB8sBBHHHBBHHHBBBBBBHH",
        socket, 0x03, 0x01, manufacturer, bytes(8), 0,  # ID (CPUID 1) left 0; no version string
        0, 0, 2000, 2000,           # voltage, external clock unknown; 2 GHz max/current as QEMU
        0x41, 0x01,                 # status: populated, enabled; upgrade: other
        _NO_HANDLE, _NO_HANDLE, _NO_HANDLE,  # L1/L2/L3 cache handles
        0, 0, 0,                    # serial, asset tag, part number strings
        1, 1, 1,                    # cores, cores enabled, threads
        0x02, 0x01)                 # characteristics: unknown; family 2: other
    return structure(4, _T4 + index, formatted, strings)


def _dimm_sizes(memory_size: int) -> list[int]:
    sizes = []
    left = memory_size
    while left > 0:
        sizes.append(min(left, _DIMM_MAX))
        left -= sizes[-1]
    return sizes


def type16_memory_array(memory_size: int, devices: int) -> bytes:
    """Physical memory array (§7.17): system memory, multi-bit ECC as QEMU says; the capacity in
    KiB, or 0x80000000 and the extended field in bytes when it does not fit."""
    capacity_kib = memory_size // KiB
    if capacity_kib < 0x8000_0000:
        capacity, extended = capacity_kib, 0
    else:
        capacity, extended = 0x8000_0000, memory_size
    formatted = struct.pack("<BBBIHHQ", 0x01, 0x03, 0x06, capacity, _UNKNOWN_HANDLE,
                            devices, extended)
    return structure(16, _T16, formatted)


def type17_memory_device(index: int, size: int) -> bytes:
    """Memory device (§7.18): a DIMM of ``size`` bytes in MiB (0x7FFF and the extended field when
    32 GiB or more), type RAM, widths and speed unknown."""
    size_mib = size // MiB
    if size_mib < 0x7FFF:
        size_field, extended = size_mib, 0
    else:
        size_field, extended = 0x7FFF, size_mib
    strings, (locator, manufacturer) = _string_refs(f"DIMM {index}", MANUFACTURER)
    formatted = struct.pack(
        "<HHHHHBBBBBHHBBBBBIHHHH",
        _T16, _UNKNOWN_HANDLE, 0xFFFF, 0xFFFF, size_field,
        0x09, 0, locator, 0,        # form factor DIMM, no device set, locator, no bank locator
        0x07, 0x0002, 0,            # type RAM, detail Other, speed unknown
        manufacturer, 0, 0, 0,      # manufacturer; no serial, asset tag, part number
        0, extended, 0,             # attributes (rank unknown), extended size, clock unknown
        0, 0, 0)                    # minimum, maximum, configured voltage unknown
    return structure(17, _T17 + index, formatted, strings)


def type19_array_mapped_address(index: int, gpa: int, length: int) -> bytes:
    """Memory array mapped address (§7.20): one RAM region, in KiB, or 0xFFFFFFFF and the
    extended byte addresses when it reaches past 4 TiB."""
    start_kib, end_kib = gpa // KiB, (gpa + length) // KiB - 1
    if end_kib < 0xFFFF_FFFF:
        formatted = struct.pack("<IIHBQQ", start_kib, end_kib, _T16, 1, 0, 0)
    else:
        formatted = struct.pack("<IIHBQQ", 0xFFFF_FFFF, 0xFFFF_FFFF, _T16, 1,
                                gpa, gpa + length - 1)
    return structure(19, _T19 + index, formatted)


def type32_boot_information() -> bytes:
    """System boot information (§7.33): no errors detected."""
    return structure(32, _T32, bytes(6) + b"\0")


def type127_end() -> bytes:
    return structure(127, _T127, b"")


@dataclass(frozen=True)
class SmbiosTables:
    """The structure table and what its entry point says about it."""

    table: bytes
    count: int
    max_structure_size: int

    def entry_point(self, table_address: int = 0) -> bytes:
        """The SMBIOS 2.1 32-bit entry point (§5.2.1) for the table at ``table_address``
        (0 for fw_cfg: the firmware fills it in), both checksums set."""
        if not 0 <= table_address <= 0xFFFF_FFFF - len(self.table):
            raise SmbiosError(f"SMBIOS table address {table_address:#x} is not 32-bit")
        fields = [b"_SM_", 0, ENTRY_POINT_LENGTH, SMBIOS_MAJOR, SMBIOS_MINOR,
                  self.max_structure_size, 0, bytes(5), b"_DMI_", 0, len(self.table),
                  table_address, self.count, (SMBIOS_MAJOR << 4) | SMBIOS_MINOR]
        raw = _ENTRY_POINT.pack(*fields)
        fields[9] = -sum(raw[0x10:]) & 0xFF  # intermediate checksum over 0x10..0x1E
        raw = _ENTRY_POINT.pack(*fields)
        fields[1] = -sum(raw[:0x10]) & 0xFF  # entry point checksum over the first 16 bytes
        return _ENTRY_POINT.pack(*fields)


def build_smbios(memory_size: int, cpu_count: int, *, uuid: bytes = bytes(16)) -> SmbiosTables:
    """The tables for a PC with ``memory_size`` bytes of RAM laid out as
    :meth:`hvvmm.layout.PcLayout.memory_layout` says and ``cpu_count`` vCPUs."""
    if len(uuid) != 16:
        raise SmbiosError("SMBIOS: the UUID is 16 bytes")
    if not 1 <= cpu_count <= PC.max_vcpus:
        raise SmbiosError(f"SMBIOS: bad vCPU count {cpu_count}")
    if memory_size < MiB:
        raise SmbiosError(f"SMBIOS: bad memory size {memory_size:#x}")
    dimms = _dimm_sizes(memory_size)
    structures = [type1_system(uuid), type3_chassis()]
    structures += [type4_processor(index) for index in range(cpu_count)]
    structures.append(type16_memory_array(memory_size, len(dimms)))
    structures += [type17_memory_device(index, size) for index, size in enumerate(dimms)]
    structures += [type19_array_mapped_address(index, gpa, length)
                   for index, (gpa, length) in enumerate(PC.memory_layout(memory_size))]
    structures += [type32_boot_information(), type127_end()]
    table = b"".join(structures)
    if len(table) > 0xFFFF:
        raise SmbiosError(f"SMBIOS: the table ({len(table)} bytes) exceeds the 2.1 entry "
                          f"point's 16-bit length")
    return SmbiosTables(table, len(structures), max(len(s) for s in structures))


def dmidecode_dump(tables: SmbiosTables) -> bytes:
    """The tables as ``dmidecode --dump-bin`` writes them: the entry point at offset 0 pointing at
    the table, which starts at offset 0x20."""
    return tables.entry_point(0x20).ljust(0x20, b"\0") + tables.table
