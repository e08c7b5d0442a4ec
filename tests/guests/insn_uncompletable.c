/* An instruction hvvmm does not complete (SSE2 movq from a general register: SIMD is left to
 * the guest's own feature switches, see hvvmm/x86/features.py). On a host whose KVM emulates
 * ring 0 the run must end with one line naming the instruction bytes and RIP. */
#include "guest.h"

int main(void)
{
    printf("executing movq %%rax, %%xmm3\n");
    asm volatile("mov $1, %%eax; movq %%rax, %%xmm3" ::: "rax");
    report(false, "movq returned");
    report_summary();
}
