"""The reset control register at port 0xCF9, as the PIIX3 and ICH9 chipsets have it.

A byte register: writing a value with RST_CPU (bit 2) set resets the machine, which calls
``on_reset()``; SYS_RST (bit 1, hard vs. soft reset) and FULL_RST (bit 3) are kept and read back,
and only choose the kind of reset on real hardware, so here any reset is the same. The FADT's
RESET_REG points here with RESET_VALUE 0x06 (SYS_RST | RST_CPU), so ACPI reboot (Linux's default
``reboot=acpi``) and ``reboot=pci`` both end up here.

Port 0xCF9 lies inside the PCI configuration mechanism's 0xCF8-0xCFF window, but that mechanism
only decodes 32-bit accesses at 0xCF8 (CONFIG_ADDRESS), so a byte access at 0xCF9 is this
register's (PCI Local Bus Specification 3.0 §3.2.2.3.2; QEMU registers both the same way).

Sources: the Intel 82371SB (PIIX3) and ICH9 datasheets (Reset Control Register, RST_CNT); QEMU
``hw/isa/piix.c`` (``rcr_write``) and ``hw/isa/lpc_ich9.c`` (``ich9_rst_cnt_write``); ACPI
Specification 6.5 §4.8.3.6 (Reset Register).
"""

from __future__ import annotations

from typing import Callable

RESET_CONTROL_PORT = 0xCF9
RESET_CONTROL_PORT_COUNT = 1
RESET_VALUE = 0x06            # the FADT's RESET_VALUE: SYS_RST | RST_CPU

RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04
RCR_FULL_RST = 0x08
_RCR_KEPT = RCR_SYS_RST | RCR_FULL_RST


class ResetControl:
    """Port 0xCF9; ``on_reset()`` is called for every write with RST_CPU set."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._value = 0

    def read(self, offset: int, size: int) -> int:
        return self._value if offset == 0 and size == 1 else (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 1:
            return
        if value & RCR_RST_CPU:
            self._on_reset()
            return
        self._value = value & _RCR_KEPT
