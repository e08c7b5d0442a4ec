"""A hypercall gets the same answer whichever way the vCPU exit takes it: the compact path
(``PACKED_HYPERCALL`` -> ``HyperV._hypercall_exit`` -> ``Partition.hypercall_simple``) over the
sync-regs page or over KVM_GET/SET_REGS, and the general path (taken while a trace listener is
attached, and for exit objects when an exit observer is installed). tests/guests/hv_ipi.c makes
fast and memory-based simple calls, rep-less variable-header calls and refused ones."""

import pytest
from procutil import assert_guest_passed

from hvvmm import Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 20


def run(image, how: str):
    compact = []
    events = []
    with Machine(MachineConfig(kernel=image, smp=2, hyperv="minimal,hv-ipi")) as machine:
        hyperv = machine.hyperv
        partition = hyperv.partition
        simple = partition.hypercall_simple

        def counted(*args):
            handled = simple(*args)
            compact.append(handled)
            return handled

        partition.hypercall_simple = counted  # the closures look it up when they are made
        for vcpu in machine.vcpus:
            vcpu.set_hypercall_exit(hyperv.port, hyperv._hypercall_exit(vcpu))
        if how == "get-set-regs":
            hyperv.use_sync_regs = False
        elif how == "traced":
            hyperv.add_listener(events.append)
        elif how == "exit-objects":
            machine.add_exit_observer(lambda vcpu, exit: None)
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = hyperv.counters()
    assert_guest_passed(result, machine.console_text)
    return machine.console_text, counters, compact, events


def test_compact_and_general_paths_answer_alike(guest_image):
    image = guest_image("hv_ipi")
    runs = {how: run(image, how)
            for how in ("sync-regs", "get-set-regs", "traced", "exit-objects")}
    console, counters, compact, _ = runs["sync-regs"]
    assert any(compact), "the compact path never ran"
    assert not all(compact), "hv_ipi makes calls the compact path must decline"
    assert runs["get-set-regs"][2] == compact
    assert not any(runs["traced"][2]) and runs["traced"][3]
    assert runs["exit-objects"][2] == []
    for how, (other_console, other_counters, _, _) in runs.items():
        assert other_console == console, how
        assert other_counters == counters, how
