/*
 * Guest side of bench/stimer_accuracy.py: how late synthetic timer expiries
 * reach the guest, and how long the host -> guest interrupt/message path
 * takes.  Built with tests/guests on the include path (hyperv.h).
 *
 * Command line (multiboot): MODE period=P ticks=N vector=V sint=S, MODE one of
 *   periodic       STIMER0 periodic, direct mode, period P (100 ns units).
 *                  The handler stamps the TSC-page clock; the expected grid
 *                  is t0 + k*P where t0, the reference time of the enabling
 *                  CONFIG write, lies in [tb, ta] (read around the WRMSR).
 *   oneshot        Linux's way (hyperv_timer.c, direct mode): a one-shot
 *                  with AutoEnable, re-armed from the handler with the next
 *                  grid point; the expected time of each expiry is exact.
 *   message        STIMER0 periodic in message mode (SINT S): the handler
 *                  reads ExpirationTime/DeliveryTime from the message.
 *   ping           No timer: every interrupt on vector V (raised by the host
 *                  through signal_interrupt, or a SynIC message on SINT S)
 *                  is answered at once with an OUT to RESULT_PORT; the host
 *                  times the round trip.
 * Results go out through RESULT_PORT (outl) after the measurement:
 *   RESULT_MAGIC, mode, n, P, tb lo/hi, ta lo/hi, then per expiry
 *   (stamp - tb) [periodic/oneshot: and expected - tb] [message: expiration
 *   - tb, delivery - tb], all in 100 ns units (u32).
 */
#include "hyperv.h"

#define RESULT_PORT 0x5ec
#define RESULT_MAGIC 0x5717e700u
#define MAX_TICKS 20000

#define HV_SYNIC_CONTROL_ENABLE 1ull
#define HV_SYNIC_SIMP_ENABLE 1ull

enum { MODE_PERIODIC = 1, MODE_ONESHOT = 2, MODE_MESSAGE = 3, MODE_PING = 4 };


static uint8_t tsc_page_mem[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static struct hv_message simp[16] __attribute__((aligned(HV_PAGE_SIZE)));
static const struct hv_tsc_page *tsc_page = (const struct hv_tsc_page *)tsc_page_mem;

static volatile int ticks;
static int wanted;
static uint64_t period, next_expected;
static int sint;
static uint32_t stamps[MAX_TICKS], expected[MAX_TICKS], delivered[MAX_TICKS];
static uint64_t tb;

static inline uint64_t now(void)
{
    uint64_t t;
    if (!hv_read_tsc_page_tsc(tsc_page, &t, NULL))
        t = rdmsr(HV_X64_MSR_TIME_REF_COUNT);
    return t;
}

static void direct_handler(struct ex_regs *regs)
{
    uint64_t t = now();
    (void)regs;
    int k = ticks;
    if (k < MAX_TICKS) {
        stamps[k] = (uint32_t)(t - tb);
        expected[k] = (uint32_t)(next_expected - tb);
    }
    if (next_expected) {     /* one-shot chain: arm the next grid point after now */
        do
            next_expected += period;
        while (next_expected <= t);
        if (k + 1 < wanted)
            wrmsr(HV_X64_MSR_STIMER0_COUNT, next_expected);
    }
    ticks = k + 1;
    apic_eoi();
}

static void message_handler(struct ex_regs *regs)
{
    uint64_t t = now();
    struct hv_message *m = &simp[sint];
    (void)regs;
    int k = ticks;
    if (m->type == HVMSG_TIMER_EXPIRED && k < MAX_TICKS) {
        stamps[k] = (uint32_t)(t - tb);
        expected[k] = (uint32_t)(m->payload[1] - tb);
        delivered[k] = (uint32_t)(m->payload[2] - tb);
        ticks = k + 1;
    } else if (m->type != HVMSG_NONE) {
        ticks = k + 1;       /* ping mode: any message counts */
    }
    m->type = HVMSG_NONE;
    mb();
    if (m->flags & 1)
        wrmsr(HV_X64_MSR_EOM, 0);
    apic_eoi();
}

static void ping_handler(struct ex_regs *regs)
{
    (void)regs;
    outl(RESULT_PORT, 0x9000 + (ticks & 0xfff));
    ticks++;
    apic_eoi();
}

static void ping_message_handler(struct ex_regs *regs)
{
    struct hv_message *m = &simp[sint];
    (void)regs;
    outl(RESULT_PORT, 0x9000 + (ticks & 0xfff));
    ticks++;
    m->type = HVMSG_NONE;
    mb();
    if (m->flags & 1)
        wrmsr(HV_X64_MSR_EOM, 0);
    apic_eoi();
}

static void synic_on(int vector)
{
    wrmsr(HV_X64_MSR_SIMP, (uintptr_t)simp | HV_SYNIC_SIMP_ENABLE);
    wrmsr(HV_X64_MSR_SINT0 + sint, (uint64_t)vector);   /* unmasked, no AutoEOI */
    wrmsr(HV_X64_MSR_SCONTROL, HV_SYNIC_CONTROL_ENABLE);
}

static void send_results(int mode, int n, uint64_t ta)
{
    outl(RESULT_PORT, RESULT_MAGIC);
    outl(RESULT_PORT, mode);
    outl(RESULT_PORT, n);
    outl(RESULT_PORT, (uint32_t)period);
    outl(RESULT_PORT, (uint32_t)tb);
    outl(RESULT_PORT, (uint32_t)(tb >> 32));
    outl(RESULT_PORT, (uint32_t)ta);
    outl(RESULT_PORT, (uint32_t)(ta >> 32));
    for (int k = 0; k < n; k++) {
        outl(RESULT_PORT, stamps[k]);
        if (mode != MODE_PERIODIC)
            outl(RESULT_PORT, expected[k]);
        if (mode == MODE_MESSAGE)
            outl(RESULT_PORT, delivered[k]);
    }
}

int main(void)
{
    int mode = cmdline_has("periodic") ? MODE_PERIODIC : cmdline_has("oneshot") ? MODE_ONESHOT
             : cmdline_has("message") ? MODE_MESSAGE : cmdline_has("ping") ? MODE_PING : 0;
    int vector = (int)cmdline_int("vector", 0xed);
    period = (uint64_t)cmdline_int("period", 10000);
    wanted = (int)cmdline_int("ticks", 2000);
    sint = (int)cmdline_int("sint", 2);
    bool via_synic = cmdline_has("synic");
    if (!mode || wanted > MAX_TICKS) {
        printf("bad command line: %s\n", cmdline());
        exit(2);
    }
    hv_enable_tsc_page(tsc_page_mem);
    apic_enable();
    if (mode == MODE_MESSAGE || (mode == MODE_PING && via_synic)) {
        synic_on(vector);
        set_irq_handler(vector, mode == MODE_PING ? ping_message_handler : message_handler);
    } else {
        set_irq_handler(vector, mode == MODE_PING ? ping_handler : direct_handler);
    }
    if (mode == MODE_PING) {
        outl(RESULT_PORT, RESULT_MAGIC);      /* ready */
        while (ticks < wanted)
            safe_halt();
        cli();
        printf("ping: %d interrupts answered\n", ticks);
        exit(0);
    }

    uint64_t ta;
    cli();
    if (mode == MODE_ONESHOT) {
        wrmsr(HV_X64_MSR_STIMER0_CONFIG, STIMER_DIRECT | STIMER_VECTOR(vector) |
              STIMER_AUTO_ENABLE);
        tb = now();
        next_expected = tb + period;
        wrmsr(HV_X64_MSR_STIMER0_COUNT, next_expected);   /* auto-enable */
        ta = now();
    } else {
        uint64_t config = STIMER_ENABLE | STIMER_PERIODIC |
            (mode == MODE_MESSAGE ? STIMER_SINTX(sint) : STIMER_DIRECT | STIMER_VECTOR(vector));
        wrmsr(HV_X64_MSR_STIMER0_COUNT, period);
        tb = now();
        wrmsr(HV_X64_MSR_STIMER0_CONFIG, config);         /* the first period starts here */
        ta = now();
    }
    while (ticks < wanted)
        safe_halt();
    cli();
    wrmsr(HV_X64_MSR_STIMER0_COUNT, 0);                   /* stop */
    int n = ticks < MAX_TICKS ? ticks : MAX_TICKS;
    printf("stimer %s: %d expiries, period %llu units, CONFIG write took %llu units\n",
           mode == MODE_PERIODIC ? "periodic" : mode == MODE_ONESHOT ? "oneshot" : "message",
           n, (unsigned long long)period, (unsigned long long)(ta - tb));
    send_results(mode, n, ta);
    exit(0);
}
