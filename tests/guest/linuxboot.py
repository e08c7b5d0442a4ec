"""Builds the Linux-loader test kernels of tests/guests/linuxboot with gcc, ld and objcopy.

* ``pvh``: an ELF32 kernel with a PVH note (32-bit entry, EBX = hvm_start_info);
* ``bzimage``: a bzImage (setup header from header.S, protocol 2.15, XLF_KERNEL_64 unless told
  otherwise) whose protected-mode part has a 32-bit protocol entry at +0, ``startup_64`` at
  +0x200, and a payload given by the caller (a compressed ELF kernel, to test the host-side
  unpacking, or bytes of no known format);
* ``vmlinux``: that protected-mode part as an ELF64 (entry startup_64, no PVH note).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCES = Path(__file__).resolve().parent.parent / "guests" / "linuxboot"
CFLAGS = ["-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone", "-mgeneral-regs-only",
          "-fno-stack-protector", "-fcf-protection=none", "-fno-builtin",
          "-fno-asynchronous-unwind-tables", "-Wall", "-Werror"]


def _run(*argv) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def build_pvh(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _run("gcc", "-m32", *CFLAGS, "-DPVH", "-c", SOURCES / "check.c", "-o", out / "pvh_check.o")
    _run("gcc", "-m32", "-c", SOURCES / "pvh.S", "-o", out / "pvh_entry.o")
    _run("ld", "-m", "elf_i386", "-nostdlib", "-static", "-z", "max-page-size=0x1000",
         "-T", SOURCES / "pvh.ld", out / "pvh_entry.o", out / "pvh_check.o", "-o", out / "pvh.elf")
    return out / "pvh.elf"


def _symbols(elf: Path) -> dict[str, int]:
    return {parts[2]: int(parts[0], 16) for parts in
            (line.split() for line in _run("nm", elf).splitlines()) if len(parts) == 3}


def build_bzimage(out: Path, payload: bytes, *, name: str = "bzImage", protocol: int = 0x020F,
                  initrd_addr_max: int = 0x7FFF_FFFF, cmdline_size: int = 2047,
                  xloadflags: int = 1) -> tuple[Path, Path]:
    """The bzImage and its protected-mode part's ELF64 (the "vmlinux")."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.payload").write_bytes(payload)
    _run("gcc", "-m64", *CFLAGS, "-c", SOURCES / "check.c", "-o", out / "bz_check.o")
    _run("gcc", "-m64", f'-DPAYLOAD="{out / (name + ".payload")}"', "-c", SOURCES / "pm.S",
         "-o", out / f"{name}_pm.o")
    elf = out / f"{name}.vmlinux"
    _run("ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-z", "max-page-size=0x1000",
         "-T", SOURCES / "pm.ld", out / f"{name}_pm.o", out / "bz_check.o", "-o", elf)
    _run("objcopy", "-O", "binary", elf, out / f"{name}.pm")
    pm = (out / f"{name}.pm").read_bytes()
    symbols = _symbols(elf)
    defines = {"SYSSIZE": -(-len(pm) // 16), "PROTOCOL": protocol,
               "INITRD_ADDR_MAX": initrd_addr_max, "CMDLINE_SIZE": cmdline_size,
               "XLOADFLAGS": xloadflags,
               "PAYLOAD_OFFSET": symbols["payload_start"] - 0x100000,
               "PAYLOAD_LENGTH": symbols["payload_end"] - symbols["payload_start"],
               "INIT_SIZE": symbols["_end"] - 0x100000}
    _run("gcc", "-m64", *(f"-D{key}={value:#x}" for key, value in defines.items()), "-c",
         SOURCES / "header.S", "-o", out / f"{name}_header.o")
    _run("objcopy", "-O", "binary", "-j", ".text", out / f"{name}_header.o",
         out / f"{name}.setup")
    setup = (out / f"{name}.setup").read_bytes()
    assert len(setup) == 1024, len(setup)
    image = out / name
    image.write_bytes(setup + pm + bytes(-len(pm) % 16))
    return image, elf
