/*
 * Partition reference time: TIME_REF_COUNT (an MSR exit each read) and the
 * reference TSC page (no exit) must be one clock (TLFS timers.md; kvm-unit-tests
 * x86/hyperv_clock.c checks the same), on every vCPU.
 *
 * BSP, before the APs start (phases are marked on HV_TEST_MARK_PORT so the
 * host can time them and count exits):
 *   mark 1 / mark 2   TIME_REF_COUNT around a host-side delay; the host
 *                     compares the difference with its own clock
 *   mark 3 / mark 4   PAGE_READS TSC-page reads: the host counts exits
 *   mark 5 / mark 6   MSR_READS TIME_REF_COUNT reads (the control: exits)
 * Then every vCPU at once: ROUNDS alternating page/MSR reads.  Each value is
 * checked against the previous one on this CPU (never backwards), the MSR
 * value against the two page reads around it (t1 <= msr <= t2, as
 * kvm-unit-tests hyperv_clock does), and against the largest value any CPU
 * has seen before it (no warp between CPUs).  The rate check compares the
 * MSR's advance with TSC_FREQUENCY x the TSC's advance (1%).
 */
#include "hyperv.h"

#define PAGE_READS 1000
#define MSR_READS 200
#define ROUNDS 1500
#define AGREE_UNITS 1000            /* 100 us */

static uint8_t tsc_page_mem[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static const struct hv_tsc_page *tsc_page = (const struct hv_tsc_page *)tsc_page_mem;
static uint64_t tsc_hz;
static uint64_t global_max;              /* largest reference time any CPU has seen */
static volatile int aps_done;

static uint64_t page_now(void)
{
    uint64_t t = 0;
    if (!hv_read_tsc_page_tsc(tsc_page, &t, NULL))
        return 0;
    return t;
}

static void publish(uint64_t value)
{
    uint64_t seen = atomic_read(&global_max);
    while (seen < value && !atomic_cmpxchg(&global_max, seen, value))
        seen = atomic_read(&global_max);
}

static void check_cpu(int cpu)
{
    uint64_t prev = 0, min_gap = ~0ull, max_gap = 0;
    int backwards = 0, outside = 0, warps = 0;
    /* Each end of the rate check: the TSC read on both sides of the MSR read, so a
     * vCPU delayed inside the exit widens the bracket instead of skewing the rate. */
    uint64_t a0 = rdtsc(), r0 = rdmsr(HV_X64_MSR_TIME_REF_COUNT), b0 = rdtsc();
    for (int i = 0; i < ROUNDS; i++) {
        uint64_t before = atomic_read(&global_max);
        uint64_t t1 = page_now();
        uint64_t m = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
        uint64_t t2 = page_now();
        backwards += (t1 < prev) + (m < t1) + (t2 < m);
        outside += !(t1 <= m && m <= t2);
        warps += t1 < before;
        if (m >= t1) {
            min_gap = m - t1 < min_gap ? m - t1 : min_gap;
            max_gap = m - t1 > max_gap ? m - t1 : max_gap;
        }
        prev = t2;
        publish(t2);
    }
    uint64_t a1 = rdtsc(), r1 = rdmsr(HV_X64_MSR_TIME_REF_COUNT), b1 = rdtsc();

    report(backwards == 0, "cpu %d: alternating page/MSR reads never go backwards (%d did, of %d)",
           cpu, backwards, 3 * ROUNDS);
    report(outside == 0, "cpu %d: page <= TIME_REF_COUNT <= page on every round (%d not)",
           cpu, outside);
    report(min_gap <= AGREE_UNITS,
           "cpu %d: TIME_REF_COUNT and the TSC page agree within 100 us (closest %llu, "
           "widest %llu units)", cpu, (unsigned long long)min_gap, (unsigned long long)max_gap);
    report(warps == 0, "cpu %d: no value older than one another CPU already saw (%d)", cpu, warps);

    /* The two MSR reads happened between a1 - b0 and b1 - a0 TSC ticks apart
     * (their brackets' inner and outer spans): the advance must fall in that range
     * converted with TSC_FREQUENCY, give or take 1% and 20 us. */
    uint64_t elapsed = r1 - r0;
    uint64_t shortest = (a1 - b0) * 10000000ull / tsc_hz;
    uint64_t longest = (b1 - a0) * 10000000ull / tsc_hz;
    report(shortest > 0 && elapsed + shortest / 100 + 200 >= shortest &&
           elapsed <= longest + longest / 100 + 200,
           "cpu %d: TIME_REF_COUNT advanced %llu units, TSC_FREQUENCY x TSC says %llu..%llu",
           cpu, (unsigned long long)elapsed, (unsigned long long)shortest,
           (unsigned long long)longest);
}

static void ap_main(int cpu)
{
    check_cpu(cpu);
    atomic_inc(&aps_done);
}

int main(void)
{
    struct hv_features hv = hv_read_features();
    if (!(hv.priv_low & HV_MSR_REFERENCE_TSC_AVAILABLE) ||
        !(hv.priv_low & HV_MSR_TIME_REF_COUNT_AVAILABLE) ||
        !(hv.priv_low & HV_ACCESS_FREQUENCY_MSRS)) {
        report(false, "reference time and frequency MSRs advertised (%#x)", hv.priv_low);
        report_summary();
    }
    tsc_hz = rdmsr(HV_X64_MSR_TSC_FREQUENCY);
    report(tsc_hz > 10000000, "TSC_FREQUENCY %llu Hz", (unsigned long long)tsc_hz);
    hv_enable_tsc_page(tsc_page_mem);
    report(tsc_page->tsc_sequence != 0 && tsc_page->tsc_scale != 0, "TSC page valid");

    /* Host-timed interval: the host sleeps while handling mark 1. */
    uint64_t a = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
    hv_test_mark(1);
    hv_test_mark(2);
    uint64_t b = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
    report_info("host-timed interval: %llu units", (unsigned long long)(b - a));

    /* Exit counting: page reads (none expected), then MSR reads (one each). */
    uint64_t last = 0;
    int bad = 0;
    hv_test_mark(3);
    for (int i = 0; i < PAGE_READS; i++) {
        uint64_t t = page_now();
        bad += t == 0 || t < last;
        last = t;
    }
    hv_test_mark(4);
    hv_test_mark(5);
    for (int i = 0; i < MSR_READS; i++)
        last = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
    hv_test_mark(6);
    report(bad == 0, "%d TSC-page reads, all valid and monotonic", PAGE_READS);

    int expected = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
    int online = expected > 1 ? smp_init(ap_main) : 1;
    check_cpu(0);
    uint64_t start = rdtsc();
    while (atomic_read(&aps_done) < online - 1 && rdtsc() - start < 30 * tsc_hz)
        pause();
    report(online == expected && atomic_read(&aps_done) == expected - 1,
           "%d of %d vCPUs checked the clocks", atomic_read(&aps_done) + 1, expected);
    report_summary();
}
