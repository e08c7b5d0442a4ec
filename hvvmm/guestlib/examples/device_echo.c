/* Talks to devices a test adds from Python: an 8-byte PIO register file at 0x5e0 and, with "mmio" on
 * the command line, a 4 KiB MMIO scratch window at 0xd000_0000 (outside RAM; identity-mapped). */
#include "guest.h"

#define ECHO_PORT 0x5e0
#define SCRATCH_MMIO 0xd0000000UL

int main(void)
{
    outl(ECHO_PORT, 0x12345678);
    report(inl(ECHO_PORT) == 0x12345678, "PIO device returns the 32-bit value written");
    outb(ECHO_PORT + 4, 0xab);
    report(inb(ECHO_PORT + 4) == 0xab, "PIO device byte register at offset 4");
    report(inw(0x5f0) == 0xffff, "unclaimed port reads as all ones");

    if (!cmdline_has("mmio"))
        report_summary();
    volatile uint32_t *scratch = (volatile uint32_t *)SCRATCH_MMIO;
    scratch[2] = 0xcafef00d;
    report(scratch[2] == 0xcafef00d, "MMIO device returns the value written at offset 8");
    volatile uint64_t *wide = (volatile uint64_t *)(SCRATCH_MMIO + 0x100);
    *wide = 0x0123456789abcdefULL;
    report(*wide == 0x0123456789abcdefULL, "MMIO 8-byte access");
    report_summary();
}
