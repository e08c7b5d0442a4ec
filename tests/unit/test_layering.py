"""Layering: the KVM layer (hvvmm/kvm) imports nothing above it, and the Hyper-V emulator
(hvvmm/hv, hvvmm/enlightenments) nothing of the KVM layer."""

import subprocess
import sys


def loaded_after(module: str) -> set[str]:
    code = (f"import sys, {module}; "
            "print(' '.join(m for m in sys.modules if m.startswith('hvvmm')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return set(out.split())


def test_the_kvm_layer_imports_nothing_above_it():
    above = {m for m in loaded_after("hvvmm.kvm")
             if m != "hvvmm" and not m.startswith("hvvmm.kvm")}
    assert above == set()


def test_the_hyperv_emulator_does_not_import_the_kvm_layer():
    loaded = loaded_after("hvvmm.hv.partition") | loaded_after("hvvmm.enlightenments")
    assert not {m for m in loaded if m.startswith("hvvmm.kvm")}
