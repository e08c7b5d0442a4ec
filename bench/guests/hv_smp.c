/*
 * Guest side of bench/hv_smp_scaling.py: hypercall throughput with one vCPU
 * issuing them, then with every vCPU issuing them at once.
 *
 * Command line (multiboot): count=N
 *   Phase 1, before the APs are started: the BSP makes N hypercalls
 *   (HvExtCallQueryCapabilities, as bench/hv_roundtrip.py), bracketed by OUTs
 *   of 0x100 and 0x200 to MARKER_PORT.
 *   Phase 2: every CPU waits at a barrier, then makes N hypercalls,
 *   bracketed by OUTs of 0x300 + cpu and 0x400 + cpu.
 * Exits with 0 when every call succeeded.
 */
#include "hyperv.h"

#define MARKER_PORT 0x5e0
#define MAX_CPUS 8
#define HVCALL_EXT_QUERY_CAPABILITIES 0x8001

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t output[MAX_CPUS][HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));
static long count;
static volatile int ready, finished, ncpus_started;
static volatile uint64_t failures;

static void calls(int cpu)
{
    uint64_t bad = 0;
    for (long i = 0; i < count; i++)
        bad |= hypercall(HVCALL_EXT_QUERY_CAPABILITIES, 0, (uintptr_t)output[cpu]) & 0xffff;
    if (bad)
        atomic_inc(&failures);
}

static void together(int cpu)
{
    atomic_inc(&ready);
    while (atomic_read(&ready) < atomic_read(&ncpus_started))
        pause();
    outl(MARKER_PORT, 0x300 + cpu);
    calls(cpu);
    outl(MARKER_PORT, 0x400 + cpu);
    atomic_inc(&finished);
}

static void ap_main(int cpu)
{
    together(cpu);
}

int main(void)
{
    count = cmdline_int("count", 5000);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, hv_linux_guest_id(6, 1, 0));
    hv_enable_hypercall_page(hypercall_page);
    outl(MARKER_PORT, 0x100);
    calls(0);
    outl(MARKER_PORT, 0x200);
    atomic_set(&ncpus_started, MAX_CPUS);  /* hold the APs at the barrier until the count is known */
    int ncpus = smp_init(ap_main);
    if (ncpus > MAX_CPUS) {
        printf("too many CPUs: %d\n", ncpus);
        exit(2);
    }
    atomic_set(&ncpus_started, ncpus);
    together(0);
    while (atomic_read(&finished) < ncpus)
        pause();
    printf("hv_smp: %d CPUs, %ld calls each, %llu failed loops\n", ncpus, count,
           (unsigned long long)failures);
    exit(failures ? 1 : 0);
}
