"""The ACPI tables (hvvmm.acpi.tables): every table disassembled by iasl without errors and with
the expected fields, checksums checked here independently, the MADT for 1, 2 and 255 vCPUs, the
DSDT's objects evaluated by ACPICA's acpiexec, and the layout in the ACPI area."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from hvvmm.acpi import AcpiBuildError, build_acpi_tables
from hvvmm.acpi import aml
from hvvmm.acpi.tables import AcpiTable, sdt
from hvvmm.layout import E820_ACPI, MiB, PC

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")
SDT_SIGNATURES = ("FACP", "APIC", "DSDT", "XSDT", "RSDT", "FACS")


def need(tool):
    if tool is None:
        pytest.fail("iasl/acpiexec are missing: install the Debian package acpica-tools")
    return tool


def disassemble(tmp_path, signature: str, blob: bytes) -> str:
    """``iasl -d`` of one table: exit 0, no errors or warnings; returns the .dsl text."""
    path = tmp_path / f"{signature}.dat"
    path.write_bytes(blob)
    proc = subprocess.run([need(IASL), "-d", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not re.search(r"\b(error|warning)", output, re.IGNORECASE), output
    text = (tmp_path / f"{signature}.dsl").read_text()
    assert "**** " not in text, text  # iasl flags unknown fields and bad values with ****
    return text


def field(text: str, name: str) -> str:
    """The value iasl prints for field ``name`` (the first one)."""
    match = re.search(rf"\]\s+{re.escape(name)} : (\S+)", text)
    assert match, f"no {name!r} in\n{text}"
    return match.group(1)


def table_sum(blob: bytes) -> int:
    return sum(blob) & 0xFF


@pytest.fixture(scope="module")
def tables2():
    return build_acpi_tables(PC, 2)


# -- checksums and structure, independently of the builder --------------------------------------

@pytest.mark.parametrize("vcpus", [1, 2, 255])
def test_every_checksum_is_valid(vcpus: int) -> None:
    tables = build_acpi_tables(PC, vcpus)
    rsdp = tables.blobs["RSDP"]
    assert rsdp[:8] == b"RSD PTR " and len(rsdp) == 36 and rsdp[15] == 2
    assert table_sum(rsdp[:20]) == 0 and table_sum(rsdp) == 0
    for signature in SDT_SIGNATURES:
        blob = tables.blobs[signature]
        assert blob[:4] == signature.encode()
        assert struct.unpack_from("<I", blob, 4)[0] == len(blob)
        if signature != "FACS":  # the FACS has no checksum (§5.2.10)
            assert table_sum(blob) == 0, signature


def test_pointers_lead_from_the_rsdp_to_every_table(tables2) -> None:
    """Walk the tables in the image the way an OS does: RSDP -> XSDT/RSDT -> FADT -> DSDT."""
    image, base = tables2.image, tables2.base

    def at(address: int, length: int) -> bytes:
        return image[address - base:address - base + length]

    def table(address: int) -> bytes:
        return at(address, struct.unpack_from("<I", at(address, 8), 4)[0])

    rsdp = at(tables2.rsdp_address, 36)
    rsdt_address, xsdt_address = struct.unpack_from("<I", rsdp, 16)[0], \
        struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt, rsdt = table(xsdt_address), table(rsdt_address)
    xsdt_entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    rsdt_entries = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    assert list(xsdt_entries) == list(rsdt_entries)
    assert sorted(table(a)[:4] for a in xsdt_entries) == [b"APIC", b"FACP"]
    fadt = next(table(a) for a in xsdt_entries if table(a)[:4] == b"FACP")
    facs32, dsdt32 = struct.unpack_from("<II", fadt, 36)
    facs64, dsdt64 = struct.unpack_from("<QQ", fadt, 132)
    assert (facs32, dsdt32) == (facs64, dsdt64)
    assert table(dsdt64)[:4] == b"DSDT" and at(facs64, 4) == b"FACS"
    assert facs64 % 64 == 0 and tables2.rsdp_address % 16 == 0
    for signature, blob in tables2.blobs.items():
        assert at(tables2.addresses[signature], len(blob)) == blob


def test_tables_lie_in_the_e820_acpi_range() -> None:
    tables = build_acpi_tables(PC, PC.max_vcpus)
    acpi = [e for e in PC.memory_map(64 * MiB) if e.type == E820_ACPI]
    assert [(e.base, e.end) for e in acpi] == [PC.acpi_tables]
    assert tables.base == PC.acpi_tables[0]
    assert tables.base + len(tables.image) <= PC.acpi_tables[1]
    # Linux's legacy scan: the RSDP on a 16-byte boundary in 0xE0000-0xFFFFF.
    assert 0xE0000 <= tables.rsdp_address < 0x100000 and tables.rsdp_address % 16 == 0


def test_build_errors() -> None:
    for bad in (0, PC.max_vcpus + 1):
        with pytest.raises(AcpiBuildError):
            build_acpi_tables(PC, bad)
    with pytest.raises(AcpiBuildError, match="only 256 fit"):
        build_acpi_tables(PC, 2, base=0x10_0000, limit=0x10_0100)
    with pytest.raises(AcpiBuildError, match="aligned"):
        build_acpi_tables(PC, 1, base=0x10_0008)
    twice = sdt("APIC", 1, b"")
    with pytest.raises(AcpiBuildError, match="two tables"):
        build_acpi_tables(PC, 1, extra_tables=[twice])


def test_another_base_and_extra_tables() -> None:
    extra = sdt("TEST", 1, b"\x01\x02\x03")
    tables = build_acpi_tables(PC, 1, base=0x20_0000, extra_tables=[extra],
                               extra_dsdt_devices=[aml.Device("PCI0", aml.Name(
                                   "_HID", aml.EisaId("PNP0A03")))])
    assert tables.rsdp_address == 0x20_0000
    assert table_sum(tables.blobs["TEST"]) == 0
    xsdt = tables.blobs["XSDT"]
    assert tables.addresses["TEST"] in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert b"PCI0" in tables.blobs["DSDT"]


# -- iasl -d ----------------------------------------------------------------------------------

@pytest.mark.parametrize("vcpus", [1, 2, 255])
def test_madt_disassembles(tmp_path, vcpus: int) -> None:
    text = disassemble(tmp_path, "APIC", build_acpi_tables(PC, vcpus).blobs["APIC"])
    assert field(text, "Local Apic Address") == f"{PC.lapic_base:08X}"
    assert re.search(r"PC-AT Compatibility : 1", text)
    subtables = re.findall(r"Subtable Type : (\w\w) \[([^\]]+)\]", text)
    lapics = [s for s in subtables if s[1] == "Processor Local APIC"]
    assert len(lapics) == vcpus
    ids = re.findall(r"Processor ID : (\w\w)\n.*Local Apic ID : (\w\w)", text)
    assert ids == [(f"{i:02X}", f"{i:02X}") for i in range(vcpus)]
    assert len(re.findall(r"Processor Enabled : 1", text)) == vcpus
    assert [s[1] for s in subtables[vcpus:]] == [
        "I/O APIC", "Interrupt Source Override", "Interrupt Source Override", "Local APIC NMI"]
    assert field(text, "I/O Apic ID") == f"{vcpus:02X}"
    assert field(text, "Address") == f"{PC.ioapic_base:08X}"
    overrides = re.findall(r"Source : (\w\w)\n.*Interrupt : (\w+)\n.*Flags \(decoded below\) : "
                           r"(\w+)", text)
    assert overrides == [("00", "00000002", "0005"),   # IRQ0 -> GSI2, edge, active high
                         ("09", "00000009", "000D")]   # SCI, level, active high
    assert field(text, "Interrupt Input LINT") == "01"


def test_fadt_disassembles(tmp_path, tables2) -> None:
    text = disassemble(tmp_path, "FACP", tables2.blobs["FACP"])
    assert field(text, "Revision") == "06" and field(text, "FADT Minor Revision") == "05"
    assert field(text, "Table Length") == "00000114"  # 276 bytes, the ACPI 6.x FADT
    assert field(text, "SCI Interrupt") == "0009"
    assert field(text, "SMI Command Port") == "00000000"
    assert field(text, "PM1A Event Block Address") == "00000600"
    assert field(text, "PM1A Control Block Address") == "00000604"
    assert field(text, "PM Timer Block Address") == "00000608"
    assert field(text, "PM1 Event Block Length") == "04"
    assert field(text, "PM1 Control Block Length") == "02"
    assert field(text, "PM Timer Block Length") == "04"
    assert field(text, "FACS Address") == f"{tables2.addresses['FACS']:08X}"
    assert field(text, "DSDT Address") == f"{tables2.addresses['DSDT']:08X}"
    assert field(text, "RTC Century Index") == "32"
    flags = {name.strip(): value for name, value in
             re.findall(r"^\s+([^\[\]:]+?) \(V\d\) : (\d)$", text, re.MULTILINE)}
    assert flags["Reset Register Supported"] == "1"
    assert flags["8042 Present on ports 60/64"] == "1"
    assert flags["VGA Not Present"] == "1"
    assert flags["CMOS RTC Not Present"] == "0"
    assert flags["Hardware Reduced"] == "0"
    assert flags["32-bit PM Timer"] == "0"
    assert flags["WBINVD instruction is operational"] == "1"
    reset = text[text.index("Reset Register :"):text.index("Value to cause reset")]
    assert "[SystemIO]" in reset and "0000000000000CF9" in reset and "Bit Width : 08" in reset
    assert field(text, "Value to cause reset") == "06"
    # The 64-bit X_ fields repeat the addresses.
    x_fields = text[text.index("FADT Minor Revision"):]
    assert f"{tables2.addresses['DSDT']:016X}" in x_fields
    for block, address, width in (("PM1A Event Block", "0600", "20"),
                                  ("PM1A Control Block", "0604", "10"),
                                  ("PM Timer Block", "0608", "20")):
        part = x_fields[x_fields.index(f"{block} :"):][:600]
        assert f"Address : 000000000000{address}" in part and f"Bit Width : {width}" in part


def test_dsdt_disassembles(tmp_path, tables2) -> None:
    text = disassemble(tmp_path, "DSDT", tables2.blobs["DSDT"])
    assert 'DefinitionBlock ("", "DSDT", 2, "HVVMM ", "HVVMMPC ", 0x00000001)' in text
    assert re.search(r"Name \(_S5, Package \(0x04\).*?\{\s*Zero,\s*Zero,\s*Zero,\s*Zero\s*\}",
                     text, re.DOTALL)
    com1 = text[text.index("Device (COM1)"):text.index("Device (KBD)")]
    assert 'EisaId ("PNP0501")' in com1
    assert re.search(r"IO \(Decode16,\s*0x03F8,\s*// Range Minimum\s*0x03F8,", com1)
    assert re.search(r"0x08,\s*// Length", com1)
    assert re.search(r"IRQNoFlags \(\)\s*\{4\}", com1)
    assert re.search(r"Device \(KBD\).*PNP0303.*0x0060.*0x0064.*\{1\}", text, re.DOTALL)
    assert re.search(r"Device \(RTC\).*PNP0B00.*0x0070.*\{8\}", text, re.DOTALL)
    assert re.search(r'Device \(FWCF\)\s*\{\s*Name \(_HID, "QEMU0002"\)', text)
    assert re.findall(r"Device \((C00\d)\)", text) == ["C000", "C001"]
    assert text.count('"ACPI0007"') == 2
    assert "Method (_PIC, 1, NotSerialized)" in text
    # Round trip: iasl compiles its disassembly back to the same AML (-on: keep \_SB as written).
    proc = subprocess.run([need(IASL), "-on", "-p", str(tmp_path / "again"),
                           str(tmp_path / "DSDT.dsl")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = (tmp_path / "again.aml").read_bytes()
    assert again[36:] == tables2.blobs["DSDT"][36:] and again[:9] == tables2.blobs["DSDT"][:9]


@pytest.mark.parametrize("signature", ["XSDT", "RSDT", "FACS"])
def test_root_tables_and_facs_disassemble(tmp_path, tables2, signature: str) -> None:
    text = disassemble(tmp_path, signature, tables2.blobs[signature])
    if signature == "FACS":
        assert field(text, "Length") == "00000040" and field(text, "Version") == "02"
        return
    listed = re.findall(r"ACPI Table Address\s+\d+ : (\w+)", text)
    assert [int(a, 16) for a in listed] == [tables2.addresses["FACP"], tables2.addresses["APIC"]]


def test_rsdp_matches_what_iasl_compiles(tmp_path, tables2) -> None:
    """iasl 2020 cannot disassemble an RSDP, but its data-table compiler builds one (and fills
    both checksums): the same fields must give the same 36 bytes."""
    rsdp = tables2.blobs["RSDP"]
    source = tmp_path / "rsdp.asl"
    source.write_text(
        '[0008]                          Signature : "RSD PTR "\n'
        "[0001]                           Checksum : 00\n"
        '[0006]                             Oem ID : "HVVMM "\n'
        "[0001]                           Revision : 02\n"
        f"[0004]                       RSDT Address : {tables2.addresses['RSDT']:08X}\n"
        "[0004]                             Length : 00000024\n"
        f"[0008]                       XSDT Address : {tables2.addresses['XSDT']:016X}\n"
        "[0001]                  Extended Checksum : 00\n"
        "[0003]                           Reserved : 000000\n")
    proc = subprocess.run([need(IASL), "-p", str(tmp_path / "rsdp"), str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


# -- the DSDT run by ACPICA ---------------------------------------------------------------------

def test_acpiexec_loads_the_tables_and_evaluates_the_dsdt(tmp_path, tables2) -> None:
    files = []
    for signature in ("FACP", "DSDT", "APIC", "FACS"):
        path = tmp_path / f"{signature}.dat"
        path.write_bytes(tables2.blobs[signature])
        files.append(str(path))
    commands = "evaluate \\_S5; evaluate \\_SB.COM1._CRS; evaluate \\_PIC 1; evaluate \\PICF"
    proc = subprocess.run([need(ACPIEXEC), "-b", commands, *files], capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out
    assert re.search(r"Table \[DSDT: HVVMMPC \].*6 Devices", out), out
    s5 = out[out.index("Evaluating \\_S5"):]
    assert re.search(r"Package\] Contains 4 Elements:(\s+\[Integer\] = 0+\n){4}", s5), s5
    assert "47 01 F8 03 F8 03 01 08 22 10 00 79 00" in out  # COM1's _CRS buffer
    picf = out[out.index("Evaluating \\PICF"):]
    assert "[Integer] = 0000000000000001" in picf  # _PIC(1) stored the APIC model


def test_unplaced_tables_keep_their_pointer_records(tables2) -> None:
    """What the linker/loader needs: each pointer's table, offset, size and target."""
    by_signature = {t.signature: t for t in tables2.tables}
    assert isinstance(by_signature["FACP"], AcpiTable)
    fadt_pointers = {(p.offset, p.size, p.target) for p in by_signature["FACP"].pointers}
    assert fadt_pointers == {(36, 4, "FACS"), (40, 4, "DSDT"), (132, 8, "FACS"),
                             (140, 8, "DSDT")}
    assert {(p.offset, p.size, p.target) for p in by_signature["RSDP"].pointers} == {
        (16, 4, "RSDT"), (24, 8, "XSDT")}
    # Unlinked, the pointer fields hold zero.
    assert by_signature["FACP"].data[36:44] == bytes(8)
