"""Smoke test of bench/stimer_accuracy.py: every mode runs briefly and prints its figures, and
no expiry is early. Not a performance test (no threshold on lateness)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.guest


def test_stimer_accuracy_runs_every_mode(bench_module, capsys):
    stimer_accuracy = bench_module("stimer_accuracy")
    assert stimer_accuracy.main(["--seconds", "0.1", "--pings", "20"]) == 0
    out = capsys.readouterr().out
    for mode in ("periodic", "oneshot", "message"):
        match = re.search(rf"^{mode}: (\d+) expiries of a 1000 us timer; early: (\d+);", out,
                          re.M)
        assert match, out
        assert int(match.group(1)) == 100 and int(match.group(2)) == 0, out
    assert re.search(r"^  guest-side lateness: p50 +[\d.]+ +p99 +[\d.]+ +max", out, re.M), out
    assert re.search(r"^  DeliveryTime - ExpirationTime: p50", out, re.M), out
    assert len(re.findall(r"^ping \(.*\(n=20\)$", out, re.M)) == 2, out
