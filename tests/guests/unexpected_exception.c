/* Takes a #GP nobody expects: the runtime must print
 * "UNEXPECTED EXCEPTION: vector 13 (#GP) ..." and exit(0x7f) (status 255).
 * A load from a non-canonical address faults on every x86-64 CPU. */
#include "guest.h"

int main(void)
{
    puts("causing a #GP");
    *(volatile uint64_t *)0x8000000000000000UL;
    report(false, "still running after an unexpected #GP");
    report_summary();
}
