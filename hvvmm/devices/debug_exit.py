"""QEMU's isa-debug-exit: a port the guest writes to end the VM with a chosen status.

As QEMU ``hw/misc/debugexit.c``: any write of value ``v`` (of any size, at any offset in the range)
ends the VM; QEMU then exits with status ``(v << 1) | 1``, so a test guest can report pass/fail
without a clean-shutdown path. Here the write calls ``on_exit(v)`` and the VMM does the ending (the
status formula is :func:`exit_status`). Reads return 0. The conventional placement, used with
``-device isa-debug-exit,iobase=0xf4,iosize=0x04``, is :data:`DEBUG_EXIT_BASE` /
:data:`DEBUG_EXIT_PORT_COUNT`.
"""

from __future__ import annotations

from typing import Callable

DEBUG_EXIT_BASE = 0xF4
DEBUG_EXIT_PORT_COUNT = 4


def exit_status(value: int) -> int:
    """The process exit status QEMU uses for a debug-exit write of ``value`` (``(v << 1) | 1``;
    the shell sees it modulo 256)."""
    return (value << 1) | 1


class DebugExit:
    """isa-debug-exit; ``on_exit(value)`` is called for every write."""

    def __init__(self, on_exit: Callable[[int], None]):
        self._on_exit = on_exit
        self.last_value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.last_value = value
        self._on_exit(value)
