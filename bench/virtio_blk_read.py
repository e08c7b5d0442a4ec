"""Sequential read throughput of virtio-blk from a guest: hvvmm vs QEMU with the same guest.

The guest is tests/guests/virtio_blk.c (its own minimal driver) with ``bench=ROUNDS``: it reads
the whole disk ROUNDS times in 64 KiB requests, 8 in flight, between two console lines
("INFO: bench start", "INFO: bench end: N bytes"). The host timestamps those lines as they
arrive, so the figure covers the I/O path only (not the boot). Runs alternate between hvvmm and
QEMU (when qemu-system-x86_64 is on PATH or named with --qemu); ratio of medians.

    python bench/virtio_blk_read.py [--size-mib M] [--rounds R] [--runs K] [--qemu PATH]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import tempfile
import time

from common import qemu_comparison

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUEST_SOURCE = ROOT / "tests" / "guests" / "virtio_blk.c"
START, END = b"INFO: bench start", b"INFO: bench end: "


def build_guest() -> pathlib.Path:
    from hvvmm.guestbuild import build_guest as build

    return build([GUEST_SOURCE])


def make_disk(path: pathlib.Path, size_mib: int) -> None:
    with open(path, "wb") as stream:
        stream.truncate(size_mib << 20)


class Timestamps:
    """A console stream noting when the bench lines arrive."""

    def __init__(self):
        self.buffer = b""
        self.start = self.end = None
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        now = time.perf_counter()
        if self.start is None and START in self.buffer:
            self.start = now
        if self.end is None and END in self.buffer and self.buffer.endswith(b"\n"):
            self.end = now
            self.bytes = int(self.buffer.split(END, 1)[1].split()[0])
        return len(data)

    def flush(self) -> None:
        pass

    def throughput(self) -> float:
        if self.start is None or self.end is None:
            raise SystemExit(f"the guest did not finish its reads: {self.buffer[-500:]!r}")
        return self.bytes / (self.end - self.start) / (1 << 20)


def run_hvvmm(guest: pathlib.Path, disk: pathlib.Path, sectors: int, rounds: int) -> float:
    from hvvmm import Machine, MachineConfig
    from hvvmm.devices.virtio_blk import DriveSpec

    stamps = Timestamps()
    with Machine(MachineConfig(kernel=str(guest), append=f"sectors={sectors} bench={rounds}",
                               drives=[DriveSpec(str(disk))], console=stamps,
                               memory=256 << 20)) as machine:
        machine.run(timeout=600)
    return stamps.throughput()


def run_qemu(qemu: str, guest: pathlib.Path, disk: pathlib.Path, sectors: int,
             rounds: int) -> float:
    stamps = Timestamps()
    proc = subprocess.Popen(
        [qemu, "-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none",
         "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(guest), "-append", f"sectors={sectors} bench={rounds}",
         "-drive", f"file={disk},format=raw,if=virtio"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        while True:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            stamps.write(chunk)
    finally:
        proc.kill()
        proc.wait()
    return stamps.throughput()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"))
    args = parser.parse_args(argv)
    guest = build_guest()
    sectors = (args.size_mib << 20) // 512
    with tempfile.TemporaryDirectory(prefix="hvvmm-bench-") as tmp:
        disk = pathlib.Path(tmp) / "disk.img"
        make_disk(disk, args.size_mib)
        qemu_disk = pathlib.Path(tmp) / "qemu-disk.img"
        make_disk(qemu_disk, args.size_mib)
        hvvmm_mib, qemu_mib = [], []
        for _ in range(args.runs):
            hvvmm_mib.append(run_hvvmm(guest, disk, sectors, args.rounds))
            if args.qemu:
                qemu_mib.append(run_qemu(args.qemu, guest, qemu_disk, sectors, args.rounds))
    return qemu_comparison("virtio-blk sequential read, 64 KiB x 8 in flight", "{:.0f} MiB/s", hvvmm_mib, qemu_mib)


if __name__ == "__main__":
    main()
