"""fw_cfg legacy I/O protocol (QEMU docs/specs/fw_cfg.rst), without KVM."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvvmm.devices.fw_cfg import FW_CFG_IO_BASE, FW_CFG_PORT_COUNT, FwCfg

SEL, DATA = 0, 1


def select(dev: FwCfg, key: int) -> None:
    dev.write(SEL, 2, key)


def read_bytes(dev: FwCfg, n: int) -> bytes:
    return bytes(dev.read(DATA, 1) for _ in range(n))


def item(dev: FwCfg, key: int, n: int) -> bytes:
    select(dev, key)
    return read_bytes(dev, n)


def test_constants() -> None:
    assert (FW_CFG_IO_BASE, FW_CFG_PORT_COUNT) == (0x510, 2)


def test_signature_and_id() -> None:
    dev = FwCfg(ram_size=1 << 30, cpu_count=2)
    assert item(dev, 0x0000, 4) == b"QEMU"
    assert item(dev, 0x0001, 4) == b"\x01\x00\x00\x00"  # traditional interface, no DMA


def test_standard_items() -> None:
    uuid = bytes(range(16))
    dev = FwCfg(ram_size=0x1_2345_6000, cpu_count=3, uuid=uuid)
    assert item(dev, 0x0002, 16) == uuid
    assert item(dev, 0x0003, 8) == bytes.fromhex("0060452301000000")  # u64 LE
    assert item(dev, 0x0005, 2) == b"\x03\x00"
    assert item(dev, 0x000F, 2) == b"\x03\x00"
    assert item(dev, 0x0002, 16) == uuid
    assert item(FwCfg(1 << 20, 1), 0x0002, 16) == bytes(16)


def test_max_cpus() -> None:
    dev = FwCfg(ram_size=1 << 20, cpu_count=2, max_cpus=8)
    assert item(dev, 0x0005, 2) == b"\x02\x00"
    assert item(dev, 0x000F, 2) == b"\x08\x00"


def test_reading_past_the_end_returns_zero() -> None:
    dev = FwCfg(1 << 20, 1)
    assert item(dev, 0x0000, 8) == b"QEMU\0\0\0\0"


def test_unknown_key_reads_zero() -> None:
    dev = FwCfg(1 << 20, 1)
    assert item(dev, 0x1234, 4) == bytes(4)
    assert item(dev, 0xFFFF, 4) == bytes(4)


def test_before_any_select_reads_zero() -> None:
    assert read_bytes(FwCfg(1 << 20, 1), 4) == bytes(4)


def test_select_resets_the_offset() -> None:
    dev = FwCfg(1 << 20, 1)
    assert item(dev, 0, 2) == b"QE"
    assert read_bytes(dev, 1) == b"M"
    assert item(dev, 0, 4) == b"QEMU"


def test_write_channel_bit_selects_the_same_item() -> None:
    dev = FwCfg(1 << 20, 1)
    assert item(dev, 0x4000, 4) == b"QEMU"


def test_data_port_writes_are_ignored() -> None:
    dev = FwCfg(1 << 20, 1)
    select(dev, 0)
    dev.write(DATA, 1, 0x41)
    dev.write(SEL, 1, 0x00)  # a byte write is a data write, not a select
    assert read_bytes(dev, 4) == b"QEMU"


def test_byte_read_at_selector_reads_data_as_qemu() -> None:
    dev = FwCfg(1 << 20, 1)
    select(dev, 0)
    assert dev.read(SEL, 1) == ord("Q")
    assert dev.read(DATA, 1) == ord("E")


def test_wide_read_is_refused_without_consuming() -> None:
    dev = FwCfg(1 << 20, 1)
    select(dev, 0)
    assert dev.read(SEL, 2) == 0xFFFF
    assert read_bytes(dev, 4) == b"QEMU"


def _dir_entry(size: int, key: int, name: bytes) -> bytes:
    return (size.to_bytes(4, "big") + key.to_bytes(2, "big") + b"\0\0"
            + name + bytes(56 - len(name)))


def test_empty_file_dir() -> None:
    dev = FwCfg(1 << 20, 1)
    assert item(dev, 0x0019, 8) == bytes(8)


def test_file_dir_layout_is_byte_exact_and_sorted() -> None:
    dev = FwCfg(1 << 20, 1)
    assert dev.add_file("opt/zeta", b"xyz") == 0x20
    assert dev.add_file("etc/alpha", b"12345") == 0x21
    assert dev.add_file("opt/beta", b"") == 0x22
    expected = (b"\x00\x00\x00\x03"
                + _dir_entry(5, 0x21, b"etc/alpha")
                + _dir_entry(0, 0x22, b"opt/beta")
                + _dir_entry(3, 0x20, b"opt/zeta"))
    assert len(expected) == 4 + 3 * 64
    assert item(dev, 0x0019, len(expected) + 4) == expected + bytes(4)
    assert item(dev, 0x20, 4) == b"xyz\0"
    assert item(dev, 0x21, 5) == b"12345"
    assert item(dev, 0x22, 1) == b"\0"


def test_file_names_are_checked() -> None:
    dev = FwCfg(1 << 20, 1)
    dev.add_file("a" * 55, b"ok")
    with pytest.raises(ValueError):
        dev.add_file("b" * 56, b"too long")
    with pytest.raises(ValueError):
        dev.add_file("\u00e9" * 28, b"56 bytes in UTF-8")
    with pytest.raises(ValueError):
        dev.add_file("a" * 55, b"duplicate")
    with pytest.raises(ValueError):
        dev.add_file("", b"empty")
    with pytest.raises(ValueError):
        dev.add_file("nul\0name", b"")
    assert item(dev, 0x0019, 4) == b"\x00\x00\x00\x01"


def test_set_item() -> None:
    dev = FwCfg(1 << 20, 1)
    dev.set_item(0x8003, b"e820")  # an arch-local key
    assert item(dev, 0x8003, 4) == b"e820"
    dev.set_item(0x0004, b"\x01\x00")
    assert item(dev, 0x0004, 2) == b"\x01\x00"
    dev.set_item(0x0020, b"taken")  # file keys skip keys already in use
    assert dev.add_file("f", b"file") == 0x21
    with pytest.raises(ValueError):
        dev.set_item(0x0019, b"")
    with pytest.raises(ValueError):
        dev.set_item(0x21, b"")
    with pytest.raises(ValueError):
        dev.set_item(0x4005, b"")
    with pytest.raises(ValueError):
        dev.set_item(0x10000, b"")


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        FwCfg(1 << 20, 0)
    with pytest.raises(ValueError):
        FwCfg(-1, 1)
    with pytest.raises(ValueError):
        FwCfg(1 << 20, 4, max_cpus=2)
    with pytest.raises(ValueError):
        FwCfg(1 << 20, 1, uuid=b"short")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 2]), st.integers(0, 1),
                          st.integers(0, 0xFFFF)), max_size=80))
def test_random_accesses_never_raise_or_widen(ops) -> None:
    dev = FwCfg(1 << 30, 4)
    dev.add_file("etc/test", bytes(range(100)))
    for is_write, size, offset, value in ops:
        offset = min(offset, FW_CFG_PORT_COUNT - size)
        if is_write:
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= dev.read(offset, size) < 1 << (8 * size)


def _dma(fw_cfg, memory, control, length, address, at=0x1000):
    import struct as _struct

    from hvvmm.devices.fw_cfg import FwCfgDma

    memory.write(at, _struct.pack(">IIQ", control, length, address))
    port = FwCfgDma(fw_cfg)
    port.write(0, 4, int.from_bytes((at >> 32).to_bytes(4, "big"), "little"))
    port.write(4, 4, int.from_bytes((at & 0xFFFF_FFFF).to_bytes(4, "big"), "little"))
    return _struct.unpack(">I", memory.read(at, 4))[0]


def test_dma_selects_reads_and_zero_fills_past_the_end():
    from hvvmm.memory import GuestMemory

    memory = GuestMemory.from_bytes(0x10000)
    fw_cfg = FwCfg(64 << 20, 1, memory=memory)
    fw_cfg.write(0, 2, 0x01)  # the ID advertises DMA
    assert fw_cfg.read(1, 1) == 0x03
    key = fw_cfg.add_file("etc/test", b"hello")
    memory.fill(0x2000, 16, 0xAA)
    assert _dma(fw_cfg, memory, key << 16 | 0x08 | 0x02, 8, 0x2000) == 0
    assert memory.read(0x2000, 9) == b"hello\0\0\0\xaa"
    # Skip then read continues from the offset.
    assert _dma(fw_cfg, memory, key << 16 | 0x08 | 0x04, 1, 0) == 0
    assert _dma(fw_cfg, memory, 0x02, 2, 0x3000) == 0
    assert memory.read(0x3000, 2) == b"el"


def test_dma_bad_requests_set_the_error_bit():
    from hvvmm.memory import GuestMemory

    memory = GuestMemory.from_bytes(0x10000)
    fw_cfg = FwCfg(64 << 20, 1, memory=memory)
    assert _dma(fw_cfg, memory, 0x00 << 16 | 0x08 | 0x02, 4, 0xFFFF_0000) == 0x01  # outside RAM
    assert _dma(fw_cfg, memory, 0x02, 1 << 31, 0x8000) == 0x01  # longer than RAM
    assert _dma(fw_cfg, memory, 0x10, 4, 0x2000) == 0x01  # writes are refused
    from hvvmm.devices.fw_cfg import FwCfgDma
    FwCfgDma(fw_cfg).write(4, 4, 0x0000_00F0)  # access structure outside RAM: ignored
    assert FwCfgDma(fw_cfg).read(0, 4) == int.from_bytes(b"QEMU", "little")


def test_dma_zero_fill_of_a_huge_read_does_not_allocate_its_length():
    import tracemalloc

    from hvvmm.memory import GuestMemory

    memory = GuestMemory.from_bytes(64 << 20)
    fw_cfg = FwCfg(64 << 20, 1, memory=memory)
    memory.fill(0x10_0000, 16, 0xAA)
    tracemalloc.start()
    try:  # the signature, then zeros over 63 MiB of guest RAM
        assert _dma(fw_cfg, memory, 0x08 | 0x02, 63 << 20, 0x10_0000) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert memory.read(0x10_0000, 6) == b"QEMU\0\0"
    assert peak < 8 << 20


def test_dma_write_takes_precedence_over_skip_as_in_qemu():
    from hvvmm.memory import GuestMemory

    memory = GuestMemory.from_bytes(0x10000)
    fw_cfg = FwCfg(64 << 20, 1, memory=memory)
    assert _dma(fw_cfg, memory, 0x10 | 0x04, 4, 0x2000) == 0x01
