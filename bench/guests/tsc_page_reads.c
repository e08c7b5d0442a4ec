/*
 * tsc_page_reads.c - the guest of bench/tsc_page_exits.py: reading the Hyper-V reference TSC page
 * clock costs no exit, reading HV_X64_MSR_TIME_REF_COUNT costs one each.
 *
 * Enables the reference TSC page (an aligned page of this image's .bss), then
 *   OUT 1 to MARKER_PORT; `reads` reads of the page clock; OUT 2;
 *   OUT 3; `msr_reads` RDMSR TIME_REF_COUNT; OUT 4;
 * and checks what it read: both clocks monotonic, and page <= MSR <= page around one MSR read
 * (kvm-unit-tests hyperv_clock). Command line: reads=N msr_reads=M (both default 20000).
 * Exit code 0 when every check passed.
 */
#include "guest.h"

#define MARKER_PORT 0x5E0
#define HV_CPUID_FEATURES 0x40000003
#define HV_ACCESS_REFERENCE_COUNTER (1u << 1)
#define HV_ACCESS_REFERENCE_TSC (1u << 9)
#define HV_X64_MSR_GUEST_OS_ID 0x40000000
#define HV_X64_MSR_TIME_REF_COUNT 0x40000020
#define HV_X64_MSR_REFERENCE_TSC 0x40000021
#define GUEST_OS_ID 0x8100060100000000ull /* what Linux 6.1.0 writes */

struct hv_reference_tsc_page {
    volatile uint32_t sequence;
    uint32_t reserved1;
    volatile uint64_t scale;
    volatile int64_t offset;
    uint64_t reserved2[509];
};

/* A whole page of its own: the overlay hides the RAM under it. VA == PA (identity map). */
static struct hv_reference_tsc_page tsc_page __attribute__((aligned(4096)));

static inline uint64_t rdtsc_ordered(void)
{
    uint32_t lo, hi;
    asm volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

/* Linux's hv_read_tsc_page(): false when the page says "use the MSR" (sequence 0). */
static bool read_page_clock(uint64_t *now)
{
    uint32_t sequence;
    uint64_t scale, tsc;
    int64_t offset;
    do {
        sequence = tsc_page.sequence;
        if (sequence == 0)
            return false;
        barrier();
        scale = tsc_page.scale;
        offset = tsc_page.offset;
        tsc = rdtsc_ordered();
        barrier();
    } while (tsc_page.sequence != sequence);
    *now = (uint64_t)(((unsigned __int128)tsc * scale) >> 64) + (uint64_t)offset;
    return true;
}

int main(void)
{
    long reads = cmdline_int("reads", 20000), msr_reads = cmdline_int("msr_reads", 20000);
    uint32_t privileges = cpuid(HV_CPUID_FEATURES).a;
    int failures = 0;
    if ((privileges & (HV_ACCESS_REFERENCE_COUNTER | HV_ACCESS_REFERENCE_TSC))
        != (HV_ACCESS_REFERENCE_COUNTER | HV_ACCESS_REFERENCE_TSC)) {
        printf("FAIL: CPUID 0x40000003 EAX %#x lacks TIME_REF_COUNT / REFERENCE_TSC\n", privileges);
        exit(1);
    }
    wrmsr(HV_X64_MSR_GUEST_OS_ID, GUEST_OS_ID);
    wrmsr(HV_X64_MSR_REFERENCE_TSC, (uint64_t)(uintptr_t)&tsc_page | 1);

    uint64_t now = 0, previous = 0, last_page = 0;
    long backwards = 0, invalid = 0;
    outb(MARKER_PORT, 1);
    for (long i = 0; i < reads; i++) {
        if (!read_page_clock(&now)) {
            invalid++;
            continue;
        }
        backwards += now < previous;
        previous = now;
    }
    outb(MARKER_PORT, 2);
    last_page = now;

    uint64_t value = 0, previous_msr = 0;
    long msr_backwards = 0;
    outb(MARKER_PORT, 3);
    for (long i = 0; i < msr_reads; i++) {
        value = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
        msr_backwards += value < previous_msr;
        previous_msr = value;
    }
    outb(MARKER_PORT, 4);

    uint64_t t1 = 0, t2 = 0, m;
    read_page_clock(&t1);
    m = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
    read_page_clock(&t2);

    if (invalid) {
        printf("FAIL: %ld page reads found TscSequence 0\n", invalid);
        failures++;
    }
    if (backwards || msr_backwards) {
        printf("FAIL: clock went backwards (page %ld times, MSR %ld times)\n", backwards,
               msr_backwards);
        failures++;
    }
    if (!(t1 <= m && m <= t2)) {
        printf("FAIL: page %lu, MSR %lu, page %lu are not in order\n", t1, m, t2);
        failures++;
    }
    if (!(last_page <= previous_msr)) {
        printf("FAIL: last page read %lu after the last MSR read %lu\n", last_page, previous_msr);
        failures++;
    }
    printf("scale %#lx offset %ld sequence %u; page %lu <= MSR %lu <= page %lu (100 ns units)\n",
           (unsigned long)tsc_page.scale, (long)tsc_page.offset, tsc_page.sequence, t1, m, t2);
    printf("%s\n", failures ? "FAIL" : "PASS: both clocks monotonic and in agreement");
    exit(failures ? 1 : 0);
}
