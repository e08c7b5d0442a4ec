/* A minimal virtio-blk driver (Virtio 1.2 §4.1 PCI modern, §2.7 split queue, §5.2 block): finds
 * the device on PCI bus 0 through configuration mechanism #1, places its BARs itself (a Multiboot
 * boot has no firmware to do it), negotiates VERSION_1 and INDIRECT_DESC, and does I/O by polling
 * the used ring.
 *
 * The test's disk: sector N holds N as a u64 in its first 8 bytes and (N + i) & 0xFF in byte i
 * after that. Command line: "sectors=N" (the disk's size); "bench=N" reads the whole disk N times
 * in 64 KiB requests, 8 in flight, and prints INFO lines around it instead of the tests.
 */
#include "guest.h"

#define PCI_ADDR 0xCF8
#define PCI_DATA 0xCFC
#define BAR4_ADDR 0xC0000000UL   /* inside the PCI window of a guest with <= 2 GiB of RAM */

#define QSIZE 64
#define SECTOR 512
#define F_INDIRECT (1u << 28)
#define DESC_NEXT 1
#define DESC_WRITE 2
#define DESC_INDIRECT 4

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct req_hdr { uint32_t type, reserved; uint64_t sector; };

static struct desc ring_desc[QSIZE] __attribute__((aligned(4096)));
static struct { uint16_t flags, idx, ring[QSIZE], used_event; }
    avail __attribute__((aligned(4096)));
static struct {
    uint16_t flags, idx;
    struct { uint32_t id, len; } ring[QSIZE];
    uint16_t avail_event;
} used __attribute__((aligned(4096)));
static struct desc indirect[8][4] __attribute__((aligned(16)));
static struct req_hdr hdrs[8];
static volatile uint8_t status[8];
static uint8_t buffers[8][65536] __attribute__((aligned(4096)));

static volatile uint8_t *common, *notify, *devcfg, *isr;
static int device_slot, msix_cap;
static volatile int irq_count;
static uint32_t notify_mult;
static uint16_t avail_idx, used_seen;

static uint32_t pci_read(int dev, int reg)
{
    outl(PCI_ADDR, 0x80000000u | (dev << 11) | (reg & 0xFC));
    return inl(PCI_DATA);
}

static void pci_write(int dev, int reg, uint32_t value)
{
    outl(PCI_ADDR, 0x80000000u | (dev << 11) | (reg & 0xFC));
    outl(PCI_DATA, value);
}

static void cw8(int off, uint8_t v) { *(volatile uint8_t *)(common + off) = v; }
static void cw16(int off, uint16_t v) { *(volatile uint16_t *)(common + off) = v; }
static void cw32(int off, uint32_t v) { *(volatile uint32_t *)(common + off) = v; }
static uint8_t cr8(int off) { return *(volatile uint8_t *)(common + off); }
static uint16_t cr16(int off) { return *(volatile uint16_t *)(common + off); }
static uint32_t cr32(int off) { return *(volatile uint32_t *)(common + off); }

static int find_device(void)
{
    for (int dev = 0; dev < 32; dev++)
        if (pci_read(dev, 0) == 0x10011AF4)
            return dev;
    return -1;
}

/* Post one request as an indirect chain in slot `slot` (0-7): header, data, status. */
static void post(int slot, uint32_t type, uint64_t sector, void *data, uint32_t len, bool write)
{
    hdrs[slot] = (struct req_hdr){ type, 0, sector };
    status[slot] = 0xEE;
    struct desc *t = indirect[slot];
    int n = 0;
    t[n] = (struct desc){ (uint64_t)&hdrs[slot], 16, DESC_NEXT, 1 }; n++;
    if (len) {
        t[n] = (struct desc){ (uint64_t)data, len, (uint16_t)(DESC_NEXT | (write ? 0 : DESC_WRITE)),
                              2 };
        n++;
    }
    t[n - 1].next = n;
    t[n] = (struct desc){ (uint64_t)&status[slot], 1, DESC_WRITE, 0 }; n++;
    ring_desc[slot] = (struct desc){ (uint64_t)t, (uint32_t)(16 * n), DESC_INDIRECT, 0 };
    avail.ring[avail_idx % QSIZE] = slot;
    __sync_synchronize();
    avail.idx = ++avail_idx;
    __sync_synchronize();
}

static void kick(void)
{
    *(volatile uint16_t *)(notify + 0 * notify_mult) = 0;
}

/* Wait for `count` completions; false on timeout. */
static bool wait_used(int count)
{
    for (long spin = 0; spin < 2000000000L; spin++) {
        __sync_synchronize();
        if ((uint16_t)(*(volatile uint16_t *)&used.idx - used_seen) >= count) {
            used_seen += count;
            return true;
        }
        pause();
    }
    return false;
}

static bool sector_ok(const uint8_t *p, uint64_t sector)
{
    if (*(const uint64_t *)p != sector)
        return false;
    for (int i = 8; i < SECTOR; i++)
        if (p[i] != (uint8_t)(sector + i))
            return false;
    return true;
}

static bool setup(void)
{
    int dev = find_device();
    if (!report(dev >= 0, "virtio-blk 1af4:1001 found on bus 0 (slot %d)", dev))
        return false;
    report(pci_read(dev, 0x2C) >> 16 == 2, "subsystem ID 2 (block)");
    /* Walk the capabilities for the modern virtio structures (all in BAR4 here). */
    int common_off = -1, notify_off = -1, device_off = -1, isr_off = -1;
    for (int cap = pci_read(dev, 0x34) & 0xFF; cap; cap = (pci_read(dev, cap) >> 8) & 0xFF) {
        uint32_t head = pci_read(dev, cap);
        if ((head & 0xFF) != 0x09)
            continue;
        int type = (head >> 24) & 0xFF, bar = pci_read(dev, cap + 4) & 0xFF;
        int offset = pci_read(dev, cap + 8);
        if (bar != 4)
            continue;
        if (type == 1) common_off = offset;
        if (type == 2) { notify_off = offset; notify_mult = pci_read(dev, cap + 16); }
        if (type == 3) isr_off = offset;
        if (type == 4) device_off = offset;
    }
    report(common_off >= 0 && notify_off >= 0 && isr_off >= 0 && device_off >= 0,
           "common, notify, ISR and device capabilities in BAR4");
    /* Size BAR4 (64-bit memory) and place it. */
    pci_write(dev, 0x20, 0xFFFFFFFF);
    uint32_t mask = pci_read(dev, 0x20);
    report((mask & 0xF) == 0xC && (~(mask & ~0xFu) + 1) == 0x4000,
           "BAR4 is 64-bit prefetchable memory of 16 KiB (mask %#x)", mask);
    pci_write(dev, 0x20, BAR4_ADDR);
    pci_write(dev, 0x24, 0);
    pci_write(dev, 0x04, 0x0006);  /* memory decoding, bus master */
    common = (volatile uint8_t *)(BAR4_ADDR + common_off);
    notify = (volatile uint8_t *)(BAR4_ADDR + notify_off);
    devcfg = (volatile uint8_t *)(BAR4_ADDR + device_off);
    isr = (volatile uint8_t *)(BAR4_ADDR + isr_off);
    device_slot = dev;
    for (int cap = pci_read(dev, 0x34) & 0xFF; cap; cap = (pci_read(dev, cap) >> 8) & 0xFF)
        if ((pci_read(dev, cap) & 0xFF) == 0x11)
            msix_cap = cap;

    cw8(0x14, 0);
    report(cr8(0x14) == 0, "reset reads back status 0");
    cw8(0x14, 1 | 2);
    cw32(0x00, 1);
    bool version1 = cr32(0x04) & 1;
    cw32(0x00, 0);
    uint32_t features = cr32(0x04);
    report(version1 && (features & F_INDIRECT), "device offers VERSION_1 and INDIRECT_DESC");
    cw32(0x08, 0); cw32(0x0C, F_INDIRECT);
    cw32(0x08, 1); cw32(0x0C, 1);
    cw8(0x14, 1 | 2 | 8);
    if (!report(cr8(0x14) & 8, "FEATURES_OK accepted"))
        return false;
    cw16(0x16, 0);
    report(cr16(0x18) >= QSIZE, "queue 0 holds %u entries", cr16(0x18));
    cw16(0x18, QSIZE);
    cw32(0x20, (uint32_t)(uint64_t)ring_desc); cw32(0x24, 0);
    cw32(0x28, (uint32_t)(uint64_t)&avail); cw32(0x2C, 0);
    cw32(0x30, (uint32_t)(uint64_t)&used); cw32(0x34, 0);
    cw16(0x1C, 1);
    cw8(0x14, 1 | 2 | 4 | 8);
    return report(cr8(0x14) == 15 && cr16(0x1C) == 1, "driver OK, queue enabled");
}

static void bench(long rounds, uint64_t sectors)
{
    const uint32_t chunk = sizeof(buffers[0]);
    uint64_t bytes = 0;
    report_info("bench start");
    for (long r = 0; r < rounds; r++) {
        uint64_t sector = 0;
        while (sector < sectors) {
            int n = 0;
            for (; n < 8 && sector < sectors; n++) {
                uint32_t len = chunk;
                if ((sectors - sector) * SECTOR < len)
                    len = (sectors - sector) * SECTOR;
                post(n, 0, sector, buffers[n], len, false);
                sector += len / SECTOR;
                bytes += len;
            }
            kick();
            if (!wait_used(n)) {
                report(false, "bench: requests completed");
                return;
            }
        }
    }
    report_info("bench end: %lu bytes", (unsigned long)bytes);
}

#define IOAPIC_BASE 0xFEC00000UL
#define MSIX_BAR_ADDR (BAR4_ADDR + 0x10000)
#define INTX_VECTOR 0x41
#define MSIX_VECTOR 0x42

static void ioapic_write(unsigned reg, uint32_t value)
{
    *(volatile uint32_t *)IOAPIC_BASE = reg;
    *(volatile uint32_t *)(IOAPIC_BASE + 0x10) = value;
}

static void on_intx(struct ex_regs *regs)
{
    (void)regs;
    (void)*isr;  /* reading the ISR lowers the level-triggered line */
    irq_count++;
    apic_eoi();
}

static void on_msix(struct ex_regs *regs)
{
    (void)regs;
    irq_count++;
    apic_eoi();
}

static bool wait_irq(void)
{
    for (long spin = 0; spin < 200000000L; spin++) {
        if (irq_count)
            return true;
        pause();
    }
    return false;
}

/* INTx: PIRQ routing in the PIIX3 (01.0, 0x60-0x63) to an ISA IRQ, the IOAPIC pin of that
 * number programmed level-triggered; then MSI-X vector 1 for queue 0. */
static void interrupts(void)
{
    int pirq = (device_slot - 1 + 1 - 1) & 3;
    uint32_t route = (pci_read(1, 0x60) >> (8 * pirq)) & 0xFF;
    report(!(route & 0x80) && route < 16, "PIRQ%c routed to ISA IRQ %u", 'A' + pirq, route);
    apic_enable();
    set_irq_handler(INTX_VECTOR, on_intx);
    ioapic_write(0x10 + 2 * route + 1, apic_id() << 24);
    ioapic_write(0x10 + 2 * route, INTX_VECTOR | (1u << 15));  /* level, active high, unmasked */
    irq_count = 0;
    post(0, 0, 0, buffers[0], SECTOR, false);
    kick();
    sti();
    report(wait_irq() && wait_used(1), "INTx reached the IOAPIC pin %u", route);
    cli();
    ioapic_write(0x10 + 2 * route, 1u << 16);  /* masked again */

    if (!report(msix_cap != 0, "MSI-X capability present"))
        return;
    pci_write(device_slot, 0x14, MSIX_BAR_ADDR);
    volatile uint32_t *table = (volatile uint32_t *)MSIX_BAR_ADDR;
    table[4 + 0] = 0xFEE00000u | (apic_id() << 12);
    table[4 + 1] = 0;
    table[4 + 2] = MSIX_VECTOR;
    table[4 + 3] = 0;                       /* unmasked */
    pci_write(device_slot, msix_cap, pci_read(device_slot, msix_cap) | (0x8000u << 16));
    cw16(0x16, 0);
    cw16(0x1A, 1);
    report(cr16(0x1A) == 1, "queue 0 uses MSI-X vector 1");
    set_irq_handler(MSIX_VECTOR, on_msix);
    irq_count = 0;
    post(1, 0, 1, buffers[1], SECTOR, false);
    kick();
    sti();
    report(wait_irq() && wait_used(1) && sector_ok(buffers[1], 1), "MSI-X message delivered");
    cli();
}

int main(void)
{
    uint64_t sectors = cmdline_int("sectors", 2048);
    if (!setup())
        report_summary();
    report(*(volatile uint64_t *)devcfg == sectors, "capacity %lu sectors",
           (unsigned long)*(volatile uint64_t *)devcfg);
    if (cmdline_has("bench")) {
        bench(cmdline_int("bench", 1), sectors);
        report_summary();
    }

    /* One read of 8 sectors. */
    post(0, 0, 0, buffers[0], 8 * SECTOR, false);
    kick();
    bool done = wait_used(1);
    bool ok = done && status[0] == 0;
    for (int s = 0; ok && s < 8; s++)
        ok = sector_ok(buffers[0] + s * SECTOR, s);
    report(ok, "read sectors 0-7");

    /* Eight reads in flight at once, completed before one look at the used ring. */
    for (int i = 0; i < 8; i++)
        post(i, 0, 100 + 3 * i, buffers[i], SECTOR, false);
    kick();
    done = wait_used(8);
    ok = done;
    for (int i = 0; ok && i < 8; i++)
        ok = status[i] == 0 && sector_ok(buffers[i], 100 + 3 * i);
    report(ok, "eight requests in flight");

    /* Write sectors 10-11, flush, read them back. */
    for (int i = 0; i < 2 * SECTOR; i++)
        buffers[1][i] = (uint8_t)(i * 7 + 3);
    post(1, 1, 10, buffers[1], 2 * SECTOR, true);
    post(2, 4, 0, 0, 0, false);
    kick();
    report(wait_used(2) && status[1] == 0 && status[2] == 0, "write and flush complete");
    memset(buffers[3], 0, 2 * SECTOR);
    post(3, 0, 10, buffers[3], 2 * SECTOR, false);
    kick();
    report(wait_used(1) && status[3] == 0 && !memcmp(buffers[1], buffers[3], 2 * SECTOR),
           "written sectors read back");

    /* GET_ID, and a read past the end of the disk. */
    memset(buffers[4], 0, 20);
    post(4, 8, 0, buffers[4], 20, false);
    post(5, 0, sectors - 1, buffers[5], 2 * SECTOR, false);
    kick();
    report(wait_used(2), "get-id and the bad read complete");
    report(status[4] == 0 && !memcmp(buffers[4], "hvvmm0", 7), "get-id: serial \"%s\"",
           (char *)buffers[4]);
    report(status[5] == 1, "read past the end: IOERR (status %u)", status[5]);
    interrupts();
    report_summary();
}
