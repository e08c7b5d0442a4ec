"""The initramfs builder: busybox's own cpio reads back exactly what was written."""

import gzip
import subprocess

from initramfs import Entry, busybox_initramfs, newc_archive


def test_newc_header_layout():
    archive = newc_archive([Entry("a", 0o100644, b"xyz")])
    assert archive[:6] == b"070701" and len(archive) % 4 == 0
    # filesize is field 7 (offset 6 + 6*8), namesize field 12
    assert int(archive[54:62], 16) == 3 and int(archive[94:102], 16) == 2
    assert archive[110:112] == b"a\0" and archive[112:115] == b"xyz"
    assert b"TRAILER!!!\0" in archive


def test_busybox_reads_the_archive(tmp_path, host_tool):
    host_tool("busybox", "busybox-static")  # the independent cpio reader
    image = busybox_initramfs(b"\x7fELF fake busybox", compress=True)
    archive = gzip.decompress(image)
    listing = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["bin", "dev", "proc", "sys", "dev/console", "bin/busybox", "init"]
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=archive, cwd=tmp_path,
                   capture_output=True, check=True)
    assert (tmp_path / "bin" / "busybox").read_bytes() == b"\x7fELF fake busybox"
    init = (tmp_path / "init").read_text()
    assert init.startswith("#!/bin/busybox sh") and "poweroff -f" in init
