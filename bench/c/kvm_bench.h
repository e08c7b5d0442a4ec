/* What the C baselines of bench/ share: a VM set up as hvvmm sets one up (in-kernel irqchip and
 * PIT, identity-map and TSS pages, one RAM slot at 0), the guest code loaded raw, and one vCPU
 * in the Multiboot entry state (32-bit flat protected mode, paging off). Each program adds what
 * its exits need. */
#ifndef HVVMM_BENCH_KVM_BENCH_H
#define HVVMM_BENCH_KVM_BENCH_H

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

struct bench_vm {
    int kvm, vm, vcpu;
    uint8_t *mem;
    size_t mem_size;
    struct kvm_run *run;
};

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

/* The VM, its RAM with CODE_FILE loaded at LOAD. */
static void bench_vm_create(struct bench_vm *b, size_t mem_size, const char *code_file,
                            uint64_t load)
{
    b->mem_size = mem_size;
    b->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (b->kvm < 0) die("/dev/kvm");
    b->vm = ioctl(b->kvm, KVM_CREATE_VM, 0);
    if (b->vm < 0) die("KVM_CREATE_VM");
    uint64_t identity = 0xfffbc000;
    if (ioctl(b->vm, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) die("identity map");
    if (ioctl(b->vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) die("KVM_SET_TSS_ADDR");
    if (ioctl(b->vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(b->vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    b->mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b->mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
        .userspace_addr = (uintptr_t)b->mem };
    if (ioctl(b->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("memory region");
    FILE *f = fopen(code_file, "rb");
    if (!f) die(code_file);
    size_t n = fread(b->mem + load, 1, mem_size - load, f);
    fclose(f);
    if (!n) die("empty code file");
}

/* vCPU 0 at ENTRY in the Multiboot entry state, and its kvm_run page. */
static void bench_vcpu_create(struct bench_vm *b, uint64_t entry)
{
    b->vcpu = ioctl(b->vm, KVM_CREATE_VCPU, 0);
    if (b->vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(b->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    b->run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, b->vcpu, 0);
    if (b->run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(b->vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    flat(&sregs.cs, 0x10, 0xb);
    flat(&sregs.ds, 0x18, 0x3);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 = 0x11; sregs.cr4 = 0; sregs.efer = 0;
    if (ioctl(b->vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = entry, .rflags = 2 };
    if (ioctl(b->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

#endif
