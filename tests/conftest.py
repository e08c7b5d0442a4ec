"""Shared test fixtures: test-guest building and the skips for hosts that cannot run a tier."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import HealthCheck, settings

from hvvmm.host import host_virtualization, kvm_access_problem

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
    virt = host_virtualization()
    for item in items:
        if kvm_problem and ("guest" in item.keywords or "realguest" in item.keywords):
            item.add_marker(pytest.mark.skip(reason=f"needs a usable /dev/kvm: {kvm_problem}"))
        elif "realguest" in item.keywords and not virt.can_boot_stock_kernels:
            item.add_marker(pytest.mark.skip(
                reason=f"needs hardware virtualization to boot a stock kernel; this host has "
                       f"{virt.describe()}"))


@pytest.fixture(scope="session")
def guest_image():
    """``guest_image("hello")`` builds tests/guests/hello.c with the runtime (cached)."""
    from hvvmm.guestbuild import build_guest

    def build(name: str, *extra_sources: str) -> pathlib.Path:
        sources = [GUEST_SOURCES / f"{name}.c", *(GUEST_SOURCES / s for s in extra_sources)]
        return build_guest(sources, output_dir=GUEST_CACHE)

    return build


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
