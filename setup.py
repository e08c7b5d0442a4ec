"""Build hooks: the cffi API-mode KVM bindings and the built-in default guest."""

import importlib.util
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildPyWithDefaultGuest(build_py):
    """Also compile hvvmm/guestlib/default_guest.c into hvvmm/data/default-guest.elf, so
    `hvvmm run` with no kernel needs no compiler at run time."""

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("_hvvmm_guestbuild",
                                                      ROOT / "hvvmm" / "guestbuild.py")
        guestbuild = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(guestbuild)  # standalone module: imports nothing from hvvmm
        target = pathlib.Path(self.build_lib) / "hvvmm" / "data" / "default-guest.elf"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = guestbuild.build_guest([ROOT / "hvvmm" / "guestlib" / "default_guest.c"],
                                       output_dir=target.parent, name="default-guest")
        if pathlib.Path(image) != target:
            pathlib.Path(image).replace(target)


setup(
    cffi_modules=["hvvmm/kvm/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithDefaultGuest},
)
