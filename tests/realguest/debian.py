"""Real guests from Debian's packages, fetched with ``apt-get download`` into a cache at test time.

The cache lives in ``$HVVMM_GUEST_CACHE`` or ``~/.cache/hvvmm/realguest``; a package already there
is not fetched again. ``apt-get download`` needs no root and no dpkg lock, only the package lists
(``apt-get update``, which ``.ci/run`` does).
"""

from __future__ import annotations

import os
import pathlib
import subprocess

from initramfs import busybox_initramfs

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"  # Debian 12: the 6.1 cloud kernel
BUSYBOX_PACKAGE = "busybox-static"


class GuestUnavailable(RuntimeError):
    """The packages cannot be had on this machine (no apt, no package lists, no network)."""


def cache_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("HVVMM_GUEST_CACHE",
                                       pathlib.Path.home() / ".cache" / "hvvmm" / "realguest"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(args: list[str], cwd: pathlib.Path | None = None) -> str:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestUnavailable(f"{' '.join(args)}: {exc}") from None
    if done.returncode:
        raise GuestUnavailable(f"{' '.join(args)} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package the meta package depends on, e.g.
    linux-image-6.1.0-57-cloud-amd64."""
    for line in _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if name.startswith("linux-image-") and name != KERNEL_META_PACKAGE:
            return name
    raise GuestUnavailable(f"apt-cache knows no kernel behind {KERNEL_META_PACKAGE}")


def extracted(package: str) -> pathlib.Path:
    """The package's files, unpacked under the cache (downloaded once)."""
    root = cache_dir() / package
    if (root / ".complete").exists():
        return root
    debs = cache_dir() / "debs"
    debs.mkdir(exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        _run(["apt-get", "download", "-q", package], cwd=debs)
    (deb,) = debs.glob(f"{package}_*.deb")
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    (root / ".complete").touch()
    return root


def debian_kernel() -> pathlib.Path:
    package = kernel_package()
    (vmlinuz,) = (extracted(package) / "boot").glob("vmlinuz-*")
    return vmlinuz


def busybox_initrd() -> pathlib.Path:
    path = cache_dir() / "busybox-initrd.img"
    busybox = (extracted(BUSYBOX_PACKAGE) / "bin" / "busybox").read_bytes()
    image = busybox_initramfs(busybox)
    if not path.exists() or path.read_bytes() != image:
        path.write_bytes(image)
    return path
