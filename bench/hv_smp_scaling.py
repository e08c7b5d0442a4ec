"""SMP scaling of the hypercall path: throughput of two vCPUs issuing hypercalls at once vs one.

The guest (``bench/guests/hv_smp.c``) first makes COUNT hypercalls (HvExtCallQueryCapabilities,
the call ``bench/hv_roundtrip.py`` times) on the BSP alone, before the APs are started; then every
vCPU passes a barrier and makes COUNT calls at once. Each phase is bracketed by OUTs to a marker
port, timed on the host; the figure is the calls per second of phase 2 (from the first vCPU's
start to the last one's end) over phase 1's. Ideal: the number of vCPUs. Every vCPU thread takes
the GIL for each exit, so the exits of two vCPUs are handled one at a time.

Where the time goes: each marker also notes the vCPU thread's user and system CPU time. Phase 1
gives ``f``, the GIL-held share of one round trip (the thread's user time, Python, over the wall
time; the rest is KVM_RUN with the GIL released), which caps SMP throughput at about ``1/f``
times one vCPU. Phase 2 gives the CPU cores the vCPU threads got together (their CPU time over
the wall time). The host's own ceiling comes from the C VMM of ``bench/hv_roundtrip.py``
(``bench/c/hv_loop.c``, no GIL): SMP separate processes running its hypercall loop at once vs
one alone, in the same run.

    python bench/hv_smp_scaling.py [--count N] [--runs K] [--smp N]
"""

from __future__ import annotations

import argparse
import pathlib
import resource
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


def schedstat() -> tuple[int, int]:
    """The calling thread's time on a CPU and time waiting runnable for one, in ns (Linux
    /proc/thread-self/schedstat); (0, 0) where the kernel does not offer it."""
    try:
        with open("/proc/thread-self/schedstat") as stat:
            running, waiting, _ = stat.read().split()
        return int(running), int(waiting)
    except (OSError, ValueError):
        return 0, 0


class Markers:
    """Host time, the calling vCPU thread's (user, system) CPU time and its schedstat at each
    marker."""

    def __init__(self):
        self.times: dict[int, int] = {}
        self.cpu: dict[int, tuple[float, float]] = {}
        self.sched: dict[int, tuple[int, int]] = {}
        self.lock = threading.Lock()

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        now = time.perf_counter_ns()
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        sched = schedstat()
        with self.lock:  # markers only: 2 + 2 x smp per run, never on the hypercall path
            self.times[value] = now
            self.cpu[value] = (usage.ru_utime, usage.ru_stime)
            self.sched[value] = sched


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
    t, cpu_time = markers.times, markers.cpu
    phase1 = (t[0x200] - t[0x100]) / 1e9
    one = count / phase1
    starts = [t[0x300 + cpu] for cpu in range(smp)]
    ends = [t[0x400 + cpu] for cpu in range(smp)]
    phase2 = (max(ends) - min(starts)) / 1e9
    together = smp * count / phase2
    gil_share = (cpu_time[0x200][0] - cpu_time[0x100][0]) / phase1
    cores1 = (sum(cpu_time[0x200]) - sum(cpu_time[0x100])) / phase1
    cores = sum(sum(cpu_time[0x400 + cpu]) - sum(cpu_time[0x300 + cpu])
                for cpu in range(smp)) / phase2
    # Phase 2, each vCPU thread from its start marker to its end marker: running, waiting
    # runnable for a host CPU, and the rest, blocked (a vCPU thread that loops on hypercalls
    # blocks only on the GIL), as shares of its wall time, summed over the vCPUs.
    split = [0.0, 0.0, 0.0]
    for cpu in range(smp):
        wall = t[0x400 + cpu] - t[0x300 + cpu]
        ran = markers.sched[0x400 + cpu][0] - markers.sched[0x300 + cpu][0]
        waited = markers.sched[0x400 + cpu][1] - markers.sched[0x300 + cpu][1]
        for i, part in enumerate((ran, waited, wall - ran - waited)):
            split[i] += part / wall / smp
    return one, together, gil_share, (cores1, cores), split


def c_scaling(smp: int, count: int) -> float:
    """Calls per second of SMP C VMM processes at once over one alone (bench/c/hv_loop.c)."""
    import subprocess
    import tempfile

    sys.path.insert(0, str(ROOT / "bench"))
    from common import LOAD_ADDRESS, build_c
    from hv_roundtrip import guest_image

    binary = build_c("hv_loop")
    image, entry = guest_image("hypercall", count)
    with tempfile.TemporaryDirectory() as tmp:
        kernel = pathlib.Path(tmp) / "hv-hypercall.elf"
        kernel.write_bytes(image)
        command = [str(binary), str(kernel), hex(LOAD_ADDRESS), hex(entry), "hypercall",
                   str(count)]
        alone = float(subprocess.run(command, check=True, capture_output=True, text=True,
                                     timeout=300).stdout)
        started = time.perf_counter_ns()
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                     for _ in range(smp)]
        for process in processes:
            process.communicate(timeout=300)
            if process.returncode:
                raise SystemExit(f"{binary} failed ({process.returncode})")
        elapsed = time.perf_counter_ns() - started
    # ns per call alone vs the whole group's calls over the wall time of the group
    return (smp * count / elapsed) / (1 / alone)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="calls per vCPU per phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument("--no-c", action="store_true", help="skip the C VMM's host ceiling")
    args = parser.parse_args(argv)
    kernel = build_guest([GUEST], output_dir=BUILD, extra_cflags=[f"-I{ROOT / 'tests/guests'}"])
    ones, togethers, ratios, shares, cores, cores1, c_ratios = [], [], [], [], [], [], []
    splits = []
    for _ in range(args.runs):  # alternating with the C ceiling, so both see the same load
        one, together, share, used, split = run_once(kernel, args.count, args.smp)
        splits.append(split)
        ones.append(one)
        togethers.append(together)
        ratios.append(together / one)
        shares.append(share)
        cores1.append(used[0])
        cores.append(used[1])
        if not args.no_c:
            c_ratios.append(c_scaling(args.smp, args.count * 4))
    ratio = statistics.median(ratios)
    share = statistics.median(shares)
    print(f"hypercalls/s: one vCPU {statistics.median(ones):,.0f}, {args.smp} vCPUs at once "
          f"{statistics.median(togethers):,.0f}; scaling {ratio:.2f}x (ideal {args.smp}x; "
          f"median of {args.runs} runs, each ratio from one run: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"GIL-held share of a round trip f = {share:.2f} (one vCPU: its thread's user CPU "
          f"over wall time), so the GIL allows about {1 / share:.1f}x; CPU cores the vCPU threads "
          f"got (their CPU time over wall time): one vCPU {statistics.median(cores1):.2f}, "
          f"{args.smp} at once {statistics.median(cores):.2f} together "
          f"(runs: {', '.join(f'{c:.2f}' for c in cores)})")
    running, waiting, blocked = (statistics.median(split[i] for split in splits)
                                 for i in range(3))
    print(f"phase 2, each vCPU thread's wall time: {running:.0%} running, {waiting:.0%} waiting "
          f"for a host CPU, {blocked:.0%} blocked (the GIL) (medians over runs, "
          "/proc/thread-self/schedstat)")
    if c_ratios:
        print(f"host ceiling: {args.smp} C VMM processes (no GIL) at once reach "
              f"{statistics.median(c_ratios):.2f}x one alone (runs: "
              f"{', '.join(f'{r:.2f}' for r in c_ratios)}); hvvmm's scaling is "
              f"{ratio / statistics.median(c_ratios):.2f} of that")
    return ratio


if __name__ == "__main__":
    main()
