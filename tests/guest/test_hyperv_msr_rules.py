"""Synthetic-MSR access rules per ``--hyperv`` preset (tests/guests/hv_msr_rules.c): gating by
CPUID, read-only MSRs, not-implemented and unknown MSRs, RsvdP bits, the hypercall-page protocol.

The guest derives its expectations from the CPUID it sees; the table here states them
independently per preset, so an MSR that is advertised and faults, or works and is not
advertised, fails on both sides. The host also checks the #GP counters.
"""

import re

import pytest
from procutil import assert_guest_passed

from hvvmm import Machine, MachineConfig

pytestmark = pytest.mark.guest

RUN_TIMEOUT = 30

# (guest name, op) that work whenever Hyper-V is on. VP_ASSIST_PAGE: Linux 6.1 writes it with no
# CPUID check, so hvvmm accepts it although hv-vapic (which would advertise it) does not exist.
ALWAYS_OK = {("GUEST_OS_ID", "read"), ("HYPERCALL", "read"), ("VP_INDEX", "read"),
             ("VP_ASSIST_PAGE", "read"), ("VP_ASSIST_PAGE", "write")}
# What each implemented feature makes work.
FEATURE_OK = {
    "hv-runtime": {("VP_RUNTIME", "read")},
    "hv-time": {("TIME_REF_COUNT", "read"), ("REFERENCE_TSC", "read"), ("REFERENCE_TSC", "write")},
    "hv-frequencies": {("TSC_FREQUENCY", "read"), ("APIC_FREQUENCY", "read")},
    "hv-reset": {("RESET", "read"), ("RESET", "write")},
    "hv-idle": {("GUEST_IDLE", "read")},
    "hv-crash": {("CRASH_P0", "read"), ("CRASH_P0", "write"), ("CRASH_P4", "read"),
                 ("CRASH_CTL", "read"), ("CRASH_CTL", "write")},
    "hv-synic": {("SCONTROL", "read"), ("SCONTROL", "write"), ("SVERSION", "read"),
                 ("SIEFP", "read"), ("SIMP", "read"), ("EOM", "write"), ("SINT0", "read")},
    "hv-stimer": {("STIMER0_CONFIG", "read"), ("STIMER0_CONFIG", "write"),
                  ("STIMER0_COUNT", "read")},
}
# Read-only MSRs (writes #GP), and MSRs nothing implements (the APIC MSRs of the refused
# hv-vapic, syndbg, reenlightenment, TSC invariant control) or no one defines: #GP everywhere.
ALWAYS_GP = {("VP_INDEX", "write"), ("VP_RUNTIME", "write"), ("TIME_REF_COUNT", "write"),
             ("TSC_FREQUENCY", "write"), ("APIC_FREQUENCY", "write"), ("GUEST_IDLE", "write"),
             ("EOI", "write"), ("ICR", "read"), ("TPR", "read"), ("SYNDBG_OPTIONS", "read"),
             ("REENLIGHTENMENT_CONTROL", "read"), ("TSC_INVARIANT_CONTROL", "read"),
             ("MSR_0x400000FE", "read"), ("MSR_0x400001FF", "write"),
             ("NESTED_SCONTROL", "read")}
PRESET_FEATURES = {
    None: set(FEATURE_OK),  # the default: everything implemented
    "minimal": set(),
    "linux": {"hv-time", "hv-frequencies", "hv-crash", "hv-idle", "hv-synic", "hv-stimer"},
    "windows": {"hv-runtime", "hv-time", "hv-frequencies", "hv-crash", "hv-idle", "hv-synic",
                "hv-stimer"},
    "minimal,hv-crash,hv-reset": {"hv-crash", "hv-reset"},
}


def hvvmm_msr_name(guest_name: str) -> str:
    if guest_name.startswith("MSR_"):
        return f"MSR {int(guest_name[4:], 16):#x}"
    return f"HV_X64_MSR_{guest_name}"


def run_rules(guest_image, spec):
    with Machine(MachineConfig(kernel=guest_image("hv_msr_rules"), hyperv=spec)) as machine:
        result = machine.run(timeout=RUN_TIMEOUT)
        counters = machine.hyperv.counters()
    return result, machine.console_text, counters


@pytest.mark.parametrize("spec", list(PRESET_FEATURES), ids=lambda s: s or "default")
def test_msr_gating_and_rules(guest_image, spec):
    result, console, counters = run_rules(guest_image, spec)
    assert_guest_passed(result, console)

    works = set(ALWAYS_OK)
    for feature in PRESET_FEATURES[spec]:
        works |= FEATURE_OK[feature]
    faults = set(ALWAYS_GP)
    for feature, cases in FEATURE_OK.items():
        if feature not in PRESET_FEATURES[spec]:
            faults |= cases
    seen = dict(re.findall(r"^PASS: (\S+ (?:read|write)): (ok|#GP)$", console, re.MULTILINE))
    for name, op in works:
        assert seen.get(f"{name} {op}") == "ok", (name, op)
    for name, op in faults:
        assert seen.get(f"{name} {op}") == "#GP", (name, op)
    assert len(seen) == len(works | faults), sorted(set(seen) - {f"{n} {o}" for n, o in
                                                                 works | faults})

    # The protocol checks hold in every preset.
    for line in ("HYPERCALL enable before GUEST_OS_ID: no fault, Enable stays 0",
                 "GUEST_OS_ID all ones: ok, reads back",
                 "HYPERCALL with RsvdP bits 11:2: no fault", "hypercall through the page works",
                 "HYPERCALL Enable = 0: the RAM below is visible again",
                 "GUEST_OS_ID = 0 disables the hypercall page",
                 "HYPERCALL page over the LAPIC page: #GP",
                 "HYPERCALL Locked: a later write is ignored"):
        assert f"PASS: {line}" in console, line
    if "hv-time" in PRESET_FEATURES[spec]:
        assert "PASS: REFERENCE_TSC with RsvdP bits 11:1: no fault, reads back exactly" in console
        assert "PASS: REFERENCE_TSC disabled: the RAM below is visible again" in console
    else:
        assert "SKIP: REFERENCE_TSC not advertised" in console
    if "hv-crash" in PRESET_FEATURES[spec]:
        assert "PASS: CRASH_CTL with every bit but CrashNotify: no fault, no report" in console

    # The host counted exactly those #GPs (plus the refused hypercall-page placements).
    msr_faults = dict(counters["vp0"]["msr_faults"])
    refused = msr_faults.pop("HV_X64_MSR_HYPERCALL/write", 0)
    assert refused >= 1  # the LAPIC page
    assert msr_faults == {f"{hvvmm_msr_name(n)}/{op}": 1 for n, op in faults}


def test_hypercall_page_beyond_maxphyaddr_faults(guest_image):
    _, console, _ = run_rules(guest_image, None)
    line = re.search(r"^INFO: HYPERCALL page at (0x[0-9a-f]+) \(MAXPHYADDR (\d+)\): (.*), reads",
                     console, re.MULTILINE)
    assert line, console
    assert line.group(3) == "#GP"
