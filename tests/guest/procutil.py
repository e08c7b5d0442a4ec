"""Reading from a guest process without ever blocking past a deadline."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from hvvmm.pytest_plugin import assert_guest_passed  # noqa: F401  (the plugin's, for these tests)


def read_line(proc: subprocess.Popen, timeout: float = 30.0, stream=None) -> str:
    """The next line ``proc`` writes to stdout (or ``stream``, e.g. ``proc.stderr``), without the
    newline. Raises AssertionError if no
    whole line arrives within ``timeout`` seconds (a guest that never prints must fail the test,
    not hang it). Reads the raw pipe a byte at a time, so nothing past the line is consumed and a
    later ``communicate()`` still sees the rest."""
    fd = (proc.stdout if stream is None else stream).fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no output line within {timeout:g} s (got {bytes(line)!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            byte = os.read(fd, 1)
            if not byte:
                raise AssertionError(f"output ended before a whole line (got {bytes(line)!r})")
            line += byte
    return line[:-1].decode(errors="replace")


HVVMM = [sys.executable, "-m", "hvvmm"]  # the installed hvvmm's command line, as a user runs it


def run_hvvmm(*args, timeout: float = 120, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """``python -m hvvmm ARGS`` run to its end (bounded by ``timeout``: a guest that hangs fails
    the test), stdin closed, stdout and stderr captured as text; ``env`` adds variables."""
    return subprocess.run([*HVVMM, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


def describe(proc: subprocess.CompletedProcess) -> str:
    """A finished run for an assertion message: the status, then stdout and stderr whole (a
    tuple would be shortened by pytest's repr and hide the guest's FAIL line)."""
    return (f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout}"
            f"\n--- stderr ---\n{proc.stderr}")
