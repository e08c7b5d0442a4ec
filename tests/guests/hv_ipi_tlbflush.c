/*
 * PV TLB flushes (hv-tlbflush): HvCallFlushVirtualAddressSpace/List (0x0002,
 * 0x0003) and their Ex forms (0x0013, 0x0014), as Linux 6.1's
 * hyperv_flush_tlb_multi() issues them (memory form, rep count = GVAs,
 * var-header size = banks), then the calls the VMM must refuse.  The APs spin
 * in long mode meanwhile and must keep making progress: the VMM parks them
 * and rewrites their control registers (KVM_SET_SREGS) for every flush.
 *
 * With "proof" on the command line (2 vCPUs) it instead shows that a flush
 * really happens: VP 1 caches a 4 KiB translation of TEST_VA, the BSP repoints
 * the PTE without INVLPG, and VP 1 reads TEST_VA again
 *   (a) after a "park only" call (hypercall PARK_CODE, which the test
 *       registers on the host: every vCPU parked and resumed, no flush), and
 *   (b) after HvCallFlushVirtualAddressSpace for VP 1.
 * (b) must always see the new page.  (a) seeing the old page shows that the
 * TLB does keep the stale entry across a park, i.e. that (b)'s result comes
 * from the flush; only hardware virtualization (VT-x/AMD-V with VPID/ASID)
 * keeps guest TLB entries that way, so the host test needs such a host.
 */
#include "hyperv.h"

#define HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE 0x0002
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST 0x0003
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX 0x0013
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX 0x0014
#define HV_FLUSH_ALL_PROCESSORS (1ull << 0)
#define HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES (1ull << 1)
#define HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY (1ull << 2)
#define HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED (1u << 2)
#define HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED (1u << 11)
#define HV_STATUS_INVALID_PARAMETER 5
#define HV_GENERIC_SET_SPARSE_4K 0
#define HV_GENERIC_SET_ALL 1
#define HV_VARHEAD(n) ((uint64_t)(n) << 17)
#define HV_REPS(n) ((uint64_t)(n) << HV_HYPERCALL_REP_COMP_OFFSET)

#define PARK_CODE 0x7ff1                /* registered by tests/guest/test_hyperv_ipi_tlbflush.py */
#define TEST_VA 0x100000000ull          /* 4 GiB: PDPT entry 4, outside the identity map */
#define PTE_P_RW 0x3ull
#define WAIT_CYCLES 20000000000ull
#define PROOF_ROUNDS 40

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t input[HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t test_pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t test_pt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_a[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_b[512] __attribute__((aligned(HV_PAGE_SIZE)));
#define MARK_A 0xaaaaaaaaaaaaaaaaull
#define MARK_B 0xbbbbbbbbbbbbbbbbull

static volatile uint64_t progress[MAX_CPUS];
static volatile int aps_ready, done;
static int ncpus;

/* The proof: VP 1 obeys `command`, answers in `answer`, the value read in `seen`. */
enum { CMD_NONE, CMD_WARM, CMD_READ };
static volatile int command, answer, round_id;
static volatile uint64_t seen;

static inline void invlpg(uint64_t va)
{
    asm volatile("invlpg (%0)" :: "r"(va) : "memory");
}

static inline uint64_t read_test_va(void)
{
    return *(volatile uint64_t *)TEST_VA;
}

static void ap_main(int cpu)
{
    atomic_inc(&aps_ready);
    int handled = 0;
    while (!atomic_read(&done)) {
        progress[cpu]++;
        if (cpu != 1 || atomic_read(&round_id) == handled)
            continue;
        handled = atomic_read(&round_id);
        if (command == CMD_WARM) {
            invlpg(TEST_VA);       /* drop what an earlier round left */
            for (int i = 0; i < 8; i++)
                seen = read_test_va();
        } else if (command == CMD_READ) {
            seen = read_test_va();
        }
        atomic_set(&answer, handled);
    }
}

/* Ask VP 1 to do `cmd`; returns what it read. */
static uint64_t vp1_do(int cmd)
{
    command = cmd;
    int id = atomic_add(&round_id, 1);
    uint64_t start = rdtsc();
    while (atomic_read(&answer) != id && rdtsc() - start < WAIT_CYCLES)
        pause();
    return atomic_read(&answer) == id ? seen : 0;
}

static bool aps_progress(void)
{
    uint64_t before[MAX_CPUS];
    for (int cpu = 1; cpu < ncpus; cpu++)
        before[cpu] = progress[cpu];
    uint64_t start = rdtsc();
    for (int cpu = 1; cpu < ncpus; cpu++)
        while (progress[cpu] == before[cpu] && rdtsc() - start < WAIT_CYCLES)
            pause();
    for (int cpu = 1; cpu < ncpus; cpu++)
        if (progress[cpu] == before[cpu])
            return false;
    return true;
}

static void expect(uint64_t result, uint16_t status, unsigned reps, const char *what)
{
    bool ok = hv_result_status(result) == status && hv_result_reps(result) == reps;
    report(ok && (status != HV_STATUS_SUCCESS || aps_progress()),
           "%s -> status %#x, %u rep(s)%s", what, hv_result_status(result),
           hv_result_reps(result), status == HV_STATUS_SUCCESS ? ", APs still running" : "");
}

/* struct hv_tlb_flush / hv_tlb_flush_ex (Linux) in `input`. */
static uint64_t flush_space(uint64_t flags, uint64_t mask)
{
    input[0] = read_cr3() & ~0xfffull;
    input[1] = flags;
    input[2] = mask;
    return hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uintptr_t)input, 0);
}

static uint64_t flush_list(uint64_t flags, uint64_t mask, unsigned gvas)
{
    input[0] = read_cr3() & ~0xfffull;
    input[1] = flags;
    input[2] = mask;
    for (unsigned i = 0; i < gvas; i++)
        input[3 + i] = TEST_VA + i * HV_PAGE_SIZE * 4 + 3;  /* + 3 more pages each */
    return hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | HV_REPS(gvas), (uintptr_t)input, 0);
}

/* Ex: a sparse set of bank 0 (or HV_GENERIC_SET_ALL), then `gvas` GVAs after
 * the banks; `var_delta` makes the variable-header size wrong on purpose. */
static uint64_t flush_ex(bool all, uint64_t mask, unsigned gvas, int var_delta, uint64_t flags)
{
    unsigned banks = all ? 0 : 1;
    input[0] = read_cr3() & ~0xfffull;
    input[1] = flags;
    input[2] = all ? HV_GENERIC_SET_ALL : HV_GENERIC_SET_SPARSE_4K;
    input[3] = all ? 0 : 1;
    input[4] = mask;
    for (unsigned i = 0; i < gvas; i++)
        input[4 + banks + i] = TEST_VA + i * HV_PAGE_SIZE;
    uint64_t code = gvas ? HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX | HV_REPS(gvas)
                         : HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX;
    return hypercall(code | HV_VARHEAD(banks + var_delta), (uintptr_t)input, 0);
}

/* TEST_VA -> page_a through a 4 KiB mapping of our own. */
static void map_test_va(void)
{
    uint64_t *pml4 = (uint64_t *)(uintptr_t)(read_cr3() & ~0xfffull);
    uint64_t *pdpt = (uint64_t *)(uintptr_t)(pml4[0] & ~0xfffull);
    page_a[0] = MARK_A;
    page_b[0] = MARK_B;
    test_pt[0] = (uintptr_t)page_a | PTE_P_RW;
    test_pd[0] = (uintptr_t)test_pt | PTE_P_RW;
    pdpt[TEST_VA >> 30] = (uintptr_t)test_pd | PTE_P_RW;
    invlpg(TEST_VA);
}

static void proof(void)
{
    uint64_t park = hypercall(PARK_CODE | HV_HYPERCALL_FAST_BIT, 0, 0);
    report(park == HV_STATUS_SUCCESS, "proof: the host's park-only call is there (%#llx)",
           (unsigned long long)park);
    int warm_ok = 0, flushed = 0, stale_after_park = 0;
    for (int i = 0; i < PROOF_ROUNDS; i++) {
        test_pt[0] = (uintptr_t)page_a | PTE_P_RW;
        mb();
        warm_ok += vp1_do(CMD_WARM) == MARK_A;
        test_pt[0] = (uintptr_t)page_b | PTE_P_RW;  /* no INVLPG on VP 1 */
        mb();
        hypercall(PARK_CODE | HV_HYPERCALL_FAST_BIT, 0, 0);
        stale_after_park += vp1_do(CMD_READ) == MARK_A;
        uint64_t result = flush_space(0, 1ull << 1);
        flushed += hv_result_status(result) == HV_STATUS_SUCCESS &&
                   vp1_do(CMD_READ) == MARK_B;
    }
    report(warm_ok == PROOF_ROUNDS, "proof: VP 1 read the first page through TEST_VA (%d/%d)",
           warm_ok, PROOF_ROUNDS);
    report(flushed == PROOF_ROUNDS,
           "proof: after the flush VP 1 always read the new page (%d/%d)", flushed,
           PROOF_ROUNDS);
    report_info("proof: after a park without flush VP 1 still read the old page in %d of %d "
                "rounds", stale_after_park, PROOF_ROUNDS);
}

int main(void)
{
    struct hv_features f = hv_read_features();
    report(f.hints & HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED, "CPUID: remote TLB flush recommended");
    report(f.hints & HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED, "CPUID: ExProcessorMasks recommended");
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);
    hv_enable_hypercall_page(hypercall_page);
    map_test_va();
    report(read_test_va() == MARK_A, "TEST_VA maps the first page on the BSP");

    ncpus = smp_init(ap_main);
    uint64_t start = rdtsc();
    while (atomic_read(&aps_ready) < ncpus - 1 && rdtsc() - start < WAIT_CYCLES)
        pause();
    report(ncpus >= 2 && atomic_read(&aps_ready) == ncpus - 1, "%d CPUs online, APs spinning",
           ncpus);
    uint64_t aps = ((ncpus >= 64) ? ~0ull : (1ull << ncpus) - 1) & ~1ull;
    uint64_t odd = aps & 0xAAAAAAAAAAAAAAAAull;

    if (cmdline_has("proof")) {
        proof();
    } else {
        /* What Linux sends (hyperv_flush_tlb_multi / hyperv_flush_tlb_others_ex). */
        expect(flush_space(0, aps), HV_STATUS_SUCCESS, 0, "0x0002 to every AP");
        expect(flush_space(HV_FLUSH_ALL_PROCESSORS | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES |
                           HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY, 0), HV_STATUS_SUCCESS, 0,
               "0x0002 to all processors, all address spaces, non-global only");
        expect(flush_list(0, aps, 3), HV_STATUS_SUCCESS, 3, "0x0003 with 3 GVA ranges");
        expect(flush_ex(false, odd, 0, 0, 0), HV_STATUS_SUCCESS, 0,
               "0x0013 to a sparse set (the odd VPs)");
        expect(flush_ex(false, aps | 1, 5, 0, 0), HV_STATUS_SUCCESS, 5,
               "0x0014 to every VP (the caller too) with 5 GVAs");
        expect(flush_ex(true, 0, 0, 0, HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES), HV_STATUS_SUCCESS,
               0, "0x0013 to HV_GENERIC_SET_ALL");

        /* Refused. */
        expect(flush_list(HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY, aps, 1),
               HV_STATUS_INVALID_PARAMETER, 0, "0x0003 with NON_GLOBAL_MAPPINGS_ONLY");
        expect(flush_space(1ull << 4, aps), HV_STATUS_INVALID_PARAMETER, 0,
               "0x0002 with a reserved flag");
        expect(flush_space(0, 1ull << ncpus), HV_STATUS_INVALID_PARAMETER, 0,
               "0x0002 naming a VP that does not exist");
        expect(flush_ex(false, odd, 0, 1, 0), HV_STATUS_INVALID_HYPERCALL_INPUT, 0,
               "0x0013 with more banks in the header than ValidBanksMask names");
    }
    atomic_set(&done, 1);
    report_summary();
}
