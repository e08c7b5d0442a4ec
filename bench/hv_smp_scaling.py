"""SMP scaling of the hypercall path: throughput of two vCPUs issuing hypercalls at once vs one.

The guest (``bench/guests/hv_smp.c``) first makes COUNT hypercalls (HvExtCallQueryCapabilities,
the call ``bench/hv_roundtrip.py`` times) on the BSP alone, before the APs are started; then every
vCPU passes a barrier and makes COUNT calls at once. Each phase is bracketed by OUTs to a marker
port, timed on the host; the figure is the calls per second of phase 2 (from the first vCPU's
start to the last one's end) over phase 1's. Ideal: the number of vCPUs. Every vCPU thread takes
the GIL for each exit, so the exits of two vCPUs are handled one at a time.

    python bench/hv_smp_scaling.py [--count N] [--runs K] [--smp N]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvvmm import ExitKind, Machine, MachineConfig  # noqa: E402
from hvvmm.guestbuild import build_guest  # noqa: E402

GUEST = ROOT / "bench" / "guests" / "hv_smp.c"
BUILD = ROOT / "bench" / ".build"
MARKER_PORT = 0x5E0


class Markers:
    def __init__(self):
        self.times: dict[int, int] = {}
        self.lock = threading.Lock()

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        now = time.perf_counter_ns()
        with self.lock:
            self.times[value] = now


def run_once(kernel, count: int, smp: int) -> tuple[float, float]:
    markers = Markers()
    with Machine(MachineConfig(kernel=kernel, append=f"count={count}", smp=smp,
                               timeout=300)) as machine:
        machine.add_pio_device(MARKER_PORT, 4, markers, "smp-bench")
        result = machine.run(timeout=300)
        counters = machine.hyperv.counters()
    if result.kind is not ExitKind.DEBUG_EXIT or result.code != 0:
        raise SystemExit(f"the guest failed: {result}\n{machine.console_text}")
    done = sum(vp["hypercalls"].get("HvExtCallQueryCapabilities/HV_STATUS_SUCCESS", 0)
               for vp in counters.values())
    if done != count * (smp + 1):
        raise SystemExit(f"{done} successful calls, expected {count * (smp + 1)}")
    t = markers.times
    one = count / ((t[0x200] - t[0x100]) / 1e9)
    starts = [t[0x300 + cpu] for cpu in range(smp)]
    ends = [t[0x400 + cpu] for cpu in range(smp)]
    together = smp * count / ((max(ends) - min(starts)) / 1e9)
    return one, together


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="calls per vCPU per phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smp", type=int, default=2)
    args = parser.parse_args(argv)
    kernel = build_guest([GUEST], output_dir=BUILD, extra_cflags=[f"-I{ROOT / 'tests/guests'}"])
    ones, togethers, ratios = [], [], []
    for _ in range(args.runs):
        one, together = run_once(kernel, args.count, args.smp)
        ones.append(one)
        togethers.append(together)
        ratios.append(together / one)
    ratio = statistics.median(ratios)
    print(f"hypercalls/s: one vCPU {statistics.median(ones):,.0f}, {args.smp} vCPUs at once "
          f"{statistics.median(togethers):,.0f}; scaling {ratio:.2f}x (ideal {args.smp}x; "
          f"median of {args.runs} runs, each ratio from one run: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    return ratio


if __name__ == "__main__":
    main()
