"""The ACPI tables as a guest finds them (tests/guests/acpi.c): the RSDP by the legacy scan, the
MADT's local APICs per vCPU, the FADT's PM timer; the FADT reset register ending the run as a
reset; and a machine without ACPI."""

import pytest

from hvvmm import ExitKind, Machine, MachineConfig
from procutil import assert_guest_passed

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30


def run(image, **config):
    with Machine(MachineConfig(kernel=image, **config)) as machine:
        rsdp = machine.acpi_rsdp
        rsdp_bytes = machine.memory.read(rsdp, 36) if rsdp is not None else None
        result = machine.run(timeout=RUN_TIMEOUT)
        return result, machine.console_text, rsdp, rsdp_bytes


@pytest.mark.parametrize("smp", [1, 3])
def test_guest_finds_the_tables(guest_image, smp):
    result, console, rsdp, rsdp_bytes = run(guest_image("acpi"), smp=smp)
    assert rsdp == 0xE0000 and rsdp_bytes[:8] == b"RSD PTR "
    assert f"INFO: RSDP at 0x{rsdp:x}" in console
    assert f"PASS: MADT: {smp} enabled local APICs for {smp} vCPUs" in console
    assert "PASS: PM timer advances" in console
    assert_guest_passed(result, console)


def test_reset_register_ends_the_run_as_a_reset(guest_image):
    result, console, _, _ = run(guest_image("acpi"), append="reset")
    assert "acpi: writing 0x6 to port 0xcf9" in console
    assert "still running" not in console and "FAIL" not in console, console
    assert result.kind is ExitKind.RESET and "0xcf9" in result.message, result
    assert not result.message.startswith("reset"), result  # the CLI says "hvvmm: reset: ..."


def test_no_acpi(guest_image):
    result, console, rsdp, _ = run(guest_image("acpi"), append="noacpi", acpi=False)
    assert rsdp is None
    assert "PASS: no RSDP without ACPI" in console
    assert_guest_passed(result, console)


def test_cli_no_acpi(guest_image):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hvvmm", "run", "--kernel",
                           str(guest_image("acpi")), "--append", "noacpi", "--no-acpi",
                           "--timeout", str(RUN_TIMEOUT)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT + 30,
                          stdin=subprocess.DEVNULL)
    assert "PASS: no RSDP without ACPI" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr  # debug-exit 0: every check passed


def test_firmware_files_in_fw_cfg(guest_image):
    """The linker/loader files are offered through fw_cfg, for firmware boots."""
    from hvvmm.devices.fw_cfg import FW_CFG_FILE_DIR

    with Machine(MachineConfig(kernel=guest_image("acpi"))) as machine:
        fw_cfg = machine.fw_cfg
        fw_cfg.write(0, 2, FW_CFG_FILE_DIR)
        count = int.from_bytes(bytes(fw_cfg.read(1, 1) for _ in range(4)), "big")
        names = []
        for _ in range(count):
            entry = bytes(fw_cfg.read(1, 1) for _ in range(64))
            names.append(entry[8:].rstrip(b"\0").decode())
    assert {"etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader"} <= set(names)
