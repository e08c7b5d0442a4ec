/*
 * Guest side of bench/stimer_cpu.py: a guest that arms well-formed synthetic
 * timers with tiny periods and then does a fixed amount of work, so that the
 * host can compare its own CPU time with and without the timers.
 *
 * Command line (multiboot): storm|quiet seed=S work=N sint=Q vector=V
 *   storm   STIMER0-3 periodic with COUNT 1..15 (100 ns - 1.5 us), randomly
 *           lazy, 1 and 3 in direct mode, 0 and 2 in message mode (SINT Q), interrupts masked
 *           the whole time; the work loop also rewrites STIMER3 as a one-shot
 *           in the past every 64 rounds (each write expires it at once).
 *   quiet   the same MSR writes, every timer left disabled.
 * The work: N OUT exits to WORK_PORT, each after a short spin, so the guest
 * does the same exits in both modes.  Ends with an isa-debug-exit of 0.
 */
#include "hyperv.h"

#define WORK_PORT 0x5ed
#ifndef STIMER_LAZY
#define STIMER_LAZY (1ull << 2)
#endif
#define HV_SYNIC_CONTROL_ENABLE 1ull
#define HV_SYNIC_SIMP_ENABLE 1ull

static struct hv_message simp[16] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t rng;

static uint32_t next_random(void)
{
    rng ^= rng << 13;           /* xorshift64 */
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

int main(void)
{
    bool storm = cmdline_has("storm");
    long work = cmdline_int("work", 20000);
    int sint = (int)cmdline_int("sint", 2);
    int vector = (int)cmdline_int("vector", 0xed);
    rng = (uint64_t)cmdline_int("seed", 1) * 0x9E3779B97F4A7C15ull | 1;
    if (!storm && !cmdline_has("quiet")) {
        printf("bad command line: %s\n", cmdline());
        exit(2);
    }
    cli();
    apic_enable();
    wrmsr(HV_X64_MSR_SIMP, (uintptr_t)simp | HV_SYNIC_SIMP_ENABLE);
    wrmsr(HV_X64_MSR_SINT0 + sint, (uint64_t)vector);
    wrmsr(HV_X64_MSR_SCONTROL, HV_SYNIC_CONTROL_ENABLE);
    for (int n = 0; n < 4; n++) {
        uint32_t r = next_random();
        uint64_t config = STIMER_PERIODIC | (storm ? STIMER_ENABLE : 0);
        if (r & 1)
            config |= STIMER_LAZY;
        if (n & 1)             /* two direct-mode timers, two message-mode ones */
            config |= STIMER_DIRECT | STIMER_VECTOR(vector);
        else
            config |= STIMER_SINTX(sint);
        wrmsr(HV_X64_MSR_STIMER0_COUNT + 2 * n, 1 + (r >> 1) % 15);
        wrmsr(HV_X64_MSR_STIMER0_CONFIG + 2 * n, config);
    }
    for (long i = 0; i < work; i++) {
        for (volatile int spin = 0; spin < 20; spin++)
            ;
        if ((i & 63) == 0) {   /* STIMER3 as a one-shot already due: expires at once */
            wrmsr(HV_X64_MSR_STIMER0_CONFIG + 6, (storm ? STIMER_ENABLE : 0) | STIMER_DIRECT |
                  STIMER_VECTOR(vector));
            wrmsr(HV_X64_MSR_STIMER0_COUNT + 6, 1);
        }
        outl(WORK_PORT, (uint32_t)i);
    }
    for (int n = 0; n < 4; n++)
        wrmsr(HV_X64_MSR_STIMER0_COUNT + 2 * n, 0);
    printf("stimer storm bench: %s, %ld work exits\n", storm ? "storm" : "quiet", work);
    exit(0);
}
