/* Faults the test expects are caught, reported and execution resumes. */
#include "guest.h"

#define BOGUS_MSR 0xBADC0DE

int main(void)
{
    uint64_t val = 0;

    report(wrmsr_safe(BOGUS_MSR, 5) == GP_VECTOR, "wrmsr to a non-existent MSR: #GP");
    report(exception_error_code() == 0, "#GP error code is 0");
    report(rdmsr_safe(BOGUS_MSR, &val) == GP_VECTOR, "rdmsr of a non-existent MSR: #GP");
    int vec = rdmsr_safe(0x1B, &val);
    report(vec == 0 && (val & (1u << 11)),
           "rdmsr IA32_APIC_BASE: no fault (vector %d), APIC enabled (%#lx)", vec, val);
    report(expect_ud("ud2"), "ud2: #UD");
    report(asm_try("mov $0x8000000000000000, %%rax; mov (%%rax), %%rax") == GP_VECTOR,
           "load from a non-canonical address: #GP");
    report(asm_try("xor %%ecx, %%ecx; mov $1, %%eax; xor %%edx, %%edx; div %%ecx") == DE_VECTOR
           && exception_occurred(), "divide by zero: #DE");
    report(asm_try("nop") == 0 && !exception_occurred(), "no fault: vector 0");
    report_summary();
}
