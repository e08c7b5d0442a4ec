/*
 * Finds the ACPI tables as an OS without boot information does: scans
 * 0xE0000-0xFFFFF for the RSDP on 16-byte boundaries (ACPI 6.5 §5.2.5.1),
 * checks both its checksums, walks the XSDT to the MADT and the FADT, and
 * checks:
 *   - the MADT lists one enabled Processor Local APIC per vCPU (fw_cfg's
 *     count) with APIC IDs 0..N-1, and the IOAPIC;
 *   - the FADT's PM timer block reads a 24-bit counter that advances, and
 *     SCI_EN reads 1 in PM1a_CNT;
 * With "noacpi" on the command line it checks instead that there is no RSDP.
 * With "reset" it then writes the FADT's RESET_VALUE to its RESET_REG (an I/O
 * port), which must end the run as a reset: nothing after that may run.
 */
#include "guest.h"

struct sdt_header {
    char signature[4];
    uint32_t length;
    uint8_t revision, checksum;
    char oem_id[6], oem_table_id[8];
    uint32_t oem_revision, creator_id, creator_revision;
} __attribute__((packed));

static uint8_t byte_sum(const void *p, uint32_t n)
{
    const uint8_t *b = p;
    uint8_t s = 0;
    while (n--)
        s += *b++;
    return s;
}

static bool same(const void *a, const char *b, int n)
{
    const char *x = a;
    for (int i = 0; i < n; i++)
        if (x[i] != b[i])
            return false;
    return true;
}

static const uint8_t *find_rsdp(void)
{
    for (uintptr_t p = 0xE0000; p < 0x100000; p += 16)
        if (same((const void *)p, "RSD PTR ", 8))
            return (const uint8_t *)p;
    return NULL;
}

static uint16_t get16(const uint8_t *p) { return p[0] | p[1] << 8; }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

static const struct sdt_header *find_table(const struct sdt_header *xsdt, const char *sig)
{
    uint32_t entries = (xsdt->length - sizeof(*xsdt)) / 8;
    const uint8_t *list = (const uint8_t *)(xsdt + 1);
    for (uint32_t i = 0; i < entries; i++) {
        const struct sdt_header *t = (const void *)(uintptr_t)get64(list + 8 * i);
        if (same(t->signature, sig, 4))
            return t;
    }
    return NULL;
}

static void check_madt(const struct sdt_header *madt, unsigned cpus)
{
    report(byte_sum(madt, madt->length) == 0, "MADT checksum");
    const uint8_t *p = (const uint8_t *)madt + 44, *end = (const uint8_t *)madt + madt->length;
    unsigned lapics = 0, ioapics = 0;
    bool ids_in_order = true;
    report(get32((const uint8_t *)madt + 36) == APIC_DEFAULT_BASE, "MADT LAPIC address");
    while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
        if (p[0] == 0 && (get32(p + 4) & 1)) {
            ids_in_order &= p[3] == lapics;
            lapics++;
        } else if (p[0] == 1) {
            ioapics++;
        }
        p += p[1];
    }
    report(lapics == cpus, "MADT: %u enabled local APICs for %u vCPUs", lapics, cpus);
    report(ids_in_order, "MADT: APIC IDs 0..%u", cpus - 1);
    report(ioapics == 1, "MADT: one IOAPIC");
}

static void check_fadt(const struct sdt_header *fadt)
{
    const uint8_t *f = (const uint8_t *)fadt;
    report(byte_sum(fadt, fadt->length) == 0, "FADT checksum");
    uint16_t pm_tmr = get32(f + 76), pm1a_cnt = get32(f + 64);
    report(pm_tmr != 0 && f[91] == 4, "FADT PM timer block at %#x", pm_tmr);
    uint32_t t0 = inl(pm_tmr), t1 = t0;
    for (int i = 0; i < 100000 && t1 == t0; i++)
        t1 = inl(pm_tmr);
    report(t0 < (1u << 24) && t1 < (1u << 24), "PM timer is 24-bit (%#x, %#x)", t0, t1);
    report(t1 != t0, "PM timer advances");
    report(inw(pm1a_cnt) & 1, "SCI_EN reads 1");
}

int main(void)
{
    const uint8_t *rsdp = find_rsdp();
    if (cmdline_has("noacpi")) {
        report(rsdp == NULL, "no RSDP without ACPI");
        report_summary();
    }
    if (!report(rsdp != NULL, "RSDP found by scanning 0xE0000-0xFFFFF"))
        report_summary();
    report_info("RSDP at %p", rsdp);
    report(byte_sum(rsdp, 20) == 0 && rsdp[15] >= 2 && byte_sum(rsdp, get32(rsdp + 20)) == 0,
           "RSDP checksums (revision %u)", rsdp[15]);
    const struct sdt_header *xsdt = (const void *)(uintptr_t)get64(rsdp + 24);
    report(same(xsdt->signature, "XSDT", 4) && byte_sum(xsdt, xsdt->length) == 0, "XSDT");
    const struct sdt_header *madt = find_table(xsdt, "APIC");
    const struct sdt_header *fadt = find_table(xsdt, "FACP");
    if (!report(madt && fadt, "XSDT lists the MADT and the FADT"))
        report_summary();
    check_madt(madt, fw_cfg_read_u16(FW_CFG_NB_CPUS));
    check_fadt(fadt);
    if (cmdline_has("reset")) {
        const uint8_t *f = (const uint8_t *)fadt;
        report(f[116] == 1 && (get32(f + 112) & (1 << 10)), "FADT reset register is an I/O port");
        printf("acpi: writing %#x to port %#x\n", f[128], (unsigned)get64(f + 120));
        outb((uint16_t)get64(f + 120), f[128]);
        report(false, "still running after the reset register write");
    }
    report_summary();
}
