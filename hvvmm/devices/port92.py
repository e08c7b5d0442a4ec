"""System Control Port A at 0x92 ("fast A20 and init"), as PCs since the PS/2 have it.

Bit 0 (fast reset): writing 1 where it was 0 resets the CPU, which calls ``on_reset()``. Bit 1
(A20 gate): kept and read back. KVM has no A20 line to mask, so A20 is always on, as in QEMU under
KVM; firmware (SeaBIOS ``set_a20``) only reads and writes this bit. Other bits read as 0.

Sources: IBM PS/2 Model 50/60 Technical Reference (System Control Port A); QEMU
``hw/i386/pc.c`` (``port92_read``/``port92_write``: reset on a rising bit 0, A20 from bit 1).
"""

from __future__ import annotations

from typing import Callable

PORT92 = 0x92
PORT92_FAST_RESET = 0x01
PORT92_A20 = 0x02


class SystemControlPortA:
    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._value = PORT92_A20  # A20 enabled after reset, as QEMU reports it

    def read(self, offset: int, size: int) -> int:
        return self._value if size == 1 else (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        rising_reset = value & PORT92_FAST_RESET and not self._value & PORT92_FAST_RESET
        self._value = value & (PORT92_FAST_RESET | PORT92_A20)
        if rising_reset:
            self._value &= ~PORT92_FAST_RESET  # as QEMU's port92_reset does on the reset
            self._on_reset()
