/*
 * A test kernel for hvvmm's Linux loaders: it checks what the loader handed it and reports
 * PASS/FAIL lines on COM1, then its verdict through isa-debug-exit (port 0xf4, 0 = all passed).
 *
 * Built twice: 64-bit, entered at startup_64 with RSI = boot_params (Linux
 * Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"; zero-page.rst for the offsets), and
 * with -DPVH 32-bit, entered through the PVH note with EBX = struct hvm_start_info (Xen
 * xen/include/public/arch-x86/hvm/start_info.h). The host tells it on the command line what to
 * expect: "size=0x.. sum=0x.. ram=0x.." (the initrd's size and FNV-1a checksum, the RAM in the
 * memory map).
 */
#include <stdint.h>

typedef unsigned long uptr;

static void outb(uint16_t port, uint8_t value) { __asm__ volatile("outb %0, %1" :: "a"(value), "Nd"(port)); }
static void putc_(char c) { outb(0x3f8, (uint8_t)c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void puthex(uint64_t v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts_(buf + i);
}

static int failures;
static void check(int ok, const char *what)
{
	puts_(ok ? "PASS: " : "FAIL: ");
	puts_(what);
	putc_('\n');
	if (!ok)
		failures++;
}

static uint64_t rd64(uptr a) { return *(volatile uint64_t *)a; }
static uint32_t rd32(uptr a) { return *(volatile uint32_t *)a; }
static inline uint16_t rd16(uptr a) { return *(volatile uint16_t *)a; }
static uint8_t rd8(uptr a) { return *(volatile uint8_t *)a; }

/* The hex value after " key=0x" (or at the start) in the command line; -1 if absent. */
static uint64_t cmdline_value(const char *cmdline, const char *key)
{
	for (const char *p = cmdline; *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (*k || q[0] != '=' || q[1] != '0' || q[2] != 'x')
			continue;
		uint64_t v = 0;
		for (q += 3; *q && *q != ' '; q++)
			v = v << 4 | (uint64_t)(*q <= '9' ? *q - '0' : (*q | 0x20) - 'a' + 10);
		return v;
	}
	return (uint64_t)-1;
}

static uint32_t fnv1a(uptr data, uint64_t size)
{
	uint32_t h = 2166136261u;
	for (uint64_t i = 0; i < size; i++)
		h = (h ^ rd8(data + (uptr)i)) * 16777619u;
	return h;
}

static void check_initrd(const char *cmdline, uint64_t addr, uint64_t size)
{
	puts_("initrd at "); puthex(addr); puts_(" size "); puthex(size); putc_('\n');
	check(size == cmdline_value(cmdline, "size"), "initrd size as the command line says");
	check((addr & 0xfff) == 0, "initrd page aligned");
	check(size && fnv1a((uptr)addr, size) == (uint32_t)cmdline_value(cmdline, "sum"),
	      "initrd checksum as the command line says");
}

static void check_ram(const char *cmdline, uint64_t ram, uint32_t entries, uint64_t first_base,
		      uint32_t first_type)
{
	puts_("memory map: "); puthex(entries); puts_(" entries, RAM "); puthex(ram); putc_('\n');
	check(entries > 0 && entries <= 128, "memory map entry count");
	check(first_base == 0 && first_type == 1, "memory map starts with RAM at 0");
	check(ram == cmdline_value(cmdline, "ram"), "RAM in the memory map as the command line says");
}

static void finish(void)
{
	puts_(failures ? "RESULT: FAIL\n" : "RESULT: PASS\n");
	outb(0xf4, failures ? 1 : 0);
	for (;;)
		__asm__ volatile("hlt");
}

#ifndef PVH

/* boot_params offsets: boot.rst and zero-page.rst */
void bz_main(uptr bp)
{
	uint16_t cs, ds, ss;
	uint64_t cr0, cr3, cr4, rflags;
	uint32_t efer_lo, efer_hi;

	puts_("linuxboot: 64-bit entry, boot_params at "); puthex(bp); putc_('\n');
	__asm__ volatile("mov %%cs, %0; mov %%ds, %1; mov %%ss, %2" : "=r"(cs), "=r"(ds), "=r"(ss));
	__asm__ volatile("mov %%cr0, %0; mov %%cr3, %1; mov %%cr4, %2" : "=r"(cr0), "=r"(cr3), "=r"(cr4));
	__asm__ volatile("pushf; pop %0" : "=r"(rflags));
	__asm__ volatile("rdmsr" : "=a"(efer_lo), "=d"(efer_hi) : "c"(0xc0000080));
	check(cs == 0x10 && ds == 0x18 && ss == 0x18, "CS = __BOOT_CS 0x10, DS = SS = __BOOT_DS 0x18");
	check((cr0 & 0x80000001) == 0x80000001 && (cr4 & 0x20) && (efer_lo & 0x500) == 0x500,
	      "long mode: CR0.PG|PE, CR4.PAE, EFER.LME|LMA");
	check(!(rflags & 0x200), "interrupts disabled");
	/* The identity map covers 4 GiB: PML4[0] -> PDPT[0..3] present, 2 MiB pages. */
	uptr pdpt = (uptr)(rd64(cr3 & ~0xfffull) & ~0xfffull);
	int mapped = (rd64(cr3 & ~0xfffull) & 1) != 0;
	for (int i = 0; i < 4; i++)
		mapped = mapped && (rd64(pdpt + 8 * i) & 1);
	uptr pd3 = (uptr)(rd64(pdpt + 24) & ~0xfffull);
	check(mapped && rd64(pd3 + 8 * 511) == (0xffe00000ull | 0x83), "page tables identity-map 4 GiB");

	check(rd16(bp + 0x1fe) == 0xaa55, "boot_flag 0xaa55");
	check(rd32(bp + 0x202) == 0x53726448, "header \"HdrS\"");
	check(rd8(bp + 0x210) == 0xff, "type_of_loader 0xff");
	check(rd8(bp + 0x1ef) == 0, "sentinel 0");
	puts_("protocol "); puthex(rd16(bp + 0x206)); putc_('\n');

	uptr cmdline = (uptr)(rd32(bp + 0x228) | (uint64_t)rd32(bp + 0xc8) << 32);
	check(cmdline != 0, "cmd_line_ptr set");
	puts_("cmdline: "); puts_((const char *)cmdline); putc_('\n');
	uint64_t len = 0;
	while (rd8(cmdline + len)) len++;
	check(len <= rd32(bp + 0x238), "command line within cmdline_size");

	uint64_t addr = rd32(bp + 0x218) | (uint64_t)rd32(bp + 0xc0) << 32;
	uint64_t size = rd32(bp + 0x21c) | (uint64_t)rd32(bp + 0xc4) << 32;
	check_initrd((const char *)cmdline, addr, size);
	check(addr + size - 1 <= rd32(bp + 0x22c), "initrd below initrd_addr_max");

	uint32_t entries = rd8(bp + 0x1e8);
	uint64_t ram = 0;
	int initrd_in_ram = 0;
	for (uint32_t i = 0; i < entries && i < 128; i++) {
		uptr e = bp + 0x2d0 + 20 * i;
		if (rd32(e + 16) == 1) {
			ram += rd64(e + 8);
			if (rd64(e) <= addr && addr + size <= rd64(e) + rd64(e + 8))
				initrd_in_ram = 1;
		}
	}
	check_ram((const char *)cmdline, ram, entries, rd64(bp + 0x2d0), rd32(bp + 0x2d0 + 16));
	check(initrd_in_ram, "initrd inside one e820 RAM range");
	puts_("rsdp="); puthex(rd64(bp + 0x70)); putc_('\n');
	finish();
}

#else

/* struct hvm_start_info offsets: start_info.h */
void pvh_main(uptr si)
{
	uint32_t cr0, cr4, eflags;

	puts_("linuxboot: PVH entry, start info at "); puthex(si); putc_('\n');
	__asm__ volatile("mov %%cr0, %0; mov %%cr4, %1" : "=r"(cr0), "=r"(cr4));
	__asm__ volatile("pushf; pop %0" : "=r"(eflags));
	check((cr0 & 0x80000001) == 1 && cr4 == 0, "32-bit protected mode, paging off, CR4 0");
	check(!(eflags & 0x200), "interrupts disabled");
	check(rd32(si) == 0x336ec578, "hvm_start_info magic 0x336ec578");
	check(rd32(si + 4) >= 1, "hvm_start_info version 1 or later");

	uptr cmdline = (uptr)rd64(si + 24);
	check(cmdline != 0, "cmdline_paddr set");
	puts_("cmdline: "); puts_((const char *)cmdline); putc_('\n');

	check(rd32(si + 12) == 1, "one module (the initrd)");
	uptr mod = (uptr)rd64(si + 16);
	check_initrd((const char *)cmdline, rd64(mod), rd64(mod + 8));

	uint32_t entries = rd32(si + 48);
	uptr map = (uptr)rd64(si + 40);
	uint64_t ram = 0;
	for (uint32_t i = 0; i < entries && i < 256; i++)
		if (rd32(map + 24 * i + 16) == 1)
			ram += rd64(map + 24 * i + 8);
	check_ram((const char *)cmdline, ram, entries, rd64(map), rd32(map + 16));
	puts_("rsdp="); puthex(rd64(si + 32)); putc_('\n');
	finish();
}

#endif
