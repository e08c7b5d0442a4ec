"""MSRs whose value cannot change while the VM exists (VP_INDEX, the frequencies) are answered in
the C run loop after their first read (``hvvmm_run_packed``): every read still gets the right
value on every vCPU and is counted; with a trace listener or an exit observer every read goes
through Python instead, so each one is seen. tests/guests/hv_constant_msrs.c reads each MSR 500
times per vCPU."""

import pytest
from procutil import assert_guest_passed

from hvvmm import Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30  # seconds; every run is bounded
READS = 500       # the guest's READS
VP_INDEX, TSC_FREQUENCY = 0x4000_0002, 0x4000_0022


@pytest.mark.parametrize("watcher", [None, "listener", "observer"])
def test_constant_msr_reads_are_answered_counted_and_seen(guest_image, watcher):
    events = []
    with Machine(MachineConfig(kernel=guest_image("hv_constant_msrs"), smp=2)) as machine:
        if watcher == "listener":
            machine.hyperv.add_listener(events.append)
        elif watcher == "observer":
            machine.add_exit_observer(lambda vcpu, exit: None)
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
        in_loop = [vcpu.vcpu.constant_msr_hits() for vcpu in machine.vcpus]
    assert_guest_passed(result, machine.console_text)
    for vp in (0, 1):
        reads = counters[f"vp{vp}"]["msr_reads"]
        assert reads["HV_X64_MSR_VP_INDEX"] == READS
        assert reads["HV_X64_MSR_TSC_FREQUENCY"] == READS + 1
        assert reads["HV_X64_MSR_GUEST_OS_ID"] == 1  # not constant: always through Python
        if watcher is None:
            # All but the first read of each answered in the loop.
            assert in_loop[vp] == {VP_INDEX: READS - 1, TSC_FREQUENCY: READS}, in_loop
        else:
            assert not any(in_loop[vp].values()), in_loop
    if watcher == "listener":
        seen = [(event.vp, event.number) for event in events if event.kind == "msr_read"]
        for vp in (0, 1):
            assert seen.count((vp, VP_INDEX)) == READS
            assert seen.count((vp, TSC_FREQUENCY)) == READS + 1


def test_a_listener_added_while_running_sees_every_later_read(guest_image):
    """Adding a listener takes the constant MSRs out of the loop at once: from vp0's first
    VP_INDEX read on, every read reaches the listener, and no read is counted twice or lost."""
    events = []
    with Machine(MachineConfig(kernel=guest_image("hv_constant_msrs"), smp=2)) as machine:
        hyperv = machine.hyperv
        original = hyperv.partition.msr_read

        def read_then_listen(vp_index, index):
            value = original(vp_index, index)
            if vp_index == 0 and index == VP_INDEX and not hyperv.listeners:
                hyperv.add_listener(events.append)  # on vp0's thread, inside its exit
            return value

        hyperv.partition.msr_read = read_then_listen
        for vcpu in machine.vcpus:  # the exits take msr_read when they are made
            vcpu.set_msr_exit(hyperv._msr_exit(vcpu))
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = hyperv.counters()
        in_loop = [vcpu.vcpu.constant_msr_hits() for vcpu in machine.vcpus]
    assert_guest_passed(result, machine.console_text)
    seen = [(event.vp, event.number) for event in events if event.kind == "msr_read"]
    assert seen.count((0, VP_INDEX)) == READS - 1  # all after the one that added it
    assert seen.count((0, TSC_FREQUENCY)) == READS  # the first one came before it
    assert in_loop[0] == {TSC_FREQUENCY: 0}, in_loop
    for vp in (0, 1):
        reads = counters[f"vp{vp}"]["msr_reads"]
        assert reads["HV_X64_MSR_VP_INDEX"] == READS
        assert reads["HV_X64_MSR_TSC_FREQUENCY"] == READS + 1


def test_the_vcpus_of_a_machine_share_a_python_gate_and_leave_it_when_they_end(guest_image):
    """With a host CPU for each vCPU thread, a thread back from KVM_RUN spins while another
    one runs Python (hvvmm.kvm.PythonGate); when the run ends no thread counts as running
    Python any more, so nothing would wait for it."""
    import os

    smp = 2
    if len(os.sched_getaffinity(0)) < smp:
        pytest.skip(f"the gate is for machines whose {smp} vCPU threads each have a host CPU; "
                    f"this process may use {len(os.sched_getaffinity(0))}")
    with Machine(MachineConfig(kernel=guest_image("hv_constant_msrs"), smp=smp)) as machine:
        gates = {id(vcpu.vcpu.python_gate) for vcpu in machine.vcpus}
        gate = machine.vcpus[0].vcpu.python_gate
        result = machine.run(timeout=RUN_TIMEOUT)
    assert_guest_passed(result, machine.console_text)
    assert gate is not None and len(gates) == 1
    assert gate.running_python == 0


def test_a_single_vcpu_has_no_python_gate(guest_image):
    with Machine(MachineConfig(kernel=guest_image("hello"))) as machine:
        assert machine.vcpus[0].vcpu.python_gate is None
