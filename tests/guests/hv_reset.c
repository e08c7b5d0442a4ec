/*
 * Resets the VM through HV_X64_MSR_RESET (TLFS partition-properties.md):
 * prints a banner, checks that only bit 0 resets (the others are RsvdP), then
 * writes bit 0.  Nothing after that write may run.
 */
#include "hyperv.h"

int main(void)
{
    printf("hv_reset: booted\n");
    struct hv_features hv = hv_read_features();
    report(hv.priv_low & HV_MSR_RESET_AVAILABLE, "RESET MSR advertised");
    uint64_t val = ~0ull;
    report(rdmsr_safe(HV_X64_MSR_RESET, &val) == 0 && val == 0, "RESET reads 0");
    report(wrmsr_safe(HV_X64_MSR_RESET, 0x6) == 0, "RESET = 0x6 (bit 0 clear): no reset");
    wrmsr_safe(HV_X64_MSR_RESET, 1);
    report(false, "still running after RESET = 1");
    report_summary();
}
