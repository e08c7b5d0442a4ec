"""Platform devices as plain state machines: no threads, no file descriptors, no KVM, no bus.

Each device is a :class:`hvvmm.bus.BusDevice` (``read(offset, size)`` / ``write(offset, size,
value)`` with ``offset`` relative to where it is registered), drives interrupts through an injected
:class:`hvvmm.bus.IrqLine` and reports machine-level events (exit, reset, power-off) through
injected callbacks. Each module exports its conventional base port and length; the VMM does the
wiring.

- :mod:`.serial`: 16550A UART (COM1 at 0x3f8, IRQ 4).
- :mod:`.debug_exit`: QEMU's isa-debug-exit (0xf4).
- :mod:`.fw_cfg`: QEMU firmware configuration, legacy I/O interface (0x510).
- :mod:`.cmos`: MC146818 RTC and CMOS NVRAM (0x70).
- :mod:`.i8042`: the PS/2 controller, enough for reset and probing (0x60, 0x64).
- :mod:`.port80`: the POST-code port (0x80).
- :mod:`.acpi_pm`: the ACPI PM block: PM1a event and control (soft power-off), PM timer (0x600).
- :mod:`.reset_control`: the reset control register (0xcf9).
- :mod:`.port92`: System Control Port A (0x92): A20 read-back and fast reset.
"""
