"""Linux 6.1's Hyper-V boot sequence, replayed by a tiny guest (tests/guests/hv_linux_boot.c).

The guest checks every answer itself (PASS/FAIL lines); these tests also check what the VMM saw:
the order of the MSR traffic (the reference TSC page before GUEST_OS_ID, as Linux's
``hyperv_timer.c`` and ``hv_init.c`` do), the
overlay pages, the decoded guest identity, the per-VP counters, and ``hvvmm run --trace``.
"""

import json
import re
import subprocess
import sys

import pytest

from hvvmm import ExitKind, Machine, MachineConfig
from procutil import describe
from hvvmm.hv.hvdef import (
    HV_X64_MSR_GUEST_OS_ID,
    HV_X64_MSR_HYPERCALL,
    HV_X64_MSR_REFERENCE_TSC,
    HV_X64_MSR_VP_ASSIST_PAGE,
    HV_X64_MSR_VP_INDEX,
    HypercallCode,
    HvStatus,
    decode_guest_os_id,
)

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30
LINUX_6_1_192_GUEST_ID = 0x8100000601C00000
UNKNOWN_CALL_CODE = 0x7FFE  # hv_linux_boot.c
STUB = bytes.fromhex("f30f1efa") + bytes((0xE6,))  # endbr64; out imm8, al


def _gpa(console: str, what: str) -> int:
    match = re.search(rf"^INFO: gpa {what} (0x[0-9a-f]+)$", console, re.MULTILINE)
    assert match, f"no '{what}' address line in the console:\n{console}"
    return int(match.group(1), 16)


def _assert_all_passed(result, console: str) -> None:
    assert "FAIL" not in console, console
    assert re.search(r"^SUMMARY: \d+ tests, 0 failures$", console, re.MULTILINE), console
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 0, (result, console)


def _first(events, kind, number, vp=0):
    for position, event in enumerate(events):
        if event.kind == kind and event.number == number and event.vp == vp:
            return position
    raise AssertionError(f"no {kind} of {number:#x} on vp{vp} in the trace")


@pytest.mark.parametrize("smp", [1, 2])
def test_linux_boot_replay(guest_image, smp):
    events = []
    with Machine(MachineConfig(kernel=guest_image("hv_linux_boot"), smp=smp)) as machine:
        machine.hyperv.add_listener(events.append)
        result = machine.run(timeout=RUN_TIMEOUT)
        console = machine.console_text
        _assert_all_passed(result, console)

        # The guest's own checks that matter most, by name (a missing line is a failure too).
        for line in ("0x40000000 vendor \"Microsoft Hv\"", "0x40000001 interface \"Hv#1\"",
                     "TSC page valid right after the WRMSR",
                     "extra: GUEST_OS_ID still 0 while the TSC page works",
                     "GUEST_OS_ID reads back", "hypercall page starts with endbr64 (fa1e0ff3)",
                     "HvExtCallQueryCapabilities -> result 0x0, capabilities 0x1",
                     f"extra: unknown call code {UNKNOWN_CALL_CODE:#x} -> result 0x2",
                     "extra: a write to the hypercall page leaves it unchanged",
                     "extra: the page still works"):
            assert f"PASS: {line}" in console, line
        for cpu in range(smp):
            assert f"PASS: cpu {cpu}: VP_INDEX = {cpu}\n" in console
            assert f"PASS: cpu {cpu}: VP_ASSIST_PAGE written without a CPUID check" in console
        for cpu in range(1, smp):
            assert f"PASS: cpu {cpu}: hypercall through the page -> status 2" in console
            assert f"PASS: cpu {cpu}: TSC page clock readable" in console
        if smp > 1:
            assert f"PASS: {smp} of {smp} vCPUs ran hv_cpu_init" in console
        # What hvvmm does with the write (TLFS: #GP; hvvmm drops it, see hvvmm.vcpu).
        write_fault = re.search(r"^INFO: hypercall page write: (.*)$", console, re.MULTILINE)
        assert write_fault and write_fault.group(1) in ("no fault", "#GP"), console

        # The overlays sit where the guest put them, and the dropped write reached neither the
        # overlay nor the RAM below it.
        partition = machine.hyperv.partition
        page_gpa = _gpa(console, "hypercall_page")
        tsc_gpa = _gpa(console, "tsc_page")
        assert partition.hypercall_port_active()
        assert partition.hypercall_page_gpa == page_gpa
        overlay = machine.memslots.overlay_at(page_gpa)
        assert overlay is not None and overlay.readonly
        assert overlay.read(0, 7) == STUB + bytes((machine.hyperv.port, 0xC3))
        assert machine.memory.read(page_gpa, 16) == bytes(16)
        tsc_overlay = machine.memslots.overlay_at(tsc_gpa)
        assert tsc_overlay is not None and tsc_overlay.readonly
        assert int.from_bytes(tsc_overlay.read(0, 4), "little") not in (0, 0xFFFFFFFF)

        # The identity Linux reported, decoded.
        assert partition.guest_os_id == LINUX_6_1_192_GUEST_ID
        decoded = decode_guest_os_id(partition.guest_os_id)
        assert decoded.is_linux and decoded.linux_version == (6, 1, 192)
        counters = machine.hyperv.counters()

    # Linux's order on the BSP (hv_init_tsc_clocksource(), then hyperv_init() in
    # arch/x86/hyperv/hv_init.c): the TSC page first,
    # VP_INDEX and VP_ASSIST_PAGE next, then GUEST_OS_ID, then the hypercall page.
    tsc_write = _first(events, "msr_write", HV_X64_MSR_REFERENCE_TSC)
    vp_index = _first(events, "msr_read", HV_X64_MSR_VP_INDEX)
    assist = _first(events, "msr_write", HV_X64_MSR_VP_ASSIST_PAGE)
    guest_id = _first(events, "msr_write", HV_X64_MSR_GUEST_OS_ID)
    hypercall_read = _first(events, "msr_read", HV_X64_MSR_HYPERCALL)
    hypercall_write = _first(events, "msr_write", HV_X64_MSR_HYPERCALL)
    query = _first(events, "hypercall", HypercallCode.HvExtCallQueryCapabilities)
    assert tsc_write < vp_index < assist < guest_id < hypercall_read < hypercall_write < query
    assert events[guest_id].inputs == {"value": f"{LINUX_6_1_192_GUEST_ID:#x}"}
    assert events[hypercall_write].inputs == {"value": f"{page_gpa | 1:#x}"}
    assert events[tsc_write].inputs == {"value": f"{tsc_gpa | 1:#x}"}
    assert events[query].result["status"] == "HV_STATUS_SUCCESS"
    assert events[query].inputs["output_gpa"] != "0x0"
    for vp in range(smp):
        read = events[_first(events, "msr_read", HV_X64_MSR_VP_INDEX, vp)]
        assert read.result == {"value": f"{vp:#x}"}
    assert not [e for e in events if "fault" in e.result], "no #GP or #UD anywhere"

    vp0 = counters["vp0"]
    assert vp0["msr_writes"]["HV_X64_MSR_GUEST_OS_ID"] == 1
    assert vp0["msr_writes"]["HV_X64_MSR_HYPERCALL"] == 1
    assert vp0["msr_writes"]["HV_X64_MSR_REFERENCE_TSC"] == 1
    assert vp0["hypercalls"]["HvExtCallQueryCapabilities/HV_STATUS_SUCCESS"] == 1
    # Codes no feature registered share one counter (the trace below still names the code).
    unknown = f"unknown codes/{HvStatus.HV_STATUS_INVALID_HYPERCALL_CODE.name}"
    assert vp0["hypercalls"][unknown] == 2
    for vp in range(1, smp):
        assert counters[f"vp{vp}"]["hypercalls"] == {unknown: 1}
        assert counters[f"vp{vp}"]["msr_writes"] == {"HV_X64_MSR_VP_ASSIST_PAGE": 1}
    assert all(not c["msr_faults"] for c in counters.values())


def test_trace_file_has_the_msr_writes_and_hypercalls(guest_image, tmp_path):
    """``hvvmm run --trace FILE``: one JSON object per line, names decoded."""
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "hvvmm", "run", "--kernel", str(guest_image("hv_linux_boot")),
         "--smp", "2", "--trace", str(trace), "--timeout", str(RUN_TIMEOUT)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT + 30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, describe(proc)  # debug-exit 0: hvvmm run exits 0
    assert "SUMMARY: " in proc.stdout and "FAIL" not in proc.stdout, proc.stdout

    lines = trace.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records, "empty trace"
    for record in records:
        assert set(record) == {"time", "vp", "kind", "number", "name", "inputs", "result"}

    def find(kind, name, vp=0):
        return [(i, r) for i, r in enumerate(records)
                if r["kind"] == kind and r["name"] == name and r["vp"] == vp]

    (tsc_at, tsc), = find("msr_write", "HV_X64_MSR_REFERENCE_TSC")
    (id_at, guest_id), = find("msr_write", "HV_X64_MSR_GUEST_OS_ID")
    (hc_at, hypercall_msr), = find("msr_write", "HV_X64_MSR_HYPERCALL")
    assert tsc_at < id_at < hc_at
    assert guest_id["number"] == "0x40000000"
    assert guest_id["inputs"]["value"] == f"{LINUX_6_1_192_GUEST_ID:#x}"
    assert int(hypercall_msr["inputs"]["value"], 16) & 1
    (_, query), = find("hypercall", "HvExtCallQueryCapabilities")
    assert query["number"] == "0x8001"
    assert query["result"] == {"status": "HV_STATUS_SUCCESS", "reps_completed": 0}
    assert query["inputs"]["fast"] is False and query["inputs"]["long_mode"] is True
    unknown = find("hypercall", f"HvCall({UNKNOWN_CALL_CODE:#06x})") + \
        find("hypercall", f"HvCall({UNKNOWN_CALL_CODE:#06x})", vp=1)
    assert len(unknown) == 3
    assert all(r["result"]["status"] == "HV_STATUS_INVALID_HYPERCALL_CODE" for _, r in unknown)
    (_, ap_index), = find("msr_read", "HV_X64_MSR_VP_INDEX", vp=1)
    assert ap_index["result"] == {"value": "0x1"}
