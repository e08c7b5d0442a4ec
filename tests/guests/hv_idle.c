/*
 * The guest idle MSR (TLFS vp-properties.md):
 * reading 0x400000F0 idles the VP until an interrupt arrives "regardless of
 * whether the interrupt is enabled", or returns early, which callers allow.
 * With IF = 0 and nothing pending it must still come back (bounded; the host
 * times marks 1..2).  With IF = 0 and a self-IPI pending it returns (marks
 * 3..4) without delivering the interrupt, which arrives once IF = 1.
 */
#include "hyperv.h"

#define IDLE_READS 20
#define IPI_VECTOR 0x40

static volatile int interrupts;

static void ipi_handler(struct ex_regs *regs)
{
    (void)regs;
    interrupts++;
    apic_eoi();
}

int main(void)
{
    struct hv_features hv = hv_read_features();
    report((hv.priv_low & HV_MSR_GUEST_IDLE_AVAILABLE) &&
           (hv.features & HV_X64_GUEST_IDLE_STATE_AVAILABLE), "guest idle advertised");
    cli();
    int faults = 0, nonzero = 0;
    hv_test_mark(1);
    for (int i = 0; i < IDLE_READS; i++) {
        uint64_t v = ~0ull;
        faults += rdmsr_safe(HV_X64_MSR_GUEST_IDLE, &v) != 0;
        nonzero += v != 0;
    }
    hv_test_mark(2);
    report(faults == 0 && nonzero == 0 && !(read_rflags() & (1u << 9)),
           "%d GUEST_IDLE reads with IF=0 and nothing pending returned 0", IDLE_READS);

    set_irq_handler(IPI_VECTOR, ipi_handler);
    apic_enable();
    apic_send_ipi(APIC_DEST_SELF | APIC_DM_FIXED | APIC_LEVEL_ASSERT | IPI_VECTOR, 0);
    uint32_t irr = apic_read(APIC_IRR + 0x10 * (IPI_VECTOR / 32));
    report(irr & (1u << (IPI_VECTOR % 32)), "self-IPI pending in the IRR while IF=0");
    hv_test_mark(3);
    uint64_t v = ~0ull;
    int vec = rdmsr_safe(HV_X64_MSR_GUEST_IDLE, &v);
    hv_test_mark(4);
    report(vec == 0 && v == 0 && interrupts == 0 && !(read_rflags() & (1u << 9)),
           "GUEST_IDLE with IF=0 and an interrupt pending returned, nothing delivered");
    sti();
    for (int i = 0; i < 2000 && !interrupts; i++)
        pause();
    cli();
    report(interrupts == 1, "the pending interrupt arrives once IF=1 (%d)", interrupts);
    report_summary();
}
