"""hvvmm's pytest plugin (loaded by pytest through the ``pytest11`` entry point): what a test
harness needs to build a small guest, boot it, and check how it ended.

Fixtures:

``hvvmm_build_guest``
    ``hvvmm_build_guest("t.c", "helper.S")`` compiles C/assembly files with hvvmm's guest runtime
    (``hvvmm/guestlib``: Multiboot entry, long mode, serial ``printf``, ``report()``,
    ``report_summary()``); ``hvvmm_build_guest(source=TEXT)`` (``language="asm"`` for
    assembly) builds source text. Images are cached by content in pytest's cache directory
    (``.pytest_cache``), so an unchanged guest is built once across runs.

``hvvmm_machine``
    ``hvvmm_machine(kernel=image, smp=2)`` returns a :class:`hvvmm.Machine` (the keywords are
    :class:`hvvmm.MachineConfig`'s) that is closed when the test ends, also if it fails. Tests
    using it are skipped, with the reason, where ``/dev/kvm`` is unusable.

``hvvmm_run_guest``
    ``result, console = hvvmm_run_guest(image, timeout=30, **config)``: boot, run to the end
    (bounded by ``timeout``), and return the outcome and the serial output.

Helper: :func:`assert_guest_passed` ``(result, console)`` or ``(machine)``: the guest printed no
``FAIL`` line and ended with isa-debug-exit 0 (``report_summary()`` with every check passed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pytest

DEFAULT_RUN_TIMEOUT = 30.0  # seconds; every run is bounded


def assert_guest_passed(result, console: str | None = None) -> None:
    """A test guest ran to its end with every check passed: no FAIL line, debug-exit 0.
    ``result`` is a :class:`hvvmm.MachineResult` (then pass the console text) or a
    :class:`hvvmm.Machine` that has run."""
    from . import ExitKind, Machine

    if isinstance(result, Machine):
        result, console = result.result, result.console_text
    console = console or ""
    __tracebackhide__ = True
    assert result is not None, "the guest has not run"
    assert "FAIL" not in console, console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, (result, console)


def _cache_dir(config) -> Path:
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        return Path(cache.mkdir("hvvmm-guests"))
    from .guestbuild import cache_dir

    return cache_dir()


@pytest.fixture(scope="session")
def hvvmm_build_guest(request):
    """Build a guest image from source files or text with hvvmm's runtime (cached)."""
    from .guestbuild import build_guest, build_guest_source

    output_dir = _cache_dir(request.config)

    def build(*sources: str | os.PathLike, source: str | None = None, language: str = "c",
              name: str | None = None, cflags: Sequence[str] = ()) -> Path:
        if source is not None:
            if sources:
                raise TypeError("give source files or source=TEXT, not both")
            return build_guest_source(source, language=language, name=name or "guest",
                                      output_dir=output_dir, extra_cflags=cflags)
        return build_guest(list(sources), output_dir=output_dir, name=name,
                           extra_cflags=cflags)

    return build


def _require_kvm() -> None:
    from .host import kvm_access_problem, kvm_device

    problem = kvm_access_problem(kvm_device())
    if problem:
        pytest.skip(f"needs a usable /dev/kvm: {problem}")


@pytest.fixture()
def hvvmm_machine():
    """A factory of machines that are closed when the test ends."""
    from . import Machine, MachineConfig

    _require_kvm()
    machines: list = []

    def create(config: MachineConfig | None = None, **settings) -> Machine:
        machine = Machine(config, **settings)
        machines.append(machine)
        return machine

    yield create
    for machine in reversed(machines):
        machine.close()


@pytest.fixture()
def hvvmm_run_guest(hvvmm_machine):
    """``result, console = hvvmm_run_guest(image, timeout=30, **config)``."""

    def run(kernel, *, timeout: float = DEFAULT_RUN_TIMEOUT, **settings):
        machine = hvvmm_machine(kernel=kernel, **settings)
        result = machine.run(timeout=timeout)
        return result, machine.console_text

    return run
