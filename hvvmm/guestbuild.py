"""Build small freestanding x86-64 guests with the hvvmm guest runtime.

The runtime (``hvvmm/guestlib``: Multiboot entry, long mode, console,
exceptions, LAPIC, SMP, test reporting; see ``guest.h``) is compiled together
with the given C/assembly sources using the system ``gcc``, ``ld`` and
``objcopy`` into a Multiboot v1 ELF32 image (64-bit code linked at 1 MiB).

Images are cached by a hash of every input file, the flags and the tool
versions, so rebuilding an unchanged guest is a few file reads.  Every image
is checked with ``objdump`` for instructions that must not appear in guests
(they hang or stop some KVM implementations): vmcall/vmmcall and other
virtualization instructions, ``int n``/``int3``/``int1``/``into``,
``cmpxchg16b`` and the xsave family.

The compiler is ``gcc`` from PATH (``$HVVMM_GUEST_CC`` overrides it; it must
accept gcc's flags); ``ld``, ``objcopy`` and ``objdump`` come from PATH.

Command line (used by setup.py to build the default guest)::

    python -m hvvmm.guestbuild OUT.elf SOURCE... [--cflag=FLAG ...]
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "GuestBuildError",
    "build_guest",
    "build_guest_source",
    "example_guest",
    "example_guests",
    "runtime_dir",
    "default_guest_path",
    "check_forbidden_instructions",
    "find_multiboot_header",
    "cache_dir",
]

# Bump when the build recipe changes in a way the hashed inputs don't show.
_RECIPE_VERSION = "1"

RUNTIME_SOURCES = ("entry.S", "trampoline.S", "runtime.c")
LINKER_SCRIPT = "guest.ld"
DEFAULT_GUEST_SOURCE = "default_guest.c"

CFLAGS = (
    "-m64",
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",          # no SSE/x87 from the compiler
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",   # no memset/memcpy calls in memset/memcpy
    "-fno-asynchronous-unwind-tables",
    "-fno-common",
    "-Wall",
)
LDFLAGS = ("-m", "elf_x86_64", "-nostdlib", "-static", "-z", "max-page-size=0x1000")

MULTIBOOT_MAGIC = 0x1BADB002

# Mnemonics refused in guest images (objdump spelling).
_FORBIDDEN = re.compile(
    r"^(vmcall|vmmcall|vmlaunch|vmresume|vmrun|vmgexit|vmfunc|"
    r"int|int1|int3|icebp|into|"
    r"cmpxchg16b|xgetbv|xsetbv|xsave\w*|xrstor\w*)$"
)
# objdump -M mode for sections that do not hold 64-bit code.
_SECTION_MODES = {".boot32": "i386", ".trampoline": "i8086"}


class GuestBuildError(Exception):
    """A guest image could not be built (the message includes compiler output)."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


def runtime_dir() -> Path:
    """Directory holding the runtime sources (guest.h, entry.S, ...)."""
    return Path(__file__).resolve().parent / "guestlib"


def cache_dir() -> Path:
    """Default cache: $XDG_CACHE_HOME/hvvmm/guests or ~/.cache/hvvmm/guests."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvvmm" / "guests"


def example_guests() -> list[str]:
    """Names of the example guests shipped in ``hvvmm/guestlib/examples`` (``device_echo``...)."""
    return sorted(p.stem for p in (runtime_dir() / "examples").glob("*.[cS]"))


def example_guest(name: str, *, output_dir: Path | str | None = None) -> Path:
    """Build (once; cached) the shipped example guest ``name`` and return its image, e.g.
    ``example_guest("device_echo")`` for the README's library example."""
    matches = sorted((runtime_dir() / "examples").glob(f"{name}.[cS]"))
    if not matches:
        raise GuestBuildError(f"no example guest {name!r}; there are: "
                              f"{', '.join(example_guests())}")
    return build_guest(matches, output_dir=output_dir)


def build_guest_source(text: str, *, language: str = "c", name: str = "guest",
                       output_dir: Path | str | None = None,
                       extra_cflags: Sequence[str] = ()) -> Path:
    """Build a guest from source text: C (``language="c"``) or assembly (``"asm"``, gcc's
    preprocessed ``.S``), with the runtime; its ``main()`` runs in long mode. Cached by content
    like :func:`build_guest`."""
    suffix = {"c": ".c", "asm": ".S"}.get(language)
    if suffix is None:
        raise GuestBuildError(f"unknown guest source language {language!r}: use 'c' or 'asm'")
    out_dir = Path(output_dir) if output_dir is not None else cache_dir()
    source_dir = out_dir / ".sources"
    source_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    source = source_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest}{suffix}"
    if not source.is_file():
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=suffix, dir=source_dir)
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        os.replace(tmp, source)
    return build_guest([source], output_dir=out_dir, name=name, extra_cflags=extra_cflags)


def shipped_default_guest() -> Path:
    """Where an installed hvvmm keeps its prebuilt default guest (setup.py builds it)."""
    return Path(__file__).resolve().parent / "data" / "default-guest.elf"


def default_guest_path() -> Path:
    """The default guest image: the prebuilt hvvmm/data/default-guest.elf if
    installed, else built on demand into the cache."""
    shipped = shipped_default_guest()
    if shipped.is_file():
        return shipped
    return build_guest([runtime_dir() / DEFAULT_GUEST_SOURCE], name="default-guest")


def _tool(name: str) -> str:
    env = {"gcc": "HVVMM_GUEST_CC"}.get(name)
    candidate = (env and os.environ.get(env)) or name
    path = shutil.which(candidate)
    if not path:
        raise GuestBuildError(
            f"{candidate!r} not found: building hvvmm guests needs gcc and binutils "
            f"(ld, objcopy, objdump), e.g. `apt-get install gcc binutils`"
        )
    return path


@functools.lru_cache(maxsize=None)
def _tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise GuestBuildError(f"cannot run {path}: {exc}") from exc
    return out.stdout.splitlines()[0] if out.stdout else ""


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise GuestBuildError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = (proc.stderr + proc.stdout).strip()
        raise GuestBuildError(f"{what} failed:\n{err}", err)
    return proc


def _inputs(sources: Sequence[Path], flags: Sequence[str] = ()) -> list[Path]:
    """Every file whose content goes into the hash."""
    rt = runtime_dir()
    files = [rt / n for n in (*RUNTIME_SOURCES, LINKER_SCRIPT)] + sorted(rt.glob("*.h"))
    for src in sources:
        files.append(src)
        # Local headers next to a source (not followed further: keep them there).
        files.extend(sorted(src.parent.glob("*.h")))
    for flag in flags:  # and the headers of every -I directory
        if flag.startswith("-I") and len(flag) > 2:
            files.extend(sorted(Path(flag[2:]).glob("*.h")))
    return files


def _digest(sources: Sequence[Path], flags: Sequence[str], tools: Iterable[str]) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {_RECIPE_VERSION}\0".encode())
    for flag in flags:
        h.update(b"flag " + flag.encode() + b"\0")
    for tool in tools:
        h.update(b"tool " + _tool_version(tool).encode() + b"\0")
    for path in _inputs(sources, flags):
        data = path.read_bytes()
        h.update(f"file {path.name} {len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def build_guest(
    sources: Sequence[Path | str],
    *,
    output_dir: Path | str | None = None,
    name: str | None = None,
    extra_cflags: Sequence[str] = (),
    allow_instructions: Iterable[str] = (),
) -> Path:
    """Compile the runtime and `sources` into a Multiboot ELF32 image.

    ``allow_instructions``: forbidden mnemonics this guest may contain anyway, for a test of
    the instructions themselves (e.g. ``("int3", "cmpxchg16b")``). A source can say the same
    with a line holding ``hvvmm-allow-instructions: int3 cmpxchg16b``.

    Returns the path of the cached image ``OUTPUT_DIR/NAME-HASH.elf``
    (``output_dir`` defaults to :func:`cache_dir`, ``name`` to the first
    source's stem).  Raises :class:`GuestBuildError` on failure.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    srcs = [Path(s).resolve() for s in sources]
    if not srcs:
        raise GuestBuildError("no guest sources given")
    for src in srcs:
        if not src.is_file():
            raise GuestBuildError(f"guest source not found: {src}")
        if src.suffix not in (".c", ".S", ".s"):
            raise GuestBuildError(f"unsupported guest source type: {src}")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name or srcs[0].stem)
    out_dir = Path(output_dir) if output_dir is not None else cache_dir()

    tools = {t: _tool(t) for t in ("gcc", "ld", "objcopy", "objdump")}
    flags = list(CFLAGS) + list(extra_cflags)
    allowed = frozenset(allow_instructions) | _allowed_in_sources(srcs)
    digest = _digest(srcs, flags + [f"allow:{m}" for m in sorted(allowed)], tools.values())
    target = out_dir / f"{name}-{digest[:16]}.elf"
    if target.is_file():
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    rt = runtime_dir()
    with tempfile.TemporaryDirectory(prefix="hvvmm-guest-") as tmp:
        runtime_objs = _runtime_objects(out_dir, tools["gcc"], flags)
        user_objs = [os.path.join(tmp, f"{i}-{src.stem}.o") for i, src in enumerate(srcs)]
        _compile(tools["gcc"], flags, list(zip(srcs, user_objs)), f"compiling guest {name!r}")
        objs = runtime_objs + user_objs

        elf64 = os.path.join(tmp, "guest64.elf")
        _run([tools["ld"], *LDFLAGS, "-T", str(rt / LINKER_SCRIPT), "-o", elf64, *objs],
             f"linking guest {name!r}")
        bad = check_forbidden_instructions(elf64, objdump=tools["objdump"], allowed=allowed)
        if bad:
            shown = "\n  ".join(bad[:20])
            raise GuestBuildError(
                f"guest {name!r} contains instructions that must not run in hvvmm "
                f"guests (they hang or fail under some KVM implementations):\n  {shown}")

        fd, tmp_out = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            _run([tools["objcopy"], "-O", "elf32-i386", elf64, tmp_out],
                 f"converting guest {name!r} to ELF32")
            if find_multiboot_header(Path(tmp_out).read_bytes()) is None:
                raise GuestBuildError(f"guest {name!r}: no Multiboot header in the first 8 KiB")
            os.chmod(tmp_out, 0o644)
            os.replace(tmp_out, target)     # atomic: concurrent builders are fine
        except BaseException:
            try:
                os.unlink(tmp_out)
            except OSError:
                pass
            raise
    return target


_ALLOW_MARKER = re.compile(r"hvvmm-allow-instructions:([a-z0-9 ]*)")


def _allowed_in_sources(sources: Sequence[Path]) -> frozenset[str]:
    """Mnemonics the sources allow themselves (``hvvmm-allow-instructions: a b``)."""
    allowed: set[str] = set()
    for src in sources:
        for match in _ALLOW_MARKER.finditer(src.read_text(errors="replace")):
            allowed.update(match.group(1).split())
    return frozenset(allowed)


def build_boot_sector(source: Path | str, *, output_dir: Path | str | None = None) -> Path:
    """Assemble a 16-bit boot sector (GNU as, ``.code16``) linked at 0:7C00 into a flat
    512-byte image ending in the 0x55AA signature, as a BIOS loads it from a disk's first
    sector. Cached like :func:`build_guest`; raises :class:`GuestBuildError`."""
    src = Path(source).resolve()
    if not src.is_file():
        raise GuestBuildError(f"boot sector source not found: {src}")
    tools = {t: _tool(t) for t in ("as", "ld")}
    h = hashlib.sha256(b"boot sector 1\0" + src.read_bytes())
    for tool in tools.values():
        h.update(_tool_version(tool).encode())
    out_dir = Path(output_dir) if output_dir is not None else cache_dir()
    target = out_dir / f"{src.stem}-{h.hexdigest()[:16]}.bin"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvvmm-mbr-") as tmp:
        obj, flat = os.path.join(tmp, "mbr.o"), os.path.join(tmp, "mbr.bin")
        _run([tools["as"], "--32", "-o", obj, str(src)], f"assembling {src.name}")
        _run([tools["ld"], "-m", "elf_i386", "-Ttext=0x7c00", "-e", "_start", "--oformat=binary",
              "-o", flat, obj], f"linking {src.name}")
        image = Path(flat).read_bytes()
        if len(image) != 512 or image[510:] != b"\x55\xaa":
            raise GuestBuildError(f"{src.name}: not a 512-byte boot sector ending in 55 AA "
                                  f"({len(image)} bytes)")
        fd, tmp_out = tempfile.mkstemp(prefix=f".{src.stem}-", suffix=".tmp", dir=out_dir)
        with os.fdopen(fd, "wb") as stream:
            stream.write(image)
        os.replace(tmp_out, target)
    return target


def _compile(gcc: str, flags: Sequence[str], jobs: Sequence[tuple[Path, str]], what: str) -> None:
    """Compile each (source, object) pair, in parallel."""
    procs = []
    for src, obj in jobs:
        cmd = [gcc, *flags, "-I", str(runtime_dir()), "-c", str(src), "-o", obj]
        try:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        except OSError as exc:
            raise GuestBuildError(f"cannot run {gcc}: {exc}") from exc
    errors = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            errors.append((err + out).strip())
    if errors:
        err = "\n".join(errors)
        raise GuestBuildError(f"{what} failed:\n{err}", err)


def _runtime_objects(out_dir: Path, gcc: str, flags: Sequence[str]) -> list[str]:
    """The runtime's object files, compiled once per runtime content, flags and
    compiler and kept in OUT_DIR/.runtime/."""
    digest = _digest([], flags, [gcc])[:16]
    obj_dir = out_dir / ".runtime"
    objs = [obj_dir / f"{digest}-{Path(s).stem}.o" for s in RUNTIME_SOURCES]
    if all(o.is_file() for o in objs):
        return [str(o) for o in objs]
    obj_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvvmm-runtime-") as tmp:
        built = [os.path.join(tmp, o.name) for o in objs]
        _compile(gcc, flags, list(zip((runtime_dir() / s for s in RUNTIME_SOURCES), built)),
                 "compiling the guest runtime")
        for src, dst in zip(built, objs):
            fd, tmp_dst = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=obj_dir)
            os.close(fd)
            shutil.copyfile(src, tmp_dst)
            os.replace(tmp_dst, dst)
    return [str(o) for o in objs]


def check_forbidden_instructions(elf: Path | str, *, objdump: str | None = None,
                                 allowed: Iterable[str] = ()) -> list[str]:
    """Disassemble every code section of a 64-bit ELF (16/32-bit boot code in
    its own mode) and return descriptions of forbidden instructions found
    (mnemonics in ``allowed`` excepted)."""
    allowed = frozenset(allowed)
    objdump = objdump or _tool("objdump")
    headers = _run([objdump, "-h", str(elf)], "listing sections").stdout
    sections = []
    lines = headers.splitlines()
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) >= 7 and parts[0].isdigit() and i + 1 < len(lines) and "CODE" in lines[i + 1]:
            sections.append(parts[1])
    found = []
    for section in sections:
        cmd = [objdump, "-d", "--no-show-raw-insn", "-j", section, str(elf)]
        mode = _SECTION_MODES.get(section)
        if mode:
            cmd[2:2] = ["-M", mode]
        func = "?"
        for line in _run(cmd, "disassembling guest").stdout.splitlines():
            m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
            if m:
                func = m.group(1)
                continue
            m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
            if not m:
                continue
            insn = m.group(2).split("#")[0].strip()
            for word in insn.split()[:3]:
                if _FORBIDDEN.match(word) and word not in allowed:
                    found.append(f"{int(m.group(1), 16):#x} <{func}> {section}: {insn}")
                    break
    return found


def find_multiboot_header(image: bytes) -> int | None:
    """Offset of a valid Multiboot v1 header within the first 8 KiB, or None."""
    for off in range(0, min(len(image), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cflags = [a.split("=", 1)[1] for a in args if a.startswith("--cflag=")]
    rest = [a for a in args if not a.startswith("--cflag=")]
    if len(rest) < 2 or any(a.startswith("-") for a in rest):
        print("usage: python -m hvvmm.guestbuild OUT.elf SOURCE... [--cflag=FLAG ...]",
              file=sys.stderr)
        return 2
    out = Path(rest[0])
    try:
        with tempfile.TemporaryDirectory(prefix="hvvmm-guestbuild-") as tmp:
            image = build_guest(rest[1:], output_dir=tmp, name=out.stem, extra_cflags=cflags)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            shutil.copyfile(image, tmp_out)
            os.replace(tmp_out, out)
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
