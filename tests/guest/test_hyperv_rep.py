"""Rep hypercalls that the VMM continues (tests/guests/hv_rep.c).

The test registers its own rep call on the partition before the run
(``Partition.add_test_hypercall``); the dispatcher reads ``max_reps_per_entry`` on every call.

Two ways to bound an entry are covered: the handler stopping after two elements of
``request.rep_inputs()``, and the dispatcher's ``max_reps_per_entry = 2``. Either way the guest
sees one call per list, and the handler is entered once per two elements.
"""

import struct

import pytest
from procutil import assert_guest_passed

from hvvmm import Machine, MachineConfig
from hvvmm.hv.hypercall import HypercallKind, HypercallResult, HypercallSpec

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30
REP_CODE = 0x7FF0  # hv_rep.c
REP_COUNT = 37
REP_XOR = 0x5A5A5A5A5A5A5A5A
PER_ENTRY = 2


def element(data: bytes, index: int) -> bytes:
    value = (struct.unpack("<Q", data)[0] ^ REP_XOR) + index
    return struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF)


@pytest.mark.parametrize("sync_regs", [True, False], ids=["sync-regs", "get-set-regs"])
@pytest.mark.parametrize("bound", ["handler", "dispatcher"])
def test_rep_call_is_continued_and_completes(guest_image, bound, sync_regs):
    entries = []

    def handler(request):
        entries.append((request.rep_start, request.rep_end, request.rep_count))
        out = bytearray()
        for index, data in request.rep_inputs():
            if bound == "handler" and len(out) == PER_ENTRY * 8:
                break  # asking for this element completed the previous ones
            out += element(data, index)
        return HypercallResult(output=bytes(out))

    events = []
    with Machine(MachineConfig(kernel=guest_image("hv_rep"))) as machine:
        partition = machine.hyperv.partition
        partition.add_test_hypercall(HypercallSpec(
            code=REP_CODE, name="TestRepCall", kind=HypercallKind.REP, handler=handler,
            rep_input_size=8, rep_output_size=8))
        if bound == "dispatcher":
            partition.dispatcher.max_reps_per_entry = PER_ENTRY
        machine.hyperv.use_sync_regs = sync_regs  # False: as on a host without sync regs
        machine.hyperv.add_listener(events.append)
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
    console = machine.console_text
    assert_guest_passed(result, console)
    assert f"PASS: rep call: status 0, {REP_COUNT} of {REP_COUNT} reps completed" in console
    assert "PASS: rep call: every output element right" in console
    assert f"PASS: rep call: continued (RCX rep start advanced to {REP_COUNT - 1})" in console
    assert "PASS: rep call from start 30: elements 30..36 written, the others untouched" in console
    assert "PASS: rejected calls wrote no output" in console

    # The handler was entered once per two elements, each time from where the last one stopped.
    first = list(range(0, REP_COUNT, PER_ENTRY))
    second = list(range(30, REP_COUNT, PER_ENTRY))
    assert [start for start, _, _ in entries] == first + second
    assert all(count == REP_COUNT for _, _, count in entries)
    if bound == "dispatcher":
        assert all(end == min(start + PER_ENTRY, REP_COUNT) for start, end, _ in entries)

    # The trace: continuations, then exactly one completed call per list.
    calls = [e for e in events if e.kind == "hypercall" and e.number == REP_CODE]
    assert all(e.name == "TestRepCall" for e in calls)
    completed = [e for e in calls if "status" in e.result]
    continued = [e for e in calls if "continued_at_rep" in e.result]
    assert [e.result for e in completed[:2]] == \
        [{"status": "HV_STATUS_SUCCESS", "reps_completed": REP_COUNT}] * 2
    assert [e.result["continued_at_rep"] for e in continued] == \
        [s + PER_ENTRY for s in first[:-1]] + [s + PER_ENTRY for s in second[:-1]]
    assert [e.inputs["rep_start"] for e in calls[:len(first)]] == first
    assert all(e.inputs["rep_count"] == REP_COUNT for e in calls[:len(first)])
    # The malformed calls were answered without entering the handler.
    assert [e.result["status"] for e in completed[2:]] == [
        "HV_STATUS_INVALID_HYPERCALL_INPUT", "HV_STATUS_INVALID_HYPERCALL_INPUT",
        "HV_STATUS_INVALID_ALIGNMENT", "HV_STATUS_INVALID_ALIGNMENT"]
    # Counters are keyed by the TLFS name of the code (the spec's name is only in the trace).
    hypercalls = counters["vp0"]["hypercalls"]
    assert hypercalls[f"HvCall({REP_CODE:#06x})/HV_STATUS_SUCCESS"] == 2
    assert hypercalls[f"HvCall({REP_CODE:#06x})/#UD or continued"] == len(continued) \
        == len(entries) - 2
