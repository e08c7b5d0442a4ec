"""PCI bus 0 in the DSDT (hvvmm.pci.acpi): iasl disassembles it cleanly, the host bridge's
resources are the layout's PCI window, and the routing table agrees with the PIIX3's swizzle."""

import re
import subprocess

from test_acpi import ACPIEXEC, disassemble, need

from hvvmm.acpi import build_acpi_tables
from hvvmm.layout import PC, MiB
from hvvmm.pci.acpi import LINK_NAMES, pci_dsdt_devices
from hvvmm.pci.i440fx import Piix3IsaBridge


def tables(memory=256 * MiB):
    return build_acpi_tables(PC, 1, extra_dsdt_devices=pci_dsdt_devices(PC, memory))


def test_pci0_resources_are_the_layout_window(tmp_path):
    for memory in (256 * MiB, 2560 * MiB):
        text = disassemble(tmp_path, "DSDT", tables(memory).blobs["DSDT"])
        pci0 = text[text.index("Device (PCI0)"):]
        assert 'EisaId ("PNP0A03")' in pci0
        start, end = PC.pci_mmio_window(memory)
        assert re.search(rf"0x{start:08X},\s*// Range Minimum\s*0x{end - 1:08X},\s*// Range "
                         "Maximum", pci0), pci0[:3000]
        start64, end64 = PC.pci_mmio64_window(memory)
        assert re.search(rf"QWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, "
                         rf"Prefetchable, ReadWrite,\s*0x0+,\s*// Granularity\s*"
                         rf"0x{start64:016X},\s*// Range Minimum\s*0x{end64 - 1:016X},", pci0)
        assert re.search(r"0x0000,\s*// Range Minimum\s*0x0CF7,", pci0)
        assert re.search(r"0x0D00,\s*// Range Minimum\s*0xFFFF,", pci0)


def test_links_report_the_firmware_routing_level_active_high(tmp_path):
    text = disassemble(tmp_path, "DSDT", tables().blobs["DSDT"])
    for name, irq in zip(LINK_NAMES, PC.pci_irqs):
        link = text[text.index(f"Device ({name})"):][:1200]
        assert 'EisaId ("PNP0C0F")' in link
        assert re.search(rf"Interrupt \(ResourceConsumer, Level, ActiveHigh, Shared, ,, \)\s*"
                         rf"\{{\s*0x{irq:08X},", link), link
        assert "Method (_SRS, 1" in link


def test_routing_table_follows_the_piix3_swizzle(tmp_path):
    text = disassemble(tmp_path, "DSDT", tables().blobs["DSDT"])
    prt = text[text.index("Name (_PRT"):]
    entries = re.findall(r"Package \(0x04\)\s*\{\s*(0x[0-9A-F]+|Zero|One),\s*"
                         r"(0x[0-9A-F]+|Zero|One),\s*(LNK[A-D]),\s*Zero\s*\}", prt)
    assert len(entries) == 31 * 4, prt[:2000]
    value = {"Zero": 0, "One": 1}
    for address, pin, link in entries:
        address, pin = (value[x] if x in value else int(x, 16) for x in (address, pin))
        assert address & 0xFFFF == 0xFFFF
        assert link == LINK_NAMES[Piix3IsaBridge.pirq_of((address >> 16) << 3, pin + 1)]


def test_acpiexec_loads_the_dsdt_with_pci0_and_evaluates_a_link(tmp_path):
    files = []
    for signature in ("FACP", "DSDT", "APIC", "FACS"):
        path = tmp_path / f"{signature}.dat"
        path.write_bytes(tables().blobs[signature])
        files.append(str(path))
    proc = subprocess.run([need(ACPIEXEC), "-b", "evaluate \\_SB.LNKC._CRS", *files],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out
    # Extended interrupt descriptor: consumer, level, active high, shared; one GSI, 11.
    assert "89 06 00 09 01 0B 00 00 00 79 00" in out, out[-2000:]
