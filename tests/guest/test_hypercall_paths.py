"""A hypercall gets the same answer whichever way the vCPU exit takes it: the compact path
(``PACKED_HYPERCALL`` -> ``HyperV._hypercall_exit`` -> ``Partition.simple_hypercalls``) over the
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
        prepare = partition.simple_hypercalls

        class Counted(dict):
            def __init__(self, vp_index):
                super().__init__()
                self.calls = prepare(vp_index)

            def __missing__(self, control):
                call = self.calls[control]
                if call is None:
                    return None

                def counted(*args):
                    status = call(*args)
                    if status is not None:
                        compact.append(True)
                    return status
                return counted

        general = hyperv._dispatch

        def counted_general(*args):
            compact.append(False)
            general(*args)

        # The closures take their compact path from it when they are made.
        partition.simple_hypercalls = Counted
        hyperv._dispatch = counted_general
        for vcpu in machine.vcpus:
            vcpu.set_hypercall_exit(hyperv._hypercall_exit(vcpu))
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
    assert runs["exit-objects"][2] and not any(runs["exit-objects"][2])
    for how, (other_console, other_counters, _, _) in runs.items():
        assert other_console == console, how
        assert other_counters == counters, how
