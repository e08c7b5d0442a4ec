"""Reading the Hyper-V reference TSC page clock costs no exit; reading TIME_REF_COUNT costs one.

The guest (``bench/guests/tsc_page_reads.c``, built with the hvvmm guest runtime) enables the
reference TSC page, marks a phase with an OUT to port 0x5e0, reads the page clock N times, marks
the end, then does the same with N reads of HV_X64_MSR_TIME_REF_COUNT, and checks that both clocks
are monotonic and agree. The host counts the vCPU's exits between the marks with an exit observer
(only counting: nothing is timed through it) and prints, e.g.::

    20000 reads of the TSC page clock: 0 exits (...)
    20000 reads of HV_X64_MSR_TIME_REF_COUNT: 20000 exits (20000 x rdmsr 0x40000020) (...)

Interrupts are off in the guest; with KVM's in-kernel LAPIC an interrupt would not exit to user
space anyway, so 0 exits is the expectation for the page, not "0 besides timer ticks".

    python bench/tsc_page_exits.py [--reads N] [--msr-reads M]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import BENCH, BUILD, MARKER_PORT  # noqa: E402

GUEST_SOURCE = BENCH / "guests" / "tsc_page_reads.c"
PAGE_PHASE, MSR_PHASE = 1, 3  # the phase after the guest's OUT 1 / OUT 3


class PhaseCounter:
    """The marker device plus an exit observer: exits counted per phase, by kind."""

    def __init__(self):
        self.phase = 0
        self.times: dict[int, int] = {}
        self.exits: dict[int, Counter] = {}

    # -- the device at MARKER_PORT
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.times[value] = time.perf_counter_ns()
        self.phase = value

    # -- the exit observer (runs on the vCPU thread before the exit is handled)
    def observe(self, vcpu_index: int, exit) -> None:
        port = getattr(exit, "port", None)
        if port == MARKER_PORT:
            return  # the marks themselves
        if port is not None:
            kind = f"{'out' if exit.is_write else 'in'} {port:#x}"
        elif hasattr(exit, "index"):
            kind = f"{'wrmsr' if exit.is_write else 'rdmsr'} {exit.index:#x}"
        else:
            kind = exit.reason_name
        self.exits.setdefault(self.phase, Counter())[kind] += 1

    def count(self, phase: int) -> int:
        return sum(self.exits.get(phase, Counter()).values())

    def describe(self, phase: int) -> str:
        kinds = self.exits.get(phase)
        if not kinds:
            return ""
        return " (" + ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common()) + ")"

    def elapsed_ns(self, phase: int) -> int:
        return self.times[phase + 1] - self.times[phase]


def build() -> pathlib.Path:
    from hvvmm.guestbuild import build_guest

    return build_guest([GUEST_SOURCE], output_dir=BUILD)


def main(argv: list[str] | None = None) -> dict[str, int]:
    from hvvmm import ExitKind, Machine, MachineConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20000, help="page-clock reads")
    parser.add_argument("--msr-reads", type=int, default=None,
                        help="TIME_REF_COUNT reads (default: as many as --reads)")
    args = parser.parse_args(argv)
    msr_reads = args.reads if args.msr_reads is None else args.msr_reads
    counter = PhaseCounter()
    with Machine(MachineConfig(kernel=build(), memory=64 << 20,
                               append=f"reads={args.reads} msr_reads={msr_reads}")) as machine:
        machine.add_pio_device(MARKER_PORT, 1, counter, "bench-marker")
        machine.add_exit_observer(counter.observe)
        result = machine.run(timeout=120)
        console = machine.console_text
    if result.kind is not ExitKind.DEBUG_EXIT or result.code != 0 or len(counter.times) != 4:
        raise SystemExit(f"the guest failed: {result.kind} {result.message}\n{console}")
    page_exits, msr_exits = counter.count(PAGE_PHASE), counter.count(MSR_PHASE)
    page_ns, msr_ns = counter.elapsed_ns(PAGE_PHASE), counter.elapsed_ns(MSR_PHASE)
    print(f"{args.reads} reads of the TSC page clock: {page_exits} exits"
          f"{counter.describe(PAGE_PHASE)} ({page_ns / 1e6:.1f} ms, "
          f"{page_ns / max(args.reads, 1) / 1000:.2f} us per read)")
    print(f"{msr_reads} reads of HV_X64_MSR_TIME_REF_COUNT: {msr_exits} exits"
          f"{counter.describe(MSR_PHASE)} ({msr_ns / 1e6:.1f} ms, "
          f"{msr_ns / max(msr_reads, 1) / 1000:.2f} us per read)")
    for line in console.splitlines():
        if line.startswith(("scale", "PASS", "FAIL")):
            print(f"guest: {line}")
    return {"page_exits": page_exits, "msr_exits": msr_exits, "reads": args.reads,
            "msr_reads": msr_reads}


if __name__ == "__main__":
    main()
