/* The baseline for bench/pio_roundtrip.py: the smallest KVM program that runs the same guest code
 * as hvvmm (a 32-bit loop of `out dx, al` to port 0x5e0) and handles each exit in a loop, with the
 * same VM setup (in-kernel irqchip and PIT). Prints nanoseconds per exit, timed from the first to
 * the last loop exit, as the Python side does.
 *
 * usage: pio_loop CODE_FILE LOAD_ADDRESS ENTRY EXITS */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4u << 20)
#define LOOP_PORT 0x5e0
#define DEBUG_EXIT_PORT 0xf4

static void die(const char *what) { perror(what); exit(2); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void flat(struct kvm_segment *s, uint16_t selector, uint8_t type)
{
    memset(s, 0, sizeof *s);
    s->limit = 0xffffffff; s->selector = selector; s->type = type;
    s->present = 1; s->db = 1; s->s = 1; s->g = 1;
}

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: %s CODE LOAD ENTRY EXITS\n", argv[0]); return 2; }
    uint64_t load = strtoull(argv[2], 0, 0), entry = strtoull(argv[3], 0, 0);
    long exits = atol(argv[4]);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint64_t identity = 0xfffbc000;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) die("identity map");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    uint8_t *mem = mmap(0, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("memory region");
    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t n = fread(mem + load, 1, MEM_SIZE - load, f);
    fclose(f);
    if (!n) die("empty code file");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    flat(&sregs.cs, 0x10, 0xb);
    flat(&sregs.ds, 0x18, 0x3); sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 = 0x11; sregs.cr4 = 0; sregs.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = entry, .rflags = 2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

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
