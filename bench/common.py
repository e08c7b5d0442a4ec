"""Helpers shared by the benchmarks: build the C baselines, make tiny Multiboot kernels, stats."""

from __future__ import annotations

import hashlib
import pathlib
import resource
import shutil
import statistics
import struct
import subprocess
import time

BENCH = pathlib.Path(__file__).resolve().parent
BUILD = BENCH / ".build"

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_AOUT_KLUDGE = 1 << 16
LOAD_ADDRESS = 0x100000
HEADER_SIZE = 32


def build_c(name: str) -> pathlib.Path:
    """Compile bench/c/NAME.c with -O2 (cached by the hash of it and the shared headers)."""
    source = BENCH / "c" / f"{name}.c"
    inputs = [source, *sorted((BENCH / "c").glob("*.h"))]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in inputs)).hexdigest()[:12]
    binary = BUILD / f"{name}-{digest}"
    if not binary.exists():
        BUILD.mkdir(exist_ok=True)
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise SystemExit("the benchmarks need gcc to build their C baselines")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def aout_kernel(code: bytes) -> tuple[bytes, int]:
    """A Multiboot kernel (a.out kludge) whose 32-bit ``code`` starts right after the header.

    Returns the image and the entry address. The same bytes can be loaded raw at
    ``LOAD_ADDRESS`` by a C baseline, so both sides run identical guest code."""
    flags = MULTIBOOT_AOUT_KLUDGE
    entry = LOAD_ADDRESS + HEADER_SIZE
    header = struct.pack("<8I", MULTIBOOT_MAGIC, flags, (-(MULTIBOOT_MAGIC + flags)) & 0xFFFFFFFF,
                         LOAD_ADDRESS, LOAD_ADDRESS, 0, 0, entry)
    return header + code, entry


def out_loop_code(port: int, count: int, *, instruction: bytes = b"\xee") -> bytes:
    """32-bit code: DX=port; ECX=count; loop { INSTRUCTION; dec ecx; jnz } ; exit via 0xf4."""
    loop = instruction + b"\x49" + b"\x75" + bytes([(-(len(instruction) + 3)) & 0xFF])
    return (b"\x66\xba" + struct.pack("<H", port)          # mov dx, port
            + b"\xb9" + struct.pack("<I", count)           # mov ecx, count
            + loop
            + b"\x66\xba\xf4\x00"                          # mov dx, 0xf4
            + b"\x31\xc0\xef"                              # xor eax, eax; out dx, eax
            + b"\xf4\xeb\xfd")                             # hlt; jmp $-1


def summarize(name: str, hvvmm_ns: list[float], c_ns: list[float],
              hvvmm_user_ns: list[float] | None = None) -> float:
    """Print the figures of one comparison; returns the ratio of the medians. Two steadier
    views are printed beside it, because load on a shared machine swings both sides by tens
    of percent between runs: the median of the per-pair ratios (run i of each side ran back to
    back, under about the same load) and the ratio of the fastest runs (load only ever slows
    a run down)."""
    h, c = statistics.median(hvvmm_ns), statistics.median(c_ns)
    ratio = h / c
    user = (f" (its vCPU thread's user CPU {statistics.median(hvvmm_user_ns) / 1000:.2f} us)"
            if hvvmm_user_ns else "")
    paired = statistics.median(a / b for a, b in zip(hvvmm_ns, c_ns))
    fastest = min(hvvmm_ns) / min(c_ns)
    print(f"{name}: hvvmm {h / 1000:.2f} us{user}, C {c / 1000:.2f} us per round trip "
          f"(medians of {len(hvvmm_ns)} alternating runs; median of paired ratios "
          f"{paired:.2f}x; fastest runs hvvmm {min(hvvmm_ns) / 1000:.2f} us, "
          f"C {min(c_ns) / 1000:.2f} us, {fastest:.2f}x); ratio {ratio:.2f}x")
    return ratio


def qemu_comparison(what: str, figure: str, hvvmm: list[float], qemu: list[float]) -> dict:
    """Print one line comparing the medians of alternating hvvmm and QEMU runs and return the
    figures; ``figure`` formats one value with its unit, e.g. ``"{:.2f} s"``. Without QEMU runs
    the line says that no comparison was made."""
    figures = {"hvvmm": statistics.median(hvvmm)}
    line = f"{what}: hvvmm {figure.format(figures['hvvmm'])} (median of {len(hvvmm)})"
    if qemu:
        figures["qemu"] = statistics.median(qemu)
        figures["ratio"] = figures["hvvmm"] / figures["qemu"]
        line += f", QEMU {figure.format(figures['qemu'])}; ratio {figures['ratio']:.2f}x"
    else:
        line += "; QEMU not found (qemu-system-x86_64 not on PATH), no comparison"
    print(line)
    return figures


# -- additions for the Hyper-V benchmarks (bench/hv_roundtrip.py, bench/tsc_page_exits.py) ------

MARKER_PORT = 0x5E0  # the guest marks the start and the end of a timed loop with an OUT here


def assemble32(source: str, address: int, name: str = "guest") -> bytes:
    """Assemble 32-bit GNU as ``source`` and link it to run at ``address``; returns the raw bytes
    (cached by source hash). Used for guest code that runs byte-identical in hvvmm (after an
    :func:`aout_kernel` header) and in a C baseline."""
    digest = hashlib.sha256(f"{address:#x}\n{source}".encode()).hexdigest()[:12]
    binary = BUILD / f"{name}-{digest}.bin"
    if not binary.exists():
        BUILD.mkdir(exist_ok=True)
        for tool in ("as", "ld"):
            if shutil.which(tool) is None:
                raise SystemExit(f"the benchmarks need binutils ({tool}) to assemble guest code")
        asm = BUILD / f"{name}-{digest}.S"
        obj = BUILD / f"{name}-{digest}.o"
        asm.write_text(source)
        subprocess.run(["as", "--32", "-o", str(obj), str(asm)], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "-N", "-e", "_start", "-Ttext", hex(address),
                        "--oformat", "binary", "-o", str(binary), str(obj)], check=True)
    return binary.read_bytes()


def thread_user_ns() -> int:
    """User-mode CPU time of the calling thread (Linux ``RUSAGE_THREAD``), in ns. On a vCPU
    thread this is the VMM's own per-exit work (Python): the time inside ``KVM_RUN`` is system
    time. Less disturbed by other load than wall time, which makes it the steadier figure for
    comparing two versions of the exit path on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return round(usage.ru_utime * 1e9)


class MarkerSink:
    """A port-I/O device for :data:`MARKER_PORT`: notes the host time, the vCPU thread's user CPU
    time and the value of every write. ``times[i]`` / ``user[i]`` / ``values[i]`` belong to the
    guest's i-th marker."""

    def __init__(self):
        self.times: list[int] = []
        self.user: list[int] = []
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.times.append(time.perf_counter_ns())
        self.user.append(thread_user_ns())
        self.values.append(value)


def run_c_baseline(binary: pathlib.Path, *args) -> str:
    """Run a C baseline with ``args`` (stringified); its stdout, stripped."""
    return subprocess.run([str(binary), *map(str, args)], check=True, capture_output=True,
                          text=True, timeout=300).stdout.strip()
