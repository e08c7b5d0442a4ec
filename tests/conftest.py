"""Shared test fixtures: test-guest building and the skips for hosts that cannot run a tier."""

from __future__ import annotations

import pathlib
import shutil

import pytest
from hypothesis import HealthCheck, settings

from hvvmm.host import kvm_access_problem

# No per-example deadline and no too-slow health check: on a shared, loaded CI machine one
# example can stall past hypothesis's default 200 ms although nothing is wrong. Speed is
# measured under bench/.
settings.register_profile("hvvmm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hvvmm")

TESTS = pathlib.Path(__file__).resolve().parent
GUEST_SOURCES = TESTS / "guests"
GUEST_CACHE = TESTS / ".guest-cache"


def pytest_collection_modifyitems(config, items):
    kvm_problem = kvm_access_problem()
    for item in items:
        needs_kvm = item.get_closest_marker("guest") or item.get_closest_marker("realguest")
        if kvm_problem and needs_kvm:
            item.add_marker(pytest.mark.skip(reason=f"needs a usable /dev/kvm: {kvm_problem}"))


@pytest.fixture(scope="session")
def guest_image():
    """``guest_image("hello")`` builds tests/guests/hello.c with the runtime (cached);
    ``guest_image("device_echo")`` a guest shipped in hvvmm/guestlib/examples. (Harnesses
    outside this repository use the plugin's ``hvvmm_build_guest``, see hvvmm/pytest_plugin.py.)"""
    from hvvmm.guestbuild import build_guest, example_guest, example_guests

    def build(name: str, *extra_sources: str) -> pathlib.Path:
        if name in example_guests() and not extra_sources:
            return example_guest(name, output_dir=GUEST_CACHE)
        sources = [GUEST_SOURCES / f"{name}.c", *(GUEST_SOURCES / s for s in extra_sources)]
        return build_guest(sources, output_dir=GUEST_CACHE)

    return build


@pytest.fixture(scope="session")
def host_tool():
    """``host_tool("qemu-img", "qemu-utils")``: the path of a program that the README's install
    line (and so .ci/run) installs from Debian package ``qemu-utils``. A missing one fails the
    test, it does not skip: a skip would read as a pass of a check that never ran."""

    def find(program: str, package: str) -> str:
        path = shutil.which(program)
        if path is None:
            pytest.fail(f"{program} is missing: install the Debian package {package} "
                        "(the README's install line does)")
        return path

    return find


@pytest.fixture()
def bench_module():
    """``bench_module("hv_roundtrip")`` imports a benchmark from bench/ (gcc and binutils are
    prerequisites of the suite, as for the test guests: a missing one fails, it does not skip)."""
    import importlib
    import sys

    bench = TESTS.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(bench))
