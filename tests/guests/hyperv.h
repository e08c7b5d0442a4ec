/*
 * hyperv.h - small guest-side helpers for the Hyper-V (HV#1) test guests:
 * CPUID leaves and bits, synthetic MSR numbers, the hypercall (64-bit
 * convention, an indirect call into the hypercall page, as Linux's
 * hv_do_hypercall() does) and the reference TSC page reader.
 *
 * Names follow Linux (include/asm-generic/hyperv-tlfs.h) where Linux has one.
 * The interface is the TLFS (Microsoft Hypervisor Top-Level Functional Spec).
 */
#ifndef HVVMM_TESTS_HYPERV_H
#define HVVMM_TESTS_HYPERV_H

#include "guest.h"

/* CPUID leaves */
#define HV_CPUID_VENDOR 0x40000000      /* EAX max leaf; EBX:ECX:EDX "Microsoft Hv" */
#define HV_CPUID_INTERFACE 0x40000001   /* EAX "Hv#1" */
#define HV_CPUID_VERSION 0x40000002
#define HV_CPUID_FEATURES 0x40000003    /* EAX:EBX privileges, EDX features */
#define HV_CPUID_HINTS 0x40000004
#define HV_CPUID_LIMITS 0x40000005
#define HV_SIGNATURE_HV1 0x31237648u    /* "Hv#1" */

/* 0x40000003 EAX: privileges 31:0 */
#define HV_MSR_VP_RUNTIME_AVAILABLE (1u << 0)
#define HV_MSR_TIME_REF_COUNT_AVAILABLE (1u << 1)
#define HV_MSR_SYNIC_AVAILABLE (1u << 2)
#define HV_MSR_SYNTIMER_AVAILABLE (1u << 3)
#define HV_MSR_APIC_ACCESS_AVAILABLE (1u << 4)
#define HV_MSR_HYPERCALL_AVAILABLE (1u << 5)
#define HV_MSR_VP_INDEX_AVAILABLE (1u << 6)
#define HV_MSR_RESET_AVAILABLE (1u << 7)
#define HV_MSR_REFERENCE_TSC_AVAILABLE (1u << 9)
#define HV_MSR_GUEST_IDLE_AVAILABLE (1u << 10)
#define HV_ACCESS_FREQUENCY_MSRS (1u << 11)
#define HV_ACCESS_REENLIGHTENMENT (1u << 13)
#define HV_ACCESS_TSC_INVARIANT (1u << 15)
/* 0x40000003 EBX: privileges 63:32 */
#define HV_ACCESS_PARTITION_ID (1u << 1)
#define HV_CPU_MANAGEMENT (1u << 12)
#define HV_ENABLE_EXTENDED_HYPERCALLS (1u << 20)
#define HV_ISOLATION (1u << 22)
/* 0x40000003 EDX: features */
#define HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE (1u << 4)
#define HV_X64_GUEST_IDLE_STATE_AVAILABLE (1u << 5)
#define HV_FEATURE_FREQUENCY_MSRS_AVAILABLE (1u << 8)
#define HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE (1u << 10)
#define HV_X64_HYPERCALL_MSR_LOCK_AVAILABLE (1u << 18)
/* 0x40000004 EAX: hints */
#define HV_X64_APIC_ACCESS_RECOMMENDED (1u << 3)

/* Synthetic MSRs */
#define HV_X64_MSR_GUEST_OS_ID 0x40000000
#define HV_X64_MSR_HYPERCALL 0x40000001
#define HV_X64_MSR_VP_INDEX 0x40000002
#define HV_X64_MSR_RESET 0x40000003
#define HV_X64_MSR_VP_RUNTIME 0x40000010
#define HV_X64_MSR_TIME_REF_COUNT 0x40000020
#define HV_X64_MSR_REFERENCE_TSC 0x40000021
#define HV_X64_MSR_TSC_FREQUENCY 0x40000022
#define HV_X64_MSR_APIC_FREQUENCY 0x40000023
#define HV_X64_MSR_EOI 0x40000070
#define HV_X64_MSR_ICR 0x40000071
#define HV_X64_MSR_TPR 0x40000072
#define HV_X64_MSR_VP_ASSIST_PAGE 0x40000073
#define HV_X64_MSR_SCONTROL 0x40000080
#define HV_X64_MSR_SVERSION 0x40000081
#define HV_X64_MSR_SIEFP 0x40000082
#define HV_X64_MSR_SIMP 0x40000083
#define HV_X64_MSR_EOM 0x40000084
#define HV_X64_MSR_SINT0 0x40000090
#define HV_X64_MSR_STIMER0_CONFIG 0x400000B0
#define HV_X64_MSR_STIMER0_COUNT 0x400000B1
#define HV_X64_MSR_GUEST_IDLE 0x400000F0
#define HV_X64_MSR_SYNDBG_OPTIONS 0x400000FF
#define HV_X64_MSR_CRASH_P0 0x40000100
#define HV_X64_MSR_CRASH_P1 0x40000101
#define HV_X64_MSR_CRASH_P2 0x40000102
#define HV_X64_MSR_CRASH_P3 0x40000103
#define HV_X64_MSR_CRASH_P4 0x40000104
#define HV_X64_MSR_CRASH_CTL 0x40000105
#define HV_X64_MSR_REENLIGHTENMENT_CONTROL 0x40000106
#define HV_X64_MSR_TSC_INVARIANT_CONTROL 0x40000118

#define HV_X64_MSR_HYPERCALL_ENABLE (1ull << 0)
#define HV_X64_MSR_HYPERCALL_LOCKED (1ull << 1)
#define HV_X64_MSR_TSC_REFERENCE_ENABLE (1ull << 0)
#define HV_X64_MSR_VP_ASSIST_PAGE_ENABLE (1ull << 0)
#define HV_CRASH_CTL_CRASH_NOTIFY (1ull << 63)
#define HV_CRASH_CTL_CRASH_NOTIFY_MSG (1ull << 62)

/* Hypercall codes and status values */
#define HVCALL_NOTIFY_LONG_SPIN_WAIT 0x0008
#define HV_EXT_CALL_QUERY_CAPABILITIES 0x8001
#define HV_HYPERCALL_FAST_BIT (1ull << 16)
#define HV_HYPERCALL_REP_COMP_OFFSET 32
#define HV_HYPERCALL_REP_START_OFFSET 48
#define HV_STATUS_SUCCESS 0
#define HV_STATUS_INVALID_HYPERCALL_CODE 2
#define HV_STATUS_INVALID_HYPERCALL_INPUT 3
#define HV_STATUS_INVALID_ALIGNMENT 4
#define HV_STATUS_ACCESS_DENIED 6

#define HV_PAGE_SIZE 4096
#define ENDBR64_U32 0xfa1e0ff3u        /* f3 0f 1e fa, little-endian */

/* Linux's hv_generate_guest_id(): 0x8100 << 48 | LINUX_VERSION_CODE << 16. */
static inline uint64_t hv_linux_guest_id(unsigned major, unsigned minor, unsigned sublevel)
{
    uint64_t code = (uint64_t)major << 16 | minor << 8 | (sublevel > 255 ? 255 : sublevel);
    return 0x8100ull << 48 | code << 16;
}
#define HV_LINUX_6_1_192_GUEST_ID 0x8100000601C00000ull

static inline uint16_t hv_result_status(uint64_t result) { return result & 0xFFFF; }
static inline unsigned hv_result_reps(uint64_t result) { return (result >> 32) & 0xFFF; }

/* ------------------------------------------------------------------------
 * Hypercalls: the 64-bit convention (RCX input value, RDX input GPA, R8
 * output GPA, result in RAX; a rep call may rewrite RCX), made by an indirect
 * call to the start of the hypercall page.  The stub clobbers nothing but RAX
 * (hvvmm/enlightenments/core.py), but the asm treats RCX/RDX/R8-R11 as clobbered, as
 * Linux's hv_do_hypercall() does, so nothing here relies on more than Linux.
 * ---------------------------------------------------------------------- */
static void *volatile hv_hypercall_pg __attribute__((unused));

static inline uint64_t hypercall_rcx(uint64_t control, uint64_t in_gpa, uint64_t out_gpa,
                                     uint64_t *rcx_after)
{
    uint64_t status;
    register uint64_t r8 asm("r8") = out_gpa;
    asm volatile("call *%[page]"
                 : "=a"(status), "+c"(control), "+d"(in_gpa), "+r"(r8)
                 : [page] "m"(hv_hypercall_pg)
                 : "cc", "memory", "r9", "r10", "r11");
    if (rcx_after)
        *rcx_after = control;
    return status;
}

static inline uint64_t hypercall(uint64_t control, uint64_t in_gpa, uint64_t out_gpa)
{
    return hypercall_rcx(control, in_gpa, out_gpa, NULL);
}

/* Linux's hyperv_init() hypercall-page sequence (hv_init.c): read the MSR,
 * keep bits 11:1, put the page frame in 63:12 and set Enable.  The guest OS
 * identity must have been reported first.  Returns the value written. */
static inline uint64_t hv_enable_hypercall_page(void *page)
{
    uint64_t old = rdmsr(HV_X64_MSR_HYPERCALL);
    uint64_t val = (old & 0xFFE) | ((uintptr_t)page & ~0xFFFull) | HV_X64_MSR_HYPERCALL_ENABLE;
    wrmsr(HV_X64_MSR_HYPERCALL, val);
    hv_hypercall_pg = page;
    return val;
}

/* ------------------------------------------------------------------------
 * The reference TSC page (TLFS timers.md; Linux hv_read_tsc_page_tsc()).
 * ---------------------------------------------------------------------- */
struct hv_tsc_page {
    volatile uint32_t tsc_sequence;
    uint32_t reserved1;
    volatile uint64_t tsc_scale;
    volatile int64_t tsc_offset;
};

static inline uint64_t mul_u64_u64_shr64(uint64_t a, uint64_t b)
{
    return (uint64_t)(((unsigned __int128)a * b) >> 64);
}

/* ReferenceTime = ((TSC * TscScale) >> 64) + TscOffset, under the sequence
 * protocol: false if the page is invalid (sequence 0: read the MSR instead). */
static inline bool hv_read_tsc_page_tsc(const struct hv_tsc_page *page, uint64_t *time,
                                        uint64_t *tsc_out)
{
    uint32_t sequence;
    uint64_t scale, tsc;
    int64_t offset;
    do {
        sequence = page->tsc_sequence;
        if (sequence == 0)
            return false;
        barrier();
        scale = page->tsc_scale;
        offset = page->tsc_offset;
        tsc = rdtsc();
        barrier();
    } while (page->tsc_sequence != sequence);
    *time = mul_u64_u64_shr64(tsc, scale) + offset;
    if (tsc_out)
        *tsc_out = tsc;
    return true;
}

/* Linux's hv_init_clocksource() enable: keep bits 11:0 of the old value, put
 * the page frame in 63:12 and set Enable.  Returns the value written. */
static inline uint64_t hv_enable_tsc_page(void *page)
{
    uint64_t old = rdmsr(HV_X64_MSR_REFERENCE_TSC);
    uint64_t val = (old & 0xFFF) | ((uintptr_t)page & ~0xFFFull) | HV_X64_MSR_TSC_REFERENCE_ENABLE;
    wrmsr(HV_X64_MSR_REFERENCE_TSC, val);
    return val;
}

/* The CPUID privilege/feature words, read once. */
struct hv_features {
    uint32_t max_leaf, priv_low, priv_high, features, hints;
};

static inline struct hv_features hv_read_features(void)
{
    struct hv_features f = { 0 };
    struct cpuid vendor = cpuid(HV_CPUID_VENDOR);
    f.max_leaf = vendor.a;
    if (vendor.a >= HV_CPUID_FEATURES) {
        struct cpuid feat = cpuid(HV_CPUID_FEATURES);
        f.priv_low = feat.a;
        f.priv_high = feat.b;
        f.features = feat.d;
    }
    if (vendor.a >= HV_CPUID_HINTS)
        f.hints = cpuid(HV_CPUID_HINTS).a;
    return f;
}

/* A write guarded against faults: returns the vector (0 if none). */
static inline int write_u8_safe(volatile uint8_t *p, uint8_t v)
{
    exception_clear();
    asm volatile(ASM_TRY("1f") "movb %1, (%0)\n\t1:" :: "r"(p), "r"(v) : "memory");
    return exception_vector();
}

/* SynIC message slot (TLFS datatypes/hv_message.md): 256 bytes; the guest sets type back to
 * HVMSG_NONE when done and writes EOM if MessagePending (flags bit 0) was set. */
#define HVMSG_NONE 0u
#define HVMSG_TIMER_EXPIRED 0x80000010u
struct hv_message {
    volatile uint32_t type;
    volatile uint8_t payload_size;
    volatile uint8_t flags;                  /* bit 0 MessagePending */
    uint16_t reserved;
    uint64_t sender;
    volatile uint64_t payload[30];
};

/* Synthetic timer CONFIG bits (TLFS timers.md "Synthetic Timer Configuration Register") */
#define STIMER_ENABLE (1ull << 0)
#define STIMER_PERIODIC (1ull << 1)
#define STIMER_AUTO_ENABLE (1ull << 3)
#define STIMER_DIRECT (1ull << 12)
#define STIMER_VECTOR(v) ((uint64_t)(v) << 4)
#define STIMER_SINTX(s) ((uint64_t)(s) << 16)

/* Host-visible phase marks: tests put a device on this port (absent: ignored). */
#define HV_TEST_MARK_PORT 0x5e8
static inline void hv_test_mark(uint32_t phase) { outl(HV_TEST_MARK_PORT, phase); }

#endif /* HVVMM_TESTS_HYPERV_H */
