/* Many accesses to one port (0x5e0): 100 byte writes of 0..99, then 100 byte reads, each
 * then their sum written to port 0x5e4; the run loop hands them to the device from its route cache
 * after the first of each. */
#include "guest.h"

int main(void)
{
    for (int i = 0; i < 100; i++)
        outb(0x5e0, (uint8_t)i);
    unsigned sum = 0;
    for (int i = 0; i < 100; i++)
        sum += inb(0x5e0);
    outl(0x5e4, sum);
    report(true, "port loop done");
    report_summary();
}
