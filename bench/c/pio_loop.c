/* The baseline for bench/pio_roundtrip.py: the smallest KVM program that runs the same guest code
 * as hvvmm (a 32-bit loop of `out dx, al` to port 0x5e0) and handles each exit in a loop, with the
 * same VM setup (in-kernel irqchip and PIT). Prints nanoseconds per exit, timed from the first to
 * the last loop exit, as the Python side does.
 *
 * usage: pio_loop CODE_FILE LOAD_ADDRESS ENTRY EXITS */
#include "kvm_bench.h"

#define MEM_SIZE (4u << 20)
#define LOOP_PORT 0x5e0
#define DEBUG_EXIT_PORT 0xf4

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: %s CODE LOAD ENTRY EXITS\n", argv[0]); return 2; }
    uint64_t load = strtoull(argv[2], 0, 0), entry = strtoull(argv[3], 0, 0);
    long exits = atol(argv[4]);
    struct bench_vm b;
    bench_vm_create(&b, MEM_SIZE, argv[1], load);
    bench_vcpu_create(&b, entry);
    int vcpu = b.vcpu;
    struct kvm_run *run = b.run;

    long seen = 0;
    uint64_t first = 0, last = 0, sink = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 3;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.port == LOOP_PORT && run->io.direction == KVM_EXIT_IO_OUT) {
            sink += data[0];  /* the "device" */
            if (++seen == 1) first = now_ns();
            if (seen == exits) last = now_ns();
        } else if (run->io.port == DEBUG_EXIT_PORT) {
            break;
        }
    }
    if (seen != exits) { fprintf(stderr, "saw %ld loop exits, expected %ld\n", seen, exits); return 3; }
    printf("%.1f\n", (double)(last - first) / (double)(exits - 1));
    return sink == 0xffffffffffffffffull;  /* keep `sink` alive */
}
