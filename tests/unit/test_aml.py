"""The AML encoder (hvvmm.acpi.aml) against iasl: each construct is written as ASL, compiled by
iasl, and the AML after the table header must equal the encoder's bytes. A few encodings are also
pinned to the bytes the ACPI specification gives."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvvmm.acpi import aml
from hvvmm.acpi.aml import (IO, IRQ, ONE, ZERO, AmlError, Arg, Buffer, Device, DWord,
                            DWordMemory, EisaId, Integer, Interrupt, IRQNoFlags, Memory32Fixed,
                            Method, Name, NameString, Package, QWord, QWordMemory,
                            ResourceTemplate, Return, Scope, Store, String, WordBusNumber,
                            WordIO, pkg_length)

IASL = shutil.which("iasl")
HEADER_LENGTH = 36


def iasl_compile(tmp_path, asl_body: str) -> bytes:
    """The AML iasl makes of ``asl_body`` inside a DSDT, without the table header."""
    if IASL is None:
        pytest.fail("iasl is missing: install the Debian package acpica-tools")
    source = tmp_path / "snippet.asl"
    source.write_text('DefinitionBlock ("", "DSDT", 2, "HVVMM", "TEST", 1)\n{\n'
                      f"{asl_body}\n}}\n")
    # -on: keep name paths as written (iasl would shorten \_SB to _SB at the root).
    proc = subprocess.run([IASL, "-on", "-p", str(tmp_path / "snippet"), str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp_path / "snippet.aml").read_bytes()[HEADER_LENGTH:]


def encoded(*terms) -> bytes:
    return b"".join(aml.encode(t) for t in terms)


# -- against the specification's bytes --------------------------------------------------------

def test_eisa_id_pnp0501() -> None:
    # ACPI 6.5 §19.6.35: EISAID("PNP0501") is 0x0105D041 (bytes 41 D0 05 01).
    assert EisaId("PNP0501").encode() == bytes([0x0C, 0x41, 0xD0, 0x05, 0x01])


def test_pkg_length_forms() -> None:
    # §20.2.4: one byte up to 63 (the count includes the PkgLength byte itself).
    assert pkg_length(0) == b"\x01"
    assert pkg_length(62) == b"\x3f"
    # 63 body bytes + 2 length bytes = 65 = 0x41: lead 0x41 (1 follow byte, low nibble 1), 0x04.
    assert pkg_length(63) == b"\x41\x04"
    assert pkg_length(0xFFF - 2) == b"\x4f\xff"
    # 4094 + 3 = 0x1001 needs the three-byte form: lead 0x81 (2 follow bytes, nibble 1), 0x100.
    assert pkg_length(0xFFF - 1) == b"\x81\x00\x01"
    with pytest.raises(AmlError):
        pkg_length(1 << 28)


def test_integers_choose_the_smallest_encoding() -> None:
    assert Integer(0).encode() == b"\x00" and Integer(1).encode() == b"\x01"
    assert Integer(2).encode() == b"\x0a\x02"
    assert Integer(0x100).encode() == b"\x0b\x00\x01"
    assert Integer(0x10000).encode() == b"\x0c\x00\x00\x01\x00"
    assert Integer(1 << 32).encode() == b"\x0e" + (1 << 32).to_bytes(8, "little")
    assert DWord(1).encode() == b"\x0c\x01\x00\x00\x00"  # a forced width stays
    for bad in (-1, 1 << 64):
        with pytest.raises(AmlError):
            Integer(bad)
    with pytest.raises(AmlError):
        aml.Byte(0x100)


def test_name_strings() -> None:
    assert NameString("_HID").encode() == b"_HID"
    assert NameString("KBD").encode() == b"KBD_"
    assert NameString("\\_SB").encode() == b"\\_SB_"
    assert NameString("\\_SB.PCI0").encode() == b"\\\x2e_SB_PCI0"
    assert NameString("^^A.B.C").encode() == b"^^\x2f\x03A___B___C___"
    assert NameString("\\").encode() == b"\\\x00"
    for bad in ("", "1ABC", "ABCDE", "a", "A-B", "\\_SB..X", "É"):
        with pytest.raises(AmlError):
            NameString(bad)


@pytest.mark.parametrize("bad", ["", "PNP050", "pnp0501", "PNP050G", "PN00501"])
def test_bad_eisa_ids(bad: str) -> None:
    with pytest.raises(AmlError):
        EisaId(bad)


def test_strings_are_ascii_only() -> None:
    assert String("ACPI0007").encode() == b"\x0dACPI0007\x00"
    for bad in ("caf\xe9", "a\0b"):
        with pytest.raises(AmlError):
            String(bad)


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_round_trips(body: int) -> None:
    encoded_length = pkg_length(body)
    lead = encoded_length[0]
    follow = lead >> 6
    assert len(encoded_length) == follow + 1
    if follow == 0:
        total = lead & 0x3F
    else:
        assert lead & 0x30 == 0  # bits 4-5 are zero in the multi-byte form
        total = (lead & 0x0F) | (int.from_bytes(encoded_length[1:], "little") << 4)
    assert total == body + len(encoded_length)
    # The shortest form: one byte fewer could not hold it.
    if follow:
        assert total - 1 >= (0x40 if follow == 1 else 1 << (4 + 8 * (follow - 1)))


# -- against iasl -----------------------------------------------------------------------------

def test_names_and_integers_match_iasl(tmp_path) -> None:
    asl = """
        Name (I000, Zero)
        Name (I001, One)
        Name (I002, 0x12)
        Name (I003, 0x1234)
        Name (I004, 0x12345678)
        Name (I005, 0x123456789A)
        Name (STR0, "ACPI0007")
        Name (_HID, EisaId ("PNP0303"))
    """
    ours = encoded(Name("I000", 0), Name("I001", 1), Name("I002", 0x12), Name("I003", 0x1234),
                   Name("I004", 0x12345678), Name("I005", 0x123456789A),
                   Name("STR0", "ACPI0007"), Name("_HID", EisaId("PNP0303")))
    assert ours == iasl_compile(tmp_path, asl)


def test_package_and_s5_match_iasl(tmp_path) -> None:
    asl = """
        Name (_S5, Package (0x04) { Zero, Zero, Zero, Zero })
        Name (PKG1, Package (0x03) { 0x1234, "X", Package (0x01) { One } })
    """
    ours = encoded(Name("_S5", Package(0, 0, 0, 0)),
                   Name("PKG1", Package(0x1234, "X", Package(ONE))))
    assert ours == iasl_compile(tmp_path, asl)


def test_scope_device_and_resources_match_iasl(tmp_path) -> None:
    asl = """
        Scope (\\_SB)
        {
            Device (COM1)
            {
                Name (_HID, EisaId ("PNP0501"))
                Name (_UID, One)
                Name (_CRS, ResourceTemplate ()
                {
                    IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )
                    IRQNoFlags () {4}
                })
            }
        }
    """
    ours = Scope("\\_SB", Device("COM1", Name("_HID", EisaId("PNP0501")), Name("_UID", 1),
                                 Name("_CRS", ResourceTemplate(IO(0x3F8, 0x3F8, 1, 8),
                                                               IRQNoFlags(4)))))
    assert ours.encode() == iasl_compile(tmp_path, asl)


def test_methods_match_iasl(tmp_path) -> None:
    asl = """
        Name (PICF, Zero)
        Method (_PIC, 1, NotSerialized) { PICF = Arg0 }
        Method (_STA, 0, NotSerialized) { Return (0x0F) }
        Method (MTHD, 2, Serialized, 3) { Return (Arg1) }
    """
    ours = encoded(Name("PICF", ZERO), Method("_PIC", 1, Store(Arg(0), "PICF")),
                   Method("_STA", 0, Return(0x0F)),
                   Method("MTHD", 2, Return(Arg(1)), serialized=True, sync_level=3))
    assert ours == iasl_compile(tmp_path, asl)


def test_address_space_descriptors_match_iasl(tmp_path) -> None:
    asl = """
        Name (_CRS, ResourceTemplate ()
        {
            WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                0x0000, 0x0000, 0x00FF, 0x0000, 0x0100,,, )
            WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,,, , TypeStatic, DenseTranslation)
            WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,,, , TypeStatic, DenseTranslation)
            DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
                0x00000000, 0x000A0000, 0x000BFFFF, 0x00000000, 0x00020000,,, ,
                AddressRangeMemory, TypeStatic)
            DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                0x00000000, 0xC0000000, 0xFEBFFFFF, 0x00000000, 0x3EC00000,,, ,
                AddressRangeMemory, TypeStatic)
            QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite,
                0x0000000000000000, 0x0000000100000000, 0x00000001FFFFFFFF,
                0x0000000000000000, 0x0000000100000000,,, , AddressRangeMemory, TypeStatic)
            Memory32Fixed (ReadWrite, 0xFEC00000, 0x00001000, )
            Memory32Fixed (ReadOnly, 0xFED00000, 0x00000400, )
            Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) { 0x00000009 }
            Interrupt (ResourceConsumer, Edge, ActiveLow, Shared, ,, ) { 0x10, 0x11 }
            IRQ (Level, ActiveLow, Shared, ) { 5, 10 }
            IRQ (Edge, ActiveHigh, Exclusive, ) { 3 }
        })
    """
    ours = Name("_CRS", ResourceTemplate(
        WordBusNumber(0x00, 0xFF),
        WordIO(0x0000, 0x0CF7),
        WordIO(0x0D00, 0xFFFF),
        DWordMemory(0x000A0000, 0x000BFFFF, cacheability=aml.MEM_CACHEABLE),
        DWordMemory(0xC0000000, 0xFEBFFFFF),
        QWordMemory(1 << 32, (2 << 32) - 1, cacheability=aml.MEM_PREFETCHABLE),
        Memory32Fixed(0xFEC00000, 0x1000),
        Memory32Fixed(0xFED00000, 0x400, writable=False),
        Interrupt(9),
        Interrupt(0x10, 0x11, level=False, active_low=True, shared=True),
        IRQ(5, 10, level=True, active_low=True, shared=True),
        IRQ(3),
    ))
    assert ours.encode() == iasl_compile(tmp_path, asl)


def test_large_package_lengths_match_iasl(tmp_path) -> None:
    """Bodies needing two- and three-byte PkgLengths (over 63 and over 4095 bytes)."""
    small = [f"Name (N{i:03X}, 0x{0x10000 + i:08X})" for i in range(10)]     # 10 * 10 bytes
    large = [f"Name (M{i:03X}, 0x{0x10000 + i:08X})" for i in range(500)]    # 5000 bytes
    asl = ("Scope (\\_SB) {\n" + "\n".join(small) + "\n}\n"
           "Device (\\BIG) {\n" + "\n".join(large) + "\n}\n"
           "Name (BUF0, Buffer (0x50) {" + ", ".join(["0x5A"] * 0x50) + "})\n")
    ours = encoded(Scope("\\_SB", *(Name(f"N{i:03X}", 0x10000 + i) for i in range(10))),
                   Device("\\BIG", *(Name(f"M{i:03X}", 0x10000 + i) for i in range(500))),
                   Name("BUF0", Buffer(b"\x5a" * 0x50)))
    assert ours == iasl_compile(tmp_path, asl)


def test_containers_can_be_extended_after_creation() -> None:
    scope = Scope("\\_SB", Device("COM1"))
    before = scope.encode()
    scope.append(Device("PCI0", Name("_HID", EisaId("PNP0A03"))))
    after = scope.encode()
    assert len(after) > len(before)
    assert after.endswith(Device("PCI0", Name("_HID", EisaId("PNP0A03"))).encode())


def test_qword_and_bad_terms() -> None:
    assert QWord(1).encode() == b"\x0e" + (1).to_bytes(8, "little")
    with pytest.raises(AmlError):
        aml.encode(True)
    with pytest.raises(AmlError):
        aml.encode(1.5)
    with pytest.raises(AmlError):
        Method("X", 8)
    with pytest.raises(AmlError):
        IRQNoFlags(16)
    with pytest.raises(AmlError):
        IO(0x10000, 0, 1, 1)


def test_if_else_and_logic_match_iasl(tmp_path) -> None:
    asl = """
        Name (PICF, Zero)
        Name (PRTA, Package (0x01) { One })
        Name (PRTP, Package (0x01) { Zero })
        Method (_PRT, 0, NotSerialized)
        {
            If (PICF) { Return (PRTA) }
            Else { Return (PRTP) }
        }
        Method (TST1, 1, NotSerialized)
        {
            If (LEqual (Arg0, 0x05)) { Return (One) }
            If (LNot (Arg0)) { Return (0x02) }
            Return (Zero)
        }
    """
    ours = encoded(
        Name("PICF", 0), Name("PRTA", Package(1)), Name("PRTP", Package(0)),
        Method("_PRT", 0, aml.If("PICF", Return(NameString("PRTA")),
                                 orelse=[Return(NameString("PRTP"))])),
        Method("TST1", 1, aml.If(aml.LEqual(Arg(0), 5), Return(1)),
               aml.If(aml.LNot(Arg(0)), Return(2)), Return(0)))
    assert ours == iasl_compile(tmp_path, asl)
