/* Never exits: for timeout tests. */
#include "guest.h"

int main(void)
{
    puts("spinning");
    for (;;)
        pause();
}
