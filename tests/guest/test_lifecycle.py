"""Create/run/destroy cycles through the library leak no fds, threads or guest memory."""

import threading

import psutil
import pytest

from hvvmm import ExitKind, Machine, MachineConfig

pytestmark = pytest.mark.guest


def test_fifty_cycles_leak_nothing(guest_image):
    image = guest_image("hello")
    process = psutil.Process()

    def cycle():
        with Machine(MachineConfig(kernel=image, smp=2, memory=64 << 20)) as machine:
            result = machine.run(timeout=30)
        assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0

    cycle()  # first-use allocations (bindings, caches) happen here
    fds, threads = process.num_fds(), threading.active_count()
    rss = process.memory_info().rss
    for _ in range(50):
        cycle()
    assert process.num_fds() == fds
    assert threading.active_count() == threads
    # 50 x 64 MiB of guest RAM would be 3.2 GiB; allow noise, not a leaked VM.
    assert process.memory_info().rss - rss < 64 << 20


def test_failed_construction_leaks_nothing(tmp_path):
    process = psutil.Process()
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\0" * 4096)
    fds = process.num_fds()
    for _ in range(5):
        with pytest.raises(ValueError):
            Machine(MachineConfig(kernel=bad))
    assert process.num_fds() == fds
