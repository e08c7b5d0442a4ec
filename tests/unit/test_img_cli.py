"""``hvvmm img``: create, info, check, convert, compare, commit; one-line errors, exit statuses."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest

from hvvmm import cli, img
from hvvmm.block import SECTOR_SIZE, open_image
from hvvmm.block import vhd

MiB = 1 << 20


def run(capsys, *argv) -> tuple[int, str, str]:
    status = img.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def fill(path, seed: int, writes: int = 10) -> bytes:
    rng = random.Random(seed)
    with open_image(path) as disk:
        total = disk.size // SECTOR_SIZE
        for _ in range(writes):
            count = rng.randrange(1, 300)
            disk.write(rng.randrange(0, total - count), rng.randbytes(count * SECTOR_SIZE))
        return disk.read(0, total)


def test_hvvmm_dispatches_img_and_lists_it(capsys, tmp_path):
    assert cli.main(["img", "create", "-f", "raw", str(tmp_path / "a.raw"), "1M"]) == 0
    assert (tmp_path / "a.raw").stat().st_size == MiB
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "img" in capsys.readouterr().out


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_create_and_info(capsys, tmp_path, subformat):
    path = tmp_path / "a.vhd"
    status, out, _ = run(capsys, "create", "-f", "vhd", "-o", f"subformat={subformat}", path,
                         "64M")
    assert status == 0 and f"subformat={subformat}" in out
    status, out, _ = run(capsys, "info", "--json", path)
    info = json.loads(out)
    assert status == 0 and info["format"] == "vhd" and info["subformat"] == subformat
    assert info["virtual-size"] == vhd.chs_size(64 * MiB)
    status, out, _ = run(capsys, "info", path)
    assert f"subformat: {subformat}" in out and "virtual size: " in out


def test_create_differencing_and_commit(capsys, tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    assert run(capsys, "create", "-f", "vhd", "-o", "force_size=on", base, "6M")[0] == 0
    before = fill(base, 1)
    status, out, _ = run(capsys, "create", "-f", "vhd", "-b", base, child)
    assert status == 0 and "differencing" in out
    info = json.loads(run(capsys, "info", "--json", child)[1])
    assert info["parent"]["path"] == str(base) and info["virtual-size"] == 6 * MiB
    expected = fill(child, 2)
    assert expected != before
    status, out, _ = run(capsys, "commit", child)
    assert status == 0 and "committed" in out
    with open_image(base) as disk:
        assert disk.read(0, disk.size // SECTOR_SIZE) == expected
    with open_image(child) as disk:
        assert disk.read(0, disk.size // SECTOR_SIZE) == expected
    assert run(capsys, "check", base)[0] == 0
    status, _, err = run(capsys, "commit", base)
    assert status == 2 and "not a differencing" in err


@pytest.mark.parametrize("source_format, target_format, options", [
    ("raw", "vhd", "subformat=dynamic"), ("raw", "vhd", "subformat=fixed"),
    ("vhd", "raw", ""), ("vhd", "vhd", "subformat=fixed"), ("raw", "raw", ""),
])
def test_convert_any_to_any_and_compare(capsys, tmp_path, source_format, target_format, options):
    source, target = tmp_path / f"src.{source_format}", tmp_path / f"dst.{target_format}"
    create = ["create", "-f", source_format, source, "5M"]
    assert run(capsys, *create)[0] == 0
    data = fill(source, 3)
    argv = ["convert", "-O", target_format] + (["-o", options] if options else [])
    assert run(capsys, *argv, source, target)[0] == 0
    status, out, _ = run(capsys, "compare", source, target)
    assert status == 0 and "identical" in out
    with open_image(target) as disk:
        assert disk.read(0, len(data) // SECTOR_SIZE) == data
        disk.write(100, b"\x01" * SECTOR_SIZE)
    status, out, _ = run(capsys, "compare", source, target)
    assert status == 1 and f"offset {100 * SECTOR_SIZE}" in out


def test_convert_a_differencing_image_flattens_it(capsys, tmp_path):
    base, child, flat = tmp_path / "base.vhd", tmp_path / "child.vhd", tmp_path / "flat.vhd"
    run(capsys, "create", "-f", "vhd", base, "4M")
    fill(base, 4)
    run(capsys, "create", "-b", base, child)
    expected = fill(child, 5)
    assert run(capsys, "convert", "-O", "vhd", child, flat)[0] == 0
    info = json.loads(run(capsys, "info", "--json", flat)[1])
    assert info["subformat"] == "dynamic" and "parent" not in info
    with open_image(flat) as disk:
        assert disk.read(0, disk.size // SECTOR_SIZE) == expected


def test_check_reports_and_repairs_a_leaked_block(capsys, tmp_path):
    path = tmp_path / "a.vhd"
    run(capsys, "create", "-f", "vhd", path, "8M")
    fill(path, 6)
    raw = path.read_bytes()
    path.write_bytes(raw[:-512] + bytes(2 * MiB + 512) + raw[-512:])
    status, out, _ = run(capsys, "check", path)
    assert status == 1 and "Leaked" in out
    status, out, _ = run(capsys, "check", "-r", path)
    assert status == 0 and "Repaired" in out
    assert path.read_bytes() == raw
    status, out, _ = run(capsys, "check", path)
    assert status == 0 and "No errors" in out


def test_bad_images_are_one_line_and_status_4(capsys, tmp_path):
    path = tmp_path / "a.vhd"
    run(capsys, "create", "-f", "vhd", path, "8M")
    fill(path, 7)
    raw = bytearray(path.read_bytes())
    header, _ = vhd.Header.parse(bytes(raw[512:1536]))
    first = struct.unpack_from(">I", raw, header.table_offset)[0]
    for index in range(1, 3):
        struct.pack_into(">I", raw, header.table_offset + 4 * index, first)   # overlapping
    path.write_bytes(bytes(raw))
    for argv in (["info", path], ["compare", path, path], ["convert", "-O", "raw", path,
                                                            tmp_path / "x.raw"],
                 ["check", "-r", path]):
        status, out, err = run(capsys, *argv)
        assert status == 4, (argv, out, err)
        assert "overlaps" in out + err and "Traceback" not in out + err
        if argv[0] != "check":
            assert len(err.strip().splitlines()) == 1
    assert path.read_bytes() == bytes(raw)


def test_a_missing_parent_is_a_bad_image(capsys, tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    run(capsys, "create", "-f", "vhd", base, "1M")
    run(capsys, "create", "-b", base, child)
    base.unlink()
    status, out, _ = run(capsys, "info", child)
    assert status == 0 and "base.vhd (not found)" in out
    status, out, _ = run(capsys, "check", child)
    assert status == 4 and "parent image is missing" in out
    for argv in (["compare", child, child], ["commit", child]):
        status, _, err = run(capsys, *argv)
        assert status == 4 and len(err.strip().splitlines()) == 1 and "missing" in err


def test_usage_and_io_errors(capsys, tmp_path):
    assert run(capsys, "create", "-f", "vhd", tmp_path / "a.vhd")[0] == 2
    assert run(capsys, "create", "-f", "vhd", "-o", "subformat=sparse", tmp_path / "a.vhd",
               "1M")[0] == 2
    assert run(capsys, "create", "-f", "vhd", "-o", "bogus=1", tmp_path / "a.vhd", "1M")[0] == 2
    assert run(capsys, "create", "-f", "raw", "-b", "x", tmp_path / "a.raw")[0] == 2
    assert run(capsys, "create", "-f", "vhd", tmp_path / "a.vhd", "3000G")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    status, _, err = run(capsys, "info", tmp_path / "missing.vhd")
    assert status == 3 and len(err.strip().splitlines()) == 1
    run(capsys, "create", "-f", "vhd", tmp_path / "b.vhd", "1M")
    with open_image(tmp_path / "b.vhd"):
        status, _, err = run(capsys, "create", "-f", "vhd", tmp_path / "b.vhd", "1M")
        assert status == 3 and "in use" in err
    status, _, err = run(capsys, "create", "-b", tmp_path / "b.vhd", tmp_path / "b.vhd")
    assert status == 2 and "its own parent" in err
    status, _, err = run(capsys, "create", "-f", "vhd", "-b", tmp_path / "missing.vhd",
                         tmp_path / "c.vhd")
    assert status == 3


def test_qemu_img_agrees_with_convert(capsys, tmp_path, host_tool):
    source, target = tmp_path / "src.raw", tmp_path / "dst.vhd"
    run(capsys, "create", "-f", "raw", source, "7M")
    fill(source, 8)
    assert run(capsys, "convert", "-O", "vhd", source, target)[0] == 0
    result = subprocess.run([host_tool("qemu-img", "qemu-utils"), "compare", "-f", "raw", "-F", "vpc", str(source),
                             str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "hvvmm", "img", "info", str(fifo)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.strip().endswith("is not a regular file or a block device")
