/*
 * A rep hypercall that the VMM continues (TLFS "Hypercall Continuation",
 * RIP back at the hypercall page's start).  The test registers call REP_CODE on the host:
 * 8-byte input and output elements, out[i] = (in[i] ^ REP_XOR) + i, at most a
 * few elements per entry, so the VMM must re-enter the stub with the rep
 * start index advanced in RCX until the list is done.  The guest sees a single
 * call: the result value says SUCCESS with every rep completed, and every
 * output element is right.  Then the same call from a non-zero rep start, and
 * the malformed shapes (rep count 0, start >= count, a list crossing a page,
 * a misaligned GPA), none of which may reach the handler.
 */
#include "hyperv.h"

#define REP_CODE 0x7ff0
#define REP_COUNT 37
#define REP_XOR 0x5a5a5a5a5a5a5a5aull
#define SENTINEL 0xdeadbeefdeadbeefull

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t input[2][HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t output[HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));

static uint64_t rep_control(unsigned count, unsigned start)
{
    return REP_CODE | (uint64_t)count << HV_HYPERCALL_REP_COMP_OFFSET |
           (uint64_t)start << HV_HYPERCALL_REP_START_OFFSET;
}

/* Output elements first..last-1 are right, the others still hold SENTINEL. */
static int wrong_elements(unsigned first, unsigned last)
{
    int wrong = 0;
    for (unsigned i = 0; i < REP_COUNT + 4; i++) {
        uint64_t want = (i >= first && i < last) ? (input[0][i] ^ REP_XOR) + i : SENTINEL;
        wrong += output[i] != want;
    }
    return wrong;
}

static void reset_output(void)
{
    for (unsigned i = 0; i < ARRAY_SIZE(output); i++)
        output[i] = SENTINEL;
}

int main(void)
{
    for (unsigned i = 0; i < ARRAY_SIZE(input[0]); i++)
        input[0][i] = 0x1000 + i * 0x1111111111ull;
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);
    hv_enable_hypercall_page(hypercall_page);

    /* The whole list in one call. */
    reset_output();
    uint64_t rcx = 0;
    uint64_t result = hypercall_rcx(rep_control(REP_COUNT, 0), (uintptr_t)input[0],
                                    (uintptr_t)output, &rcx);
    report(hv_result_status(result) == HV_STATUS_SUCCESS && hv_result_reps(result) == REP_COUNT,
           "rep call: status %u, %u of %u reps completed", hv_result_status(result),
           hv_result_reps(result), REP_COUNT);
    report(wrong_elements(0, REP_COUNT) == 0, "rep call: every output element right");
    unsigned rcx_start = (rcx >> HV_HYPERCALL_REP_START_OFFSET) & 0xFFF;
    report(rcx_start > 0 && rcx_start < REP_COUNT &&
           (rcx & 0xFFFF) == REP_CODE && ((rcx >> 32) & 0xFFF) == REP_COUNT,
           "rep call: continued (RCX rep start advanced to %u)", rcx_start);
    report_info("rep call: RCX after the call %#llx", (unsigned long long)rcx);

    /* From a non-zero start (what Linux's hv_do_rep_hypercall() re-issues). */
    reset_output();
    result = hypercall(rep_control(REP_COUNT, 30), (uintptr_t)input[0], (uintptr_t)output);
    report(hv_result_status(result) == HV_STATUS_SUCCESS && hv_result_reps(result) == REP_COUNT,
           "rep call from start 30: status %u, %u reps completed", hv_result_status(result),
           hv_result_reps(result));
    report(wrong_elements(30, REP_COUNT) == 0,
           "rep call from start 30: elements 30..36 written, the others untouched");

    /* Malformed: nothing may be written, the handler is never entered. */
    reset_output();
    result = hypercall(rep_control(0, 0), (uintptr_t)input[0], (uintptr_t)output);
    report(result == HV_STATUS_INVALID_HYPERCALL_INPUT, "rep count 0 -> %#llx",
           (unsigned long long)result);
    result = hypercall(rep_control(REP_COUNT, REP_COUNT), (uintptr_t)input[0], (uintptr_t)output);
    report(result == HV_STATUS_INVALID_HYPERCALL_INPUT, "rep start = rep count -> %#llx",
           (unsigned long long)result);
    uintptr_t straddle = (uintptr_t)input[0] + HV_PAGE_SIZE - 8 * 10;
    result = hypercall(rep_control(REP_COUNT, 0), straddle, (uintptr_t)output);
    report(result == HV_STATUS_INVALID_ALIGNMENT, "input list crossing a page -> %#llx",
           (unsigned long long)result);
    result = hypercall(rep_control(REP_COUNT, 0), (uintptr_t)input[0] + 4, (uintptr_t)output);
    report(result == HV_STATUS_INVALID_ALIGNMENT, "misaligned input GPA -> %#llx",
           (unsigned long long)result);
    report(wrong_elements(0, 0) == 0, "rejected calls wrote no output");
    report_summary();
}
