"""ACPI tables for hvvmm's PC: an AML encoder (:mod:`.aml`), the table builders
(:mod:`.tables`) and QEMU's linker/loader format (:mod:`.loader`)."""

from __future__ import annotations

from .loader import build_firmware_files
from .tables import AcpiBuildError, AcpiTable, AcpiTables, build_acpi_tables

__all__ = ["AcpiBuildError", "AcpiTable", "AcpiTables", "build_acpi_tables", "provide_tables"]


def provide_tables(tables: AcpiTables, fw_cfg, memory=None) -> int | None:
    """Offer ``tables`` to the guest: always as fw_cfg's table-loader files (a BIOS installs
    them itself, as from QEMU), and, given guest ``memory`` (a kernel booted directly, with no
    firmware to install them), also written to the layout's ACPI area. Returns the RSDP's
    guest-physical address when written, else None."""
    for name, data in build_firmware_files(tables.tables).items():
        fw_cfg.add_file(name, data)
    if memory is None:
        return None
    tables.install(memory)
    return tables.rsdp_address
