/*
 * Instructions some KVMs cannot emulate in ring 0 (hvvmm completes them in user space there,
 * see hvvmm/x86/complete.py); on VT-x/AMD-V they run on the CPU and the same checks hold.
 * The builder refuses these in guests unless the source allows them:
 * hvvmm-allow-instructions: int3 int cmpxchg16b xsetbv xgetbv xsave64 xrstor64
 */
#include "guest.h"

#define RFLAGS_CF (1ul << 0)
#define RFLAGS_PF (1ul << 2)
#define RFLAGS_ZF (1ul << 6)
#define RFLAGS_SF (1ul << 7)
#define RFLAGS_OF (1ul << 11)
#define RFLAGS_AC (1ul << 18)
#define CR4_FSGSBASE (1ul << 16)
#define MSR_FS_BASE 0xC0000100

static volatile uint64_t trap_count, trap_rip, trap_vector;

static void count_trap(struct ex_regs *regs)
{
    trap_count++;
    trap_rip = regs->rip;
    trap_vector = regs->vector;
}

static void test_int3_and_int_n(void)
{
    uint64_t after;

    set_irq_handler(BP_VECTOR, count_trap);
    set_irq_handler(0x41, count_trap);
    asm volatile("int3\n\t1: lea 1b(%%rip), %0" : "=r"(after) :: "memory");
    report(trap_count == 1 && trap_vector == BP_VECTOR && trap_rip == after,
           "int3: #BP handler ran once, return rip %#lx is the next instruction %#lx",
           trap_rip, after);
    asm volatile("int $0x41\n\t1: lea 1b(%%rip), %0" : "=r"(after) :: "memory");
    report(trap_count == 2 && trap_vector == 0x41 && trap_rip == after,
           "int $0x41: handler ran, return rip %#lx is the next instruction %#lx",
           trap_rip, after);
    set_irq_handler(BP_VECTOR, NULL);
    set_irq_handler(0x41, NULL);
}

static void test_popcnt(void)
{
    uint64_t result, flags;
    static volatile uint64_t in_memory = 0x8000000000000001ul;

    if (!(cpuid(1).c & (1u << 23))) {
        report_skip("popcnt: not in CPUID");
        return;
    }
    /* stc first: POPCNT must clear CF (and OF, SF, AF, PF); ZF only for a zero source. */
    asm volatile("stc; popcnt %2, %0; pushfq; pop %1"
                 : "=&r"(result), "=r"(flags) : "r"(0xF0F0F0F0ul) : "cc");
    report(result == 16 && !(flags & (RFLAGS_CF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_PF)),
           "popcnt reg: 16 bits, flags %#lx", flags);
    asm volatile("stc; popcnt %2, %0; pushfq; pop %1"
                 : "=&r"(result), "=r"(flags) : "r"(0ul) : "cc");
    report(result == 0 && (flags & RFLAGS_ZF) && !(flags & RFLAGS_CF),
           "popcnt of 0: ZF set, CF clear (flags %#lx)", flags);
    asm volatile("popcnt %1, %0" : "=r"(result) : "m"(in_memory) : "cc");
    report(result == 2, "popcnt from memory: %lu", result);
}

static void test_fwait_fninit(void)
{
    uint16_t cw = 0, sw = 0xFFFF;

    asm volatile("fwait" ::: "memory");
    report(true, "fwait with nothing pending continues");
    asm volatile("fninit; fnstcw %0; fnstsw %1" : "=m"(cw), "=m"(sw) :: "memory");
    report(cw == 0x037F && sw == 0, "fninit: control word %#x, status word %#x", cw, sw);
}

static void test_mxcsr(void)
{
    uint32_t saved = 0, readback = 0, wanted = 0x1F80 | 0x6000; /* round toward zero */

    asm volatile("stmxcsr %0" : "=m"(saved));
    asm volatile("ldmxcsr %1; stmxcsr %0" : "=m"(readback) : "m"(wanted));
    report(readback == wanted, "ldmxcsr/stmxcsr round trip: %#x (saved %#x)", readback, saved);
    asm volatile("ldmxcsr %0" :: "m"(saved));
    report(asm_try("movl $0x10000, -8(%%rsp); ldmxcsr -8(%%rsp)") == GP_VECTOR,
           "ldmxcsr with a reserved bit: #GP");
    /* An unmapped operand: #PF with CR2 = the address (the runtime maps the first 4 GiB). */
    int vector = asm_try("mov $0x100000000000, %%rax; ldmxcsr (%%rax)");
    uint64_t cr2 = read_cr2();
    report(vector == PF_VECTOR && cr2 == 0x100000000000ul && exception_error_code() == 0,
           "ldmxcsr from an unmapped page: #PF (vector %d) cr2 %#lx error code %#lx",
           vector, cr2, exception_error_code());
}

static void test_rdrand(void)
{
    uint64_t a = 0, b = 0;
    uint8_t ok_a = 0, ok_b = 0;

    if (!(cpuid(1).c & (1u << 30))) {
        report_skip("rdrand: not in CPUID");
        return;
    }
    asm volatile("rdrand %0; setc %1" : "=r"(a), "=qm"(ok_a) :: "cc");
    asm volatile("rdrand %0; setc %1" : "=r"(b), "=qm"(ok_b) :: "cc");
    report(ok_a && ok_b && a != b, "rdrand: CF=1 twice, %#lx != %#lx", a, b);
}

struct u128 { uint64_t lo, hi; } __attribute__((aligned(16)));
static struct u128 shared_counter;

static bool cmpxchg16b(struct u128 *p, struct u128 *expected, struct u128 desired)
{
    bool ok;
    asm volatile("lock cmpxchg16b %1; setz %0"
                 : "=q"(ok), "+m"(*p), "+a"(expected->lo), "+d"(expected->hi)
                 : "b"(desired.lo), "c"(desired.hi) : "cc", "memory");
    return ok;
}

#define INCREMENTS 100

static void add_to_shared_counter(void)
{
    for (int i = 0; i < INCREMENTS; i++) {
        struct u128 old = shared_counter;
        while (!cmpxchg16b(&shared_counter, &old,
                           (struct u128){ old.lo + 1, old.hi + 1 }))
            ;
    }
}

static volatile int ap_done;

static void ap_main(int cpu)
{
    add_to_shared_counter();
    atomic_inc(&ap_done);
}

static void test_cmpxchg16b(void)
{
    static struct u128 value = { 1, 2 };
    struct u128 expected = { 1, 2 };

    if (!(cpuid(1).c & (1u << 13))) {
        report_skip("cmpxchg16b: not in CPUID");
        return;
    }
    bool ok = cmpxchg16b(&value, &expected, (struct u128){ 3, 4 });
    report(ok && value.lo == 3 && value.hi == 4, "cmpxchg16b equal: stored (%lu, %lu)",
           value.lo, value.hi);
    expected = (struct u128){ 7, 7 };
    ok = cmpxchg16b(&value, &expected, (struct u128){ 9, 9 });
    report(!ok && expected.lo == 3 && expected.hi == 4 && value.lo == 3,
           "cmpxchg16b not equal: ZF clear, old value (%lu, %lu) loaded", expected.lo,
           expected.hi);
    report(asm_try("lea -24(%%rsp), %%rsi; and $-16, %%rsi; add $8, %%rsi; "
                   "lock cmpxchg16b (%%rsi)") == GP_VECTOR,
           "cmpxchg16b on a misaligned operand: #GP");

    int cpus = smp_init(ap_main);
    add_to_shared_counter();
    uint64_t deadline = rdtsc() + 60ul * 1000 * 1000 * 1000;
    while (ap_done < cpus - 1 && rdtsc() < deadline)
        pause();
    uint64_t want = (uint64_t)INCREMENTS * cpus;
    report(shared_counter.lo == want && shared_counter.hi == want,
           "cmpxchg16b increments from %d vCPUs are atomic: (%lu, %lu), want %lu", cpus,
           shared_counter.lo, shared_counter.hi, want);
}

static void test_clac_stac(void)
{
    if (!(cpuid_count(7, 0).b & (1u << 20))) {
        report_skip("clac/stac: no SMAP in CPUID");
        return;
    }
    uint64_t after_stac, after_clac;
    asm volatile("stac; pushfq; pop %0" : "=r"(after_stac) :: "cc");
    asm volatile("clac; pushfq; pop %0" : "=r"(after_clac) :: "cc");
    report((after_stac & RFLAGS_AC) && !(after_clac & RFLAGS_AC),
           "stac sets RFLAGS.AC (%#lx), clac clears it (%#lx)", after_stac, after_clac);
}

static void test_fsgsbase(void)
{
    if (!(cpuid_count(7, 0).b & 1u)) {
        report_skip("rd/wrfsbase: no FSGSBASE in CPUID");
        return;
    }
    uint64_t cr4 = read_cr4();
    exception_clear();
    asm volatile(ASM_TRY("1f") "mov %0, %%cr4\n\t1:" :: "r"(cr4 | CR4_FSGSBASE) : "memory");
    if (exception_vector()) {
        report_skip("rd/wrfsbase: the vCPU refuses CR4.FSGSBASE (vector %d)", exception_vector());
        return;
    }
    uint64_t saved = rdmsr(MSR_FS_BASE), read = 0;
    asm volatile("wrfsbase %1; rdfsbase %0" : "=r"(read) : "r"(0x123456789000ul));
    uint64_t msr = rdmsr(MSR_FS_BASE);
    report(read == 0x123456789000ul && msr == read,
           "wrfsbase/rdfsbase: %#lx, IA32_FS_BASE %#lx", read, msr);
    report(asm_try("mov $0x8000000000000000, %%rax; wrfsbase %%rax") == GP_VECTOR,
           "wrfsbase of a non-canonical value: #GP");
    wrmsr(MSR_FS_BASE, saved);
    asm volatile("mov %0, %%cr4" :: "r"(cr4));
    /* Not checked here: #UD with CR4.FSGSBASE clear. A PVM host runs these on the CPU with
     * the host's CR4 (the unit tests check the completer's #UD). */
}

static struct u128 invpcid_descriptor __attribute__((used));

static void test_invpcid(void)
{
    if (!(cpuid_count(7, 0).b & (1u << 10))) {
        report_skip("invpcid: not in CPUID");
        return;
    }
    report(asm_try("mov $2, %%eax; invpcid invpcid_descriptor(%%rip), %%rax") == 0,
           "invpcid type 2 (everything, globals too)");
    report(asm_try("mov $4, %%eax; invpcid invpcid_descriptor(%%rip), %%rax") == GP_VECTOR,
           "invpcid type 4: #GP");
}

static uint8_t xsave_area[4096] __attribute__((aligned(64)));
static uint8_t xrstor_area[4096] __attribute__((aligned(64), used));

static void test_xsave_xrstor(void)
{
    static uint64_t xmm_in[2] __attribute__((aligned(16))) = { 0x1122334455667788ul, 0x99 };
    static uint64_t xmm_out[2] __attribute__((aligned(16)));
    uint32_t mxcsr = 0x7F80, lo, hi;

    if (!(cpuid(1).c & (1u << 26))) {
        report_skip("xsave/xrstor: no XSAVE in CPUID");
        return;
    }
    exception_clear();
    asm volatile(ASM_TRY("1f") "mov %0, %%cr4\n\t1:" :: "r"(read_cr4() | (1ul << 18))
                 : "memory");
    if (exception_vector() || asm_try("xor %%ecx, %%ecx; mov $3, %%eax; xor %%edx, %%edx; "
                                      "xsetbv")) {
        report_skip("xsave/xrstor: the vCPU refuses CR4.OSXSAVE or XCR0 = 3");
        return;
    }
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    report(lo == 3 && hi == 0, "xgetbv: XCR0 %#x", lo);
    asm volatile("ldmxcsr %0; movdqu %1, %%xmm3" :: "m"(mxcsr), "m"(xmm_in));
    asm volatile("xsave64 %0" : "=m"(xsave_area) : "a"(3), "d"(0) : "memory");
    report(*(uint32_t *)(xsave_area + 24) == 0x7F80
           && *(uint64_t *)(xsave_area + 160 + 3 * 16) == xmm_in[0]
           && (*(uint64_t *)(xsave_area + 512) & ~3ul) == 0,
           "xsave: MXCSR %#x, XMM3 %#lx, XSTATE_BV %#lx", *(uint32_t *)(xsave_area + 24),
           *(uint64_t *)(xsave_area + 160 + 3 * 16), *(uint64_t *)(xsave_area + 512));
    memcpy(xrstor_area, xsave_area, sizeof xrstor_area);
    *(uint32_t *)(xrstor_area + 24) = 0x1F80;
    *(uint64_t *)(xrstor_area + 160 + 3 * 16) = 0xABCDEF;
    *(uint64_t *)(xrstor_area + 512) = 3;
    asm volatile("xrstor64 %0" :: "m"(xrstor_area), "a"(3), "d"(0) : "memory");
    asm volatile("stmxcsr %0; movdqu %%xmm3, %1" : "=m"(mxcsr), "=m"(xmm_out));
    report(mxcsr == 0x1F80 && xmm_out[0] == 0xABCDEF && xmm_out[1] == 0x99,
           "xrstor: MXCSR %#x, XMM3 %#lx:%#lx", mxcsr, xmm_out[1], xmm_out[0]);
    *(uint64_t *)(xrstor_area + 512) = 1ul << 40; /* a component XCR0 does not have */
    report(asm_try("mov $3, %%eax; xor %%edx, %%edx; xrstor64 xrstor_area(%%rip)")
           == GP_VECTOR, "xrstor of an XSTATE_BV bit outside XCR0: #GP");
}

int main(void)
{
    test_int3_and_int_n();
    test_popcnt();
    test_fwait_fninit();
    test_mxcsr();
    test_rdrand();
    test_clac_stac();
    test_fsgsbase();
    test_invpcid();
    test_xsave_xrstor();
    test_cmpxchg16b();
    report_summary();
}
