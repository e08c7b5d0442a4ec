"""The ACPI tables of an hvvmm PC: RSDP, XSDT/RSDT, FADT, FACS, DSDT and MADT.

Each table is built as bytes with its pointer fields left zero, plus a record of those fields
(:class:`Pointer`: which table, at which offset, how wide, pointing at which table) and of its
checksums. :func:`link` then lays the tables out at addresses and fills in pointers and checksums.
The same records give QEMU's linker/loader commands (:mod:`hvvmm.acpi.loader`), so the tables a
direct kernel boot finds in memory are the tables firmware would install from fw_cfg.

What the tables describe comes from the PC layout table (:data:`hvvmm.layout.PC`): the ACPI PM
register block, the SCI, the reset register, the interrupt controllers and the ISA devices.

Sources: ACPI Specification 6.5 (§5.2.5 RSDP, §5.2.6 table header, §5.2.7 RSDT, §5.2.8 XSDT,
§5.2.9 FADT, §5.2.10 FACS, §5.2.11.1 DSDT, §5.2.12 MADT, §5.2.3.2 Generic Address Structure);
QEMU ``hw/i386/acpi-build.c`` and ``hw/acpi/aml-build.c`` for what a PC guest is usually given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from hvvmm.devices.acpi_pm import (ACPI_PM1_CNT_LENGTH, ACPI_PM1_CNT_OFFSET, ACPI_PM1_EVT_LENGTH,
                                   ACPI_PM_TMR_LENGTH, ACPI_PM_TMR_OFFSET, SLP_TYP_S5_QEMU)
from hvvmm.devices.reset_control import RESET_CONTROL_PORT, RESET_VALUE
from hvvmm.layout import PC, PcLayout

from . import aml

OEM_ID = b"HVVMM "      # 6 bytes
OEM_TABLE_ID = b"HVVMMPC "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"HVMM"
CREATOR_REVISION = 1
HEADER_LENGTH = 36

RSDP_SIGNATURE = b"RSD PTR "
RSDP_LENGTH = 36          # ACPI 2.0+ RSDP (§5.2.5.3)
RSDP_V1_LENGTH = 20       # the part the first checksum covers
FADT_REVISION = 6         # ACPI 6.x FADT, 276 bytes (§5.2.9)
FADT_MINOR_REVISION = 5   # ACPI 6.5
FADT_LENGTH = 276
FACS_LENGTH = 64
FACS_ALIGNMENT = 64       # §5.2.10: the FACS is 64-byte aligned
MADT_REVISION = 5         # ACPI 6.2+; the entries used here are unchanged since 1.0
DSDT_REVISION = 2         # 64-bit integers (§5.2.11.1)

# FADT Fixed Feature Flags (§5.2.9).
FADT_WBINVD = 1 << 0          # WBINVD works (required for ACPI 2.0+ compatible platforms)
FADT_PROC_C1 = 1 << 2         # C1 (HLT) works on every processor
FADT_PWR_BUTTON = 1 << 4      # 1: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5      # 1: no fixed-feature sleep button
FADT_FIX_RTC = 1 << 6         # 1: RTC wake status is not in the fixed register space
FADT_TMR_VAL_EXT = 1 << 8     # 1: 32-bit PM timer (ours is 24-bit, so clear)
FADT_RESET_REG_SUP = 1 << 10  # RESET_REG / RESET_VALUE are valid
FADT_HW_REDUCED_ACPI = 1 << 20

# IA-PC Boot Architecture Flags (§5.2.9.3).
IAPC_LEGACY_DEVICES = 1 << 0  # ISA/LPC devices a driver cannot enumerate exist (COM1, the RTC)
IAPC_8042 = 1 << 1            # an 8042 keyboard controller is present (ports 0x60/0x64)
IAPC_VGA_NOT_PRESENT = 1 << 2  # no VGA: do not probe its ports and memory
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# Generic Address Structure (§5.2.3.2).
GAS_SYSTEM_IO = 1
GAS_ACCESS_UNDEFINED, GAS_ACCESS_BYTE, GAS_ACCESS_WORD, GAS_ACCESS_DWORD = 0, 1, 2, 3

# MADT (§5.2.12).
MADT_PCAT_COMPAT = 1 << 0     # dual 8259s are present and must be masked to use the APICs
MADT_LOCAL_APIC = 0           # §5.2.12.2
MADT_IO_APIC = 1              # §5.2.12.3
MADT_INTERRUPT_OVERRIDE = 2   # §5.2.12.5
MADT_LOCAL_APIC_NMI = 4       # §5.2.12.7
MADT_LAPIC_ENABLED = 1 << 0
MADT_ALL_PROCESSORS = 0xFF    # ACPI Processor UID meaning "every processor" in a LAPIC NMI entry
# MPS INTI flags (§5.2.12.5): polarity bits 0-1, trigger mode bits 2-3.
MPS_ACTIVE_HIGH = 0b01
MPS_ACTIVE_LOW = 0b11
MPS_EDGE = 0b01 << 2
MPS_LEVEL = 0b11 << 2
MPS_CONFORMS = 0

CMOS_CENTURY_INDEX = 0x32  # the RTC's century byte, as hvvmm.devices.cmos keeps it


class AcpiBuildError(ValueError):
    """Tables that cannot be built (too many vCPUs, no room in the ACPI area, ...)."""


@dataclass(frozen=True)
class Pointer:
    """A field of ``size`` bytes at ``offset`` of its table that holds the address of table
    ``target``: what QEMU's linker/loader calls ADD_POINTER."""

    offset: int
    size: int
    target: str


@dataclass(frozen=True)
class Checksum:
    """The byte at ``offset`` makes bytes ``[start, start+length)`` of its table sum to 0."""

    offset: int
    start: int
    length: int


@dataclass
class AcpiTable:
    """One table before it is placed: ``data`` with zero pointers and checksums."""

    signature: str
    data: bytes
    pointers: list[Pointer] = field(default_factory=list)
    checksums: list[Checksum] = field(default_factory=list)
    alignment: int = 8


def checksum_byte(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with that byte's place holding 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def header(signature: bytes, length: int, revision: int) -> bytes:
    """The System Description Table Header (§5.2.6), checksum 0 (filled in by :func:`link`)."""
    return struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                       OEM_REVISION, CREATOR_ID, CREATOR_REVISION)


def sdt(signature: str, revision: int, body: bytes, pointers: Iterable[Pointer] = (),
        alignment: int = 8) -> AcpiTable:
    """A table with the standard header over ``body``; ``pointers`` offsets count from the
    start of the table (header included)."""
    length = HEADER_LENGTH + len(body)
    return AcpiTable(signature, header(signature.encode("ascii"), length, revision) + body,
                     list(pointers), [Checksum(9, 0, length)], alignment)


def gas(address: int, bit_width: int, access_size: int = GAS_ACCESS_UNDEFINED,
        space: int = GAS_SYSTEM_IO, bit_offset: int = 0) -> bytes:
    """A Generic Address Structure (§5.2.3.2), 12 bytes."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


# -- the tables ---------------------------------------------------------------------------------

def build_facs() -> AcpiTable:
    """FACS (§5.2.10): no checksum; hardware signature 0, no waking vector, the
    global lock free, version 2. hvvmm has no sleep states but S5, so nothing here changes."""
    data = struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, 2, bytes(3), 0,
                       bytes(24))
    assert len(data) == FACS_LENGTH
    return AcpiTable("FACS", data, [], [], FACS_ALIGNMENT)


def build_fadt(layout: PcLayout = PC) -> AcpiTable:
    """FADT (§5.2.9), revision 6, not hardware-reduced: the ACPI PM registers at the
    layout's PM base, the SCI, the reset register, and pointers to the FACS and the DSDT (both
    the 32-bit and the X_ fields, with the same values: ACPICA accepts that and old OSes read
    the 32-bit ones)."""
    pm_base = layout.acpi_pm_base
    pm1a_evt = pm_base
    pm1a_cnt = pm_base + ACPI_PM1_CNT_OFFSET
    pm_tmr = pm_base + ACPI_PM_TMR_OFFSET
    flags = (FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_FIX_RTC
             | FADT_RESET_REG_SUP)
    boot_arch = IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT
    body = b"".join((
        struct.pack("<II", 0, 0),            # 36 FIRMWARE_CTRL, 40 DSDT (pointers)
        struct.pack("<BBH", 0, 0, layout.sci_irq),  # 44 reserved, 45 PM profile: unspecified
        # 48 SMI_CMD 0 (zero without SMM, §5.2.9): the hardware is always in ACPI mode and
        # SCI_EN reads 1, so ACPI_ENABLE/ACPI_DISABLE/S4BIOS_REQ/PSTATE_CNT are 0 too.
        struct.pack("<IBBBB", 0, 0, 0, 0, 0),
        struct.pack("<IIIIII", pm1a_evt, 0, pm1a_cnt, 0, 0, pm_tmr),  # 56..76
        struct.pack("<II", 0, 0),            # 80 GPE0_BLK, 84 GPE1_BLK: no GPE blocks
        struct.pack("<BBBBBBBB", ACPI_PM1_EVT_LENGTH, ACPI_PM1_CNT_LENGTH, 0,
                    ACPI_PM_TMR_LENGTH, 0, 0, 0, 0),  # 88..95 lengths, GPE1_BASE, CST_CNT
        # 96 P_LVL2_LAT > 100 and 98 P_LVL3_LAT > 1000: no C2/C3 (§5.2.9).
        struct.pack("<HHHH", 101, 1001, 0, 0),
        struct.pack("<BBBBB", 0, 0, 0, 0, CMOS_CENTURY_INDEX),  # 104..108 duty, alarms, CENTURY
        struct.pack("<HBI", boot_arch, 0, flags),  # 109 IAPC_BOOT_ARCH, 111 reserved, 112 Flags
        gas(RESET_CONTROL_PORT, 8, GAS_ACCESS_BYTE),  # 116 RESET_REG (§4.8.3.6)
        struct.pack("<BHB", RESET_VALUE, 0, FADT_MINOR_REVISION),  # 128, 129 ARM, 131 minor
        struct.pack("<QQ", 0, 0),            # 132 X_FIRMWARE_CTRL, 140 X_DSDT (pointers)
        gas(pm1a_evt, 8 * ACPI_PM1_EVT_LENGTH),   # 148 X_PM1a_EVT_BLK
        gas(0, 0),                                # 160 X_PM1b_EVT_BLK
        gas(pm1a_cnt, 8 * ACPI_PM1_CNT_LENGTH),   # 172 X_PM1a_CNT_BLK
        gas(0, 0), gas(0, 0),                     # 184 X_PM1b_CNT_BLK, 196 X_PM2_CNT_BLK
        gas(pm_tmr, 8 * ACPI_PM_TMR_LENGTH),      # 208 X_PM_TMR_BLK
        gas(0, 0), gas(0, 0),                     # 220 X_GPE0_BLK, 232 X_GPE1_BLK
        gas(0, 0), gas(0, 0),                     # 244 SLEEP_CONTROL_REG, 256 SLEEP_STATUS_REG
        struct.pack("<Q", 0),                     # 268 hypervisor vendor identity
    ))
    table = sdt("FACP", FADT_REVISION, body, [Pointer(36, 4, "FACS"), Pointer(40, 4, "DSDT"),
                                              Pointer(132, 8, "FACS"), Pointer(140, 8, "DSDT")])
    assert len(table.data) == FADT_LENGTH
    return table


def processor_uid(index: int) -> int:
    """The ACPI Processor UID of vCPU ``index``: the index, as its APIC ID."""
    return index


def build_madt(layout: PcLayout, vcpu_count: int) -> AcpiTable:
    """MADT (§5.2.12): the local APIC address, PCAT_COMPAT, one enabled Processor Local APIC
    per vCPU (ACPI Processor UID = APIC ID = index, as ``hvvmm.cpuid`` gives the APIC IDs), the
    IOAPIC (its ID after the last APIC ID, GSI base 0), the ISA overrides (IRQ0 -> GSI2 edge,
    the SCI level/active-high as QEMU) and LINT1 as NMI on every processor."""
    _check_vcpu_count(layout, vcpu_count)
    body = bytearray(struct.pack("<II", layout.lapic_base, MADT_PCAT_COMPAT))
    for index in range(vcpu_count):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, processor_uid(index), index,
                            MADT_LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id(vcpu_count), 0,
                        layout.ioapic_base, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, layout.pit_gsi,
                        MPS_ACTIVE_HIGH | MPS_EDGE)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, layout.sci_irq,
                        layout.sci_irq, MPS_ACTIVE_HIGH | MPS_LEVEL)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS,
                        MPS_CONFORMS, 1)
    return sdt("APIC", MADT_REVISION, bytes(body))


def ioapic_id(vcpu_count: int) -> int:
    """The IOAPIC's ID: the first after the APIC IDs 0..vcpu_count-1 (at most 255)."""
    return vcpu_count


def _check_vcpu_count(layout: PcLayout, vcpu_count: int) -> None:
    if not isinstance(vcpu_count, int) or not 1 <= vcpu_count <= layout.max_vcpus:
        raise AcpiBuildError(f"the MADT describes 1-{layout.max_vcpus} vCPUs, not {vcpu_count}")


def _isa_io(layout: PcLayout, name: str, length: int | None = None) -> bytes:
    device = layout.device(name)
    return aml.IO(device.port, device.port, 1, device.ports if length is None else length)


def dsdt_devices(layout: PcLayout, vcpu_count: int) -> list[aml.Term]:
    """The devices under ``\\_SB``: a processor device per vCPU (§8.4: ``_UID`` = the MADT's
    ACPI Processor UID), COM1, the i8042 keyboard controller, the RTC and fw_cfg, with the
    ports and IRQs of the layout table."""
    serial, kbd, cmos = layout.device("serial0"), layout.device("i8042-data"), \
        layout.device("cmos")
    devices: list[aml.Term] = [
        aml.Device(f"C{index:03X}", aml.Name("_HID", "ACPI0007"),
                   aml.Name("_UID", processor_uid(index)))
        for index in range(vcpu_count)
    ]
    devices += [
        aml.Device("COM1", aml.Name("_HID", aml.EisaId("PNP0501")), aml.Name("_UID", 1),
                   aml.Name("_CRS", aml.ResourceTemplate(_isa_io(layout, "serial0"),
                                                         aml.IRQNoFlags(serial.irq)))),
        aml.Device("KBD", aml.Name("_HID", aml.EisaId("PNP0303")),
                   aml.Name("_CRS", aml.ResourceTemplate(_isa_io(layout, "i8042-data"),
                                                         _isa_io(layout, "i8042-command"),
                                                         aml.IRQNoFlags(kbd.irq)))),
        aml.Device("RTC", aml.Name("_HID", aml.EisaId("PNP0B00")),
                   aml.Name("_CRS", aml.ResourceTemplate(_isa_io(layout, "cmos"),
                                                         aml.IRQNoFlags(cmos.irq)))),
        # QEMU's fw_cfg: _STA 0x0B, present and working but not shown (as QEMU's DSDT).
        aml.Device("FWCF", aml.Name("_HID", "QEMU0002"), aml.Name("_STA", 0x0B),
                   aml.Name("_CRS", aml.ResourceTemplate(_isa_io(layout, "fw_cfg")))),
    ]
    return devices


def build_dsdt(layout: PcLayout, vcpu_count: int, extra_devices: Sequence[aml.Term] = ()
               ) -> AcpiTable:
    """DSDT (§5.2.11.1): ``\\_SB`` with :func:`dsdt_devices` and ``extra_devices``; ``\\_S5``
    (§7.4.2.5) with the SLP_TYP hvvmm.devices.acpi_pm takes as soft-off; ``\\_PIC`` (§5.8.1),
    which records the interrupt model the OS chose in ``PICF`` for a later ``_PRT`` to read."""
    system_bus = aml.Scope("\\_SB", *dsdt_devices(layout, vcpu_count), *extra_devices)
    body = b"".join(aml.encode(term) for term in (
        system_bus,
        aml.Name("_S5", aml.Package(SLP_TYP_S5_QEMU, SLP_TYP_S5_QEMU, 0, 0)),
        aml.Name("PICF", 0),
        aml.Method("_PIC", 1, aml.Store(aml.Arg(0), "PICF")),
    ))
    return sdt("DSDT", DSDT_REVISION, body)


def build_xsdt(signatures: Sequence[str]) -> AcpiTable:
    """XSDT (§5.2.8): 64-bit pointers to every table but the FACS and DSDT."""
    return sdt("XSDT", 1, bytes(8 * len(signatures)),
               [Pointer(HEADER_LENGTH + 8 * i, 8, s) for i, s in enumerate(signatures)])


def build_rsdt(signatures: Sequence[str]) -> AcpiTable:
    """RSDT (§5.2.7): the same list with 32-bit pointers, for ACPI 1.0 readers."""
    return sdt("RSDT", 1, bytes(4 * len(signatures)),
               [Pointer(HEADER_LENGTH + 4 * i, 4, s) for i, s in enumerate(signatures)])


def build_rsdp() -> AcpiTable:
    """RSDP (§5.2.5.3), revision 2: the RSDT and XSDT addresses, the checksum of the first 20
    bytes and the extended checksum of all 36."""
    data = struct.pack("<8sB6sBIIQB3s", RSDP_SIGNATURE, 0, OEM_ID, 2, 0, RSDP_LENGTH, 0, 0,
                       bytes(3))
    return AcpiTable("RSDP", data, [Pointer(16, 4, "RSDT"), Pointer(24, 8, "XSDT")],
                     [Checksum(8, 0, RSDP_V1_LENGTH), Checksum(32, 0, RSDP_LENGTH)], 16)


def build_table_list(layout: PcLayout = PC, vcpu_count: int = 1, *,
                     extra_dsdt_devices: Sequence[aml.Term] = (),
                     extra_tables: Sequence[AcpiTable] = ()) -> list[AcpiTable]:
    """Every table, unplaced, RSDP first."""
    _check_vcpu_count(layout, vcpu_count)
    described = [build_fadt(layout), build_madt(layout, vcpu_count), *extra_tables]
    signatures = [t.signature for t in described]
    if len(set(signatures)) != len(signatures):
        raise AcpiBuildError(f"two tables with one signature in {signatures}")
    return [build_rsdp(), build_facs(), build_dsdt(layout, vcpu_count, extra_dsdt_devices),
            *described, build_xsdt(signatures), build_rsdt(signatures)]


# -- placing and linking ------------------------------------------------------------------------

def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def place(tables: Sequence[AcpiTable], start: int = 0) -> dict[str, int]:
    """Offsets from ``start`` for ``tables`` in order, each at its alignment."""
    offsets, here = {}, start
    for table in tables:
        here = _align(here, table.alignment)
        offsets[table.signature] = here
        here += len(table.data)
    return offsets


def link(tables: Sequence[AcpiTable], addresses: dict[str, int]) -> dict[str, bytes]:
    """The tables with every pointer set to its target's address in ``addresses`` and every
    checksum computed (after the pointers, as the loader does)."""
    linked = {}
    for table in tables:
        data = bytearray(table.data)
        for pointer in table.pointers:
            address = addresses[pointer.target]
            if address >> (8 * pointer.size):
                raise AcpiBuildError(f"{table.signature} cannot point at {pointer.target} at "
                                     f"{address:#x} with {pointer.size} bytes")
            data[pointer.offset:pointer.offset + pointer.size] = address.to_bytes(pointer.size,
                                                                                  "little")
        for checksum in table.checksums:
            data[checksum.offset] = 0
            data[checksum.offset] = checksum_byte(data[checksum.start:checksum.start +
                                                       checksum.length])
        linked[table.signature] = bytes(data)
    return linked


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out in guest memory from ``base``: ``blobs`` by signature ("RSDP" for the
    RSDP), ``addresses`` by signature, and the contiguous ``image`` to copy to ``base``."""

    base: int
    rsdp_address: int
    addresses: dict[str, int]
    blobs: dict[str, bytes]
    image: bytes
    tables: tuple[AcpiTable, ...]  # unlinked, for the linker/loader

    def install(self, memory) -> None:
        """Write the image into guest memory (a :class:`hvvmm.memory.GuestMemory`)."""
        memory.write(self.base, self.image)


def build_acpi_tables(layout: PcLayout = PC, vcpu_count: int = 1, *, base: int | None = None,
                      limit: int | None = None,
                      extra_dsdt_devices: Sequence[aml.Term] = (),
                      extra_tables: Sequence[AcpiTable] = ()) -> AcpiTables:
    """Build every table for ``vcpu_count`` vCPUs and lay them out from ``base`` (default: the
    layout's ACPI area, whose end is the default ``limit``). The RSDP comes first, 16-byte
    aligned, where an OS's scan of 0xE0000-0xFFFFF finds it (§5.2.5.1). ``extra_dsdt_devices``
    go under ``\\_SB``; ``extra_tables`` (an MCFG, ...) are listed in the XSDT and RSDT.
    Raises :class:`AcpiBuildError` if they do not fit below ``limit``."""
    if base is None:
        base = layout.acpi_tables[0]
        if limit is None:
            limit = layout.acpi_tables[1]
    if base % 16:
        raise AcpiBuildError(f"ACPI table base {base:#x} is not 16-byte aligned")
    tables = build_table_list(layout, vcpu_count, extra_dsdt_devices=extra_dsdt_devices,
                              extra_tables=extra_tables)
    addresses = place(tables, base)
    last = tables[-1]
    end = addresses[last.signature] + len(last.data)
    if limit is not None and end > limit:
        raise AcpiBuildError(f"the ACPI tables need {end - base} bytes from {base:#x}; only "
                             f"{limit - base} fit")
    if end > 1 << 32:
        raise AcpiBuildError("the ACPI tables must lie below 4 GiB (the RSDT's pointers)")
    blobs = link(tables, addresses)
    image = bytearray(end - base)
    for table in tables:
        offset = addresses[table.signature] - base
        image[offset:offset + len(table.data)] = blobs[table.signature]
    return AcpiTables(base, addresses["RSDP"], addresses, blobs, bytes(image), tuple(tables))
