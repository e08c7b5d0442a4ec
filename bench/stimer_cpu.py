"""Host CPU time a guest can make hvvmm spend with synthetic timers (hv-stimer).

A guest (``bench/guests/stimer_storm.c``) arms STIMER0-3 as periodic timers with COUNT 1..15
(100 ns - 1.5 us), randomly lazy, two in direct and two in message mode, interrupts masked, and also
rewrites STIMER3 as a one-shot already due every 64 rounds of its work loop; then it does a
fixed amount of work (spins and OUT exits). The ``quiet`` run makes the same MSR writes and
exits with every timer disabled. The figure is hvvmm's CPU time (user + system, every thread of
this process: ``resource.getrusage``) and wall time for the same guest work, storm / quiet,
with the timers' expiry counters. Runs alternate; medians are printed.

    python bench/stimer_cpu.py [--runs N] [--work N] [--seed S]
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvvmm import ExitKind, Machine, MachineConfig  # noqa: E402
from hvvmm.enlightenments import stimer as S  # noqa: E402
from hvvmm.guestbuild import build_guest  # noqa: E402

GUEST = ROOT / "bench" / "guests" / "stimer_storm.c"
BUILD = ROOT / "bench" / ".build"
WORK_PORT = 0x5ED
SPEC = "hv-vpindex,hv-time,hv-synic,hv-stimer,hv-stimer-direct"


class WorkPort:
    def __init__(self):
        self.count = 0

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.count += 1


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def run_once(kernel, mode: str, work: int, seed: int) -> dict:
    port = WorkPort()
    append = f"{mode} seed={seed} work={work}"
    with Machine(MachineConfig(kernel=kernel, append=append, hyperv=SPEC,
                               timeout=300)) as machine:
        machine.add_pio_device(WORK_PORT, 4, port, "storm-work")
        state = machine.hyperv.partition.state[S.NAME]
        (user0, sys0), wall0 = cpu_seconds(), time.perf_counter()
        result = machine.run(timeout=300)
        (user1, sys1), wall = cpu_seconds(), time.perf_counter() - wall0
        counters = state.counters()
    if result.kind is not ExitKind.DEBUG_EXIT or result.code != 0 or port.count != work:
        raise SystemExit(f"{mode}: the guest failed: {result} ({port.count} work exits)\n"
                         f"{machine.console_text}")
    expired = sum(t["expired"] for vp in counters.values() for t in vp.values())
    return {"user": user1 - user0, "sys": sys1 - sys0, "wall": wall, "expired": expired,
            "counters": counters}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    kernel = build_guest([GUEST], output_dir=BUILD, extra_cflags=[f"-I{ROOT / 'tests/guests'}"])
    runs: dict[str, list[dict]] = {"quiet": [], "storm": []}
    for _ in range(args.runs):
        for mode in ("quiet", "storm"):
            runs[mode].append(run_once(kernel, mode, args.work, args.seed))
    keys = ("user", "sys", "wall", "expired")
    med = {mode: {key: statistics.median(r[key] for r in rs) for key in keys}
           for mode, rs in runs.items()}
    for mode in ("quiet", "storm"):
        m = med[mode]
        print(f"{mode}: user CPU {m['user']:.2f} s, system CPU {m['sys']:.2f} s, wall "
              f"{m['wall']:.2f} s, {m['expired']:.0f} timer expiries "
              f"({m['expired'] / m['wall']:.0f}/s) for {args.work} work exits "
              f"(medians of {args.runs})")
    ratio = {key: med["storm"][key] / max(med["quiet"][key], 1e-9) for key in keys[:3]}
    print(f"storm / quiet: user CPU {ratio['user']:.2f}x, system CPU {ratio['sys']:.2f}x, "
          f"wall {ratio['wall']:.2f}x")
    print(f"last storm counters: {runs['storm'][-1]['counters']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
