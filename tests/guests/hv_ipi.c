/*
 * PV IPIs (hv-ipi): HvCallSendSyntheticClusterIpi (0x000B, fast as Linux 6.1
 * issues it, and from memory) and HvCallSendSyntheticClusterIpiEx (0x0015, a
 * sparse HV_VP_SET and HV_GENERIC_SET_ALL, as Linux's __send_ipi_mask_ex()
 * builds them).  Every CPU counts the IPIs its handler takes; after each call
 * the BSP waits (bounded) until exactly the targets' counters went up by one,
 * then checks that nobody else's did.  Then the calls the VMM must refuse,
 * none of which may deliver anything.  Without the CPUID hint (hv-ipi off)
 * only checks that both calls are denied.  "x2apic" on the command line switches
 * every CPU to x2APIC mode first.  Works with 2 or more vCPUs.
 */
#include "hyperv.h"

#define HVCALL_SEND_IPI 0x000b
#define HVCALL_SEND_IPI_EX 0x0015
#define HV_X64_CLUSTER_IPI_RECOMMENDED (1u << 10)
#define HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED (1u << 11)
#define HV_STATUS_INVALID_PARAMETER 5
#define HV_GENERIC_SET_SPARSE_4K 0
#define HV_GENERIC_SET_ALL 1
#define HV_VARHEAD(n) ((uint64_t)(n) << 17)

#define IPI_VECTOR 0xe0
#define WAIT_CYCLES 20000000000ull  /* bound on every wait (about 7 s at 3 GHz) */
#define QUIET_CYCLES 100000000ull   /* how long "nothing else arrives" is watched */

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
/* struct hv_send_ipi / hv_send_ipi_ex (Linux), in one input page. */
static uint64_t input[HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));

static volatile int hits[MAX_CPUS];
static int expected[MAX_CPUS];
static volatile int aps_ready, done;
static volatile uint64_t vp_index[MAX_CPUS];
static int ncpus;

static void ipi_handler(struct ex_regs *regs)
{
    (void)regs;
    atomic_inc(&hits[smp_id()]);
    apic_eoi();
}

static void ap_main(int cpu)
{
    vp_index[cpu] = rdmsr(HV_X64_MSR_VP_INDEX);
    atomic_inc(&aps_ready);
    while (!atomic_read(&done))
        safe_halt();               /* sti; hlt: no IPI slips in between */
    cli();
}

static bool counts_match(void)
{
    for (int cpu = 0; cpu < ncpus; cpu++)
        if (atomic_read(&hits[cpu]) != expected[cpu])
            return false;
    return true;
}

/* Wait until every counter equals expected[], then watch a while longer for
 * extra IPIs; reports and returns whether all of it held. */
static bool expect_hits(const char *what)
{
    uint64_t start = rdtsc();
    while (!counts_match() && rdtsc() - start < WAIT_CYCLES)
        pause();
    start = rdtsc();
    while (counts_match() && rdtsc() - start < QUIET_CYCLES)
        pause();
    bool ok = counts_match();
    if (!ok)
        for (int cpu = 0; cpu < ncpus; cpu++)
            report_info("%s: cpu %d took %d IPI(s), expected %d", what, cpu,
                        atomic_read(&hits[cpu]), expected[cpu]);
    return report(ok, "%s: exactly the targets took one IPI each", what);
}

static uint64_t send_ipi_fast(uint32_t vector, uint64_t mask)
{
    /* Linux: hv_do_fast_hypercall16(HVCALL_SEND_IPI, vector, mask). */
    return hypercall(HVCALL_SEND_IPI | HV_HYPERCALL_FAST_BIT, vector, mask);
}

static uint64_t send_ipi_memory(uint32_t vector, uint64_t mask)
{
    input[0] = vector;             /* vector, TargetVtl 0, padding */
    input[1] = mask;
    return hypercall(HVCALL_SEND_IPI, (uintptr_t)input, 0);
}

/* Ex with a sparse set of the CPUs in `mask` (bank 0 only, as Linux's
 * cpumask_to_vpset() for fewer than 64 VPs), or HV_GENERIC_SET_ALL when
 * `all`; `var_delta` makes the variable-header size wrong on purpose. */
static uint64_t send_ipi_ex(uint32_t vector, bool all, uint64_t mask, int var_delta)
{
    input[0] = vector;
    input[1] = all ? HV_GENERIC_SET_ALL : HV_GENERIC_SET_SPARSE_4K;
    input[2] = all ? 0 : 1;        /* ValidBanksMask */
    input[3] = mask;               /* bank 0 */
    int banks = all ? 0 : 1;
    return hypercall(HVCALL_SEND_IPI_EX | HV_VARHEAD(banks + var_delta), (uintptr_t)input, 0);
}

static void expect_status(uint64_t result, uint16_t status, const char *what)
{
    report(result == status, "%s -> status %#llx (expected %#x)", what,
           (unsigned long long)result, status);
}

int main(void)
{
    struct hv_features f = hv_read_features();
    report(f.hints & HV_X64_CLUSTER_IPI_RECOMMENDED, "CPUID: cluster IPI recommended (hint 10)");
    report(f.hints & HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED,
           "CPUID: ExProcessorMasks recommended (hint 11)");
    if (cmdline_has("x2apic")) {
        if (!enable_x2apic())
            report_skip("x2APIC not supported");
        else
            report(x2apic_enabled(), "BSP in x2APIC mode");
    }
    set_irq_handler(IPI_VECTOR, ipi_handler);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);
    hv_enable_hypercall_page(hypercall_page);

    ncpus = smp_init(ap_main);
    uint64_t start = rdtsc();
    while (atomic_read(&aps_ready) < ncpus - 1 && rdtsc() - start < WAIT_CYCLES)
        pause();
    report(ncpus >= 2 && atomic_read(&aps_ready) == ncpus - 1, "%d CPUs online, APs waiting",
           ncpus);
    vp_index[0] = rdmsr(HV_X64_MSR_VP_INDEX);
    bool same = true;
    for (int cpu = 0; cpu < ncpus; cpu++)
        same &= vp_index[cpu] == (uint64_t)cpu;
    report(same, "every CPU's VP_INDEX is its APIC ID (what the masks name)");
    apic_enable();
    sti();

    uint64_t all_mask = (ncpus >= 64) ? ~0ull : (1ull << ncpus) - 1;
    int last = ncpus - 1;

    if (!(f.hints & HV_X64_CLUSTER_IPI_RECOMMENDED)) {
        /* hv-ipi off: the calls exist but are denied (KVM without the hint). */
        expect_status(send_ipi_fast(IPI_VECTOR, all_mask), HV_STATUS_ACCESS_DENIED,
                      "hv-ipi off: fast 0x000B");
        expect_status(send_ipi_ex(IPI_VECTOR, true, 0, 0), HV_STATUS_ACCESS_DENIED,
                      "hv-ipi off: 0x0015");
        expect_hits("hv-ipi off");
        atomic_set(&done, 1);
        cli();
        report_summary();
    }

    /* One VP, fast (what Linux sends for every IPI once hint 10 is set). */
    expect_status(send_ipi_fast(IPI_VECTOR, 1ull << last), HV_STATUS_SUCCESS,
                  "fast 0x000B to the last VP");
    expected[last]++;
    expect_hits("fast 0x000B to the last VP");

    /* The caller itself (hv_send_ipi_self). */
    expect_status(send_ipi_fast(IPI_VECTOR, 1), HV_STATUS_SUCCESS, "fast 0x000B to itself");
    expected[0]++;
    expect_hits("fast 0x000B to itself");

    /* Memory form, every AP. */
    expect_status(send_ipi_memory(IPI_VECTOR, all_mask & ~1ull), HV_STATUS_SUCCESS,
                  "0x000B from memory to every AP");
    for (int cpu = 1; cpu < ncpus; cpu++)
        expected[cpu]++;
    expect_hits("0x000B from memory to every AP");

    /* Ex, a sparse set: the odd VPs (VP 1, or VPs 1 and 3 with four vCPUs). */
    uint64_t odd = all_mask & 0xAAAAAAAAAAAAAAAAull;
    expect_status(send_ipi_ex(IPI_VECTOR, false, odd, 0), HV_STATUS_SUCCESS,
                  "0x0015 to a sparse set (the odd VPs)");
    for (int cpu = 1; cpu < ncpus; cpu += 2)
        expected[cpu]++;
    expect_hits("0x0015 to a sparse set (the odd VPs)");

    /* Ex, HV_GENERIC_SET_ALL (Linux: the mask is every present CPU). */
    expect_status(send_ipi_ex(IPI_VECTOR, true, 0, 0), HV_STATUS_SUCCESS,
                  "0x0015 to HV_GENERIC_SET_ALL");
    for (int cpu = 0; cpu < ncpus; cpu++)
        expected[cpu]++;
    expect_hits("0x0015 to HV_GENERIC_SET_ALL");

    /* What must be refused, delivering nothing. */
    expect_status(send_ipi_fast(0x0f, 1ull << last), HV_STATUS_INVALID_PARAMETER,
                  "vector 0x0f");
    expect_status(send_ipi_fast(IPI_VECTOR, 1ull << ncpus), HV_STATUS_INVALID_PARAMETER,
                  "a mask bit for a VP that does not exist");
    expect_status(send_ipi_ex(IPI_VECTOR, false, 1ull << ncpus, 0),
                  HV_STATUS_INVALID_PARAMETER, "0x0015 naming a VP that does not exist");
    expect_status(send_ipi_ex(IPI_VECTOR, false, 2, 1), HV_STATUS_INVALID_HYPERCALL_INPUT,
                  "0x0015 with more banks in the header than ValidBanksMask names");
    expect_status(send_ipi_ex(IPI_VECTOR, false, 2, -1), HV_STATUS_INVALID_HYPERCALL_INPUT,
                  "0x0015 with fewer banks in the header than ValidBanksMask names");
    expect_hits("the refused calls");

    atomic_set(&done, 1);
    cli();
    report_summary();
}
