/*
 * Synthetic timers (TLFS timers.md) seen from a guest.
 *
 * Direct mode (when CPUID 0x40000003 EDX bit 19 is set):
 *   periodic    1 kHz-ish periodic timer: every interrupt at or after its grid
 *               point (t0 >= tb, the reference time read before the enabling
 *               WRMSR, so stamp_k >= tb + (k+1)*P must hold), none lost
 *   one-shot    exactly one interrupt, not before COUNT; Enable reads 0 after
 *   auto-enable Linux's CONFIG 0x1ED9 pattern: each COUNT write arms it;
 *               COUNT 0 clears Enable
 *   past        a one-shot already due fires at once
 *   disable     writing CONFIG 0 stops a periodic timer
 *   smp         the AP runs its own timer at the same time (per-VP timers)
 * Without EDX bit 19 the DirectMode bit raises #GP.
 * Message mode (when the SynIC is advertised):
 *   periodic    HVMSG_TIMER_EXPIRED on SINT2: type, size, index, ExpirationTime
 *               on the grid, DeliveryTime >= ExpirationTime <= handler stamp
 *   one-shot    ExpirationTime == COUNT
 *   busy slot   with SINT3's slot occupied no message and no interrupt come
 *               (MessagePending is set instead); clearing it and writing EOM
 *               brings the message, with the original ExpirationTime
 *   SINTx = 0   an enabled message-mode timer with SINTx 0 reads disabled
 * Always: reserved CONFIG bits raise #GP.  Every wait is bounded.
 */
#include "hyperv.h"

#ifndef HV_STIMER_DIRECT_MODE_AVAILABLE
#define HV_STIMER_DIRECT_MODE_AVAILABLE (1u << 19)
#endif
#define CONFIG(n) (HV_X64_MSR_STIMER0_CONFIG + 2 * (n))
#define COUNT(n) (HV_X64_MSR_STIMER0_COUNT + 2 * (n))
#define MS 10000ull                          /* reference units per millisecond */
#define DIRECT_VECTOR 0xe0
#define AP_VECTOR 0xe1
#define SINT_A 2
#define SINT_B 3
#define VECTOR_A 0x50
#define VECTOR_B 0x51
#define MAX_STAMPS 64
#define BUSY_TYPE 0x12345u


static uint8_t tsc_page_mem[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static struct hv_message simp[16] __attribute__((aligned(HV_PAGE_SIZE)));
static const struct hv_tsc_page *tsc_page = (const struct hv_tsc_page *)tsc_page_mem;

static volatile int direct_ticks[2];
static volatile uint64_t direct_stamps[2][MAX_STAMPS];

struct received {
    uint32_t type, size, index;
    uint64_t expiration, delivery, stamp;
};
static volatile int msg_count[16];
static struct received msgs[16][MAX_STAMPS];

static uint64_t now(void)
{
    uint64_t t;
    if (!hv_read_tsc_page_tsc(tsc_page, &t, NULL))
        t = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
    return t;
}

/* Interrupts on; poll until *counter >= want or `units` of reference time
 * pass.  Returns the final counter. */
static int wait_count(volatile int *counter, int want, uint64_t units)
{
    uint64_t end = now() + units;
    sti();
    while (*counter < want && now() < end)
        pause();
    cli();
    return *counter;
}

static void idle_for(uint64_t units)
{
    static volatile int never;
    wait_count(&never, 1, units);
}

static void direct_handler(struct ex_regs *regs)
{
    uint64_t t = now();
    int cpu = smp_id() ? 1 : 0;
    (void)regs;
    int k = direct_ticks[cpu];
    if (k < MAX_STAMPS)
        direct_stamps[cpu][k] = t;
    direct_ticks[cpu] = k + 1;
    apic_eoi();
}

static void take_message(int sint)
{
    uint64_t t = now();
    struct hv_message *m = &simp[sint];
    int k = msg_count[sint];
    if (k < MAX_STAMPS) {
        struct received *r = &msgs[sint][k];
        r->type = m->type;
        r->size = m->payload_size;
        r->index = (uint32_t)m->payload[0];
        r->expiration = m->payload[1];
        r->delivery = m->payload[2];
        r->stamp = t;
    }
    msg_count[sint] = k + 1;
    m->type = 0;
    mb();
    if (m->flags & 1)
        wrmsr(HV_X64_MSR_EOM, 0);
}

static void sint_a_handler(struct ex_regs *regs) { (void)regs; take_message(SINT_A); apic_eoi(); }
static void sint_b_handler(struct ex_regs *regs) { (void)regs; take_message(SINT_B); apic_eoi(); }

static bool direct_pending(void)
{
    return apic_read(APIC_IRR + 0x10 * (DIRECT_VECTOR / 32)) & (1u << (DIRECT_VECTOR % 32));
}

/* A tick raised just before the previous test's disabling write can still wait
 * in the IRR (interrupts were off): take it before counting from zero. */
static void reset_direct(void)
{
    uint64_t give_up = now() + 2000 * MS;
    sti();
    while (direct_pending() && now() < give_up)
        pause();
    cli();
    direct_ticks[0] = 0;
}

/* ---------------------------------------------------------------- direct */

static void test_direct_periodic(void)
{
    const uint64_t period = 2 * MS;
    const int want = 20;
    reset_direct();
    wrmsr(COUNT(0), period);
    uint64_t tb = now();
    wrmsr(CONFIG(0), STIMER_ENABLE | STIMER_PERIODIC | STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR));
    int got = wait_count(&direct_ticks[0], want, want * period + 2000 * MS);
    wrmsr(CONFIG(0), 0);
    uint64_t t_end = now();
    int early = 0;
    for (int k = 0; k < got && k < MAX_STAMPS; k++)
        early += direct_stamps[0][k] < tb + (k + 1) * period;
    report(got >= want, "direct periodic: %d of %d interrupts", got, want);
    report(early == 0, "direct periodic: no interrupt before its grid point (%d early)", early);
    report((uint64_t)got <= (t_end - tb) / period + 1,
           "direct periodic: no more interrupts than periods (%d in %llu units)", got,
           (unsigned long long)(t_end - tb));
    report_info("direct periodic: first interrupt %llu units after tb, last %llu",
                (unsigned long long)(direct_stamps[0][0] - tb),
                (unsigned long long)(direct_stamps[0][want - 1] - tb));
}

static void test_direct_one_shot(void)
{
    reset_direct();
    uint64_t due = now() + 3 * MS;
    wrmsr(COUNT(1), due);
    wrmsr(CONFIG(1), STIMER_ENABLE | STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR));
    wait_count(&direct_ticks[0], 1, 2000 * MS);
    uint64_t config = rdmsr(CONFIG(1));
    idle_for(10 * MS);
    report(direct_ticks[0] == 1, "direct one-shot: exactly one interrupt (%d)", direct_ticks[0]);
    report(direct_ticks[0] >= 1 && direct_stamps[0][0] >= due,
           "direct one-shot: not before COUNT (%lld units after)",
           (long long)(direct_stamps[0][0] - due));
    report(!(config & STIMER_ENABLE) && (config & STIMER_DIRECT),
           "direct one-shot: Enable clear after expiry (CONFIG %#llx)",
           (unsigned long long)config);
}

static void test_direct_auto_enable(void)
{
    reset_direct();
    /* Linux hv_stimer_init(): enable | auto_enable | vector 0xED | direct = 0x1ED9 */
    uint64_t linux_config = STIMER_ENABLE | STIMER_AUTO_ENABLE | STIMER_DIRECT |
                            STIMER_VECTOR(0xED);
    wrmsr(CONFIG(2), linux_config);
    report(rdmsr(CONFIG(2)) == 0x1ED9, "auto-enable: Linux's CONFIG reads back 0x1ed9");
    wrmsr(CONFIG(2), STIMER_AUTO_ENABLE | STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR));
    uint64_t due = 0;
    for (int i = 0; i < 3; i++) {
        due = now() + 2 * MS;
        wrmsr(COUNT(2), due);                 /* sets Enable */
        if (i == 0) {
            /* A one-shot clears Enable when it fires; on a loaded host it may already have
             * fired (2 ms) by the time this RDMSR runs, which also shows it was enabled: its
             * interrupt is then pending (interrupts are off here). */
            uint64_t after = rdmsr(CONFIG(2));
            report((after & STIMER_ENABLE) || direct_ticks[0] >= 1 || direct_pending(),
                   "auto-enable: COUNT write set Enable");
        }
        wait_count(&direct_ticks[0], i + 1, 2000 * MS);
    }
    report(direct_ticks[0] == 3, "auto-enable: three COUNT writes, three interrupts (%d)",
           direct_ticks[0]);
    report(direct_stamps[0][2] >= due, "auto-enable: the last one not early");
    /* Far ahead: a vCPU preempted between the two writes must not see it fire. */
    wrmsr(COUNT(2), now() + 1000 * MS);
    wrmsr(COUNT(2), 0);
    report(!(rdmsr(CONFIG(2)) & STIMER_ENABLE), "auto-enable: COUNT 0 clears Enable");
    idle_for(10 * MS);
    report(direct_ticks[0] == 3, "auto-enable: nothing fires after COUNT 0 (%d)",
           direct_ticks[0]);
}

static void test_direct_past(void)
{
    reset_direct();
    uint64_t t = now();
    wrmsr(COUNT(3), t > 5 * MS ? t - 5 * MS : 1);
    uint64_t written = now();
    wrmsr(CONFIG(3), STIMER_ENABLE | STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR));
    wait_count(&direct_ticks[0], 1, 2000 * MS);
    report(direct_ticks[0] == 1, "past one-shot: fires at once");
    report_info("past one-shot: %llu us after the enabling write",
                (unsigned long long)((direct_stamps[0][0] - written) / 10));
}

static void test_direct_disable(void)
{
    reset_direct();
    wrmsr(COUNT(0), 1 * MS);
    wrmsr(CONFIG(0), STIMER_ENABLE | STIMER_PERIODIC | STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR));
    wait_count(&direct_ticks[0], 3, 2000 * MS);
    wrmsr(CONFIG(0), 0);
    idle_for(2 * MS);                          /* one raised before the write may be pending */
    int at_stop = direct_ticks[0];
    idle_for(15 * MS);
    report(at_stop >= 3 && direct_ticks[0] == at_stop,
           "disable: CONFIG 0 stops a periodic timer (%d then %d)", at_stop, direct_ticks[0]);
}

static volatile int ap_done;
static volatile int ap_result;

static void ap_main(int cpu)
{
    (void)cpu;
    const uint64_t period = 1 * MS;
    uint64_t tb = now();
    wrmsr(COUNT(0), period);
    wrmsr(CONFIG(0), STIMER_ENABLE | STIMER_PERIODIC | STIMER_DIRECT | STIMER_VECTOR(AP_VECTOR));
    int got = wait_count(&direct_ticks[1], 30, 2000 * MS);
    wrmsr(CONFIG(0), 0);
    int early = 0;
    for (int k = 0; k < got && k < MAX_STAMPS; k++)
        early += direct_stamps[1][k] < tb + (k + 1) * period;
    ap_result = (got >= 30 ? 1 : 0) | (early == 0 ? 2 : 0);
    atomic_set(&ap_done, 1);
}

static void test_direct_smp(void)
{
    if (cpu_count() < 2) {
        report_skip("smp: one vCPU");
        return;
    }
    reset_direct();
    set_irq_handler(AP_VECTOR, direct_handler);
    wrmsr(COUNT(0), 3 * MS);
    uint64_t tb = now();
    wrmsr(CONFIG(0), STIMER_ENABLE | STIMER_PERIODIC | STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR));
    int online = smp_init(ap_main);
    uint64_t end = now() + 3000 * MS;
    sti();
    while (!atomic_read(&ap_done) && now() < end)
        pause();
    cli();
    wrmsr(CONFIG(0), 0);
    int early = 0, bsp = direct_ticks[0];
    for (int k = 0; k < bsp && k < MAX_STAMPS; k++)
        early += direct_stamps[0][k] < tb + (k + 1) * 3 * MS;
    report(online >= 2 && ap_done, "smp: the AP finished");
    report(ap_result == 3, "smp: the AP's own 1 ms timer: 30 interrupts, none early (%d)",
           ap_result);
    report(bsp >= 1 && early == 0, "smp: the BSP's 3 ms timer ran meanwhile (%d, %d early)",
           bsp, early);
}

/* --------------------------------------------------------------- message */

static void synic_on(void)
{
    wrmsr(HV_X64_MSR_SIMP, (uintptr_t)simp | 1);
    wrmsr(HV_X64_MSR_SINT0 + SINT_A, VECTOR_A);
    wrmsr(HV_X64_MSR_SINT0 + SINT_B, VECTOR_B);
    wrmsr(HV_X64_MSR_SCONTROL, 1);
}

static void test_message_periodic(void)
{
    const uint64_t period = 2 * MS;
    const int want = 10;
    wrmsr(COUNT(0), period);
    uint64_t tb = now();
    wrmsr(CONFIG(0), STIMER_ENABLE | STIMER_PERIODIC | STIMER_SINTX(SINT_A));
    uint64_t ta = now();
    int got = wait_count(&msg_count[SINT_A], want, want * period + 2000 * MS);
    wrmsr(CONFIG(0), 0);
    idle_for(5 * MS);
    int bad_header = 0, off_grid = 0, early = 0, bad_delivery = 0;
    uint64_t first = msgs[SINT_A][0].expiration;
    for (int k = 0; k < got && k < MAX_STAMPS; k++) {
        struct received *r = &msgs[SINT_A][k];
        bad_header += r->type != HVMSG_TIMER_EXPIRED || r->size != 24 || r->index != 0;
        off_grid += (r->expiration - first) % period != 0 ||
                    (k && r->expiration <= msgs[SINT_A][k - 1].expiration);
        early += r->stamp < r->expiration;
        bad_delivery += r->delivery < r->expiration || r->delivery > r->stamp;
    }
    report(got >= want, "message periodic: %d of %d messages", got, want);
    report(bad_header == 0, "message periodic: type 0x80000010, size 24, timer 0 (%d bad)",
           bad_header);
    report(first >= tb + period && first <= ta + period,
           "message periodic: first ExpirationTime one period after the enabling write");
    report(off_grid == 0, "message periodic: ExpirationTimes on the grid (%d off)", off_grid);
    report(early == 0 && bad_delivery == 0,
           "message periodic: ExpirationTime <= DeliveryTime <= handler stamp (%d, %d)",
           early, bad_delivery);
}

static void test_message_one_shot(void)
{
    int before = msg_count[SINT_A];
    uint64_t due = now() + 3 * MS;
    wrmsr(CONFIG(1), STIMER_AUTO_ENABLE | STIMER_SINTX(SINT_A));
    wrmsr(COUNT(1), due);
    wait_count(&msg_count[SINT_A], before + 1, 2000 * MS);
    idle_for(5 * MS);
    struct received *r = &msgs[SINT_A][before];
    report(msg_count[SINT_A] == before + 1, "message one-shot: one message");
    report(r->index == 1 && r->expiration == due && r->delivery >= due && r->stamp >= due,
           "message one-shot: timer 1, ExpirationTime == COUNT, not early");
}

static void test_message_busy_slot(void)
{
    struct hv_message *slot = &simp[SINT_B];
    slot->type = BUSY_TYPE;                   /* someone else's message is in the slot */
    slot->flags = 0;
    mb();
    uint64_t due = now() + 2 * MS;
    wrmsr(COUNT(2), due);
    wrmsr(CONFIG(2), STIMER_ENABLE | STIMER_SINTX(SINT_B));
    /* The host's timer thread sets MessagePending when the timer is due; wait for it
     * (bounded) rather than for a fixed time a loaded host may overrun. */
    uint64_t give_up = now() + 2000 * MS;
    while (!(slot->flags & 1) && now() < give_up)
        idle_for(1 * MS);
    idle_for(5 * MS);
    report(msg_count[SINT_B] == 0 && slot->type == BUSY_TYPE,
           "busy slot: no message and no interrupt while the slot is occupied");
    report(slot->flags & 1, "busy slot: MessagePending set in the occupying message");
    uint64_t released = now();
    slot->type = 0;
    mb();
    wrmsr(HV_X64_MSR_EOM, 0);
    wait_count(&msg_count[SINT_B], 1, 2000 * MS);
    struct received *r = &msgs[SINT_B][0];
    report(msg_count[SINT_B] == 1 && r->type == HVMSG_TIMER_EXPIRED && r->index == 2,
           "busy slot: the timer message arrives after EOM");
    report(r->expiration == due && r->delivery >= released,
           "busy slot: original ExpirationTime, DeliveryTime after the release (%lld units)",
           (long long)(r->delivery - released));
}

static void test_sintx_zero(void)
{
    wrmsr(CONFIG(3), STIMER_ENABLE | STIMER_PERIODIC);   /* message mode, SINTx = 0 */
    report(rdmsr(CONFIG(3)) == STIMER_PERIODIC, "SINTx 0: the timer is marked disabled");
    wrmsr(CONFIG(3), 0);
}

/* ------------------------------------------------------------------ main */

int main(void)
{
    struct hv_features hv = hv_read_features();
    bool direct = hv.features & HV_STIMER_DIRECT_MODE_AVAILABLE;
    bool synic = hv.priv_low & HV_MSR_SYNIC_AVAILABLE;
    report(hv.priv_low & HV_MSR_SYNTIMER_AVAILABLE, "AccessSyntheticTimerRegs advertised");
    report_info("direct mode %s, SynIC %s", direct ? "advertised" : "not advertised",
                synic ? "advertised" : "not advertised");

    hv_enable_tsc_page(tsc_page_mem);
    apic_enable();
    set_irq_handler(DIRECT_VECTOR, direct_handler);
    set_irq_handler(VECTOR_A, sint_a_handler);
    set_irq_handler(VECTOR_B, sint_b_handler);

    int faults = 0;
    faults += wrmsr_safe(CONFIG(0), STIMER_SINTX(SINT_A) | (1ull << 13)) == GP_VECTOR;
    faults += wrmsr_safe(CONFIG(0), STIMER_SINTX(SINT_A) | (1ull << 20)) == GP_VECTOR;
    faults += wrmsr_safe(CONFIG(0), STIMER_SINTX(SINT_A) | (1ull << 63)) == GP_VECTOR;
    report(faults == 3 && rdmsr(CONFIG(0)) == 0, "reserved CONFIG bits raise #GP");

    if (direct && !cmdline_has("no-direct")) {
        test_direct_periodic();
        test_direct_one_shot();
        test_direct_auto_enable();
        test_direct_past();
        test_direct_disable();
    } else if (!direct) {
        report(wrmsr_safe(CONFIG(0), STIMER_DIRECT | STIMER_VECTOR(DIRECT_VECTOR)) == GP_VECTOR,
               "DirectMode without CPUID EDX bit 19 raises #GP");
    }
    if (synic && !cmdline_has("no-message")) {
        synic_on();
        test_message_periodic();
        test_message_one_shot();
        test_message_busy_slot();
        test_sintx_zero();
    }
    if (direct && !cmdline_has("no-direct"))
        test_direct_smp();
    report_summary();
}
