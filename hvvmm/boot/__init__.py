"""Kernel loaders behind one protocol.

:func:`detect_format` tells the kernel's format from its bytes, :func:`load` places the kernel
and what it is handed in guest RAM and returns the :class:`BootState`, and
:func:`apply_entry_state` puts the boot vCPU into that state. Formats, in the order they are
recognised (as QEMU's ``x86_load_linux`` does):

* ``bzimage``: a Linux bzImage (boot protocol 2.06+), see :mod:`hvvmm.boot.linux`; by default its
  compressed kernel is unpacked in the host (:mod:`hvvmm.boot.decompress`) and booted as the
  vmlinux below;
* ``multiboot``: a Multiboot v1 kernel (:mod:`hvvmm.boot.multiboot`);
* ``pvh``: an ELF kernel with a PVH entry note (:mod:`hvvmm.boot.pvh`);
* ``vmlinux``: an x86-64 ELF kernel without the note, entered through Linux's 64-bit boot protocol.

A Linux kernel takes one initrd; a Multiboot kernel any number of modules ("FILE ARGS...").
"""

from __future__ import annotations

import os
from typing import Sequence

from hvvmm.layout import MemoryMapEntry, MiB
from hvvmm.memory import GuestMemory

from . import linux, multiboot, pvh
from .elf import is_elf, parse_elf
from .multiboot import MultibootModule
from .state import BootState, CpuMode, KernelImageError, apply_entry_state

__all__ = ["BootState", "CpuMode", "KernelImageError", "BootModule", "FORMATS", "DECOMPRESS",
           "LINUX_FORMATS", "detect_format", "read_modules", "linux_command_line", "load",
           "apply_entry_state"]

FORMATS = ("bzimage", "multiboot", "pvh", "vmlinux")
DECOMPRESS = ("host", "guest")
LINUX_FORMATS = ("bzimage", "pvh", "vmlinux")

BootModule = MultibootModule  # a file handed to the kernel: its bytes and its command line


def detect_format(image: bytes) -> str:
    """One of :data:`FORMATS`, from the image's bytes; :class:`KernelImageError` if none fits."""
    if linux.is_bzimage(image):
        return "bzimage"
    try:
        multiboot.find_multiboot_header(image)
        return "multiboot"
    except KernelImageError as exc:
        no_multiboot = exc
    if is_elf(image):
        elf = parse_elf(image)
        if pvh.pvh_entry(elf) is not None:
            return "pvh"
        if elf.kind == "ELF64":
            return "vmlinux"
    raise KernelImageError(f"not a Linux bzImage, an x86-64 ELF kernel or a Multiboot kernel: "
                           f"{no_multiboot}")


def linux_command_line(fmt: str, append: str, host_options: str) -> str:
    """The command line a kernel of format ``fmt`` gets: ``append``, then ``host_options`` (Linux
    options this host needs, e.g. :func:`hvvmm.x86.features.emulator_safe_linux_options`) for a
    Linux kernel only: a Multiboot kernel's command line is its own business. Later options win
    in Linux's parser, so the user's ``append`` comes first and a user can still read what was
    added in /proc/cmdline."""
    if fmt not in LINUX_FORMATS or not host_options:
        return append
    return f"{append} {host_options}" if append else host_options


def read_modules(specs: Sequence[str], fmt: str, ram_size: int | None = None) -> list[BootModule]:
    """Read what ``--initrd`` names. For Multiboot each spec is "FILE [ARGS...]" (a module);
    for Linux there is at most one, a file name as it is (QEMU's ``-initrd``). A file larger
    than ``ram_size`` is refused before it is read. An unreadable file raises :class:`OSError`
    with ``filename`` set."""
    if fmt in LINUX_FORMATS:
        if len(specs) > 1:
            raise KernelImageError(f"a Linux kernel takes one initrd, not {len(specs)}")
        paths = [(spec, spec) for spec in specs]
    else:
        paths = [(spec.split(" ", 1)[0], spec) for spec in specs]
    modules = []
    for path, spec in paths:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if ram_size is not None and size > ram_size:
                raise KernelImageError(f"the initrd {path} ({-(-size // MiB)} MiB) is larger "
                                       f"than guest RAM ({ram_size // MiB} MiB)")
            modules.append(BootModule(file.read(), spec))
    return modules


def load(memory: GuestMemory, image: bytes, *, fmt: str | None = None, name: str, append: str = "",
         modules: Sequence[BootModule] = (), memory_map: Sequence[MemoryMapEntry],
         rsdp: int | None = None, decompress: str = "host") -> BootState:
    """Load ``image`` (format ``fmt``, detected if ``None``) into ``memory``.

    ``name`` is the kernel's file name (Multiboot puts it first on the command line; Linux does
    not). ``rsdp``: the ACPI RSDP's address, handed to Linux kernels (``boot_params.
    acpi_rsdp_addr``, ``hvm_start_info.rsdp_paddr``). ``decompress``: where a bzImage's kernel is
    unpacked, ``"host"`` or ``"guest"``. Raises :class:`KernelImageError` (one sentence) for an
    image, initrd or command line that cannot be booted; nothing is written to ``memory`` then.
    """
    if decompress not in DECOMPRESS:
        raise ValueError(f"decompress must be one of {DECOMPRESS}, not {decompress!r}")
    fmt = fmt or detect_format(image)
    if fmt == "multiboot":
        return multiboot.load_multiboot(memory, image, kernel_name=name, append=append,
                                        modules=modules, memory_map=memory_map)
    if len(modules) > 1:
        raise KernelImageError(f"a Linux kernel takes one initrd, not {len(modules)}")
    initrd = modules[0].data if modules else None
    common = dict(append=append, initrd=initrd, memory_map=memory_map, rsdp=rsdp)
    if fmt == "bzimage":
        return linux.load_bzimage(memory, image, decompress=decompress, **common)
    if fmt == "pvh":
        return pvh.load_pvh(memory, image, **common)
    if fmt == "vmlinux":
        return linux.load_vmlinux(memory, image, **common)
    raise ValueError(f"unknown kernel format {fmt!r}")
