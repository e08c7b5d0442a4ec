"""Round trip of a Hyper-V hypercall and of a synthetic-MSR read through hvvmm vs. a minimal C VMM.

Both sides run byte-identical 32-bit guest code (Multiboot entry state: flat protected mode, no
paging) that writes HV_X64_MSR_GUEST_OS_ID, enables the hypercall page, marks the start with an
OUT to port 0x5e0, then loops COUNT times over

* ``hypercall``: EDX:EAX = 0x8001 (HvExtCallQueryCapabilities: a simple call, no input, 8 bytes
  of output to an 8-byte-aligned GPA; it goes through every step of the memory-based convention,
  table lookup, checks, handler, output write, result, and is what Windows and Linux issue at
  boot), EBX:ECX = 0, EDI:ESI = output GPA, ``call`` the hypercall page (``endbr64; out 0x56,
  al; ret``); or
* ``msr``: ``rdmsr`` of HV_X64_MSR_VP_INDEX (0x40000002), a value that cannot change while the
  VM exists, which hvvmm answers in its C run loop after the first read (counted there); or
* ``msr-generic``: ``rdmsr`` of HV_X64_MSR_GUEST_OS_ID (0x40000000, XORed with the value
  written), which can change, so every read goes through Python's MSR path,

ORs every result into a scratch word, marks the end with an OUT of that word to port 0x5e0 and
leaves through isa-debug-exit. The C baseline (``bench/c/hv_loop.c``) does the KVM work hvvmm does
per exit: the same MSR filter (every synthetic range denied, KVM_MSR_EXIT_REASON_FILTER), sync
regs (REGS|SREGS) read from ``kvm_run`` at a hypercall exit, the mode/CPL checks, the control
decode and validation, the 8-byte output written into guest RAM, the result in EDX:EAX and the
regs marked dirty. Each side times the two marker exits; figures are per round trip. The runs
alternate (hvvmm, C, hvvmm, ...) so both see the same machine load; the ratio of medians is the
figure to report.

    python bench/hv_roundtrip.py [--count N] [--runs K] [--only hypercall|msr|msr-generic]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (HEADER_SIZE, LOAD_ADDRESS, MARKER_PORT, MarkerSink,  # noqa: E402
                    aout_kernel, assemble32, build_c, run_c_baseline, summarize)

STACK_TOP = 0x9_0000
HYPERCALL_GPA = 0x20_0000
OUTPUT_GPA = 0x30_0000
SCRATCH_GPA = 0x30_0800          # the guest ORs every status / MSR value in here
HV_X64_MSR_GUEST_OS_ID = 0x4000_0000
HV_X64_MSR_HYPERCALL = 0x4000_0001
HV_X64_MSR_VP_INDEX = 0x4000_0002
CONTROL = 0x8001                 # HvExtCallQueryCapabilities, simple, not fast
GUEST_OS_ID = 0x8100_0601_0000_0000  # what Linux 6.1.0 writes (vendor 0x8100)
MEMORY = 16 << 20
MODES = ("hypercall", "msr", "msr-generic")
LABELS = {"hypercall": "hypercall (HvExtCallQueryCapabilities)",
          "msr": "synthetic MSR read (VP_INDEX)",
          "msr-generic": "synthetic MSR read through the general path (GUEST_OS_ID)"}

LOOP_BODIES = {
    "hypercall": f"""
    mov ${CONTROL:#x}, %eax
    xor %edx, %edx
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edi, %edi
    mov ${OUTPUT_GPA:#x}, %esi
    call {HYPERCALL_GPA:#x}
    or %eax, {SCRATCH_GPA:#x}
    or %edx, {SCRATCH_GPA:#x}
""",
    "msr": f"""
    mov ${HV_X64_MSR_VP_INDEX:#x}, %ecx
    rdmsr
    or %eax, {SCRATCH_GPA:#x}
    or %edx, {SCRATCH_GPA:#x}
""",
    "msr-generic": f"""
    mov ${HV_X64_MSR_GUEST_OS_ID:#x}, %ecx
    rdmsr
    xor ${GUEST_OS_ID & 0xFFFFFFFF:#x}, %eax
    xor ${GUEST_OS_ID >> 32:#x}, %edx
    or %eax, {SCRATCH_GPA:#x}
    or %edx, {SCRATCH_GPA:#x}
""",
}


def guest_source(mode: str, count: int) -> str:
    return f"""
    .code32
    .globl _start
_start:
    mov ${STACK_TOP:#x}, %esp
    mov ${HV_X64_MSR_GUEST_OS_ID:#x}, %ecx
    mov ${GUEST_OS_ID & 0xFFFFFFFF:#x}, %eax
    mov ${GUEST_OS_ID >> 32:#x}, %edx
    wrmsr
    mov ${HV_X64_MSR_HYPERCALL:#x}, %ecx
    mov ${HYPERCALL_GPA | 1:#x}, %eax
    xor %edx, %edx
    wrmsr
    movl $0, {SCRATCH_GPA:#x}
    mov ${MARKER_PORT:#x}, %dx
    out %al, %dx
    mov ${count}, %ebp
1:
{LOOP_BODIES[mode]}
    dec %ebp
    jnz 1b
    mov ${MARKER_PORT:#x}, %dx
    mov {SCRATCH_GPA:#x}, %eax
    out %eax, %dx
    mov $0xf4, %dx
    xor %eax, %eax
    out %eax, %dx
2:  hlt
    jmp 2b
"""


def guest_image(mode: str, count: int) -> tuple[bytes, int]:
    code = assemble32(guest_source(mode, count), LOAD_ADDRESS + HEADER_SIZE, f"hv-{mode}")
    return aout_kernel(code)


def run_hvvmm(kernel: pathlib.Path, mode: str, count: int) -> tuple[float, float]:
    from hvvmm import ExitKind, Machine, MachineConfig

    sink = MarkerSink()
    with Machine(MachineConfig(kernel=kernel, memory=MEMORY)) as machine:
        machine.add_pio_device(MARKER_PORT, 4, sink, "bench-marker")
        result = machine.run(timeout=120)
        vp0 = machine.hyperv.counters()["vp0"]
        output = machine.memory.read(OUTPUT_GPA, 8)
    if result.kind is not ExitKind.DEBUG_EXIT or len(sink.times) != 2:
        raise SystemExit(f"hvvmm {mode} run failed: {result.kind} {result.message} "
                         f"({len(sink.times)} markers)")
    if sink.values[1] != 0:
        raise SystemExit(f"hvvmm {mode}: the guest saw non-zero results (OR {sink.values[1]:#x})")
    if mode == "hypercall":
        done = vp0["hypercalls"].get("HvExtCallQueryCapabilities/HV_STATUS_SUCCESS", 0)
        if int.from_bytes(output, "little") != 1:  # bit 0: GetBootZeroedMemory
            raise SystemExit(f"hvvmm hypercall: output {bytes(output).hex()}")
    else:
        msr = "HV_X64_MSR_VP_INDEX" if mode == "msr" else "HV_X64_MSR_GUEST_OS_ID"
        done = vp0["msr_reads"].get(msr, 0)
    if done != count:
        raise SystemExit(f"hvvmm {mode}: {done} successful accesses, expected {count}: {vp0}")
    return (sink.times[1] - sink.times[0]) / count, (sink.user[1] - sink.user[0]) / count


def run_c(binary: pathlib.Path, image: pathlib.Path, entry: int, mode: str, count: int) -> float:
    return float(run_c_baseline(binary, image, hex(LOAD_ADDRESS), hex(entry), mode, count))


def measure(mode: str, count: int, runs: int, binary: pathlib.Path,
            tmp: pathlib.Path) -> tuple[list[float], list[float], list[float]]:
    image, entry = guest_image(mode, count)
    kernel = tmp / f"hv-{mode}.elf"
    kernel.write_bytes(image)  # the C side loads the same whole image at LOAD_ADDRESS
    run_hvvmm(kernel, mode, count)  # warm-up: imports, first VM, page cache
    run_c(binary, kernel, entry, mode, count)
    hvvmm_ns, c_ns, user_ns = [], [], []
    for _ in range(runs):
        wall, user = run_hvvmm(kernel, mode, count)
        hvvmm_ns.append(wall)
        user_ns.append(user)
        c_ns.append(run_c(binary, kernel, entry, mode, count))
    return hvvmm_ns, c_ns, user_ns


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="round trips per run")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per side")
    parser.add_argument("--only", choices=MODES, help="measure one of the two")
    args = parser.parse_args(argv)
    binary = build_c("hv_loop")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (args.only,) if args.only else MODES:
            hvvmm_ns, c_ns, user_ns = measure(mode, args.count, args.runs, binary,
                                              pathlib.Path(tmp))
            ratios[mode] = summarize(LABELS[mode], hvvmm_ns, c_ns, user_ns)
    return ratios


if __name__ == "__main__":
    main()
