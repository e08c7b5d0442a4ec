"""A minimal initramfs for real-guest boots: busybox and an /init script, as a newc cpio archive.

The newc ("new ASCII") format is the one the kernel unpacks (Linux
Documentation/driver-api/early-userspace/buffer-format.rst): per entry a 110-byte header of
"070701" and thirteen 8-digit hex fields, the NUL-terminated name padded to 4 bytes, then the data
padded to 4 bytes; the archive ends with an entry named "TRAILER!!!".
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

_MAGIC = b"070701"


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def newc_archive(entries: list[Entry]) -> bytes:
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        out += _pad4(header + name)
        out += _pad4(entry.data)
    return bytes(out)


INIT_SCRIPT = """\
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "hvvmm-init: /init started"
/bin/busybox dmesg > /dev/null
echo "hvvmm-init: online CPUs $(/bin/busybox cat /sys/devices/system/cpu/online)"
echo "hvvmm-init: clocksource $(/bin/busybox cat \
/sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "hvvmm-init: clockevents $(/bin/busybox cat \
/sys/devices/system/clockevents/clockevent*/current_device)"
echo "hvvmm-init: powering off"
/bin/busybox poweroff -f
"""


def busybox_initramfs(busybox: bytes, init_script: str = INIT_SCRIPT,
                      compress: bool = True) -> bytes:
    """An initramfs holding /bin/busybox (a static binary) and ``init_script`` as /init."""
    directory = stat.S_IFDIR | 0o755
    executable = stat.S_IFREG | 0o755
    archive = newc_archive([
        Entry("bin", directory), Entry("dev", directory), Entry("proc", directory),
        Entry("sys", directory),
        # The kernel opens /dev/console for init's stdio before anything is mounted.
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("bin/busybox", executable, busybox),
        Entry("init", executable, init_script.encode()),
    ])
    return gzip.compress(archive, mtime=0) if compress else archive
