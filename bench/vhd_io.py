"""4 KiB I/O through the VHD backend against the raw backend, on the same file system, in one run.

For each backend (raw; dynamic VHD; differencing VHD over a filled dynamic VHD), on a fresh image
each round: sequential 4 KiB writes over the whole disk (in a VHD, every block gets allocated:
the allocation path), sequential reads, random writes, random reads; each write phase ends with
a flush, inside the timing. Each workload runs on the three images back to back, in an order that
alternates between rounds; the figures are medians of the rounds, and each ratio is the VHD's
throughput over raw's (1.00 = as fast as raw).

    .venv/bin/python bench/vhd_io.py [--size MIB] [--runs N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hvvmm.block import SECTOR_SIZE, RawBackend  # noqa: E402
from hvvmm.block.vhd import VhdBackend, create_vhd  # noqa: E402

IO = 4096
SECTORS = IO // SECTOR_SIZE
WORKLOADS = ("sequential write", "sequential read", "random write", "random read")
BACKENDS = ("raw", "dynamic", "differencing")


def make(kind: str, directory: Path, size: int):
    path = directory / f"{kind}.img"
    if kind == "raw":
        with open(path, "wb") as stream:
            stream.truncate(size)
        return RawBackend(path)
    if kind == "dynamic":
        create_vhd(path, size, force_size=True)
        return VhdBackend(path)
    base = directory / "base.vhd"
    create_vhd(base, size, force_size=True)
    with VhdBackend(base) as disk:           # the parent holds data everywhere
        chunk = os.urandom(1 << 20)
        for sector in range(0, size // SECTOR_SIZE, len(chunk) // SECTOR_SIZE):
            disk.write(sector, chunk)
    create_vhd(path, parent=base)
    return VhdBackend(path)


def run_workload(disk, workload: str, order: list[int], data: bytes) -> float:
    """Seconds for one pass of ``workload`` over the disk (4 KiB requests in ``order``)."""
    start = time.perf_counter()
    if workload.endswith("write"):
        for i in order:
            disk.write(i * SECTORS, data)
        disk.flush()
    else:
        for i in order:
            disk.read(i * SECTORS, SECTORS)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="disk size in MiB (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--dir", help="where the images go (default: a temporary directory)")
    args = parser.parse_args(argv)
    size = args.size << 20
    results: dict[str, dict[str, list[float]]] = {kind: {w: [] for w in WORKLOADS}
                                                  for kind in BACKENDS}
    count = size // IO
    data = os.urandom(IO)
    for round_number in range(args.runs):
        # Fresh images each round; each workload runs on the three back to back, in an order
        # that alternates between rounds, so that a busy host skews all three alike.
        kinds = BACKENDS if round_number % 2 == 0 else BACKENDS[::-1]
        directory = Path(tempfile.mkdtemp(prefix="vhd-bench-", dir=args.dir))
        disks = {}
        try:
            for kind in BACKENDS:
                disks[kind] = make(kind, directory, size)
            shuffled = list(range(count))
            random.Random(round_number).shuffle(shuffled)
            for workload in WORKLOADS:
                order = shuffled if workload.startswith("random") else list(range(count))
                for kind in kinds:
                    results[kind][workload].append(run_workload(disks[kind], workload, order,
                                                                data))
        finally:
            for disk in disks.values():
                disk.close()
            shutil.rmtree(directory)
    where = args.dir or tempfile.gettempdir()
    print(f"4 KiB I/O on a {args.size} MiB disk in {where}, medians of {args.runs} rounds "
          "(MiB/s; ratio = VHD / raw)")
    print(f"{'workload':<18}{'raw':>9}{'dynamic':>10}{'ratio':>8}{'differencing':>14}{'ratio':>8}")
    ratios: dict[str, dict[str, float]] = {"dynamic": {}, "differencing": {}}
    for workload in WORKLOADS:
        speed = {kind: args.size / statistics.median(results[kind][workload])
                 for kind in BACKENDS}
        for kind in ("dynamic", "differencing"):
            ratios[kind][workload] = speed[kind] / speed["raw"]
        print(f"{workload:<18}{speed['raw']:>9.1f}{speed['dynamic']:>10.1f}"
              f"{ratios['dynamic'][workload]:>7.2f}x{speed['differencing']:>14.1f}"
              f"{ratios['differencing'][workload]:>7.2f}x")
    return ratios


if __name__ == "__main__":
    main()
