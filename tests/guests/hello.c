/* Smallest test guest: one line of output and one passing report. */
#include "guest.h"

int main(void)
{
    puts("Hello from hvvmm guest");
    report(true, "guest runs main()");
    report_summary();
}
