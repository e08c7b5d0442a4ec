"""hvvmm: a KVM virtual machine monitor in Python that implements the Hyper-V guest interface.

The public API is imported lazily, so the pure-Python parts (``hvvmm.hv``, ``hvvmm.devices``,
``hvvmm.memory``) can be used and tested without the compiled KVM bindings.
"""

__version__ = "0.1.0"

_MACHINE_API = ("ConfigError", "ExitKind", "ImageError", "Machine", "MachineConfig",
                "MachineResult")

__all__ = [*_MACHINE_API, "__version__"]


def __getattr__(name):
    if name in _MACHINE_API:
        from . import machine

        return getattr(machine, name)
    raise AttributeError(f"module 'hvvmm' has no attribute {name!r}")
