"""Smoke test of the Hyper-V benchmarks: they run with a handful of iterations and print figures.

Not a performance test (no threshold on the ratios); it keeps bench/hv_roundtrip.py,
bench/c/hv_loop.c and bench/tsc_page_exits.py working as hvvmm changes.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.guest


def test_hv_roundtrip_prints_both_ratios(bench_module, capsys):
    ratios = bench_module("hv_roundtrip").main(["--count", "50", "--runs", "1"])
    out = capsys.readouterr().out
    assert set(ratios) == {"hypercall", "msr", "msr-generic"}
    assert all(ratio > 0 for ratio in ratios.values())
    assert re.search(r"^hypercall .*ratio \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^synthetic MSR read \(VP_INDEX\).*ratio \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^synthetic MSR read through the general path .*ratio \d+\.\d\dx$", out,
                     re.M), out


def test_tsc_page_reads_cause_no_exits(bench_module, capsys):
    counts = bench_module("tsc_page_exits").main(["--reads", "100"])
    out = capsys.readouterr().out
    assert counts["page_exits"] == 0, out
    assert counts["msr_exits"] == counts["msr_reads"] == 100, out
    assert "100 reads of the TSC page clock: 0 exits" in out


def test_virtio_blk_read_bench_prints_a_throughput(bench_module, capsys):
    figures = bench_module("virtio_blk_read").main(["--size-mib", "2", "--rounds", "1",
                                                    "--runs", "1"])
    out = capsys.readouterr().out
    assert figures["hvvmm"] > 0
    assert re.search(r"^virtio-blk sequential read.*hvvmm \d+ MiB/s", out, re.M), out


@pytest.mark.slow
def test_disk_boot_bench_times_the_first_mbr_line(bench_module, capsys):
    figures = bench_module("disk_boot").main(["--runs", "1"])
    out = capsys.readouterr().out
    assert 0 < figures["hvvmm"] < 120
    assert re.search(r"^start to first MBR output: hvvmm \d+\.\d\d s", out, re.M), out
