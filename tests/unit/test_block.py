"""The block layer: raw backend I/O bounds, read-only drives, QEMU-style image locks, probing."""

import errno
import os
import subprocess
import sys

import pytest

from hvvmm.block import (FORMATS, SECTOR_SIZE, BlockError, ImageFormatError, ImageLockedError,
                         RawBackend, open_image)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 16)  # 8 sectors
    return path


def test_raw_read_write_round_trip(image):
    with RawBackend(image) as disk:
        assert disk.size == 8 * SECTOR_SIZE
        assert disk.read(1, 1) == (bytes(range(256)) * 2)
        disk.write(2, b"\xAA" * SECTOR_SIZE * 2)
        disk.flush()
        assert disk.read(2, 2) == b"\xAA" * 1024
    data = image.read_bytes()
    assert data[1024:2048] == b"\xAA" * 1024 and data[2048:] == (bytes(range(256)) * 16)[2048:]


@pytest.mark.parametrize("sector, count", [(-1, 1), (8, 1), (7, 2), (0, 9), (0, -1)])
def test_raw_refuses_requests_outside_the_disk(image, sector, count):
    with RawBackend(image) as disk:
        with pytest.raises(BlockError):
            disk.read(sector, count)
        if count > 0:
            with pytest.raises(BlockError):
                disk.write(sector, bytes(SECTOR_SIZE * count))
    assert image.read_bytes() == bytes(range(256)) * 16


def test_read_only_drive_refuses_writes_and_discards(image):
    with RawBackend(image, read_only=True) as disk:
        with pytest.raises(BlockError, match="read-only"):
            disk.write(0, bytes(SECTOR_SIZE))
        with pytest.raises(BlockError, match="read-only"):
            disk.discard(0, 1)


def test_raw_size_must_be_whole_sectors(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(ImageFormatError, match="multiple of 512"):
        RawBackend(path)


def test_discard_reads_back_zeros_or_old_data(image, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("a discard must not start a process (ctypes.util.find_library)")
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with RawBackend(image) as disk:
        before = disk.read(0, 8)
        disk.discard(0, 8)
        after = disk.read(0, 8)
        assert after in (before, bytes(8 * SECTOR_SIZE))


def test_two_writers_conflict_and_readers_share(image):
    with RawBackend(image):
        with pytest.raises(ImageLockedError, match="in use"):
            RawBackend(image)
        with pytest.raises(ImageLockedError):
            RawBackend(image, read_only=True)  # a reader must not see a disk change under it
    with RawBackend(image, read_only=True), RawBackend(image, read_only=True):
        with pytest.raises(ImageLockedError):
            RawBackend(image)
    with RawBackend(image):  # every lock went with the closes
        pass


def test_lock_is_seen_by_another_process(image):
    with RawBackend(image):
        code = ("import sys\nfrom hvvmm.block import RawBackend, ImageLockedError\n"
                "try:\n    RawBackend(sys.argv[1])\nexcept ImageLockedError:\n    sys.exit(7)\n")
        result = subprocess.run([sys.executable, "-c", code, str(image)], timeout=60)
        assert result.returncode == 7


def test_open_image_probes_and_names_formats(image):
    with open_image(image) as disk:
        assert isinstance(disk, RawBackend)
    with pytest.raises(ImageFormatError, match="unknown image format 'qcow9'"):
        open_image(image, format="qcow9")
    with pytest.raises(BlockError, match="cannot open"):
        open_image(os.fspath(image) + ".missing")
    assert "raw" in FORMATS


def vhd_footer_sector(tmp_path) -> bytes:
    """A valid dynamic VHD footer, as a guest could write it into its raw disk."""
    from hvvmm.block import vhd
    path = tmp_path / "donor.vhd"
    vhd.create_vhd(path, 1 << 20)
    return path.read_bytes()[-SECTOR_SIZE:]


@pytest.mark.parametrize("sector", [0, 7])   # the sectors the probes read: first and last
def test_probed_raw_refuses_writes_that_make_it_look_like_another_format(image, tmp_path,
                                                                         sector, caplog):
    footer = vhd_footer_sector(tmp_path)
    before = image.read_bytes()
    with caplog.at_level("WARNING", logger="hvvmm.block"):
        disk = open_image(image)
    assert "probing guessed raw" in caplog.text
    with disk:
        with pytest.raises(BlockError, match="look like a vhd image") as excinfo:
            disk.write(sector, footer)
        assert excinfo.value.errno == errno.EPERM
        with pytest.raises(BlockError, match="look like a vhd image"):
            disk.write(0, footer * 8)   # the whole disk at once
        disk.write(sector, b"\x55" * SECTOR_SIZE)   # other data there is fine
        disk.write(3, footer)                         # and a footer elsewhere
    assert open_image(image, read_only=True).__class__ is RawBackend
    expected = bytearray(before)
    expected[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] = b"\x55" * SECTOR_SIZE
    expected[3 * SECTOR_SIZE:4 * SECTOR_SIZE] = footer
    assert image.read_bytes() == expected


def test_named_raw_format_writes_anything(image, tmp_path, caplog):
    footer = vhd_footer_sector(tmp_path)
    with caplog.at_level("WARNING", logger="hvvmm.block"):
        with open_image(image, read_only=True):   # probed, but read-only: no warning
            pass
        with open_image(image, format="raw") as disk:
            disk.write(7, footer)
    assert caplog.text == ""
    assert image.read_bytes()[-SECTOR_SIZE:] == footer
    # Why drives a guest writes should name their format: the next probe takes it for a VHD.
    with pytest.raises(ImageFormatError, match="cxsparse"):
        open_image(image)


def test_a_refused_probed_open_logs_no_warning(image, caplog):
    with RawBackend(image), caplog.at_level("WARNING", logger="hvvmm.block"):
        with pytest.raises(ImageLockedError):
            open_image(image)
    assert caplog.text == ""
