/* Reads of the synthetic MSRs whose value cannot change (VP_INDEX, TSC_FREQUENCY), many times
 * on every vCPU: hvvmm answers them in its C run loop after the first read, and the test checks
 * that every read still gets the right value and is counted (and traced, when someone listens). */
#include "guest.h"
#include "hyperv.h"

#define READS 500
#define GUEST_OS_ID 0x8100000000000000ull

static volatile int ap_ok[8];
static volatile int ap_done[8];

static int read_many(int vp)
{
    uint64_t first_freq = rdmsr(HV_X64_MSR_TSC_FREQUENCY);
    int ok = first_freq != 0;
    for (int i = 0; i < READS; i++) {
        ok &= rdmsr(HV_X64_MSR_VP_INDEX) == (uint64_t)vp;
        ok &= rdmsr(HV_X64_MSR_TSC_FREQUENCY) == first_freq;
    }
    /* An MSR whose value can change still goes through the general path (the BSP wrote it
     * before the APs started: it is one for the whole partition). */
    ok &= rdmsr(HV_X64_MSR_GUEST_OS_ID) == GUEST_OS_ID;
    return ok;
}

static void ap_main(int cpu)
{
    ap_ok[cpu] = read_many(cpu);
    ap_done[cpu] = 1;
}

int main(void)
{
    wrmsr(HV_X64_MSR_GUEST_OS_ID, GUEST_OS_ID);
    int cpus = smp_init(ap_main);
    report(read_many(0), "vp0: VP_INDEX and TSC_FREQUENCY read back right every time");
    for (int cpu = 1; cpu < cpus; cpu++) {
        while (!ap_done[cpu])
            pause();
        report(ap_ok[cpu], "an AP: VP_INDEX and TSC_FREQUENCY read back right every time");
    }
    report_summary();
}
