/*
 * The synthetic-MSR access rules (TLFS feature-discovery.md, hypercall-interface.md,
 * timers.md; KVM selftest x86/hyperv_features.c checks the same faults):
 *
 *  1. gating: each MSR in the table works iff its CPUID bit is advertised,
 *     otherwise #GP; read-only MSRs #GP on write; SynIC/stimer/APIC/syndbg
 *     MSRs (not implemented, so not advertised) and unknown synthetic MSRs
 *     #GP.  Each line reads "PASS: NAME read|write: #GP|ok" so the host can
 *     check its own expectations for the preset too.
 *  2. reserved bits: HYPERCALL 11:2 and REFERENCE_TSC 11:1 are RsvdP (no
 *     fault, kept), GUEST_OS_ID has none, CRASH_CTL's unknown bits are
 *     ignored; no RsvdZ bit exists in these MSRs, so nothing here may #GP.
 *  3. the hypercall page protocol: Enable stays 0 while GUEST_OS_ID is 0;
 *     the page is an overlay that hides RAM and uncovers it again when it is
 *     disabled or GUEST_OS_ID goes back to 0; an unplaceable GPA #GPs; the
 *     Locked bit.
 */
#include "hyperv.h"

#define UNKNOWN_CALL_CODE 0x7ffe
#define PATTERN 0x5a

enum gate { ALWAYS, NEVER, PRIV, FEAT, PRIV_FEAT };
enum op { RD, WR };

struct msr_case {
    const char *name;
    uint32_t msr;
    enum op op;
    uint64_t value;                 /* for writes */
    enum gate gate;
    uint32_t priv, feat;            /* 0x40000003 EAX / EDX bits */
};

#define RO_WRITE(n, m) { n, m, WR, 0, NEVER, 0, 0 }

static const struct msr_case cases[] = {
    { "GUEST_OS_ID", HV_X64_MSR_GUEST_OS_ID, RD, 0, PRIV, HV_MSR_HYPERCALL_AVAILABLE, 0 },
    { "HYPERCALL", HV_X64_MSR_HYPERCALL, RD, 0, PRIV, HV_MSR_HYPERCALL_AVAILABLE, 0 },
    { "VP_INDEX", HV_X64_MSR_VP_INDEX, RD, 0, PRIV, HV_MSR_VP_INDEX_AVAILABLE, 0 },
    RO_WRITE("VP_INDEX", HV_X64_MSR_VP_INDEX),
    { "VP_RUNTIME", HV_X64_MSR_VP_RUNTIME, RD, 0, PRIV, HV_MSR_VP_RUNTIME_AVAILABLE, 0 },
    RO_WRITE("VP_RUNTIME", HV_X64_MSR_VP_RUNTIME),
    { "TIME_REF_COUNT", HV_X64_MSR_TIME_REF_COUNT, RD, 0, PRIV, HV_MSR_TIME_REF_COUNT_AVAILABLE, 0 },
    RO_WRITE("TIME_REF_COUNT", HV_X64_MSR_TIME_REF_COUNT),
    { "REFERENCE_TSC", HV_X64_MSR_REFERENCE_TSC, RD, 0, PRIV, HV_MSR_REFERENCE_TSC_AVAILABLE, 0 },
    { "REFERENCE_TSC", HV_X64_MSR_REFERENCE_TSC, WR, 0, PRIV, HV_MSR_REFERENCE_TSC_AVAILABLE, 0 },
    { "TSC_FREQUENCY", HV_X64_MSR_TSC_FREQUENCY, RD, 0, PRIV_FEAT, HV_ACCESS_FREQUENCY_MSRS,
      HV_FEATURE_FREQUENCY_MSRS_AVAILABLE },
    RO_WRITE("TSC_FREQUENCY", HV_X64_MSR_TSC_FREQUENCY),
    { "APIC_FREQUENCY", HV_X64_MSR_APIC_FREQUENCY, RD, 0, PRIV_FEAT, HV_ACCESS_FREQUENCY_MSRS,
      HV_FEATURE_FREQUENCY_MSRS_AVAILABLE },
    RO_WRITE("APIC_FREQUENCY", HV_X64_MSR_APIC_FREQUENCY),
    { "RESET", HV_X64_MSR_RESET, RD, 0, PRIV, HV_MSR_RESET_AVAILABLE, 0 },
    { "RESET", HV_X64_MSR_RESET, WR, 0, PRIV, HV_MSR_RESET_AVAILABLE, 0 },   /* 0: no reset */
    { "GUEST_IDLE", HV_X64_MSR_GUEST_IDLE, RD, 0, PRIV_FEAT, HV_MSR_GUEST_IDLE_AVAILABLE,
      HV_X64_GUEST_IDLE_STATE_AVAILABLE },
    RO_WRITE("GUEST_IDLE", HV_X64_MSR_GUEST_IDLE),
    { "CRASH_P0", HV_X64_MSR_CRASH_P0, RD, 0, FEAT, 0, HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE },
    { "CRASH_P0", HV_X64_MSR_CRASH_P0, WR, 0x1234, FEAT, 0, HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE },
    { "CRASH_P4", HV_X64_MSR_CRASH_P4, RD, 0, FEAT, 0, HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE },
    { "CRASH_CTL", HV_X64_MSR_CRASH_CTL, RD, 0, FEAT, 0, HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE },
    { "CRASH_CTL", HV_X64_MSR_CRASH_CTL, WR, 0, FEAT, 0, HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE },
    /* Linux writes it with no CPUID check; hvvmm accepts it whatever CPUID says (§3.2). */
    { "VP_ASSIST_PAGE", HV_X64_MSR_VP_ASSIST_PAGE, RD, 0, ALWAYS, 0, 0 },
    { "VP_ASSIST_PAGE", HV_X64_MSR_VP_ASSIST_PAGE, WR, 0, ALWAYS, 0, 0 },
    { "EOI", HV_X64_MSR_EOI, WR, 0, PRIV, HV_MSR_APIC_ACCESS_AVAILABLE, 0 },
    { "ICR", HV_X64_MSR_ICR, RD, 0, PRIV, HV_MSR_APIC_ACCESS_AVAILABLE, 0 },
    { "TPR", HV_X64_MSR_TPR, RD, 0, PRIV, HV_MSR_APIC_ACCESS_AVAILABLE, 0 },
    { "SCONTROL", HV_X64_MSR_SCONTROL, RD, 0, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "SCONTROL", HV_X64_MSR_SCONTROL, WR, 1, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "SVERSION", HV_X64_MSR_SVERSION, RD, 0, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "SIEFP", HV_X64_MSR_SIEFP, RD, 0, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "SIMP", HV_X64_MSR_SIMP, RD, 0, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "EOM", HV_X64_MSR_EOM, WR, 0, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "SINT0", HV_X64_MSR_SINT0, RD, 0, PRIV, HV_MSR_SYNIC_AVAILABLE, 0 },
    { "STIMER0_CONFIG", HV_X64_MSR_STIMER0_CONFIG, RD, 0, PRIV, HV_MSR_SYNTIMER_AVAILABLE, 0 },
    { "STIMER0_CONFIG", HV_X64_MSR_STIMER0_CONFIG, WR, 0, PRIV, HV_MSR_SYNTIMER_AVAILABLE, 0 },
    { "STIMER0_COUNT", HV_X64_MSR_STIMER0_COUNT, RD, 0, PRIV, HV_MSR_SYNTIMER_AVAILABLE, 0 },
    { "SYNDBG_OPTIONS", HV_X64_MSR_SYNDBG_OPTIONS, RD, 0, FEAT, 0, 1u << 11 },
    { "REENLIGHTENMENT_CONTROL", HV_X64_MSR_REENLIGHTENMENT_CONTROL, RD, 0, PRIV,
      HV_ACCESS_REENLIGHTENMENT, 0 },
    { "TSC_INVARIANT_CONTROL", HV_X64_MSR_TSC_INVARIANT_CONTROL, RD, 0, PRIV,
      HV_ACCESS_TSC_INVARIANT, 0 },
    { "MSR_0x400000FE", 0x400000FE, RD, 0, NEVER, 0, 0 },
    { "MSR_0x400001FF", 0x400001FF, WR, 0, NEVER, 0, 0 },
    { "NESTED_SCONTROL", 0x40001080, RD, 0, NEVER, 0, 0 },
};

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t tsc_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static struct hv_features hv;

static bool gate_open(const struct msr_case *c)
{
    switch (c->gate) {
    case ALWAYS: return true;
    case NEVER: return false;
    case PRIV: return (hv.priv_low & c->priv) == c->priv;
    case FEAT: return (hv.features & c->feat) == c->feat;
    case PRIV_FEAT: return (hv.priv_low & c->priv) == c->priv && (hv.features & c->feat) == c->feat;
    }
    return false;
}

static bool shows_pattern(const uint8_t *page)
{
    const volatile uint8_t *p = page;
    return p[0] == PATTERN && p[5] == PATTERN && p[HV_PAGE_SIZE - 1] == PATTERN;
}

static bool shows_stub(const uint8_t *page)
{
    return *(const volatile uint32_t *)page == ENDBR64_U32;
}

static void check_gating(void)
{
    for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
        const struct msr_case *c = &cases[i];
        uint64_t val;
        int vec = c->op == RD ? rdmsr_safe(c->msr, &val) : wrmsr_safe(c->msr, c->value);
        bool expect_ok = gate_open(c) && !(c->gate == NEVER);
        bool ok = vec == 0;
        report(ok == expect_ok && (ok || vec == GP_VECTOR), "%s %s: %s", c->name,
               c->op == RD ? "read" : "write", ok ? "ok" : vec == GP_VECTOR ? "#GP" :
               exception_mnemonic(vec));
    }
}

static void check_hypercall_page(void)
{
    uint64_t gpa = (uintptr_t)hypercall_page, val;
    memset(hypercall_page, PATTERN, sizeof(hypercall_page));

    /* Enable with no guest OS identity: accepted, Enable stays 0, no overlay. */
    wrmsr(HV_X64_MSR_GUEST_OS_ID, 0);
    int vec = wrmsr_safe(HV_X64_MSR_HYPERCALL, gpa | 1);
    val = rdmsr(HV_X64_MSR_HYPERCALL);
    report(vec == 0 && !(val & 1) && shows_pattern(hypercall_page),
           "HYPERCALL enable before GUEST_OS_ID: no fault, Enable stays 0 (%#llx), RAM visible",
           (unsigned long long)val);

    /* GUEST_OS_ID has no reserved bits. */
    uint64_t id = 0xffffffffffffffffull;
    vec = wrmsr_safe(HV_X64_MSR_GUEST_OS_ID, id);
    report(vec == 0 && rdmsr(HV_X64_MSR_GUEST_OS_ID) == id, "GUEST_OS_ID all ones: ok, reads back");
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);

    /* RsvdP 11:2 set: no fault; kept. */
    uint64_t with_rsvd = gpa | 0xFFC | 1;
    vec = wrmsr_safe(HV_X64_MSR_HYPERCALL, with_rsvd);
    val = rdmsr(HV_X64_MSR_HYPERCALL);
    report(vec == 0 && val == with_rsvd && shows_stub(hypercall_page),
           "HYPERCALL with RsvdP bits 11:2: no fault, reads back %#llx, page mapped",
           (unsigned long long)val);
    hv_hypercall_pg = hypercall_page;
    report(hypercall(UNKNOWN_CALL_CODE, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE,
           "hypercall through the page works");

    /* Enable = 0 uncovers the RAM below (TLFS overlay). */
    wrmsr(HV_X64_MSR_HYPERCALL, gpa);
    report(!(rdmsr(HV_X64_MSR_HYPERCALL) & 1) && shows_pattern(hypercall_page),
           "HYPERCALL Enable = 0: the RAM below is visible again");

    /* GUEST_OS_ID = 0 disables the page. */
    wrmsr(HV_X64_MSR_HYPERCALL, gpa | 1);
    bool mapped = shows_stub(hypercall_page);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, 0);
    report(mapped && !(rdmsr(HV_X64_MSR_HYPERCALL) & 1) && shows_pattern(hypercall_page),
           "GUEST_OS_ID = 0 disables the hypercall page");
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);

    /* Pages the platform cannot place (the LAPIC page; beyond MAXPHYADDR): #GP, still off. */
    vec = wrmsr_safe(HV_X64_MSR_HYPERCALL, APIC_DEFAULT_BASE | 1);
    report(vec == GP_VECTOR && !(rdmsr(HV_X64_MSR_HYPERCALL) & 1),
           "HYPERCALL page over the LAPIC page: %s", vec ? exception_mnemonic(vec) : "no fault");
    unsigned phys_bits = cpuid(0x80000008).a & 0xFF;
    uint64_t beyond = 1ull << phys_bits;
    vec = wrmsr_safe(HV_X64_MSR_HYPERCALL, beyond | 1);
    val = rdmsr(HV_X64_MSR_HYPERCALL);
    report_info("HYPERCALL page at %#llx (MAXPHYADDR %u): %s, reads %#llx",
                (unsigned long long)beyond, phys_bits, vec ? exception_mnemonic(vec) : "no fault",
                (unsigned long long)val);
    if (!vec)
        wrmsr(HV_X64_MSR_HYPERCALL, 0);
}

static void check_reference_tsc(void)
{
    if (!(hv.priv_low & HV_MSR_REFERENCE_TSC_AVAILABLE)) {
        report_skip("REFERENCE_TSC not advertised");
        return;
    }
    memset(tsc_page, PATTERN, sizeof(tsc_page));
    uint64_t value = (uintptr_t)tsc_page | 0xFFE | 1;
    int vec = wrmsr_safe(HV_X64_MSR_REFERENCE_TSC, value);
    uint64_t back = rdmsr(HV_X64_MSR_REFERENCE_TSC);
    const struct hv_tsc_page *p = (const struct hv_tsc_page *)tsc_page;
    report(vec == 0 && back == value && p->tsc_sequence != 0 && p->tsc_scale != 0,
           "REFERENCE_TSC with RsvdP bits 11:1: no fault, reads back exactly, page valid");
    wrmsr(HV_X64_MSR_REFERENCE_TSC, 0);
    report(rdmsr(HV_X64_MSR_REFERENCE_TSC) == 0 && shows_pattern(tsc_page),
           "REFERENCE_TSC disabled: the RAM below is visible again");
}

static void check_crash_ctl_reserved(void)
{
    if (!(hv.features & HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE)) {
        report_skip("crash MSRs not advertised");
        return;
    }
    /* Every bit but CrashNotify: ignored, no report (a report would end the run). */
    int vec = wrmsr_safe(HV_X64_MSR_CRASH_CTL, ~HV_CRASH_CTL_CRASH_NOTIFY);
    report(vec == 0, "CRASH_CTL with every bit but CrashNotify: no fault, no report");
}

static void check_locked(void)
{
    if (!(hv.features & HV_X64_HYPERCALL_MSR_LOCK_AVAILABLE)) {
        report_skip("HYPERCALL Locked bit not advertised");
        return;
    }
    uint64_t locked = (uintptr_t)hypercall_page | HV_X64_MSR_HYPERCALL_LOCKED | 1;
    wrmsr(HV_X64_MSR_HYPERCALL, locked);
    int vec = wrmsr_safe(HV_X64_MSR_HYPERCALL, 0);
    uint64_t val = rdmsr(HV_X64_MSR_HYPERCALL);
    report(vec == 0 && val == locked && shows_stub(hypercall_page),
           "HYPERCALL Locked: a later write is ignored (reads %#llx), the page stays",
           (unsigned long long)val);
}

int main(void)
{
    hv = hv_read_features();
    report_info("privileges %#x/%#x features %#x", hv.priv_low, hv.priv_high, hv.features);
    check_gating();
    check_hypercall_page();
    check_reference_tsc();
    check_crash_ctl_reserved();
    check_locked();
    report_summary();
}
