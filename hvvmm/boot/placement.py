"""Placing loaded images in guest RAM: range checks and copies that may span adjacent RAM
regions. Shared by every loader in :mod:`hvvmm.boot`."""

from __future__ import annotations

from typing import Sequence

from hvvmm.layout import MiB
from hvvmm.memory import GuestMemory, GuestMemoryError

from .state import KernelImageError

_4GiB = 1 << 32


def ram_contains(memory: GuestMemory, gpa: int, size: int) -> bool:
    """Whether ``[gpa, gpa+size)`` is wholly RAM, possibly across adjacent regions."""
    if gpa < 0 or size < 0:
        return False
    if size == 0:
        return True
    end = gpa + size
    for region in memory.regions:  # sorted by address
        if region.gpa <= gpa < region.end:
            gpa = region.end
            if gpa >= end:
                return True
    return False


_ZERO_CHUNK = MiB


def write(memory: GuestMemory, gpa: int, data: bytes | memoryview, size: int = 0) -> None:
    """Copy ``data`` to ``gpa``, then zeros up to ``size`` bytes in all, across adjacent regions."""
    total = max(len(data), size)
    done = 0
    while done < total:
        here = gpa + done
        region = next((r for r in memory.regions if r.gpa <= here < r.end), None)
        if region is None:
            raise GuestMemoryError(here, total - done)
        if done < len(data):
            chunk = min(len(data) - done, region.end - here)
            memory.view(here, chunk)[:] = data[done:done + chunk]
        else:
            chunk = min(total - done, region.end - here, _ZERO_CHUNK)
            memory.view(here, chunk)[:] = bytes(chunk)
        done += chunk


def _mib_text(size: int, round_up: bool) -> str:
    return str(-(-size // MiB) if round_up else size // MiB)


def check_kernel(memory: GuestMemory, segments: Sequence) -> None:
    """Segments (objects with ``gpa``, ``memsz``, ``end``, ``name``) that do not overlap, lie in
    RAM and end below 4 GiB; else :class:`KernelImageError`."""
    need = sum(segment.memsz for segment in segments)
    if need > memory.size:
        raise KernelImageError(
            f"the kernel needs {_mib_text(need, True)} MiB but the guest has "
            f"{_mib_text(memory.size, False)} MiB of RAM")
    ordered = sorted(segments, key=lambda segment: segment.gpa)
    for before, after in zip(ordered, ordered[1:]):
        if after.gpa < before.end:
            raise KernelImageError(f"{before.name} overlaps {after.name}")
    for segment in segments:
        if not ram_contains(memory, segment.gpa, segment.memsz):
            raise KernelImageError(
                f"{segment.name} lies outside guest RAM "
                f"[{segment.gpa:#x}, {segment.end:#x})")
        if segment.end > _4GiB:
            raise KernelImageError(f"{segment.name} extends past 4 GiB")
