/* Brings up every vCPU.  Each AP checks that its APIC ID (LAPIC register and
 * CPUID) equals its index and that an expected fault is caught on it; the BSP
 * checks that all the vCPUs fw_cfg announces came online, then sends every
 * CPU (itself included) a fixed IPI.  With "x2apic" on the command line the
 * CPUs switch to x2APIC mode first. */
#include "guest.h"

#define IPI_VECTOR 0x40

static volatile int aps_done, ipis_seen;
static volatile uint8_t ipi_seen[MAX_CPUS];

static void ipi_handler(struct ex_regs *regs)
{
    (void)regs;
    ipi_seen[smp_id()] = 1;
    atomic_inc(&ipis_seen);
    apic_eoi();
}

static bool wait_for(volatile int *counter, int value)
{
    uint64_t start = rdtsc();
    while (atomic_read(counter) < value && rdtsc() - start < 30000000000ULL)
        pause();
    return atomic_read(counter) >= value;
}

static void ap_main(int cpu)
{
    uint32_t id = apic_id(), cpuid_id = cpuid_apic_id();
    report(id == (uint32_t)cpu && cpuid_id == id,
           "cpu %d: APIC ID %u (CPUID %u) matches its index%s", cpu, id, cpuid_id,
           x2apic_enabled() ? " (x2APIC)" : "");
    report(asm_try("mov $0x8000000000000000, %%rax; mov (%%rax), %%rax") == GP_VECTOR,
           "cpu %d: expected #GP caught", cpu);
    atomic_inc(&aps_done);
    while (!ipi_seen[cpu])
        safe_halt();                /* sti; hlt: the IPI cannot slip in between */
    cli();
}

int main(void)
{
    int expected = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
    report(apic_id() == 0 && cpuid_apic_id() == 0 && smp_id() == 0,
           "BSP is cpu 0 with APIC ID 0");
    if (cmdline_has("x2apic")) {
        if (!enable_x2apic())
            report_skip("x2APIC not supported");
        else
            report(x2apic_enabled() && apic_id() == 0, "BSP in x2APIC mode");
    }
    set_irq_handler(IPI_VECTOR, ipi_handler);
    int online = smp_init(ap_main);
    wait_for(&aps_done, online - 1);
    report(online == expected, "%d of %d vCPUs online", online, expected);
    report(atomic_read(&aps_done) == expected - 1, "every AP ran ap_main");

    apic_enable();
    for (int cpu = 1; cpu < online; cpu++)
        apic_send_ipi(APIC_DM_FIXED | APIC_LEVEL_ASSERT | IPI_VECTOR, cpu);
    apic_send_ipi(APIC_DEST_SELF | APIC_DM_FIXED | APIC_LEVEL_ASSERT | IPI_VECTOR, 0);
    sti();
    wait_for(&ipis_seen, online);
    cli();
    report(ipi_seen[0], "BSP got its self-IPI");
    report(atomic_read(&ipis_seen) == online, "%d of %d CPUs got an IPI",
           atomic_read(&ipis_seen), online);
    report_summary();
}
