"""ACPI tables for hvvmm's PC: an AML encoder (:mod:`.aml`), the table builders
(:mod:`.tables`) and QEMU's linker/loader format (:mod:`.loader`)."""

from .tables import AcpiBuildError, AcpiTable, AcpiTables, build_acpi_tables

__all__ = ["AcpiBuildError", "AcpiTable", "AcpiTables", "build_acpi_tables"]
