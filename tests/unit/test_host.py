"""What ``hvvmm info`` says about the host's virtualization (hvvmm.host)."""

import pytest

from hvvmm.host import HostVirtualization


@pytest.mark.parametrize("hardware", ["vmx", "svm", None])
def test_an_emulating_kvm_is_described_as_booting_stock_kernels_slowly(hardware):
    # Instruction completion (hvvmm.x86) lets stock Linux boot where KVM emulates ring 0.
    host = HostVirtualization(hardware, ("kvm", "kvm_pvm"))
    assert not host.ring0_on_hardware
    text = host.describe()
    assert "PVM" in text and "stock kernels boot, slowly" in text
    assert "cannot boot" not in text


@pytest.mark.parametrize("hardware, name", [("vmx", "Intel VT-x"), ("svm", "AMD-V")])
def test_hardware_kvm_runs_ring0_on_hardware(hardware, name):
    host = HostVirtualization(hardware, ("kvm", f"kvm_{'intel' if hardware == 'vmx' else 'amd'}"))
    assert host.ring0_on_hardware
    assert host.describe() == f"{name}: KVM runs guest ring-0 code on hardware"


def test_no_virtualization_at_all():
    host = HostVirtualization(None, ())
    assert not host.ring0_on_hardware
    assert "no vmx/svm" in host.describe()


def test_the_earlier_property_name_still_answers():
    assert HostVirtualization("vmx", ("kvm_intel",)).can_boot_stock_kernels
    assert not HostVirtualization(None, ("kvm_pvm",)).can_boot_stock_kernels
