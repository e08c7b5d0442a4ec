"""Time from start to a booted disk's first output: ``hvvmm run disk.img`` vs QEMU on one image.

The disk's boot sector is the test MBR (tests/guests/mbr.S): SeaBIOS loads it from a virtio-blk
disk and it prints "MBR: hello" on COM1 as its first act. Each run is a fresh process, timed
from its spawn to that line on its stdout; hvvmm and QEMU runs alternate so both see the same
machine load, and the ratio of medians is the figure to report. Without qemu-system-x86_64 on
PATH (or named with --qemu) only hvvmm is timed, and the script says so.

hvvmm's modules are byte-compiled first, as ``pip install`` does: a checkout run under
PYTHONDONTWRITEBYTECODE=1 (or from a read-only tree) otherwise recompiles every module on every
start, some 0.2 s that an installed hvvmm never pays.

    python bench/disk_boot.py [--runs K] [--qemu PATH]
"""

from __future__ import annotations

import argparse
import compileall
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from common import qemu_comparison

ROOT = pathlib.Path(__file__).resolve().parent.parent
MBR_SOURCE = ROOT / "tests" / "guests" / "mbr.S"
FIRST_LINE = b"MBR: hello"


def make_disk(directory: pathlib.Path) -> pathlib.Path:
    from hvvmm.guestbuild import build_boot_sector

    sector = build_boot_sector(MBR_SOURCE, output_dir=directory).read_bytes()
    image = bytearray(1 << 20)
    image[:512] = sector
    image[512:523] = b"HVVMM-LBA-1"
    path = directory / "disk.img"
    path.write_bytes(image)
    return path


def time_to_line(command: list[str], timeout: float = 120.0) -> float:
    """Seconds from spawning ``command`` to FIRST_LINE on its stdout; the process is then
    stopped."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    seen = b""
    try:
        while FIRST_LINE not in seen:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else \
                proc.stdout.read(1)
            if not chunk:
                raise SystemExit(f"{command[0]} ended before printing {FIRST_LINE!r}: {seen!r}")
            seen += chunk
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"{command[0]}: no {FIRST_LINE!r} within {timeout:g} s")
        return time.perf_counter() - started
    finally:
        proc.kill()
        proc.wait()


def hvvmm_command(disk: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "hvvmm", "run", str(disk), "--timeout", "120"]


def qemu_command(qemu: str, disk: pathlib.Path) -> list[str]:
    return [qemu, "-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-drive", f"file={disk},format=raw,if=virtio"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"),
                        help="the QEMU binary (default: qemu-system-x86_64 on PATH)")
    args = parser.parse_args(argv)
    compileall.compile_dir(ROOT / "hvvmm", quiet=1)  # the bytecode an installed hvvmm has
    with tempfile.TemporaryDirectory(prefix="hvvmm-bench-") as tmp:
        directory = pathlib.Path(tmp)
        disk = make_disk(directory)
        qemu_disk = directory / "qemu-disk.img"
        shutil.copyfile(disk, qemu_disk)  # two images: the two VMMs never share a lock
        hvvmm_s, qemu_s = [], []
        for _ in range(args.runs):
            hvvmm_s.append(time_to_line(hvvmm_command(disk)))
            if args.qemu:
                qemu_s.append(time_to_line(qemu_command(args.qemu, qemu_disk)))
    return qemu_comparison("start to first MBR output", "{:.2f} s", hvvmm_s, qemu_s)


if __name__ == "__main__":
    main()
