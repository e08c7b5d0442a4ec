"""Sizes as people write them (``256M``, ``1G``, ``512MiB``), shared by the command line and
:class:`hvvmm.machine.MachineConfig`."""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": MiB, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``512MiB``, ``2048K``; a plain number is MiB (as QEMU's ``-m``).
    Raises ValueError with a sentence saying what is accepted."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix "
                         "(a plain number is MiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps one decimal: ``1.5 GiB``."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            value = size / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{size} bytes"
