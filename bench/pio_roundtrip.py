"""Round trip of one port-I/O exit through hvvmm's run loop vs. a minimal C KVM program.

Both run byte-identical 32-bit guest code (a loop of ``out dx, al`` to port 0x5e0) in a VM set up
the same way (in-kernel irqchip and PIT), and time from the first to the last loop exit. The runs
alternate so both see the same machine load; the ratio of medians is the figure to report.

    python bench/pio_roundtrip.py [--exits N] [--runs K]
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (LOAD_ADDRESS, aout_kernel, build_c, out_loop_code, summarize,  # noqa: E402
                    thread_user_ns)

LOOP_PORT = 0x5E0


class TimedSink:
    """The "device": counts writes and notes the time of the first and the last."""

    def __init__(self, exits: int):
        self.exits = exits
        self.seen = 0
        self.first = self.last = 0
        self.first_user = self.last_user = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen += 1
        if self.seen == 1:
            self.first = time.perf_counter_ns()
            self.first_user = thread_user_ns()
        elif self.seen == self.exits:
            self.last = time.perf_counter_ns()
            self.last_user = thread_user_ns()


def run_hvvmm(kernel: pathlib.Path, exits: int) -> tuple[float, float]:
    from hvvmm import ExitKind, Machine, MachineConfig

    sink = TimedSink(exits)
    with Machine(MachineConfig(kernel=kernel, memory=16 << 20)) as machine:
        machine.add_pio_device(LOOP_PORT, 1, sink, "bench-sink")
        result = machine.run(timeout=120)
    if result.kind is not ExitKind.DEBUG_EXIT or sink.seen != exits:
        raise SystemExit(f"hvvmm run failed: {result.message} ({sink.seen} exits)")
    return ((sink.last - sink.first) / (exits - 1),
            (sink.last_user - sink.first_user) / (exits - 1))


def run_c(binary: pathlib.Path, code: pathlib.Path, entry: int, exits: int) -> float:
    out = subprocess.run([str(binary), str(code), hex(LOAD_ADDRESS), hex(entry), str(exits)],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    image, entry = aout_kernel(out_loop_code(LOOP_PORT, args.exits))
    binary = build_c("pio_loop")
    with tempfile.TemporaryDirectory() as tmp:
        kernel = pathlib.Path(tmp) / "pio-loop.elf"
        kernel.write_bytes(image)
        code = pathlib.Path(tmp) / "pio-loop.bin"
        code.write_bytes(image)  # the C side loads the whole image at LOAD_ADDRESS
        run_hvvmm(kernel, args.exits)  # warm-up: imports, first VM
        hvvmm_ns, c_ns, user_ns = [], [], []
        for _ in range(args.runs):
            c_ns.append(run_c(binary, code, entry, args.exits))
            wall, user = run_hvvmm(kernel, args.exits)
            hvvmm_ns.append(wall)
            user_ns.append(user)
    summarize("PIO exit", hvvmm_ns, c_ns, user_ns)


if __name__ == "__main__":
    main()
