"""The stock Debian cloud bzImage reaches its first console line with its kernel unpacked in the
host (booted through PVH) and with the kernel's own decompressor (the 64-bit bzImage entry).

Prints the time from starting ``hvvmm run`` to the first kernel line for each; the run stops
there. Run with ``.venv/bin/python -m pytest -m realguest -s tests/realguest -k first_line``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

import debian

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

LIMIT = float(os.environ.get("HVVMM_REALGUEST_TIMEOUT", "900"))


def time_to_first_line(kernel, decompress: str) -> tuple[float, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvvmm", "run", "--kernel", str(kernel), "--memory", "512M",
         "--append", "console=ttyS0 earlyprintk=ttyS0", "--kernel-decompress", decompress,
         "--timeout", str(LIMIT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    output = b""
    try:
        while b"Command line:" not in output and time.monotonic() - started < LIMIT:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
        return time.monotonic() - started, output.decode(errors="replace")
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("decompress", ["host", "guest"])
def test_first_kernel_line(decompress):
    try:
        kernel = debian.debian_kernel()
    except debian.GuestUnavailable as exc:
        pytest.fail(f"the Debian kernel could not be fetched: {exc}")
    elapsed, console = time_to_first_line(kernel, decompress)
    assert "Linux version 6.1" in console, console[-3000:]
    print(f"\n{kernel.name}, --kernel-decompress {decompress}: first kernel line after "
          f"{elapsed:.1f} s")
