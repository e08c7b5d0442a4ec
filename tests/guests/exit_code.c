/* Exits through isa-debug-exit with the code given as "code=N" on the
 * command line (default 0): process status (N << 1) | 1. */
#include "guest.h"

int main(void)
{
    long code = cmdline_int("code", 0);
    printf("exiting with code %ld\n", code);
    exit((int)code);
}
