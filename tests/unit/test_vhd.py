"""VHD images (hvvmm/block/vhd.py): layout, reads and writes against a model, differencing chains,
hostile images, crash consistency, and interop with qemu-img and libvhdi as independent readers."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvvmm.block import (SECTOR_SIZE, BlockError, ImageFormatError, ImageLockedError, open_image,
                         probe_format)
from hvvmm.block import vhd
from hvvmm.cli import parse_size
from hvvmm.block.vhd import (FOOTER_SIZE, HostFile, VhdBackend, check_vhd, chs_geometry,
                             create_vhd)

MiB = 1 << 20
BLOCK_SECTORS = vhd.DEFAULT_BLOCK_SIZE // SECTOR_SIZE


def pattern(seed: int, sectors: int) -> bytes:
    return random.Random(seed).randbytes(sectors * SECTOR_SIZE)


def read_all(disk) -> bytes:
    return disk.read(0, disk.size // SECTOR_SIZE)


# -- layout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sectors, geometry", [
    (2048, (30, 4, 17)),                      # 1 MiB: 17 sectors per track, at least 4 heads
    (20480, (301, 4, 17)),
    (1 << 21, (2080, 16, 63)),                # 1 GiB: too many cylinders for 17 or 31
    (65535 * 16 * 255 + 10, (65535, 16, 255)),  # past the largest geometry: capped
    (65535 * 16 * 63, (16191, 16, 255)),      # "if totalSectors >= 65535 * 16 * 63"
])
def test_chs_geometry_follows_the_specification_algorithm(sectors, geometry):
    assert chs_geometry(sectors) == geometry


def test_dynamic_image_layout(tmp_path):
    path = tmp_path / "d.vhd"
    size = create_vhd(path, 5 * MiB, force_size=True)
    raw = path.read_bytes()
    assert size == 5 * MiB
    assert raw[:8] == b"conectix" and raw[-FOOTER_SIZE:] == raw[:FOOTER_SIZE]
    assert raw[512:520] == b"cxsparse"
    footer, _ = vhd.Footer.parse(raw[-FOOTER_SIZE:])
    header, _ = vhd.Header.parse(raw[512:1536])
    assert (footer.disk_type, footer.current_size, footer.data_offset) == (vhd.DYNAMIC, size, 512)
    assert header.block_size == 2 * MiB and header.max_table_entries == 3
    assert raw[header.table_offset:header.table_offset + 12] == b"\xff" * 12
    assert probe_format(str(path)) == "vhd"


def test_sizes_round_up_to_the_geometry_unless_forced(tmp_path):
    size = create_vhd(tmp_path / "a.vhd", 10 * MiB)
    cylinders, heads, sectors = chs_geometry(size // SECTOR_SIZE)
    assert size == cylinders * heads * sectors * SECTOR_SIZE >= 10 * MiB
    assert create_vhd(tmp_path / "b.vhd", 10 * MiB + 1, force_size=True) == 10 * MiB + 512


def test_fixed_image_is_the_disk_then_the_footer(tmp_path):
    path = tmp_path / "f.vhd"
    size = create_vhd(path, 3 * MiB, subformat="fixed", force_size=True)
    with open_image(path) as disk:
        assert isinstance(disk, VhdBackend) and disk.subformat == "fixed"
        disk.write(7, pattern(1, 3))
    raw = path.read_bytes()
    assert len(raw) == size + FOOTER_SIZE and raw[7 * 512:10 * 512] == pattern(1, 3)
    assert raw[size:size + 8] == b"conectix"


# -- reads and writes --------------------------------------------------------------------------

def test_dynamic_reads_zeros_then_what_was_written(tmp_path):
    path = tmp_path / "d.vhd"
    create_vhd(path, 6 * MiB, force_size=True)
    with open_image(path) as disk:
        assert read_all(disk) == bytes(6 * MiB)
        disk.write(BLOCK_SECTORS - 2, pattern(2, 5))     # crosses a block boundary
        assert disk.read(BLOCK_SECTORS - 3, 7) == bytes(512) + pattern(2, 5) + bytes(512)
    with open_image(path) as disk:
        assert disk.read(BLOCK_SECTORS - 2, 5) == pattern(2, 5)
        assert disk.allocated_blocks() == [0, 1]
        # each block's data starts on a 4 KiB boundary, its bitmap right before it
        assert all((disk._bat[block] * 512 + 512) % 4096 == 0 for block in (0, 1))
    assert check_vhd(str(path)).errors == []


def test_whole_block_write_to_an_allocated_block_reads_no_bitmap(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 4 * MiB, force_size=True)
    create_vhd(child, parent=base)
    reads = []

    class Counting(HostFile):
        def pread(self, length, offset):
            reads.append((offset, length))
            return super().pread(length, offset)

    fd = os.open(child, os.O_RDWR)
    with VhdBackend(child, lock=False, host_file=Counting(fd, str(child))) as disk:
        disk.write(3, pattern(3, 1))     # allocates block 0
        disk._bitmaps.clear()            # forget the cached bitmap
        reads.clear()
        disk.write(0, pattern(4, BLOCK_SECTORS))
        assert reads == []
        assert disk.read(0, BLOCK_SECTORS) == pattern(4, BLOCK_SECTORS)


def test_requests_outside_the_disk_and_read_only(tmp_path):
    path = tmp_path / "d.vhd"
    create_vhd(path, 1 * MiB, force_size=True)
    with open_image(path, read_only=True) as disk:
        with pytest.raises(BlockError):
            disk.read(2048, 1)
        with pytest.raises(BlockError):
            disk.write(0, bytes(512))
    with open_image(path) as disk:
        with pytest.raises(BlockError):
            disk.write(2047, bytes(1024))
        with pytest.raises(BlockError):
            disk.write(0, bytes(100))


def test_discard_zeros_a_dynamic_image_and_keeps_a_differencing_one(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 2 * MiB, force_size=True)
    with open_image(base) as disk:
        disk.write(0, pattern(5, 8))
    create_vhd(child, parent=base)
    with open_image(child) as disk:
        disk.write(0, pattern(6, 4))
        disk.discard(0, 8)
        assert disk.read(0, 8) in (pattern(6, 4) + pattern(5, 8)[2048:], bytes(4096))
    with open_image(base) as disk:
        disk.discard(0, 8)
        assert disk.read(0, 8) == bytes(4096)


class Model:
    """A disk image and the bytearray it should read as."""

    def __init__(self, tmp_path, kind: str, size_sectors: int = 3 * BLOCK_SECTORS // 2 + 3):
        self.path = tmp_path / f"{kind}.vhd"
        size = size_sectors * SECTOR_SIZE
        if kind == "differencing":
            base = tmp_path / "base.vhd"
            create_vhd(base, size, force_size=True, block_size=64 * 1024)
            self.data = bytearray(pattern(99, size_sectors))
            with open_image(base) as disk:
                disk.write(0, bytes(self.data))
            create_vhd(self.path, parent=base, block_size=64 * 1024)
        else:
            create_vhd(self.path, size, subformat=kind, force_size=True, block_size=64 * 1024)
            self.data = bytearray(size)


write_ops = st.lists(st.tuples(st.integers(0, 3 * BLOCK_SECTORS // 2 + 2), st.integers(1, 300),
                               st.integers(0, 255)), min_size=1, max_size=8)


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=write_ops)
def test_random_writes_match_a_bytearray_model_across_reopens(tmp_path_factory, kind, ops):
    model = Model(tmp_path_factory.mktemp(kind), kind)
    total = len(model.data) // SECTOR_SIZE
    for sector, count, value in ops:
        count = min(count, total - sector)
        if count <= 0:
            continue
        data = bytes([value]) * (count * SECTOR_SIZE)
        with open_image(model.path) as disk:
            disk.write(sector, data)
        model.data[sector * SECTOR_SIZE:(sector + count) * SECTOR_SIZE] = data
        with open_image(model.path, read_only=True) as disk:
            assert read_all(disk) == bytes(model.data)
            start = max(0, min(sector - 3, total - 5))
            assert disk.read(start, 5) == bytes(model.data[start * 512:(start + 5) * 512])
    result = check_vhd(str(model.path))
    assert result.errors == [] and result.leaks == []


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize("cache", ["writeback", "none"])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 3 * BLOCK_SECTORS // 2 + 2),
                              st.sampled_from([1, 7, 8, 16, 64, 300]), st.integers(0, 255),
                              st.booleans()), min_size=1, max_size=20))
def test_random_writes_in_one_session_then_reopened(tmp_path_factory, kind, cache, ops):
    """Writes and reads in one open image (the cached, in-place and deferred paths), some
    flushed, then the image reopened."""
    model = Model(tmp_path_factory.mktemp(kind), kind)
    total = len(model.data) // SECTOR_SIZE
    with VhdBackend(model.path, cache=cache) as disk:
        for sector, count, value, flush in ops:
            sector -= sector % 8 if count % 8 == 0 else 0
            count = min(count, total - sector)
            data = bytes([value]) * (count * SECTOR_SIZE)
            disk.write(sector, data)
            model.data[sector * SECTOR_SIZE:(sector + count) * SECTOR_SIZE] = data
            start = max(0, min(sector - 9, total - 20))
            assert disk.read(start, 20) == bytes(model.data[start * 512:(start + 20) * 512])
            if flush:
                disk.flush()
        assert read_all(disk) == bytes(model.data)
    with open_image(model.path, read_only=True) as disk:
        assert read_all(disk) == bytes(model.data)
    result = check_vhd(str(model.path))
    assert (result.errors, result.leaks, result.stale) == ([], [], [])


# -- differencing chains -----------------------------------------------------------------------

def test_differencing_reads_the_parent_where_it_holds_nothing(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 4 * MiB, force_size=True)
    with open_image(base) as disk:
        disk.write(0, pattern(7, 8192))
    create_vhd(child, parent=base)
    with open_image(child) as disk:
        assert disk.parent is not None and disk.parent.read_only
        disk.write(10, pattern(8, 3))
        expected = bytearray(pattern(7, 8192))
        expected[10 * 512:13 * 512] = pattern(8, 3)
        assert read_all(disk) == bytes(expected)
    with open_image(base, read_only=True) as disk:
        assert read_all(disk) == pattern(7, 8192)   # the parent is untouched


def test_two_children_share_a_parent_but_the_parent_is_not_writable_meanwhile(tmp_path):
    base = tmp_path / "base.vhd"
    create_vhd(base, 1 * MiB, force_size=True)
    create_vhd(tmp_path / "a.vhd", parent=base)
    create_vhd(tmp_path / "b.vhd", parent=base)
    with open_image(tmp_path / "a.vhd"), open_image(tmp_path / "b.vhd"):
        with pytest.raises(ImageLockedError):
            open_image(base)
    with open_image(tmp_path / "a.vhd"):
        with pytest.raises(ImageLockedError):
            open_image(tmp_path / "a.vhd")


def test_parent_found_by_relative_locator_after_moving_both(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 1 * MiB, force_size=True)
    create_vhd(child, parent=base)
    moved = tmp_path / "moved"
    moved.mkdir()
    base.rename(moved / "base.vhd")
    child.rename(moved / "child.vhd")
    with open_image(moved / "child.vhd") as disk:
        assert disk.parent.path == str(moved / "base.vhd")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_parent(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 1 * MiB, force_size=True)
    create_vhd(child, parent=base)
    base.unlink()
    with pytest.raises(ImageFormatError) as excinfo:
        open_image(child)
    assert "parent image is missing" in one_line_error(excinfo)


@pytest.mark.parametrize("what", ["uuid", "timestamp"])
def test_a_parent_that_is_not_the_parent_is_refused(tmp_path, what):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    stamp = vhd.vhd_timestamp()
    create_vhd(base, 1 * MiB, force_size=True, timestamp=stamp)
    create_vhd(child, parent=base)
    before = child.read_bytes()
    if what == "uuid":
        create_vhd(base, 1 * MiB, force_size=True, timestamp=stamp)   # a new UUID
    else:
        raw = bytearray(base.read_bytes())
        footer, _ = vhd.Footer.parse(bytes(raw[-512:]))
        footer.timestamp += 1
        raw[:512] = raw[-512:] = footer.pack()
        base.write_bytes(raw)
    with pytest.raises(ImageFormatError) as excinfo:
        open_image(child)
    assert "expects" in one_line_error(excinfo) and what.upper()[:4] in \
        one_line_error(excinfo).upper()
    assert child.read_bytes() == before
    with open_image(base, format="vhd"):   # the refused child let go of its parent's lock
        pass


def test_parent_loop_is_refused(tmp_path):
    a, b, c = (tmp_path / f"{name}.vhd" for name in "abc")
    create_vhd(a, 1 * MiB, force_size=True)
    create_vhd(b, parent=a)
    create_vhd(c, parent=b)
    create_vhd(a, parent=c)        # a now says its parent is c: c -> b -> a -> c
    fds = open_fds()
    with pytest.raises(ImageFormatError) as excinfo:
        open_image(c)
    assert "loops" in one_line_error(excinfo)
    assert "loops" in " ".join(check_vhd(str(c)).errors)
    assert open_fds() == fds


# -- hostile images ----------------------------------------------------------------------------

def dynamic_image(tmp_path, blocks=((0, 1), (2, 2))) -> tuple:
    path = tmp_path / "d.vhd"
    create_vhd(path, 4 * BLOCK_SECTORS * SECTOR_SIZE, force_size=True)
    with open_image(path) as disk:
        for block, seed in blocks:
            disk.write(block * BLOCK_SECTORS, pattern(seed, 4))
    raw = bytearray(path.read_bytes())
    header, _ = vhd.Header.parse(bytes(raw[512:1536]))
    return path, raw, header


def set_header(raw: bytearray, header: vhd.Header) -> None:
    raw[512:1536] = header.pack()


def set_bat(raw: bytearray, header: vhd.Header, index: int, value: int) -> None:
    struct.pack_into(">I", raw, header.table_offset + 4 * index, value)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def refuses(path, raw: bytes, *words) -> str:
    path.write_bytes(raw)
    fds = open_fds()
    with pytest.raises(ImageFormatError) as excinfo:
        open_image(path, format="vhd")
    message = one_line_error(excinfo)
    assert all(word in message for word in words), message
    assert path.read_bytes() == raw             # nothing was written
    assert check_vhd(str(path), repair=True).errors
    assert path.read_bytes() == raw             # not even by check -r
    assert open_fds() == fds                    # and every descriptor (with its locks) closed
    return message


def test_bad_checksum_in_a_fixed_footer(tmp_path):
    path = tmp_path / "f.vhd"
    create_vhd(path, 1 * MiB, subformat="fixed", force_size=True)
    raw = bytearray(path.read_bytes())
    raw[-512 + 40] ^= 1
    refuses(path, bytes(raw), "checksum")


def test_bad_checksum_in_both_footers_and_in_the_header(tmp_path):
    path, raw, header = dynamic_image(tmp_path)
    for at in (40, len(raw) - 512 + 40):
        raw[at] ^= 1
    refuses(path, bytes(raw), "checksum")
    path, raw, header = dynamic_image(tmp_path)
    raw[512 + 100] ^= 1
    refuses(path, bytes(raw), "header checksum")


def test_truncated_file(tmp_path):
    path, raw, header = dynamic_image(tmp_path)
    refuses(path, bytes(raw[:-1024]), "past the end")
    path = tmp_path / "f.vhd"
    create_vhd(path, 1 * MiB, subformat="fixed", force_size=True)
    raw = path.read_bytes()
    refuses(path, raw[:1000] + raw[-512:], "truncated")
    refuses(path, raw[:300], "footer")


def test_bat_entries_past_the_end_or_overlapping(tmp_path):
    path, raw, header = dynamic_image(tmp_path)
    bat = struct.unpack_from(">4I", raw, header.table_offset)
    bad = bytearray(raw)
    set_bat(bad, header, 1, len(raw) // 512)
    refuses(path, bytes(bad), "BAT entry 1", "past the end")
    bad = bytearray(raw)
    set_bat(bad, header, 1, bat[0])
    refuses(path, bytes(bad), "overlaps")
    bad = bytearray(raw)
    set_bat(bad, header, 1, bat[0] + 7)
    refuses(path, bytes(bad), "overlaps")
    bad = bytearray(raw)
    set_bat(bad, header, 1, 2)                  # on top of the header and the BAT
    refuses(path, bytes(bad), "overlaps")


@pytest.mark.parametrize("block_size, words", [(3 << 20, "block size"), (0, "block size"),
                                                (1 << 30, "block size")])
def test_block_size_must_be_a_power_of_two(tmp_path, block_size, words):
    path, raw, header = dynamic_image(tmp_path)
    header.block_size = block_size
    set_header(raw, header)
    refuses(path, bytes(raw), words)


def test_bat_too_small_or_outside_the_file(tmp_path):
    path, raw, header = dynamic_image(tmp_path)
    header.max_table_entries = 2
    set_header(raw, header)
    refuses(path, bytes(raw), "BAT has 2 entries")
    path, raw, header = dynamic_image(tmp_path)
    header.table_offset = len(raw)
    set_header(raw, header)
    refuses(path, bytes(raw), "BAT")


def test_a_bat_too_large_to_hold_is_refused_before_it_is_read(tmp_path):
    # 2^22 + 1 blocks of 512 bytes: a 16 MiB BAT in a sparse file; the cap refuses it unread.
    path = tmp_path / "huge.vhd"
    blocks = vhd.MAX_BLOCKS + 1
    footer = vhd.Footer(vhd.DYNAMIC, blocks * SECTOR_SIZE, bytes(16), 0, data_offset=512)
    header = vhd.Header(1536, 0xFFFFFFFF, SECTOR_SIZE)
    end = 1536 + blocks * 4 + SECTOR_SIZE
    with open(path, "wb") as stream:
        stream.write(footer.pack() + header.pack())
        stream.truncate(end)
        stream.seek(end)
        stream.write(footer.pack())
    tracemalloc.start()
    try:
        with pytest.raises(ImageFormatError) as excinfo:
            open_image(path, format="vhd")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"at most {vhd.MAX_BLOCKS}" in one_line_error(excinfo)
    assert peak < 1 * MiB
    with pytest.raises(ValueError, match="larger blocks"):
        create_vhd(tmp_path / "new.vhd", blocks * SECTOR_SIZE, block_size=SECTOR_SIZE,
                   force_size=True)


def test_locator_outside_the_file(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 1 * MiB, force_size=True)
    create_vhd(child, parent=base)
    raw = bytearray(child.read_bytes())
    header, _ = vhd.Header.parse(bytes(raw[512:1536]))
    header.locators[0].offset = 1 << 40
    set_header(raw, header)
    refuses(child, bytes(raw), "parent locator 0")


def valid_images(tmp_path) -> dict[str, bytes]:
    images = {}
    for kind in ("fixed", "dynamic"):
        path = tmp_path / f"{kind}.vhd"
        create_vhd(path, 256 * 1024, subformat=kind, force_size=True, block_size=64 * 1024)
        with open_image(path) as disk:
            disk.write(130, pattern(10, 6))
        images[kind] = path.read_bytes()
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_vhd(base, 256 * 1024, force_size=True, block_size=64 * 1024)
    create_vhd(child, parent=base, block_size=64 * 1024)
    with open_image(child) as disk:
        disk.write(5, pattern(11, 3))
    images["differencing"] = child.read_bytes()
    return images


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile")
    return path, valid_images(path)


mutation = st.tuples(st.sampled_from(["fixed", "dynamic", "differencing"]),
                     st.sampled_from(["footer", "head", "header", "bat", "locator", "anywhere"]),
                     st.integers(0, 1 << 20), st.integers(1, 255), st.booleans(),
                     st.integers(0, 4))


@settings(max_examples=300, deadline=None)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_images_fail_cleanly(hostile_dir, mutations):
    directory, images = hostile_dir
    kind = mutations[0][0]
    raw = bytearray(images[kind])
    for _, where, at, xor, fix_checksums, cut in mutations:
        start, length = {"footer": (len(raw) - 512, 512), "head": (0, 512),
                         "header": (512, 1024), "bat": (1536, 512),
                         "locator": (2048, 1024), "anywhere": (0, len(raw))}[where]
        if start + length > len(raw) or length <= 0:
            continue
        raw[start + at % length] ^= xor
        if fix_checksums and kind != "fixed":   # reach the checks behind the checksums
            header, _ = _unchecked_header(raw)
            if header is not None:
                raw[512:1536] = header
            for footer_at in (0, len(raw) - 512):
                fixed = _refooter(raw[footer_at:footer_at + 512])
                if fixed:
                    raw[footer_at:footer_at + 512] = fixed
        if cut:
            del raw[len(raw) - cut * 512:]
    path = directory / f"mutant-{kind}.vhd"
    if kind == "differencing":
        path = directory / "child.vhd"
    path.write_bytes(bytes(raw))
    fds = open_fds()
    try:
        with open_image(path, format="vhd") as disk:
            data = read_all(disk)
            disk.write(0, data[:512 * 3])
            disk.write(disk.size // 512 - 1, bytes(512))
    except ImageFormatError as exc:
        assert "\n" not in str(exc)
        assert path.read_bytes() == bytes(raw)   # refused: nothing written
    except BlockError as exc:
        assert "\n" not in str(exc)
    result = check_vhd(str(path))
    assert all("\n" not in message for message in result.errors)
    assert open_fds() == fds
    if kind == "differencing":
        path.write_bytes(images["differencing"])


def _refooter(raw: bytes) -> bytes | None:
    if raw[:8] != b"conectix":
        return None
    raw = bytearray(raw)
    raw[64:68] = bytes(4)
    raw[64:68] = ((~sum(raw)) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(raw)


def _unchecked_header(raw: bytearray):
    if raw[512:520] != b"cxsparse":
        return None, ""
    header = bytearray(raw[512:1536])
    header[36:40] = bytes(4)
    header[36:40] = ((~sum(header)) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(header), ""


# -- crash consistency -------------------------------------------------------------------------

class Crash(Exception):
    pass


class CuttingFile(HostFile):
    """Does ``allowed`` writes and flushes, then half of the next write (none of a write within
    one sector, which disks write whole), then raises: a VMM killed mid-write."""

    def __init__(self, fd, path, allowed):
        super().__init__(fd, path)
        self.allowed = allowed
        self.steps = []

    def pwrite(self, data, offset):
        self.steps.append(("write", offset, len(data)))
        if self.allowed == 0:
            data = bytes(data)
            if len(data) > SECTOR_SIZE:
                super().pwrite(data[:len(data) // 2], offset)
            raise Crash
        self.allowed -= 1
        super().pwrite(data, offset)

    def sync(self):
        self.steps.append(("sync",))
        if self.allowed == 0:
            raise Crash
        self.allowed -= 1
        super().sync()


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize("first", [0, 5])
def test_allocation_cut_short_at_every_step(tmp_path, kind, first):
    old = pattern(20, 4 * BLOCK_SECTORS)
    new = pattern(21, 40)
    for allowed in range(8):
        directory = tmp_path / f"{allowed}"
        directory.mkdir()
        path = directory / "disk.vhd"
        if kind == "differencing":
            create_vhd(directory / "base.vhd", len(old), force_size=True)
            with open_image(directory / "base.vhd") as disk:
                disk.write(0, old)
            create_vhd(path, parent=directory / "base.vhd")
            before = old
        else:
            create_vhd(path, len(old), force_size=True)
            with open_image(path) as disk:
                disk.write(0, old[:BLOCK_SECTORS * 512])    # block 0 allocated
            before = old[:BLOCK_SECTORS * 512] + bytes(len(old) - BLOCK_SECTORS * 512)
        sector = BLOCK_SECTORS + first           # block 1: not allocated yet
        fd = os.open(path, os.O_RDWR)
        disk = VhdBackend(path, lock=False, host_file=CuttingFile(fd, str(path), allowed))
        try:
            disk.write(sector, new)
            disk.flush()
            completed = True
        except (Crash, BlockError):
            completed = False
        steps = disk._file.steps
        disk.close()
        result = check_vhd(str(path))
        assert result.errors == [], (allowed, result)
        after = bytearray(before)
        after[sector * 512:sector * 512 + len(new)] = new
        with open_image(path, read_only=True) as disk:
            data = read_all(disk)
        assert data in (before, bytes(after)), allowed
        if completed:
            assert data == bytes(after)
            # the footer at the new end, the bitmap and data; at the flush, a sync, then the
            # BAT entry (its sector of the BAT), then a sync
            assert [step[0] for step in steps][-3:] == ["sync", "write", "sync"]
            assert steps[-2][1:] == (1536, 16)
            assert steps[0][1] > max(step[1] for step in steps[1:-3])
            assert allowed >= 4
            break
        repaired = check_vhd(str(path), repair=True)
        assert repaired.errors == []
        clean = check_vhd(str(path))
        assert (clean.errors, clean.leaks, clean.stale) == ([], [], []), (allowed, clean)
        with open_image(path) as disk:
            assert read_all(disk) == data
            disk.write(sector, new)              # the repaired image takes the write again
            assert disk.read(sector, 40) == new
        assert check_vhd(str(path)).leaks == []
    else:
        pytest.fail("the write never completed")


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_a_vmm_killed_without_flush_leaves_a_consistent_image(tmp_path, cache):
    path = tmp_path / "d.vhd"
    create_vhd(path, 4 * MiB, force_size=True)
    disk = VhdBackend(path, cache=cache)
    disk.write(0, pattern(30, 16))
    os.close(disk._file.fd)      # killed: no flush, no close
    disk._file.fd = -1
    with open_image(path) as reopened:
        data = reopened.read(0, 16)
    # writeback: the BAT entry waits for a flush, so the write is lost but the image is sound;
    # cache=none: every step reached the file at once
    assert data == (bytes(16 * 512) if cache == "writeback" else pattern(30, 16))
    result = check_vhd(str(path))
    assert result.errors == [] and bool(result.leaks) == (cache == "writeback")


def test_damaged_end_footer_uses_the_copy_and_check_repairs_it(tmp_path):
    path, raw, header = dynamic_image(tmp_path)
    raw[-512:-256] = bytes(256)
    path.write_bytes(bytes(raw))
    with open_image(path, read_only=True) as disk:
        assert disk.read(0, 4) == pattern(1, 4)
    result = check_vhd(str(path))
    assert result.errors == [] and result.stale
    assert check_vhd(str(path), repair=True).repaired
    clean = path.read_bytes()
    assert clean[-512:] == clean[:512] and check_vhd(str(path)).stale == []


def test_stale_footer_copy_is_reported_and_repaired(tmp_path):
    path, raw, header = dynamic_image(tmp_path)
    raw[:512] = bytes(512)
    path.write_bytes(bytes(raw))
    assert check_vhd(str(path)).stale
    assert "rewrote the footer copy at offset 0" in check_vhd(str(path), repair=True).repaired
    assert path.read_bytes()[:512] == bytes(raw[-512:])


# -- interop -----------------------------------------------------------------------------------

try:
    import pyvhdi
except ImportError:   # pragma: no cover
    pyvhdi = None


# The independent readers are prerequisites (README install line, setup.cfg's test extra): a
# missing one fails the tests that use it instead of skipping them.
@pytest.fixture()
def qemu_utils(host_tool):
    host_tool("qemu-img", "qemu-utils")
    host_tool("qemu-io", "qemu-utils")


@pytest.fixture()
def libvhdi():
    if pyvhdi is None:
        pytest.fail("libvhdi-python (module pyvhdi) is missing: pip install -e '.[test]'")


needs_qemu_img = pytest.mark.usefixtures("qemu_utils")
needs_libvhdi = pytest.mark.usefixtures("libvhdi")


def qemu_source(path, current_size: bool = False) -> list[str]:
    """qemu-img's arguments for a VHD. QEMU before 10.0 sizes an image from an unknown creator
    by its CHS geometry; ``force_size_calc=current_size`` reads an exact-size image right."""
    if current_size:
        return ["--image-opts", f"driver=vpc,force_size_calc=current_size,file.filename={path}"]
    return ["-f", "vpc", str(path)]


def qemu_raw(path, tmp_path, current_size: bool = False) -> bytes:
    out = tmp_path / f"{os.path.basename(path)}.raw"
    subprocess.run(["qemu-img", "convert", *qemu_source(path, current_size), "-O", "raw",
                    str(out)], check=True)
    return out.read_bytes()


def libvhdi_read(path, parent=None) -> bytes:
    image = pyvhdi.file()
    image.open(str(path))
    opened = [image]
    if parent is not None:
        parent_image = pyvhdi.file()
        parent_image.open(str(parent))
        image.set_parent(parent_image)
        opened.append(parent_image)
    try:
        return image.read_buffer_at_offset(image.get_media_size(), 0)
    finally:
        for item in opened:
            item.close()


def scribble(disk, seed: int) -> None:
    rng = random.Random(seed)
    total = disk.size // SECTOR_SIZE
    for _ in range(20):
        count = rng.randrange(1, 600)
        sector = rng.randrange(0, total - count)
        disk.write(sector, rng.randbytes(count * SECTOR_SIZE))


@needs_qemu_img
@pytest.mark.parametrize("size", ["1M", "10M", "1G", "3000M"])
def test_geometry_rounding_matches_qemu_img(tmp_path, size):
    path = tmp_path / "q.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", str(path), size], check=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                          capture_output=True, text=True).stdout
    qemu_size = int(info.split('"virtual-size": ')[1].split(",")[0])
    assert vhd.chs_size(parse_size(size)) == qemu_size
    assert vhd.inspect_vhd(str(path)).footer.geometry == chs_geometry(qemu_size // SECTOR_SIZE)


@needs_qemu_img
@pytest.mark.parametrize("options", ["subformat=fixed", "subformat=dynamic",
                                     "subformat=dynamic,force_size=on",
                                     "subformat=fixed,force_size=on"])
def test_images_qemu_img_writes_read_identically(tmp_path, options):
    path = tmp_path / "q.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", options, str(path), "9M"],
                   check=True)
    commands = ["write -P 0x5a 0 4k", "write -P 0xa5 1500k 1M", "write -P 0x11 6M 2M",
                "write -P 0x22 8388096 512"]
    args = ["qemu-io", "-f", "vpc"]
    for command in commands:
        args += ["-c", command]
    subprocess.run(args + [str(path)], check=True, capture_output=True)
    expected = qemu_raw(path, tmp_path)
    with open_image(path) as disk:   # probed: a fixed image's footer, a dynamic image's copy
        assert disk.size == len(expected)
        assert read_all(disk) == expected
    assert check_vhd(str(path)).errors == []


@needs_qemu_img
@needs_libvhdi
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize("force_size", [False, True])
def test_images_hvvmm_writes_read_identically_in_qemu_img_and_libvhdi(tmp_path, subformat,
                                                                       force_size):
    path = tmp_path / "h.vhd"
    create_vhd(path, 9 * MiB + 4096, subformat=subformat, force_size=force_size)
    with open_image(path) as disk:
        scribble(disk, 30)
        expected = read_all(disk)
    info = subprocess.run(["qemu-img", "info", "--output=json",
                           *qemu_source(path, force_size)],
                          check=True, capture_output=True, text=True).stdout
    assert f'"virtual-size": {len(expected)}' in info
    assert qemu_raw(path, tmp_path, force_size) == expected
    assert libvhdi_read(path) == expected


@needs_libvhdi
def test_differencing_images_hvvmm_writes_read_correctly_in_libvhdi(tmp_path):
    base, child, grandchild = (tmp_path / f"{name}.vhd" for name in ("base", "child", "gc"))
    create_vhd(base, 7 * MiB)
    with open_image(base) as disk:
        scribble(disk, 40)
    create_vhd(child, parent=base)
    with open_image(child) as disk:
        scribble(disk, 41)
        expected = read_all(disk)
    image = pyvhdi.file()
    image.open(str(child))
    assert image.get_parent_identifier() is not None
    image.close()
    assert libvhdi_read(child, parent=base) == expected


@needs_qemu_img
def test_qemu_img_reads_hvvmm_dynamic_after_check_repair(tmp_path):
    # a leaked block trimmed by check -r leaves an image qemu-img still reads the same
    path, raw, header = dynamic_image(tmp_path)
    with open_image(path) as disk:
        expected = read_all(disk)
    raw = bytearray(path.read_bytes())
    leak = raw[:-512] + bytes(vhd.DEFAULT_BLOCK_SIZE + 512) + raw[-512:]
    path.write_bytes(bytes(leak))
    assert check_vhd(str(path)).leaks
    check_vhd(str(path), repair=True)
    assert path.read_bytes() == bytes(raw)
    assert qemu_raw(path, tmp_path, current_size=True) == expected


def test_benchmark_runs_and_prints_ratios(bench_module, capsys):
    ratios = bench_module("vhd_io").main(["--size", "4", "--runs", "1"])
    out = capsys.readouterr().out
    assert set(ratios) == {"dynamic", "differencing"}
    assert all(ratio > 0 for kind in ratios.values() for ratio in kind.values())
    assert "random read" in out and "ratio" in out
