"""hvvmm.guestbuild: building guests with the runtime, caching, the guards."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hvvmm import guestbuild
from hvvmm.guestbuild import GuestBuildError, build_guest

GUESTS = Path(__file__).resolve().parent.parent / "guests"

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A cache directory shared by the tests that don't look at caching (saves
    compiling the runtime for each)."""
    return tmp_path_factory.mktemp("guest-cache")


def images(directory: Path) -> list[str]:
    """Image names in a cache directory; asserts that no temporary file was left."""
    assert not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_build_hello_and_cache(tmp_path, monkeypatch):
    image = build_guest([GUESTS / "hello.c"], output_dir=tmp_path)
    assert image.parent == tmp_path and image.name.startswith("hello-")
    assert image.suffix == ".elf"
    mtime = image.stat().st_mtime_ns
    assert images(tmp_path) == [image.name]

    def no_compiler(*args, **kwargs):
        raise AssertionError("cached build ran a compiler")
    monkeypatch.setattr(guestbuild.subprocess, "Popen", no_compiler)
    again = build_guest([str(GUESTS / "hello.c")], output_dir=tmp_path)
    assert again == image
    assert again.stat().st_mtime_ns == mtime


def test_runtime_objects_reused(tmp_path, monkeypatch):
    build_guest([GUESTS / "hello.c"], output_dir=tmp_path)
    compiled = []
    real_popen = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if "-c" in cmd:
            compiled.append(Path(cmd[cmd.index("-c") + 1]).name)
        return real_popen(cmd, *args, **kwargs)
    monkeypatch.setattr(guestbuild.subprocess, "Popen", popen)
    build_guest([GUESTS / "exit_code.c"], output_dir=tmp_path)
    assert compiled == ["exit_code.c"]


def test_cache_key_follows_content_and_flags(tmp_path):
    src = write(tmp_path / "g.c", '#include "guest.h"\nint main(void) { return 1; }\n')
    out = tmp_path / "cache"
    first = build_guest([src], output_dir=out)
    with_flag = build_guest([src], output_dir=out, extra_cflags=["-DFOO=1"])
    write(src, '#include "guest.h"\nint main(void) { return 2; }\n')
    changed = build_guest([src], output_dir=out)
    assert len({first, with_flag, changed}) == 3
    named = build_guest([src], output_dir=out, name="custom")
    assert named.name.startswith("custom-")


def test_cache_key_follows_headers_of_include_directories(tmp_path):
    # bench/guests/*.c include tests/guests/hyperv.h through -I: an edit there must rebuild.
    include = tmp_path / "inc"
    include.mkdir()
    write(include / "shared.h", "#define VALUE 1\n")
    (tmp_path / "src").mkdir()
    src = write(tmp_path / "src" / "g.c",
                '#include "guest.h"\n#include "shared.h"\nint main(void) { return VALUE; }\n')
    out = tmp_path / "cache"
    first = build_guest([src], output_dir=out, extra_cflags=[f"-I{include}"])
    write(include / "shared.h", "#define VALUE 2\n")
    assert build_guest([src], output_dir=out, extra_cflags=[f"-I{include}"]) != first


def test_multiboot_header_and_elf32(shared):
    data = build_guest([GUESTS / "hello.c"], output_dir=shared).read_bytes()
    # ELF32, little endian, EM_386, executable.
    assert data[:4] == b"\x7fELF" and data[4] == 1 and data[5] == 1
    e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIII", data, 16)
    assert (e_type, e_machine) == (2, 3)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    segments = []
    for i in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIIIII", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            segments.append((p_paddr, p_memsz))
    assert any(start <= e_entry < start + size for start, size in segments)
    assert min(start for start, _ in segments) == 0x100000

    headers = []
    for off in range(0, 8192 - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == 0x1BADB002:
            headers.append((off, flags, checksum))
    assert len(headers) == 1
    off, flags, checksum = headers[0]
    assert (0x1BADB002 + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & 0x2                          # wants the memory information
    assert not flags & 0x10000                  # plain ELF, no a.out kludge
    assert guestbuild.find_multiboot_header(data) == off


@pytest.mark.parametrize("insn", [
    "int3", "int $0x80", "vmcall", "vmmcall", "cmpxchg16b (%rdi)", "xsave (%rdi)",
    "xrstor (%rdi)", "xgetbv",
])
def test_forbidden_instruction_refused(tmp_path, shared, insn):
    src = write(tmp_path / "bad.c",
                '#include "guest.h"\nint main(void) { asm volatile("%s"); return 0; }\n' % insn)
    with pytest.raises(GuestBuildError) as err:
        build_guest([src], output_dir=shared)
    assert insn.split()[0] in str(err.value)
    assert "<main>" in str(err.value)
    assert not list(shared.glob("bad-*"))


def test_compile_error(tmp_path, shared):
    src = write(tmp_path / "broken.c", "int main(void) { return undefined_thing; }\n")
    with pytest.raises(GuestBuildError) as err:
        build_guest([src], output_dir=shared)
    assert "undefined_thing" in str(err.value)
    assert "undefined_thing" in err.value.stderr
    assert not list(shared.glob("broken-*"))


def test_link_error(tmp_path, shared):
    src = write(tmp_path / "nolink.c", "void missing(void);\nint main(void) { missing(); return 0; }\n")
    with pytest.raises(GuestBuildError, match="missing"):
        build_guest([src], output_dir=shared)


def test_bad_inputs(tmp_path):
    with pytest.raises(GuestBuildError, match="not found"):
        build_guest([tmp_path / "nope.c"], output_dir=tmp_path)
    with pytest.raises(GuestBuildError, match="unsupported"):
        build_guest([write(tmp_path / "x.txt", "")], output_dir=tmp_path)


def test_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("HVVMM_GUEST_CC", "no-such-gcc-hvvmm")
    with pytest.raises(GuestBuildError, match="no-such-gcc-hvvmm.*not found"):
        build_guest([GUESTS / "hello.c"], output_dir=tmp_path)


def test_concurrent_builds(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: build_guest([GUESTS / "hello.c"], output_dir=tmp_path),
                              range(4)))
    assert len(set(built)) == 1
    assert images(tmp_path) == [built[0].name]


@pytest.mark.parametrize("source", sorted(p.name for p in GUESTS.glob("*.c")))
def test_test_guests_build(shared, source):
    image = build_guest([GUESTS / source], output_dir=shared)
    assert guestbuild.find_multiboot_header(image.read_bytes()) is not None


def test_default_guest(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = guestbuild.default_guest_path()
    assert path.is_file()
    assert guestbuild.find_multiboot_header(path.read_bytes()) is not None
    shipped = Path(guestbuild.__file__).parent / "data" / "default-guest.elf"
    if not shipped.is_file():
        assert path.parent == tmp_path / "hvvmm" / "guests"


def test_command_line(tmp_path):
    out = tmp_path / "sub" / "guest.elf"
    env = dict(os.environ, PYTHONPATH=str(Path(guestbuild.__file__).parent.parent),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "hvvmm.guestbuild", str(out), str(GUESTS / "exit_code.c")],
        capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert guestbuild.find_multiboot_header(out.read_bytes()) is not None
    bad = subprocess.run([sys.executable, "-m", "hvvmm.guestbuild", str(out)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "usage" in bad.stderr
