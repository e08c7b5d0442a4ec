/* The baseline for bench/hv_roundtrip.py: the smallest KVM program that runs the same guest code
 * as hvvmm and answers its Hyper-V exits the way hvvmm does, minus Python:
 *
 *  - VM setup as hvvmm's: in-kernel irqchip and PIT, the host's supported CPUID, 16 MiB of RAM;
 *    KVM_CAP_X86_USER_SPACE_MSR (KVM_MSR_EXIT_REASON_FILTER) and KVM_X86_SET_MSR_FILTER denying
 *    both synthetic MSR ranges (0x40000000-0x400001ff, 0x40001000-0x400010ff), so every synthetic
 *    MSR access exits to user space; sync regs (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS) enabled,
 *    so KVM copies regs and sregs into kvm_run on every exit, as in hvvmm.
 *  - WRMSR GUEST_OS_ID / HYPERCALL: stored; enabling the page (GUEST_OS_ID != 0) copies the stub
 *    page (endbr64; out 0x56, al; ret; int3...) into RAM at the GPA (hvvmm maps a read-only
 *    overlay instead; that happens once, outside the timed loop).
 *  - RDMSR VP_INDEX: answers 0; GUEST_OS_ID: the value written.
 *  - OUT 0x56 (1 byte, one item, page enabled): a hypercall. Registers from run->s.regs, long
 *    mode (EFER.LMA && CS.L), CR0.PE and CPL (SS.DPL) checks, control from EDX:EAX (RCX in long
 *    mode), code lookup, reserved/rep/varhead/fast checks, GPAs from EBX:ECX / EDI:ESI, output list
 *    alignment/page/RAM checks, the 8-byte HvExtCallQueryCapabilities output written into RAM,
 *    the result in EDX:EAX (RAX) and KVM_SYNC_X86_REGS marked dirty.
 *
 * Timed from the first to the second OUT to the marker port, as on the Python side; prints
 * nanoseconds per loop iteration (COUNT iterations).
 *
 * usage: hv_loop CODE_FILE LOAD_ADDRESS ENTRY hypercall|msr|msr-generic COUNT
 * (msr counts the reads of VP_INDEX, msr-generic those of GUEST_OS_ID) */
#include <errno.h>

#include "kvm_bench.h"

#define MEM_SIZE (16u << 20)
#define PAGE_SIZE 4096u
#define MARKER_PORT 0x5e0
#define DEBUG_EXIT_PORT 0xf4
#define HYPERCALL_PORT 0x56

#define HV_X64_MSR_GUEST_OS_ID 0x40000000u
#define HV_X64_MSR_HYPERCALL 0x40000001u
#define HV_X64_MSR_VP_INDEX 0x40000002u
#define HV_HYPERCALL_ENABLE 1ull
#define HV_HYPERCALL_LOCKED 2ull

#define HC_CODE_MASK 0xffffull
#define HC_FAST (1ull << 16)
#define HC_VARHEAD_MASK (0x3ffull << 17)
#define HC_REP_COUNT_MASK (0xfffull << 32)
#define HC_REP_START_MASK (0xfffull << 48)
#define HC_RSVD_MASK ((0x1full << 27) | (0xfull << 44) | (0xfull << 60))
#define HV_EXT_CALL_QUERY_CAPABILITIES 0x8001
#define HV_STATUS_SUCCESS 0
#define HV_STATUS_INVALID_HYPERCALL_CODE 2
#define HV_STATUS_INVALID_HYPERCALL_INPUT 3
#define HV_STATUS_INVALID_ALIGNMENT 4
#define EXT_CAPABILITIES 1ull /* GetBootZeroedMemory, as hvvmm reports */

#define EFER_LMA (1ull << 10)
#define U32 0xffffffffull

static uint8_t *mem;
static uint64_t guest_os_id, hypercall_msr;
static long hypercalls, bad_hypercalls;

static void set_cpuid(int kvm, int vcpu)
{
    int nent = 128;
    for (;;) {
        struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + nent * sizeof cpuid->entries[0]);
        cpuid->nent = nent;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0) {
            if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
            free(cpuid);
            return;
        }
        free(cpuid);
        if (errno != E2BIG) die("KVM_GET_SUPPORTED_CPUID");
        nent *= 2;
    }
}

static void wrmsr(struct kvm_run *run)
{
    uint64_t value = run->msr.data;
    run->msr.error = 0;
    switch (run->msr.index) {
    case HV_X64_MSR_GUEST_OS_ID:
        guest_os_id = value;
        if (!value) hypercall_msr &= ~HV_HYPERCALL_ENABLE;
        break;
    case HV_X64_MSR_HYPERCALL:
        if (hypercall_msr & HV_HYPERCALL_LOCKED) break;
        if (!guest_os_id) value &= ~HV_HYPERCALL_ENABLE;
        if (value & HV_HYPERCALL_ENABLE) {
            uint64_t gpa = value & ~(uint64_t)(PAGE_SIZE - 1);
            if (gpa + PAGE_SIZE > MEM_SIZE) { run->msr.error = 1; break; }
            static const uint8_t stub[] = { 0xf3, 0x0f, 0x1e, 0xfa, 0xe6, HYPERCALL_PORT, 0xc3 };
            memset(mem + gpa, 0xcc, PAGE_SIZE);
            memcpy(mem + gpa, stub, sizeof stub);
        }
        hypercall_msr = value;
        break;
    default:
        run->msr.error = 1; /* #GP */
    }
}

static void rdmsr(struct kvm_run *run)
{
    run->msr.error = 0;
    switch (run->msr.index) {
    case HV_X64_MSR_GUEST_OS_ID: run->msr.data = guest_os_id; break;
    case HV_X64_MSR_HYPERCALL: run->msr.data = hypercall_msr; break;
    case HV_X64_MSR_VP_INDEX: run->msr.data = 0; break;
    default: run->msr.error = 1;
    }
}

static int output_list_ok(uint64_t gpa, uint64_t len)
{
    return !(gpa & 7) && (gpa % PAGE_SIZE) + len <= PAGE_SIZE && gpa + len <= MEM_SIZE;
}

static void hypercall(struct kvm_run *run)
{
    struct kvm_regs *r = &run->s.regs.regs;
    struct kvm_sregs *s = &run->s.regs.sregs;
    int long_mode = (s->efer & EFER_LMA) && s->cs.l;
    uint64_t control = long_mode ? r->rcx : ((r->rdx & U32) << 32) | (r->rax & U32);
    if (!(s->cr0 & 1) || s->ss.dpl != 0) { bad_hypercalls++; return; } /* hvvmm: #UD */
    uint64_t status;
    if ((control & HC_CODE_MASK) != HV_EXT_CALL_QUERY_CAPABILITIES)
        status = HV_STATUS_INVALID_HYPERCALL_CODE;
    else if (control & (HC_RSVD_MASK | HC_REP_COUNT_MASK | HC_REP_START_MASK | HC_VARHEAD_MASK
                        | HC_FAST))
        status = HV_STATUS_INVALID_HYPERCALL_INPUT;
    else {
        uint64_t output_gpa = long_mode ? r->r8 : ((r->rdi & U32) << 32) | (r->rsi & U32);
        if (!output_list_ok(output_gpa, 8)) {
            status = HV_STATUS_INVALID_ALIGNMENT;
        } else {
            uint64_t caps = EXT_CAPABILITIES;
            memcpy(mem + output_gpa, &caps, sizeof caps);
            status = HV_STATUS_SUCCESS;
        }
    }
    if (status != HV_STATUS_SUCCESS) bad_hypercalls++;
    hypercalls++;
    if (long_mode) {
        r->rax = status;
    } else {
        r->rdx = status >> 32;
        r->rax = status & U32;
    }
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s CODE LOAD ENTRY hypercall|msr|msr-generic COUNT\n", argv[0]);
        return 2;
    }
    uint64_t load = strtoull(argv[2], 0, 0), entry = strtoull(argv[3], 0, 0);
    int msr_mode = !strcmp(argv[4], "msr") || !strcmp(argv[4], "msr-generic");
    uint32_t counted_msr = strcmp(argv[4], "msr") ? HV_X64_MSR_GUEST_OS_ID : HV_X64_MSR_VP_INDEX;
    if (!msr_mode && strcmp(argv[4], "hypercall")) { fprintf(stderr, "bad mode\n"); return 2; }
    long count = atol(argv[5]);

    struct bench_vm b;
    bench_vm_create(&b, MEM_SIZE, argv[1], load);
    mem = b.mem;
    int vm = b.vm;

    struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR,
                                  .args = { KVM_MSR_EXIT_REASON_FILTER } };
    if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0) die("KVM_CAP_X86_USER_SPACE_MSR");
    static uint8_t deny0[0x200 / 8], deny1[0x100 / 8]; /* all zero: deny */
    struct kvm_msr_filter filter = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
    filter.ranges[0] = (struct kvm_msr_filter_range){
        .flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, .nmsrs = 0x200, .base = 0x40000000,
        .bitmap = deny0 };
    filter.ranges[1] = (struct kvm_msr_filter_range){
        .flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, .nmsrs = 0x100, .base = 0x40001000,
        .bitmap = deny1 };
    if (ioctl(vm, KVM_X86_SET_MSR_FILTER, &filter) < 0) die("KVM_X86_SET_MSR_FILTER");

    bench_vcpu_create(&b, entry);
    int vcpu = b.vcpu;
    struct kvm_run *run = b.run;
    set_cpuid(b.kvm, vcpu);
    run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;

    long markers = 0, msr_reads = 0;
    uint64_t first = 0, last = 0, final_or = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint16_t port = run->io.port;
            int out = run->io.direction == KVM_EXIT_IO_OUT;
            if (port == HYPERCALL_PORT) {
                if (out && run->io.size == 1 && run->io.count == 1
                    && (hypercall_msr & HV_HYPERCALL_ENABLE))
                    hypercall(run);
            } else if (port == MARKER_PORT && out) {
                uint32_t value = 0;
                memcpy(&value, data, run->io.size < 4 ? run->io.size : 4);
                if (++markers == 1) first = now_ns();
                else { last = now_ns(); final_or = value; }
            } else if (port == DEBUG_EXIT_PORT) {
                goto done;
            } else if (!out) {
                memset(data, 0xff, run->io.size * run->io.count);
            }
            break;
        }
        case KVM_EXIT_X86_WRMSR:
            wrmsr(run);
            break;
        case KVM_EXIT_X86_RDMSR:
            if (run->msr.index == counted_msr) msr_reads++;
            rdmsr(run);
            break;
        default:
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 3;
        }
    }
done:
    if (markers != 2) { fprintf(stderr, "saw %ld markers, expected 2\n", markers); return 3; }
    long done_count = msr_mode ? msr_reads : hypercalls;
    if (done_count != count || bad_hypercalls || final_or) {
        fprintf(stderr, "%ld accesses (%ld bad), expected %ld; guest OR %#llx\n", done_count,
                bad_hypercalls, count, (unsigned long long)final_or);
        return 3;
    }
    printf("%.1f\n", (double)(last - first) / (double)count);
    return 0;
}
