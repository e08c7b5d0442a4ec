"""cffi API-mode build of the <linux/kvm.h> bindings (module ``hvvmm.kvm._kvm``).

Struct layouts, constants and ioctl numbers come from the C compiler: the declarations below are
partial (``...;``) wherever cffi allows it, so a field we do not name can never be mis-sized, and
cffi checks every named field's offset against the compiler's. Only the anonymous structs nested in
``struct kvm_run``'s exit union must be spelled whole (cffi cannot make a nameless struct partial);
their offsets inside ``kvm_run`` are still verified.

Built by setup.py (``cffi_modules``); ``python -m hvvmm.kvm._build`` builds it in place.
"""

from __future__ import annotations

import cffi

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;

/* ---- system and ioctl constants ------------------------------------------------------------ */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_REINJECT_CONTROL ...
#define KVM_IRQ_LINE ...
#define KVM_SIGNAL_MSI ...
#define KVM_IOEVENTFD ...
#define KVM_ENABLE_CAP ...
#define KVM_X86_SET_MSR_FILTER ...
#define KVM_GET_TSC_KHZ ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...

/* ---- capabilities --------------------------------------------------------------------------- */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_SYNC_REGS ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_X86_USER_SPACE_MSR ...
#define KVM_CAP_X86_MSR_FILTER ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
#define KVM_CAP_HYPERV ...
#define KVM_CAP_EXIT_ON_EMULATION_FAILURE ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XCRS ...

/* ---- exits ---------------------------------------------------------------------------------- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_MSR_EXIT_REASON_FILTER ...
#define KVM_MSR_FILTER_READ ...
#define KVM_MSR_FILTER_WRITE ...
#define KVM_MSR_FILTER_DEFAULT_ALLOW ...
#define KVM_MSR_FILTER_MAX_RANGES ...
#define KVM_SYNC_X86_REGS ...
#define KVM_SYNC_X86_SREGS ...
#define KVM_MEM_READONLY ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_UNINITIALIZED ...

/* ---- structures ----------------------------------------------------------------------------- */
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; ...;
};
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[...];
    ...;
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; ...;
};
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_reinject_control { __u8 pit_reinject; ...; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_msr_filter_range { __u32 flags; __u32 nmsrs; __u32 base; __u8 *bitmap; ...; };
struct kvm_msr_filter { __u32 flags; struct kvm_msr_filter_range ranges[...]; ...; };
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    ...;
};
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_sync_regs { struct kvm_regs regs; struct kvm_sregs sregs; ...; };

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        struct { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; } msr;
        char padding[256];
    };
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    ...;
};

/* ---- helpers defined in the C source below -------------------------------------------------- */
static const size_t HVVMM_SYNC_REGS_OFFSET;
int hvvmm_ioctl(int fd, unsigned long request, void *arg);
int hvvmm_ioctl_value(int fd, unsigned long request, unsigned long arg);
int hvvmm_run(int vcpu_fd);
#define HVVMM_PACKED_IO ...
#define HVVMM_PACKED_OUT ...
#define HVVMM_PACKED_MSR ...
#define HVVMM_PACKED_WRMSR ...
#define HVVMM_PACKED_HYPERCALL ...
#define HVVMM_PACKED_HC_SIMPLE ...
#define HVVMM_PACKED_HC_LONG ...
#define HVVMM_CONSTANT_MSR_SLOTS ...
struct hvvmm_msr_slot { __u32 index; __u32 enabled; __u64 value; __u64 hits; };
struct hvvmm_vcpu_loop {
    int fd;
    int hypercall_port;
    struct kvm_run *run;
    size_t run_size;
    __u32 msr_slots;
    struct hvvmm_msr_slot msr[...];
    __u64 hc_input;
    __u64 hc_output;
    __u8 hc_success;
    struct hvvmm_python_gate *gate;
    __u8 in_python;
};
struct hvvmm_python_gate { __u32 in_python; __u32 spin_ns; ...; };
long long hvvmm_run_packed(struct hvvmm_vcpu_loop *loop);
long long hvvmm_pack_exit(struct hvvmm_vcpu_loop *loop);
int hvvmm_set_constant_msr(struct hvvmm_vcpu_loop *loop, __u32 index, __u64 value);
void hvvmm_disable_constant_msrs(struct hvvmm_vcpu_loop *loop);
__u64 hvvmm_constant_msr_hits(struct hvvmm_vcpu_loop *loop, unsigned slot);
void hvvmm_apply_hypercall_success(struct hvvmm_vcpu_loop *loop);
void hvvmm_python_gate_leave(struct hvvmm_vcpu_loop *loop);
int hvvmm_install_run_exits(void);
#define HVVMM_HC_SUCCESS_32 ...
#define HVVMM_HC_SUCCESS_64 ...
void *hvvmm_map_shared(int fd, size_t size);
int hvvmm_unmap(void *address, size_t size);
int hvvmm_install_kick_handler(int signo);
unsigned char hvvmm_atomic_fetch_or_u8(uintptr_t address, unsigned char mask);
"""

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <linux/kvm.h>

static const size_t HVVMM_SYNC_REGS_OFFSET = offsetof(struct kvm_run, s.regs);

/* Each returns the ioctl's result, or -errno: no thread-local errno dance on the Python side. */
int hvvmm_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int hvvmm_ioctl_value(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int hvvmm_run(int vcpu_fd)
{
    int r = ioctl(vcpu_fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

/* The state of one vCPU's packed run loop, owned by Python (ffi.new, one per vCPU) and used by
 * that vCPU's thread alone, except where a comment says otherwise. */
#define HVVMM_CONSTANT_MSR_SLOTS 8
struct hvvmm_msr_slot { uint32_t index; uint32_t enabled; uint64_t value; uint64_t hits; };
struct hvvmm_vcpu_loop {
    int fd;
    int hypercall_port;       /* the hypercall page's `out imm8, al` port; -1: none */
    struct kvm_run *run;
    size_t run_size;
    /* RDMSRs answered here without waking Python: MSRs whose value cannot change while the VM
     * exists (the VP index, the timer frequencies), each published by Python after its first
     * read through the general path. Slots are only ever appended (msr_slots grows) by the
     * vCPU's own thread; another thread may clear `enabled` (a trace listener was added), and
     * reads `hits` (the reads answered here, which Python adds to its counters). */
    uint32_t msr_slots;
    struct hvvmm_msr_slot msr[HVVMM_CONSTANT_MSR_SLOTS];
    /* The GPA / fast-input registers of the hypercall a HVVMM_PACKED_HC_SIMPLE exit carries:
     * RDX and R8 in long mode, EBX:ECX and EDI:ESI otherwise (TLFS "Hypercall Inputs"). */
    uint64_t hc_input;
    uint64_t hc_output;
    /* HVVMM_HC_SUCCESS_32/64 when that call succeeded (the hypercall exit's answer to
     * run_exits): the next run of the loop writes the result before KVM_RUN
     * (hvvmm_apply_hypercall_success). */
    uint8_t hc_success;
    /* Shared by the vCPUs of one machine (NULL: none): see hvvmm_wait_for_python_gate. */
    struct hvvmm_python_gate *gate;
    uint8_t in_python;        /* this vCPU's thread counts in gate->in_python */
};

/* How many vCPU threads of a machine are running Python (between two hvvmm_run_packed calls:
 * handling an exit, with the GIL or about to take it). A thread whose KVM_RUN returns while
 * another one runs Python would block on the GIL and sleep in the kernel, and being woken
 * again costs far more than the few microseconds the other one holds it for (measured:
 * 30% of two busy vCPU threads' time blocked). So it spins here, without the GIL, until no
 * other vCPU thread runs Python or spin_ns passes, and only then lets cffi take the GIL: an
 * adaptive spin before blocking, as pthread's adaptive mutexes do. Only for machines whose
 * vCPU threads each have a host CPU (Machine._create_vcpus), else a spinning thread takes CPU
 * time from the one it waits for. */
struct hvvmm_python_gate { uint32_t in_python; uint32_t spin_ns; };

static uint64_t hvvmm_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void hvvmm_leave_python(struct hvvmm_vcpu_loop *loop)
{
    if (loop->in_python) {
        __atomic_fetch_sub(&loop->gate->in_python, 1, __ATOMIC_RELEASE);
        loop->in_python = 0;
    }
}

/* The thread will run Python without the loop for a while (parked, stopping): stop counting. */
void hvvmm_python_gate_leave(struct hvvmm_vcpu_loop *loop)
{
    if (loop->gate)
        hvvmm_leave_python(loop);
}

static void hvvmm_wait_for_python_gate(struct hvvmm_vcpu_loop *loop)
{
    struct hvvmm_python_gate *gate = loop->gate;
    if (__atomic_load_n(&gate->in_python, __ATOMIC_ACQUIRE)) {
        uint64_t deadline = hvvmm_now_ns() + gate->spin_ns;
        unsigned spins = 0;
        while (__atomic_load_n(&gate->in_python, __ATOMIC_ACQUIRE)) {
            __builtin_ia32_pause();
            if (++spins % 64 == 0 && hvvmm_now_ns() > deadline)
                break;
        }
    }
    __atomic_fetch_add(&gate->in_python, 1, __ATOMIC_ACQUIRE);
    loop->in_python = 1;
}

/* KVM_RUN (again while an AP leaves wait-for-SIPI: EAGAIN), and the common exit decoded in C so
 * that Python reads one integer instead of the kvm_run page: one port access of 1, 2 or 4 bytes
 * comes back as HVVMM_PACKED_IO | size << 48 | port << 32 | (OUT: HVVMM_PACKED_OUT | the value;
 * IN: the data offset in the page, where the answer goes); an RDMSR/WRMSR sent to user space as
 * HVVMM_PACKED_MSR | (WRMSR: HVVMM_PACKED_WRMSR) | the MSR index (the value written, and the
 * answer, stay in run->msr). Any other exit returns 0 (decode it from the page), a failed KVM_RUN
 * -errno (hvvmm_pack_exit is the decoding alone, for tests). The data offset is checked against
 * the page, as the Python decoder does: never trust an offset, even the kernel's. x86 hosts:
 * little-endian.
 * A 1-byte OUT to the hypercall port also carries HVVMM_PACKED_HYPERCALL, so Python goes straight
 * to the hypercall handler; and, when the call is made from the environment the TLFS allows
 * (protected mode, CPL 0: "Legal Hypercall Environments") with a control value that has nothing
 * but a call code and the fast bit (no rep count or start, no variable header, no reserved bit),
 * HVVMM_PACKED_HC_SIMPLE | (long mode: HVVMM_PACKED_HC_LONG) | control << 8 (bits 8-24; AL stays
 * in bits 0-7), with the GPA/fast-input registers in loop->hc_input/hc_output. That needs the
 * registers in the page (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS); without them, and for every
 * other call, Python reads the registers itself. Long mode is EFER.LMA && CS.L, CPL is SS.DPL, as
 * KVM reads them (arch/x86/kvm/x86.h is_64_bit_hypercall(), vmx/vmx.c vmx_get_cpl()). */
#define HVVMM_PACKED_IO (1ll << 62)
#define HVVMM_PACKED_OUT (1ll << 61)
#define HVVMM_PACKED_MSR (1ll << 60)
#define HVVMM_PACKED_WRMSR (1ll << 59)
#define HVVMM_PACKED_HYPERCALL (1ll << 58)
#define HVVMM_PACKED_HC_SIMPLE (1ll << 57)
#define HVVMM_PACKED_HC_LONG (1ll << 56)
#define HVVMM_HC_SIMPLE_BITS 17          /* call code (0-15) and fast (16) */
#define HVVMM_EFER_LMA (1ull << 10)
#define HVVMM_CR0_PE 1ull
#define HVVMM_SYNC_BOTH (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)

void hvvmm_apply_hypercall_success(struct hvvmm_vcpu_loop *loop);

static long long hvvmm_pack_hypercall(struct hvvmm_vcpu_loop *loop, const struct kvm_run *run)
{
    if ((run->kvm_valid_regs & HVVMM_SYNC_BOTH) != HVVMM_SYNC_BOTH)
        return 0;
    const struct kvm_regs *r = &run->s.regs.regs;
    const struct kvm_sregs *s = &run->s.regs.sregs;
    if (!(s->cr0 & HVVMM_CR0_PE) || s->ss.dpl != 0)
        return 0;
    int long_mode = (s->efer & HVVMM_EFER_LMA) && s->cs.l;
    uint64_t control = long_mode ? r->rcx : r->rdx << 32 | (uint32_t)r->rax;
    if (control >> HVVMM_HC_SIMPLE_BITS)
        return 0;
    loop->hc_input = long_mode ? r->rdx : r->rbx << 32 | (uint32_t)r->rcx;
    loop->hc_output = long_mode ? r->r8 : r->rdi << 32 | (uint32_t)r->rsi;
    return HVVMM_PACKED_HC_SIMPLE | (long_mode ? HVVMM_PACKED_HC_LONG : 0)
           | (long long)control << 8;
}

long long hvvmm_pack_exit(struct hvvmm_vcpu_loop *loop)
{
    const struct kvm_run *run = loop->run;
    if (run->exit_reason == KVM_EXIT_X86_RDMSR)
        return HVVMM_PACKED_MSR | run->msr.index;
    if (run->exit_reason == KVM_EXIT_X86_WRMSR)
        return HVVMM_PACKED_MSR | HVVMM_PACKED_WRMSR | run->msr.index;
    if (run->exit_reason != KVM_EXIT_IO || run->io.count != 1)
        return 0;
    unsigned size = run->io.size;
    unsigned long long offset = run->io.data_offset;
    if ((size != 1 && size != 2 && size != 4) || offset > loop->run_size - size)
        return 0;
    long long packed = HVVMM_PACKED_IO | (long long)size << 48 | (long long)run->io.port << 32;
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        uint32_t value = 0;
        memcpy(&value, (const char *)run + offset, size);
        if (size == 1 && run->io.port == loop->hypercall_port)
            packed |= HVVMM_PACKED_HYPERCALL | hvvmm_pack_hypercall(loop, run);
        return packed | HVVMM_PACKED_OUT | value;
    }
    return packed | offset;
}

/* Answer an RDMSR exit from the constant slots; 0 when the MSR has none. */
static int hvvmm_answer_constant_msr(struct hvvmm_vcpu_loop *loop)
{
    struct kvm_run *run = loop->run;
    uint32_t index = run->msr.index, n = loop->msr_slots;
    for (uint32_t i = 0; i < n; i++) {
        struct hvvmm_msr_slot *slot = &loop->msr[i];
        if (slot->index == index && __atomic_load_n(&slot->enabled, __ATOMIC_RELAXED)) {
            run->msr.error = 0;
            run->msr.data = slot->value;
            __atomic_store_n(&slot->hits, slot->hits + 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    return 0;
}

long long hvvmm_run_packed(struct hvvmm_vcpu_loop *loop)
{
    if (loop->hc_success)
        hvvmm_apply_hypercall_success(loop);
    if (loop->gate)
        hvvmm_leave_python(loop);
    long long packed;
    for (;;) {
        int r;
        do
            r = ioctl(loop->fd, KVM_RUN, 0);
        while (r < 0 && errno == EAGAIN);
        if (r < 0) {
            packed = -errno;
            break;
        }
        /* A stop or a kick still ends the loop: it sets immediate_exit and interrupts KVM_RUN,
         * so the next KVM_RUN returns EINTR at once. */
        if (loop->run->exit_reason == KVM_EXIT_X86_RDMSR && loop->msr_slots
            && hvvmm_answer_constant_msr(loop))
            continue;
        packed = hvvmm_pack_exit(loop);
        break;
    }
    if (loop->gate)
        hvvmm_wait_for_python_gate(loop);
    return packed;
}

/* Answer the constant MSR `index` with `value` in the loop from now on (vCPU thread only).
 * 0, or -ENOSPC when every slot is taken (the MSR then keeps going through Python). */
int hvvmm_set_constant_msr(struct hvvmm_vcpu_loop *loop, uint32_t index, uint64_t value)
{
    uint32_t n = loop->msr_slots;
    for (uint32_t i = 0; i < n; i++) {
        if (loop->msr[i].index == index) {
            loop->msr[i].value = value;
            __atomic_store_n(&loop->msr[i].enabled, 1, __ATOMIC_RELEASE);
            return 0;
        }
    }
    if (n == HVVMM_CONSTANT_MSR_SLOTS)
        return -ENOSPC;
    loop->msr[n] = (struct hvvmm_msr_slot){ .index = index, .enabled = 1, .value = value };
    __atomic_store_n(&loop->msr_slots, n + 1, __ATOMIC_RELEASE);
    return 0;
}

/* Every constant MSR goes through Python again (any thread; a read the vCPU is answering at
 * this very moment may still be answered here). Hits are kept. */
void hvvmm_disable_constant_msrs(struct hvvmm_vcpu_loop *loop)
{
    uint32_t n = __atomic_load_n(&loop->msr_slots, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++)
        __atomic_store_n(&loop->msr[i].enabled, 0, __ATOMIC_RELEASE);
}

/* The reads of slot `slot` answered here so far (any thread). */
uint64_t hvvmm_constant_msr_hits(struct hvvmm_vcpu_loop *loop, unsigned slot)
{
    return slot < HVVMM_CONSTANT_MSR_SLOTS ? __atomic_load_n(&loop->msr[slot].hits,
                                                             __ATOMIC_RELAXED) : 0;
}

/* The result of a successful simple hypercall, HV_STATUS_SUCCESS with no reps: RAX = 0 in long
 * mode, EDX:EAX = 0 otherwise (TLFS "Hypercall Outputs"), into the sync-regs area for KVM to
 * load at the next entry. */
#define HVVMM_HC_SUCCESS_32 1
#define HVVMM_HC_SUCCESS_64 2

void hvvmm_apply_hypercall_success(struct hvvmm_vcpu_loop *loop)
{
    struct kvm_run *run = loop->run;
    run->s.regs.regs.rax = 0;
    if (loop->hc_success == HVVMM_HC_SUCCESS_32)
        run->s.regs.regs.rdx = 0;
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    loop->hc_success = 0;
}

/* run_exits(loop_address, routes, hypercall_exit, msr_exit): hvvmm_run_packed again and again,
 * handing each exit Python has a handler for to that handler straight from here, without
 * returning to the Python loop (a route of None: a port no device holds, answered here as the
 * bus answers it): a 1-byte OUT to the armed hypercall port to
 * hypercall_exit(packed, first, second) (the register pair of a decoded call; an answer of
 * HVVMM_HC_SUCCESS_32/64 writes the success result before the next entry), an MSR exit to msr_exit(packed) (an RDMSR's handler may answer with the value), a
 * port access whose packed form
 * above bit 32 is a key of the dict `routes` to routes[key](value) (OUT) or routes[key]()
 * (IN, the answer stored in the page as Vcpu.complete_in does it). Returns the packed value of
 * the first exit it has no handler for (0: decode it from the page, < 0: -errno); an exception
 * a handler raises comes out of run_exits. hypercall_exit and msr_exit may be None.
 * A Python function written in C (the stable ABI) rather than a cffi call: one exit costs the
 * Python loop a call and its branches, which on this path is most of the Python work. */
/* handler(packed), or with the register pair handler(packed, first, second): the result (a
 * new reference), or NULL with the exception set. */
static PyObject *hvvmm_call_exit_handler(PyObject *handler, long long packed, int with_pair,
                                         uint64_t first, uint64_t second)
{
    PyObject *arguments[3] = { PyLong_FromLongLong(packed), NULL, NULL }, *result = NULL;
    if (with_pair) {
        arguments[1] = PyLong_FromUnsignedLongLong(first);
        arguments[2] = PyLong_FromUnsignedLongLong(second);
    }
    if (arguments[0] && (!with_pair || (arguments[1] && arguments[2])))
        result = PyObject_CallFunctionObjArgs(handler, arguments[0], arguments[1], arguments[2],
                                              NULL);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(arguments[i]);
    return result;
}

/* A port read's answer from a route, stored where Vcpu.complete_in would; 0, or -1 with the
 * exception set (a value the access cannot hold is refused as int.to_bytes refuses it). */
static int hvvmm_store_port_read(struct hvvmm_vcpu_loop *loop, long long packed, PyObject *result)
{
    unsigned size = (unsigned)(packed >> 48) & 0xff;
    unsigned long long offset = (unsigned long long)packed & 0xffffffffu;
    unsigned long long value = PyLong_AsUnsignedLongLong(result);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (size < 8 && value >> (8 * size)) {
        PyErr_Format(PyExc_OverflowError, "port read of %u bytes answered %llu", size, value);
        return -1;
    }
    memcpy((char *)loop->run + offset, &value, size);  /* offset: checked in hvvmm_pack_exit */
    return 0;
}

static PyObject *hvvmm_py_run_exits(PyObject *self, PyObject *args)
{
    PyObject *address, *routes, *hypercall_exit, *msr_exit;
    (void)self;
    if (!PyArg_UnpackTuple(args, "run_exits", 4, 4, &address, &routes, &hypercall_exit,
                           &msr_exit))
        return NULL;
    struct hvvmm_vcpu_loop *loop = PyLong_AsVoidPtr(address);
    if (loop == NULL || !PyDict_Check(routes)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "run_exits: a loop address and a dict of routes");
        return NULL;
    }
    for (;;) {
        PyThreadState *state = PyEval_SaveThread();
        long long packed = hvvmm_run_packed(loop);
        PyEval_RestoreThread(state);
        PyObject *result;
        if (packed <= 0)
            return PyLong_FromLongLong(packed);
        if (packed & HVVMM_PACKED_HYPERCALL) {
            if (hypercall_exit == Py_None)
                return PyLong_FromLongLong(packed);
            /* With the register pair (the call's when HVVMM_PACKED_HC_SIMPLE is set, else
             * stale); the answer HVVMM_HC_SUCCESS_32/64 has the result written before the
             * next entry. */
            result = hvvmm_call_exit_handler(hypercall_exit, packed, 1, loop->hc_input,
                                             loop->hc_output);
            if (result == NULL)
                return NULL;
            if (PyLong_Check(result)) {
                long success = PyLong_AsLong(result);
                if (success == HVVMM_HC_SUCCESS_32 || success == HVVMM_HC_SUCCESS_64)
                    loop->hc_success = (uint8_t)success;
            }
        } else if (packed & HVVMM_PACKED_MSR) {
            if (msr_exit == Py_None)
                return PyLong_FromLongLong(packed);
            /* An RDMSR handler may answer with the value (an int) rather than complete the
             * access itself: it is stored here, as Vcpu.complete_rdmsr would. */
            result = hvvmm_call_exit_handler(msr_exit, packed, 0, 0, 0);
            if (result == NULL)
                return NULL;
            if (!(packed & HVVMM_PACKED_WRMSR) && PyLong_Check(result)) {
                unsigned long long value = PyLong_AsUnsignedLongLong(result);
                if (value == (unsigned long long)-1 && PyErr_Occurred()) {
                    Py_DECREF(result);
                    return NULL;
                }
                loop->run->msr.error = 0;
                loop->run->msr.data = value;
            }
        } else {  /* HVVMM_PACKED_IO */
            PyObject *key = PyLong_FromLongLong(packed >> 32);
            if (key == NULL)
                return NULL;
            PyObject *route = PyDict_GetItemWithError(routes, key);  /* borrowed */
            Py_DECREF(key);
            if (route == NULL)  /* the Python loop finds the device (or the error) */
                return PyErr_Occurred() ? NULL : PyLong_FromLongLong(packed);
            if (route == Py_None) {  /* no device: reads are all ones, writes go nowhere */
                if (!(packed & HVVMM_PACKED_OUT))
                    memset((char *)loop->run + ((unsigned long long)packed & 0xffffffffu), 0xff,
                           (unsigned)(packed >> 48) & 0xff);
                continue;
            }
            Py_INCREF(route);  /* the dict may change while it runs */
            if (packed & HVVMM_PACKED_OUT) {
                PyObject *value = PyLong_FromUnsignedLong((unsigned long)(packed & 0xffffffffu));
                result = value ? PyObject_CallFunctionObjArgs(route, value, NULL) : NULL;
                Py_XDECREF(value);
            } else {
                result = PyObject_CallFunctionObjArgs(route, NULL);
                if (result != NULL && hvvmm_store_port_read(loop, packed, result) < 0)
                    Py_CLEAR(result);
            }
            Py_DECREF(route);
            if (result == NULL)
                return NULL;
        }
        Py_DECREF(result);
    }
}

static PyMethodDef hvvmm_run_exits_def = {
    "run_exits", hvvmm_py_run_exits, METH_VARARGS,
    "run_exits(loop_address, routes, hypercall_exit, msr_exit): see hvvmm/kvm/_build.py"};

/* Puts run_exits on this module (hvvmm.kvm._kvm). Called through cffi, so without the GIL. */
int hvvmm_install_run_exits(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int r = -1;
    PyObject *module = PyImport_AddModule("hvvmm.kvm._kvm");  /* borrowed */
    if (module != NULL) {
        PyObject *function = PyCFunction_NewEx(&hvvmm_run_exits_def, NULL, NULL);
        if (function != NULL) {
            r = PyObject_SetAttrString(module, "run_exits", function);
            Py_DECREF(function);
        }
    }
    if (r < 0)
        PyErr_Clear();
    PyGILState_Release(gil);
    return r;
}

/* A locked OR on one byte of memory the guest shares (SynIC event flags), so a guest clearing
 * other bits of the byte at the same time keeps its change. The builtin compiles to `lock or`
 * (or a cmpxchg loop) inline: no libatomic. */
unsigned char hvvmm_atomic_fetch_or_u8(uintptr_t address, unsigned char mask)
{
    return __atomic_fetch_or((unsigned char *)address, mask, __ATOMIC_SEQ_CST);
}

/* The kvm_run page of a vCPU; NULL on failure (errno says why). */
void *hvvmm_map_shared(int fd, size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int hvvmm_unmap(void *address, size_t size)
{
    return munmap(address, size) < 0 ? -errno : 0;
}

/* The signal that kicks a vCPU thread out of KVM_RUN. Its handler is a C no-op installed without
 * SA_RESTART, so KVM_RUN returns EINTR; installing it in C (not with Python's signal module) works
 * from any thread and leaves the application's own Python signal handlers alone. */
static void hvvmm_kick(int signo) { (void)signo; }

int hvvmm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hvvmm_kick;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvvmm.kvm._kvm", SOURCE)

if __name__ == "__main__":
    import os
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    os.chdir(root)
    ffibuilder.compile(tmpdir=str(root), verbose=False)
