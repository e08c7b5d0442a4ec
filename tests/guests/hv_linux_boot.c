/*
 * Replays, in order, what Linux 6.1 does with the Hyper-V interface while it
 * boots (arch/x86/kernel/cpu/mshyperv.c, arch/x86/hyperv/hv_init.c,
 * drivers/clocksource/hyperv_timer.c), and checks
 * every answer:
 *
 *   phase 1  detection (CPUID 0x40000000/1/3), privileges and hints, limits,
 *            version, APIC_FREQUENCY, the reference TSC page enabled and read
 *            at once (before GUEST_OS_ID exists), TSC_FREQUENCY (twice);
 *   phase 3  hyperv_init(): CRASH_CTL, VP_INDEX, VP_ASSIST_PAGE (written with
 *            no CPUID check, as 6.1 does), GUEST_OS_ID, the hypercall page
 *            (rdmsr, then (old & 0xFFE) | pfn << 12 | 1), its ENDBR64, the
 *            extended-capabilities query through the page;
 *   phase 5  each AP: VP_INDEX, VP_ASSIST_PAGE, a hypercall, the TSC page.
 *
 * Beyond Linux (marked "extra"): an unknown call code, GUEST_OS_ID read-back,
 * and a write to the hypercall page, which must not change it.  Lines
 * "INFO: gpa ..." give the host the page addresses.
 */
#include "hyperv.h"

#define UNKNOWN_CALL_CODE 0x7ffe      /* no such hypercall */

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t tsc_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t vp_assist[MAX_CPUS][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t ext_caps __attribute__((aligned(8)));  /* Linux: a static kernel variable */
static struct hv_features hv;
static volatile int aps_done;

static bool tsc_page_enabled;

static void check_clock(int cpu)
{
    uint64_t t;
    if (!tsc_page_enabled)
        return;
    bool valid = hv_read_tsc_page_tsc((struct hv_tsc_page *)tsc_page, &t, NULL);
    report(valid && t > 0, "cpu %d: TSC page clock readable (%llu x 100 ns)", cpu,
           (unsigned long long)t);
}

/* hv_cpu_init(): rdmsr VP_INDEX, then wrmsr VP_ASSIST_PAGE = pfn << 12 | 1
 * with no CPUID check (Linux arch/x86/hyperv/hv_init.c). */
static void hv_cpu_init(int cpu)
{
    uint64_t index = ~0ull, back = 0;
    int vec = rdmsr_safe(HV_X64_MSR_VP_INDEX, &index);
    report(vec == 0 && index == (uint64_t)cpu, "cpu %d: VP_INDEX = %llu", cpu,
           (unsigned long long)index);
    uint64_t assist = (uintptr_t)vp_assist[cpu] | HV_X64_MSR_VP_ASSIST_PAGE_ENABLE;
    vec = wrmsr_safe(HV_X64_MSR_VP_ASSIST_PAGE, assist);
    int vec2 = rdmsr_safe(HV_X64_MSR_VP_ASSIST_PAGE, &back);
    report(vec == 0 && vec2 == 0 && back == assist,
           "cpu %d: VP_ASSIST_PAGE written without a CPUID check is accepted (%s, reads %#llx)",
           cpu, (hv.priv_low & HV_MSR_APIC_ACCESS_AVAILABLE) ? "advertised" : "not advertised",
           (unsigned long long)back);
}

static void ap_main(int cpu)
{
    hv_cpu_init(cpu);
    uint64_t status = hypercall(UNKNOWN_CALL_CODE, 0, 0);
    report(hv_result_status(status) == HV_STATUS_INVALID_HYPERCALL_CODE,
           "cpu %d: hypercall through the page -> status %u", cpu, hv_result_status(status));
    check_clock(cpu);
    atomic_inc(&aps_done);
}

int main(void)
{
    /* ---- phase 1: ms_hyperv_platform() / ms_hyperv_init_platform() ---- */
    report(cpuid(1).c & (1u << 31), "CPUID.1:ECX.hypervisor set");
    struct cpuid vendor = cpuid(HV_CPUID_VENDOR);
    char name[13];
    memcpy(name, &vendor.b, 4);
    memcpy(name + 4, &vendor.c, 4);
    memcpy(name + 8, &vendor.d, 4);
    name[12] = 0;
    report(strcmp(name, "Microsoft Hv") == 0, "0x40000000 vendor \"%s\"", name);
    report(vendor.a >= 0x40000005 && vendor.a <= 0x4000FFFF,
           "0x40000000 max leaf %#x in [0x40000005, 0x4000ffff]", vendor.a);
    report(cpuid(HV_CPUID_INTERFACE).a == HV_SIGNATURE_HV1, "0x40000001 interface \"Hv#1\"");
    hv = hv_read_features();
    report((hv.priv_low & HV_MSR_HYPERCALL_AVAILABLE) && (hv.priv_low & HV_MSR_VP_INDEX_AVAILABLE),
           "HYPERCALL and VP_INDEX available (Linux detects Hyper-V)");
    report_info("Hyper-V: privilege flags low %#x, high %#x, hints %#x, misc %#x",
                hv.priv_low, hv.priv_high, hv.hints, hv.features);
    report(!(hv.priv_high & (HV_ACCESS_PARTITION_ID | HV_CPU_MANAGEMENT | HV_ISOLATION)),
           "no AccessPartitionId, CpuManagement or Isolation (mshyperv.c)");
    report(!(hv.hints & HV_X64_APIC_ACCESS_RECOMMENDED),
           "no APIC-access recommendation with the in-kernel LAPIC");
    struct cpuid kvm = cpuid(0x40000100);
    report(memcmp(&kvm.b, "KVMK", 4) != 0, "no KVM signature at 0x40000100 (KVM would win)");
    struct cpuid limits = cpuid(HV_CPUID_LIMITS);
    report_info("max VPs %u, max LPs %u", limits.a, limits.b);
    struct cpuid version = cpuid(HV_CPUID_VERSION);
    report_info("Hyper-V: Host Build %u.%u.%u.%u-%u-%u", version.b >> 16, version.b & 0xFFFF,
                version.a, version.d & 0xFFFFFF, version.c, version.d >> 24);

    bool freq = (hv.priv_low & HV_ACCESS_FREQUENCY_MSRS) &&
                (hv.features & HV_FEATURE_FREQUENCY_MSRS_AVAILABLE);
    if (freq) {
        uint64_t apic_hz = 0;
        int vec = rdmsr_safe(HV_X64_MSR_APIC_FREQUENCY, &apic_hz);
        report(vec == 0 && apic_hz == 1000000000ull, "APIC_FREQUENCY = %llu Hz",
               (unsigned long long)apic_hz);
    }
    report(!(hv.priv_low & HV_ACCESS_TSC_INVARIANT),
           "TSC_INVARIANT not advertised (the TSC page clocksource wins)");

    /* hv_init_clocksource(): the TSC page, before GUEST_OS_ID is written. */
    if (hv.priv_low & HV_MSR_REFERENCE_TSC_AVAILABLE) {
        uint64_t written = hv_enable_tsc_page(tsc_page);
        report_info("gpa tsc_page %#lx", (unsigned long)(uintptr_t)tsc_page);
        const struct hv_tsc_page *p = (const struct hv_tsc_page *)tsc_page;
        report(rdmsr(HV_X64_MSR_REFERENCE_TSC) == written, "REFERENCE_TSC reads back %#llx",
               (unsigned long long)written);
        uint32_t seq = p->tsc_sequence;
        uint64_t scale = p->tsc_scale;
        report(seq != 0 && seq != 0xFFFFFFFFu && scale != 0,
               "TSC page valid right after the WRMSR (sequence %#x, scale %#llx)", seq,
               (unsigned long long)scale);
        tsc_page_enabled = true;
        check_clock(0);                      /* hv_sched_clock_offset = read now */
        report(rdmsr(HV_X64_MSR_GUEST_OS_ID) == 0,
               "extra: GUEST_OS_ID still 0 while the TSC page works");
    } else if (hv.priv_low & HV_MSR_TIME_REF_COUNT_AVAILABLE) {
        uint64_t t = 0;
        report(rdmsr_safe(HV_X64_MSR_TIME_REF_COUNT, &t) == 0, "MSR clocksource readable");
    }

    /* tsc_early_init(): x86_platform.calibrate_cpu/tsc = hv_get_tsc_khz (twice). */
    if (freq) {
        uint64_t a = 0, b = 0;
        int vec = rdmsr_safe(HV_X64_MSR_TSC_FREQUENCY, &a) | rdmsr_safe(HV_X64_MSR_TSC_FREQUENCY, &b);
        report(vec == 0 && a != 0 && a == b, "tsc: Detected %llu.%03llu MHz processor",
               (unsigned long long)(a / 1000000), (unsigned long long)(a / 1000 % 1000));
    }

    /* ---- phase 3: hyperv_init() ---- */
    if (hv.features & HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE) {
        uint64_t ctl = 0;
        int vec = rdmsr_safe(HV_X64_MSR_CRASH_CTL, &ctl);
        report(vec == 0 && (ctl & HV_CRASH_CTL_CRASH_NOTIFY_MSG),
               "CRASH_CTL reads %#llx: the kmsg-dump channel is offered",
               (unsigned long long)ctl);
    }
    hv_cpu_init(0);

    uint64_t guest_id = hv_linux_guest_id(6, 1, 192);
    report(guest_id == HV_LINUX_6_1_192_GUEST_ID, "Linux 6.1.192 guest id %#llx",
           (unsigned long long)guest_id);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, guest_id);
    report(rdmsr(HV_X64_MSR_GUEST_OS_ID) == guest_id, "GUEST_OS_ID reads back");

    uint64_t hc = hv_enable_hypercall_page(hypercall_page);
    report_info("gpa hypercall_page %#lx", (unsigned long)(uintptr_t)hypercall_page);
    uint64_t hc_back = rdmsr(HV_X64_MSR_HYPERCALL);
    report(hc_back == hc && (hc_back & HV_X64_MSR_HYPERCALL_ENABLE),
           "HYPERCALL reads back %#llx with Enable set", (unsigned long long)hc_back);

    const volatile uint8_t *page = hypercall_page;
    uint32_t first = *(const volatile uint32_t *)page;
    report(first == ENDBR64_U32, "hypercall page starts with endbr64 (%08x)", first);
    report(page[4] == 0xE6 && page[6] == 0xC3, "stub: out %#x, al; ret", page[5]);

    if (hv.priv_high & HV_ENABLE_EXTENDED_HYPERCALLS) {
        ext_caps = ~0ull;
        uint64_t status = hypercall(HV_EXT_CALL_QUERY_CAPABILITIES, 0, (uintptr_t)&ext_caps);
        report(status == HV_STATUS_SUCCESS && ext_caps != ~0ull,
               "HvExtCallQueryCapabilities -> result %#llx, capabilities %#llx",
               (unsigned long long)status, (unsigned long long)ext_caps);
    }
    uint64_t status = hypercall(UNKNOWN_CALL_CODE, 0, 0);
    report(status == HV_STATUS_INVALID_HYPERCALL_CODE,
           "extra: unknown call code %#x -> result %#llx", UNKNOWN_CALL_CODE,
           (unsigned long long)status);

    /* Extra: the page is read-only (TLFS: writes #GP).  It must stay unchanged. */
    uint8_t before[16];
    for (int i = 0; i < 16; i++)
        before[i] = page[i];
    int vec = write_u8_safe((volatile uint8_t *)hypercall_page, 0x90);
    report_info("hypercall page write: %s", vec ? exception_mnemonic(vec) : "no fault");
    bool same = true;
    for (int i = 0; i < 16; i++)
        same &= page[i] == before[i];
    report(same, "extra: a write to the hypercall page leaves it unchanged");
    status = hypercall(UNKNOWN_CALL_CODE, 0, 0);
    report(status == HV_STATUS_INVALID_HYPERCALL_CODE, "extra: the page still works");

    /* ---- phase 5: the APs ---- */
    int expected = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
    if (expected > 1) {
        int online = smp_init(ap_main);
        uint64_t start = rdtsc();
        while (atomic_read(&aps_done) < online - 1 && rdtsc() - start < 20000000000ULL)
            pause();
        report(online == expected && atomic_read(&aps_done) == expected - 1,
               "%d of %d vCPUs ran hv_cpu_init", atomic_read(&aps_done) + 1, expected);
    }
    report_summary();
}
