/*
 * default_guest.c - what `hvvmm run` boots when no kernel is given: a short
 * report of the virtual machine as the guest sees it, then power off.
 */
#include "guest.h"

static volatile int aps_done;

static void cpu_online_line(int cpu)
{
    uint32_t id = apic_id(), cpuid_id = cpuid_apic_id();
    if (id == cpuid_id)
        printf("cpu %d (APIC ID %u) online\n", cpu, id);
    else
        printf("cpu %d (APIC ID %u, but CPUID says %u) online\n", cpu, id, cpuid_id);
}

static void ap_main(int cpu)
{
    cpu_online_line(cpu);
    atomic_inc(&aps_done);
}

static const char *region_type(uint32_t type)
{
    switch (type) {
    case 1: return "available";
    case 2: return "reserved";
    case 3: return "ACPI reclaimable";
    case 4: return "ACPI NVS";
    case 5: return "bad";
    default: return "unknown";
    }
}

static void print_region(uint64_t base, uint64_t len, uint32_t type, void *arg)
{
    (void)arg;
    printf("  %#018lx-%#018lx %s\n", base, base + len - 1, region_type(type));
}

/* Copy `n` register bytes as text, stopping at NUL, '.' for non-printables. */
static void regs_to_str(char *dst, const uint32_t *regs, int nregs)
{
    const char *src = (const char *)regs;
    int i;
    for (i = 0; i < 4 * nregs && src[i]; i++)
        dst[i] = src[i] >= 0x20 && src[i] < 0x7F ? src[i] : '.';
    dst[i] = 0;
}

static void report_cpus(void)
{
    int n = cpu_count();
    printf("vCPUs: %d\n", n);
    cpu_online_line(0);
    if (n < 2)
        return;
    int online = smp_init(ap_main);
    /* Let the APs finish their line (bounded). */
    uint64_t start = rdtsc();
    while (atomic_read(&aps_done) < online - 1 && rdtsc() - start < 30000000000ULL)
        pause();
    if (online != n)
        printf("only %d of %d vCPUs came online\n", online, n);
}

static void report_memory(void)
{
    if (fw_cfg_present())
        printf("RAM: %lu MiB\n", fw_cfg_read_u64(FW_CFG_RAM_SIZE) >> 20);
    printf("usable memory: %lu KiB\n", ram_size() >> 10);
    puts("memory map:");
    if (!memory_map(print_region, NULL))
        puts("  (none from the boot loader)");
}

static void report_hypervisor(void)
{
    if (!(cpuid(1).c & (1u << 31))) {
        puts("hypervisor bit (CPUID.1:ECX[31]) clear");
        return;
    }
    struct cpuid r = cpuid(0x40000000);
    uint32_t vendor_regs[3] = { r.b, r.c, r.d };
    char vendor[13];
    regs_to_str(vendor, vendor_regs, 3);
    uint32_t max = r.a;
    printf("hypervisor bit set; CPUID 0x40000000: vendor \"%s\", max leaf %#x\n", vendor, max);
    if (strcmp(vendor, "Microsoft Hv"))
        return;
    if (max > 0x400000FF)
        max = 0x400000FF;
    puts("hypervisor leaves:");
    printf("  %-10s  %-10s %-10s %-10s %s\n", "leaf", "eax", "ebx", "ecx", "edx");
    for (uint32_t leaf = 0x40000001; leaf <= max; leaf++) {
        r = cpuid(leaf);
        printf("  %#010x: %#010x %#010x %#010x %#010x\n", leaf, r.a, r.b, r.c, r.d);
    }
    if (max >= 0x40000001) {
        uint32_t sig = cpuid(0x40000001).a;
        char text[5];
        regs_to_str(text, &sig, 1);
        printf("interface signature: %#010x \"%s\"%s\n", sig, text,
               sig == 0x31237648 ? " (Hyper-V compatible)" : "");
    }
}

int main(void)
{
    puts("hvvmm default guest");
    printf("command line: %s\n", cmdline());
    report_cpus();
    report_memory();
    report_hypervisor();
    puts("powering off");
    poweroff();
}
