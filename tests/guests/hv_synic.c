/*
 * The SynIC on 2 vCPUs (TLFS inter-partition-communication.md), driven through
 * QEMU's hyperv-testdev (port 0x3000) as kvm-unit-tests' hyperv_synic and
 * hyperv_connections do, and through the host API (tests/guest/
 * test_hyperv_synic.py posts and signals when the guest writes a phase mark
 * to HV_TEST_MARK_PORT):
 *
 *   registers   reset values, SVERSION, EOM reads 0; the SIM/SIEF overlays
 *               hide the RAM below them and uncover it when disabled
 *   sints       each CPU raises all 16 SINTs of the other (4 of them AutoEOI)
 *   host msgs   mark 1: the host posts two messages into one slot; the second
 *               waits (MessagePending) until the guest frees the slot and
 *               writes EOM
 *   host events mark 2: the host sets one flag on CPU 1 twice (one interrupt)
 *   testdev     PostMessage to self / the other CPU / a busy slot, EOM
 *               redelivery, SignalEvent self / other / already set, and the
 *               INVALID_CONNECTION_ID probe kvm-unit-tests uses
 *   host conns  PostMessage to a host handler, SignalEvent / PostMessage to
 *               connections the host registered, and the TLFS error statuses
 *   flood       FLOOD AutoEOI and FLOOD explicit-EOI deliveries on CPU 0 and
 *               FLOOD/4 AutoEOI to CPU 1; then a lower-priority SINT still
 *               gets through and no SINT vector is left in service (ISR)
 */
#include "hyperv.h"

#define FLOOD 2000
#define HVCALL_POST_MESSAGE 0x005c
#define HVCALL_SIGNAL_EVENT 0x005d
#define HV_STATUS_INVALID_PARAMETER 0x05
#define HV_STATUS_INVALID_PORT_ID 0x11
#define HV_STATUS_INVALID_CONNECTION_ID 0x12

#define HV_SYNIC_SINT_MASKED (1ull << 16)
#define HV_SYNIC_SINT_AUTO_EOI (1ull << 17)
#define HV_DEPRECATING_AEOI_RECOMMENDED (1u << 9)
#define HV_POST_MESSAGES (1u << 4)
#define HV_SIGNAL_EVENTS (1u << 5)

#define TESTDEV_PORT 0x3000
enum { SINT_ROUTE_CREATE = 1, SINT_ROUTE_DESTROY, SINT_ROUTE_SET_SINT, MSG_CONN_CREATE,
       MSG_CONN_DESTROY, EVT_CONN_CREATE, EVT_CONN_DESTROY };

/* SINT -> vector; AutoEOI where kvm-unit-tests' hyperv_synic has it.  SINT 15
 * has a low priority class (6) so a stuck higher ISR bit would block it. */
static const uint8_t sint_vector[16] = {
    0xB0, 0xB1, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7,
    0xB8, 0xB9, 0xBA, 0xBB, 0xBC, 0xBD, 0xBE, 0x60,
};
static const bool sint_auto_eoi[16] = { [3] = true, [8] = true, [10] = true, [14] = true };
#define MSG_SINT 8          /* testdev message connections (AutoEOI, as kvm-unit-tests) */
#define EVT_SINT 9
#define HOST_MSG_SINT 2     /* the host's two messages */
#define HOST_EVT_SINT 4
#define HOST_EVT_FLAG 77
#define MSG_CONN_BASE 0x10
#define EVT_CONN_BASE 0x20
#define MSG_TYPE 0x12345678u
/* Connections the host registers (test_hyperv_synic.py). */
#define HOST_HANDLER_CONN 0x500
#define HOST_EVT_CONN 0x600   /* -> CPU 1, SINT 5, flag 600 */
#define HOST_MSG_CONN 0x700   /* -> CPU 1, SINT 6 */

struct hv_post_message_input {
    uint32_t connection_id, reserved, message_type, payload_size;
    uint64_t payload[30];
};

static uint8_t hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t simp_mem[2][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t siefp_mem[2][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static struct hv_post_message_input post_in[2] __attribute__((aligned(HV_PAGE_SIZE)));

static volatile uint32_t hits[2][256];     /* interrupts taken, per CPU and vector */
static bool auto_eoi_vector[256];
static uint64_t tsc_hz;

static struct hv_message *slot(int cpu, int sint)
{
    return (struct hv_message *)simp_mem[cpu] + sint;
}

static volatile uint8_t *flags_of(int cpu, int sint)
{
    return (volatile uint8_t *)siefp_mem[cpu] + 256 * sint;
}

static bool flag_is_set(int cpu, int sint, int flag)
{
    return flags_of(cpu, sint)[flag / 8] & (1u << (flag % 8));
}

static void clear_flag(int cpu, int sint, int flag)
{
    __atomic_fetch_and(&flags_of(cpu, sint)[flag / 8], (uint8_t)~(1u << (flag % 8)),
                       __ATOMIC_SEQ_CST);  /* lock and, as the TLFS recommends */
}

static void sint_handler(struct ex_regs *regs)
{
    atomic_inc(&hits[smp_id()][regs->vector]);
    if (!auto_eoi_vector[regs->vector])
        apic_eoi();
}

static bool wait_hits(int cpu, int vector, uint32_t want)
{
    uint64_t start = rdtsc();
    while (atomic_read(&hits[cpu][vector]) < want)
        if (rdtsc() - start > 2 * tsc_hz)
            return false;
        else
            pause();
    return atomic_read(&hits[cpu][vector]) == want;
}

static void settle(void)  /* long enough for any interrupt in flight to arrive */
{
    delay_tsc(tsc_hz / 200);
}

static void testdev(int ctl, int vp, int sint, int conn)
{
    outl(TESTDEV_PORT, (uint32_t)conn << 24 | ctl << 16 | vp << 8 | sint);
}

static uint16_t post_message(int cpu, uint32_t conn, uint32_t type, uint32_t size, uint64_t p0)
{
    struct hv_post_message_input *in = &post_in[cpu];
    in->connection_id = conn;
    in->reserved = 0;
    in->message_type = type;
    in->payload_size = size;
    in->payload[0] = p0;
    return hv_result_status(hypercall(HVCALL_POST_MESSAGE, (uintptr_t)in, 0));
}

static uint16_t signal_event(uint32_t conn, uint16_t flag)
{
    return hv_result_status(hypercall(HVCALL_SIGNAL_EVENT | HV_HYPERCALL_FAST_BIT,
                                      conn | (uint64_t)flag << 32, 0));
}

/* Free a message slot as the TLFS recommends: MessageType = 0, then EOM if
 * MessagePending was set.  Returns whether it was. */
static bool consume(int cpu, int sint)
{
    struct hv_message *m = slot(cpu, sint);
    m->type = 0;
    mb();
    if (m->flags & 1) {
        wrmsr(HV_X64_MSR_EOM, 0);
        return true;
    }
    return false;
}

/* ---- running something on CPU 1 ------------------------------------------ */
static void (*volatile ap_fn)(void);
static volatile uint32_t ap_seq, ap_done;

static void ap_main(int cpu)
{
    uint32_t seen = 0;
    sti();
    for (;;) {
        while (atomic_read(&ap_seq) == seen)
            pause();
        seen = atomic_read(&ap_seq);
        ap_fn();
        atomic_inc(&ap_done);
    }
}

static void run_on_cpu1(void (*fn)(void))
{
    uint32_t done = atomic_read(&ap_done);
    ap_fn = fn;
    atomic_inc(&ap_seq);
    uint64_t start = rdtsc();
    while (atomic_read(&ap_done) == done && rdtsc() - start < 10 * tsc_hz)
        pause();
}

/* ---- per-CPU setup -------------------------------------------------------- */
static bool reset_ok[2], overlay_ok[2];

static void setup_cpu(void)
{
    int cpu = smp_id();
    bool ok = rdmsr(HV_X64_MSR_SVERSION) == 1 && rdmsr(HV_X64_MSR_EOM) == 0 &&
              rdmsr(HV_X64_MSR_SCONTROL) == 0 && rdmsr(HV_X64_MSR_SIMP) == 0 &&
              rdmsr(HV_X64_MSR_SIEFP) == 0;
    for (int i = 0; i < 16; i++)
        ok &= rdmsr(HV_X64_MSR_SINT0 + i) == HV_SYNIC_SINT_MASKED;
    reset_ok[cpu] = ok;

    /* RAM below the pages, to see the overlays hide and uncover it. */
    memset(simp_mem[cpu], 0xA5, HV_PAGE_SIZE);
    memset(siefp_mem[cpu], 0x5A, HV_PAGE_SIZE);
    wrmsr(HV_X64_MSR_SIMP, (rdmsr(HV_X64_MSR_SIMP) & 0xFFE) | (uintptr_t)simp_mem[cpu] | 1);
    wrmsr(HV_X64_MSR_SIEFP, (rdmsr(HV_X64_MSR_SIEFP) & 0xFFE) | (uintptr_t)siefp_mem[cpu] | 1);
    overlay_ok[cpu] = ((volatile uint64_t *)simp_mem[cpu])[17] == 0 &&
                      ((volatile uint64_t *)siefp_mem[cpu])[300] == 0;
    wrmsr(HV_X64_MSR_SCONTROL, 1);
    for (int i = 0; i < 16; i++) {
        wrmsr(HV_X64_MSR_SINT0 + i,
              sint_vector[i] | (sint_auto_eoi[i] ? HV_SYNIC_SINT_AUTO_EOI : 0));
        testdev(SINT_ROUTE_CREATE, cpu, i, 0);
    }
    testdev(MSG_CONN_CREATE, cpu, MSG_SINT, MSG_CONN_BASE + cpu);
    testdev(EVT_CONN_CREATE, cpu, EVT_SINT, EVT_CONN_BASE + cpu);
    sti();
}

static bool uncovered[2];

static void teardown_cpu(void)
{
    int cpu = smp_id();
    testdev(EVT_CONN_DESTROY, cpu, EVT_SINT, EVT_CONN_BASE + cpu);
    testdev(MSG_CONN_DESTROY, cpu, MSG_SINT, MSG_CONN_BASE + cpu);
    for (int i = 0; i < 16; i++) {
        testdev(SINT_ROUTE_DESTROY, cpu, i, 0);
        wrmsr(HV_X64_MSR_SINT0 + i, 0xFF | HV_SYNIC_SINT_MASKED);
    }
    wrmsr(HV_X64_MSR_SCONTROL, 0);
    wrmsr(HV_X64_MSR_SIMP, 0);
    wrmsr(HV_X64_MSR_SIEFP, 0);
    uncovered[cpu] = ((volatile uint64_t *)simp_mem[cpu])[17] == 0xA5A5A5A5A5A5A5A5ull &&
                     ((volatile uint64_t *)siefp_mem[cpu])[300] == 0x5A5A5A5A5A5A5A5Aull;
}

/* ---- 16 SINTs across 2 CPUs (kvm-unit-tests hyperv_synic) ------------------ */
static volatile int sints_target;

static void raise_all_sints(void)
{
    for (int i = 0; i < 16; i++)
        testdev(SINT_ROUTE_SET_SINT, sints_target, i, 0);
}

static void raise_all_sints_on_cpu0_from_cpu1(void)
{
    sints_target = 0;
    raise_all_sints();
}

static void test_sints(void)
{
    memset((void *)hits, 0, sizeof(hits));
    run_on_cpu1(raise_all_sints_on_cpu0_from_cpu1);
    sints_target = 1;
    raise_all_sints();
    for (int cpu = 0; cpu < 2; cpu++) {
        int once = 0;
        for (int i = 0; i < 16; i++)
            once += wait_hits(cpu, sint_vector[i], 1);
        report(once == 16, "cpu %d: each of the 16 SINTs raised by the other CPU arrived once "
               "(%d did)", cpu, once);
    }
}

/* ---- host messages and events (marks 1, 2) ----------------------------------- */
static void test_host_messages(void)
{
    int vec = sint_vector[HOST_MSG_SINT];
    struct hv_message *m = slot(0, HOST_MSG_SINT);
    hits[0][vec] = 0;
    hv_test_mark(1);  /* the host posts "first", then "second" into SINT 2 */
    bool first = wait_hits(0, vec, 1) && m->type == 0x1001 && m->payload_size == 8 &&
                 m->payload[0] == 0x7473726966ull /* "first" */;
    report(first, "host message 1 delivered with one interrupt (type %#x)", m->type);
    settle();
    report((m->flags & 1) && atomic_read(&hits[0][vec]) == 1 && m->type == 0x1001,
           "host message 2 pending behind it: MessagePending set, no interrupt");
    report(consume(0, HOST_MSG_SINT), "MessagePending seen when freeing the slot; EOM written");
    report(wait_hits(0, vec, 2) && m->type == 0x1002 && !(m->flags & 1) &&
           m->payload[0] == 0x646e6f636573ull /* "second" */,
           "EOM: host message 2 redelivered with one interrupt");
    consume(0, HOST_MSG_SINT);
    settle();
    report(atomic_read(&hits[0][vec]) == 2, "no further message");
}

static void test_host_events(void)
{
    int vec = sint_vector[HOST_EVT_SINT];
    hits[1][vec] = 0;
    hv_test_mark(2);  /* the host sets flag 77 of SINT 4 on CPU 1, twice */
    report(wait_hits(1, vec, 1) && flag_is_set(1, HOST_EVT_SINT, HOST_EVT_FLAG),
           "host event flag set on cpu 1 with one interrupt");
    settle();
    report(atomic_read(&hits[1][vec]) == 1, "the same flag set again: no second interrupt");
    clear_flag(1, HOST_EVT_SINT, HOST_EVT_FLAG);
}

/* ---- testdev connections (kvm-unit-tests hyperv_connections) ----------------- */
static uint64_t msg_counter[2];
static volatile uint16_t cpu1_status;

static bool msg_ok(int dst, uint16_t status)
{
    struct hv_message *m = slot(dst, MSG_SINT);
    wait_hits(dst, sint_vector[MSG_SINT], 1);  /* the other vCPU may not run at once */
    settle();
    return status == 0 && m->type == MSG_TYPE && m->payload_size == 8 && !(m->flags & 1) &&
           m->payload[0] == msg_counter[dst] && atomic_read(&hits[dst][sint_vector[MSG_SINT]]) == 1;
}

static bool msg_busy(int dst, uint16_t status)
{
    struct hv_message *m = slot(dst, MSG_SINT);
    return status == 0 && m->type == MSG_TYPE && (m->flags & 1) &&
           m->payload[0] == msg_counter[dst] - 1 &&
           atomic_read(&hits[dst][sint_vector[MSG_SINT]]) == 0;
}

static uint16_t send_msg(int src, int dst)
{
    hits[dst][sint_vector[MSG_SINT]] = 0;
    return post_message(src, MSG_CONN_BASE + dst, MSG_TYPE, 8, ++msg_counter[dst]);
}

static void cpu1_sends_to_cpu0(void) { cpu1_status = send_msg(1, 0); }
static void cpu1_consumes(void) { consume(1, MSG_SINT); }
static void cpu1_clears_flag(void) { clear_flag(1, EVT_SINT, EVT_CONN_BASE + 1); }

static void test_testdev_connections(void)
{
    int mvec = sint_vector[MSG_SINT], evec = sint_vector[EVT_SINT];
    report(signal_event(0x1234, 0) == HV_STATUS_INVALID_CONNECTION_ID,
           "SignalEvent to an unknown connection: INVALID_CONNECTION_ID (not 2, so "
           "kvm-unit-tests would not skip)");

    uint16_t s = send_msg(0, 0);
    report(msg_ok(0, s), "send message to self (status %u)", s);
    consume(0, MSG_SINT);
    run_on_cpu1(cpu1_sends_to_cpu0);
    report(msg_ok(0, cpu1_status), "cpu 1 sends a message to cpu 0");
    consume(0, MSG_SINT);

    s = send_msg(0, 1);
    report(msg_ok(1, s), "send message to another cpu");
    s = send_msg(0, 1);
    settle();
    report(msg_busy(1, s), "send message to busy slot: status 0, old message, MessagePending");
    hits[1][mvec] = 0;
    run_on_cpu1(cpu1_consumes);
    report(msg_ok(1, 0), "receive pending message after EOM");
    run_on_cpu1(cpu1_consumes);

    hits[0][evec] = 0;
    s = signal_event(EVT_CONN_BASE + 0, 0);
    report(s == 0 && flag_is_set(0, EVT_SINT, EVT_CONN_BASE) && wait_hits(0, evec, 1),
           "signal event on self (flag %#x)", EVT_CONN_BASE);
    clear_flag(0, EVT_SINT, EVT_CONN_BASE);
    hits[1][evec] = 0;
    s = signal_event(EVT_CONN_BASE + 1, 0);
    report(s == 0 && flag_is_set(1, EVT_SINT, EVT_CONN_BASE + 1) && wait_hits(1, evec, 1),
           "signal event on another cpu");
    hits[1][evec] = 0;
    s = signal_event(EVT_CONN_BASE + 1, 0);
    settle();
    report(s == 0 && flag_is_set(1, EVT_SINT, EVT_CONN_BASE + 1) && hits[1][evec] == 0,
           "signal event already set: status 0, no interrupt");
    run_on_cpu1(cpu1_clears_flag);
    report(signal_event(EVT_CONN_BASE + 1, 1) == HV_STATUS_INVALID_PARAMETER,
           "SignalEvent flag number beyond the port's one flag: INVALID_PARAMETER");
}

/* ---- host-registered connections ------------------------------------------- */
static void test_host_connections(void)
{
    report(post_message(0, HOST_HANDLER_CONN, 0x4321, 8, 0x74736f682d6f74ull /* "to-host" */)
           == 0, "PostMessage to a host handler");
    hits[1][sint_vector[5]] = 0;
    report(signal_event(HOST_EVT_CONN, 0) == 0 && wait_hits(1, sint_vector[5], 1) &&
           flag_is_set(1, 5, 600), "SignalEvent on a host event connection: cpu 1 flag 600");
    hits[1][sint_vector[6]] = 0;
    struct hv_message *m = slot(1, 6);
    report(post_message(0, HOST_MSG_CONN, 0x99, 8, 42) == 0 && wait_hits(1, sint_vector[6], 1) &&
           m->type == 0x99 && m->payload[0] == 42 && m->sender == HOST_MSG_CONN,
           "PostMessage on a host message connection: cpu 1 SINT 6");
    report(post_message(0, HOST_MSG_CONN, 0x80000001u, 8, 0) == HV_STATUS_INVALID_PARAMETER,
           "PostMessage with a hypervisor message type: INVALID_PARAMETER");
    report(post_message(0, HOST_MSG_CONN, 0x99, 241, 0) == HV_STATUS_INVALID_PARAMETER,
           "PostMessage with a 241-byte payload: INVALID_PARAMETER");
    report(post_message(0, HOST_EVT_CONN, 0x99, 8, 0) == HV_STATUS_INVALID_PORT_ID,
           "PostMessage on an event connection: INVALID_PORT_ID");
    report(signal_event(HOST_MSG_CONN, 0) == HV_STATUS_INVALID_PORT_ID,
           "SignalEvent on a message connection: INVALID_PORT_ID");
}

/* ---- the flood ------------------------------------------------------------- */
static int flood(int target, int sint, int count)
{
    int vec = sint_vector[sint];
    hits[target][vec] = 0;
    for (int i = 0; i < count; i++) {
        testdev(SINT_ROUTE_SET_SINT, target, sint, 0);
        if (!wait_hits(target, vec, i + 1))
            return i;
    }
    return count;
}

static bool isr_clear(void)
{
    for (int i = 0; i < 16; i++) {
        int v = sint_vector[i];
        if (apic_read(APIC_ISR + 0x10 * (v / 32)) & (1u << (v % 32)))
            return false;
    }
    return true;
}

static volatile bool cpu1_isr_clear;
static void cpu1_checks_isr(void) { cpu1_isr_clear = isr_clear(); }

static void test_flood(void)
{
    uint64_t t0 = rdtsc();
    int n = flood(0, 3, FLOOD);
    report(n == FLOOD, "AutoEOI SINT 3 on cpu 0: %d of %d interrupts", n, FLOOD);
    n = flood(0, 0, FLOOD);
    report(n == FLOOD, "explicit-EOI SINT 0 on cpu 0: %d of %d interrupts", n, FLOOD);
    n = flood(1, 14, FLOOD / 4);
    report(n == FLOOD / 4, "AutoEOI SINT 14 on cpu 1 (from cpu 0): %d of %d interrupts", n,
           FLOOD / 4);
    report_info("flood: %llu ms", (unsigned long long)((rdtsc() - t0) * 1000 / tsc_hz));
    /* A stuck ISR bit of 0xB3/0xBE would hold back this class-6 vector. */
    hits[0][0x60] = hits[1][0x60] = 0;
    testdev(SINT_ROUTE_SET_SINT, 0, 15, 0);
    testdev(SINT_ROUTE_SET_SINT, 1, 15, 0);
    report(wait_hits(0, 0x60, 1) && wait_hits(1, 0x60, 1),
           "a lower-priority SINT still arrives on both CPUs");
    /* The last AutoEOI fix-ups run on the host's timer thread: poll, bounded. */
    uint64_t give_up = rdtsc() + 2 * tsc_hz;
    bool clear;
    for (;;) {
        run_on_cpu1(cpu1_checks_isr);
        clear = isr_clear() && cpu1_isr_clear;
        if (clear || rdtsc() > give_up)
            break;
        delay_tsc(tsc_hz / 1000);
    }
    report(clear, "no SINT vector left in service (ISR) on either CPU");
}

int main(void)
{
    struct hv_features hv = hv_read_features();
    if (!(hv.priv_low & HV_MSR_SYNIC_AVAILABLE)) {
        report(false, "SynIC advertised (privileges %#x)", hv.priv_low);
        report_summary();
    }
    report((hv.priv_high & (HV_POST_MESSAGES | HV_SIGNAL_EVENTS)) ==
           (HV_POST_MESSAGES | HV_SIGNAL_EVENTS), "PostMessages and SignalEvents privileges");
    report(hv.hints & HV_DEPRECATING_AEOI_RECOMMENDED, "DeprecatingAutoEOI recommended");
    tsc_hz = rdmsr(HV_X64_MSR_TSC_FREQUENCY);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);
    hv_enable_hypercall_page(hypercall_page);
    for (int i = 0; i < 16; i++) {
        set_irq_handler(sint_vector[i], sint_handler);
        auto_eoi_vector[sint_vector[i]] = sint_auto_eoi[i];
    }

    int online = smp_init(ap_main);
    if (online != 2) {
        report(false, "2 vCPUs online (%d)", online);
        report_summary();
    }
    setup_cpu();
    run_on_cpu1(setup_cpu);
    report(reset_ok[0] && reset_ok[1], "SynIC registers at their reset values on both CPUs");
    report(overlay_ok[0] && overlay_ok[1], "SIM/SIEF overlays hide the RAM below (read zero)");

    test_sints();
    test_host_messages();
    test_host_events();
    test_testdev_connections();
    test_host_connections();
    test_flood();

    teardown_cpu();
    run_on_cpu1(teardown_cpu);
    report(uncovered[0] && uncovered[1], "disabled SIM/SIEF pages uncover the RAM below");
    report_summary();
}
