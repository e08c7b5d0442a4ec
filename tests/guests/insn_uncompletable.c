/* An instruction hvvmm does not complete (xrstor): on a host whose KVM emulates ring 0 the run
 * must end with one line naming the instruction bytes and RIP.
 * hvvmm-allow-instructions: xrstor */
#include "guest.h"

static uint8_t area[1024] __attribute__((aligned(64)));

int main(void)
{
    printf("executing xrstor\n");
    asm volatile("xor %%eax, %%eax; xor %%edx, %%edx; xrstor %0" :: "m"(area) : "rax", "rdx",
                 "memory");
    report(false, "xrstor returned");
    report_summary();
}
