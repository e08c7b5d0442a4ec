/*
 * runtime.c - the C half of the hvvmm guest runtime (see guest.h).
 */
#include "guest.h"

/* ------------------------------------------------------------------------
 * Per-CPU data lives at the bottom of each CPU's stack, so this_cpu() needs
 * neither segment bases nor MSRs.  CPU i runs on cpu_stacks[i].
 * ---------------------------------------------------------------------- */
struct percpu {
    int index;
    bool x2apic;
    volatile int ex_vector;      /* vector + 1 recorded by an ASM_TRY fixup, 0 = none */
    uint64_t ex_error_code;
};

char cpu_stacks[MAX_CPUS][STACK_SIZE]
    __attribute__((section(".bss.stacks"), aligned(STACK_SIZE)));

static inline struct percpu *this_cpu(void)
{
    uintptr_t sp;
    asm("mov %%rsp, %0" : "=r"(sp));
    return (struct percpu *)(sp & ~(uintptr_t)(STACK_SIZE - 1));
}

int smp_id(void) { return this_cpu()->index; }

/* ------------------------------------------------------------------------
 * libc subset
 * ---------------------------------------------------------------------- */
void *memset(void *s, int c, size_t n)
{
    void *d = s;
    asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return s;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    asm volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) :: "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++)
        if (*a != *b || !*a)
            return (unsigned char)*a - (unsigned char)*b;
    return 0;
}

char *strchr(const char *s, int c)
{
    for (;; s++) {
        if (*s == (char)c)
            return (char *)s;
        if (!*s)
            return NULL;
    }
}

void delay_tsc(uint64_t cycles)
{
    uint64_t start = rdtsc();
    while (rdtsc() - start < cycles)
        pause();
}

/* ------------------------------------------------------------------------
 * Console
 * ---------------------------------------------------------------------- */
static spinlock_t console_spin;
static volatile int console_owner = -1;
static int console_depth;

void console_lock(void)
{
    int me = smp_id();
    if (console_owner == me) {          /* re-entry, e.g. from an exception */
        console_depth++;
        return;
    }
    spin_lock(&console_spin);
    console_owner = me;
    console_depth = 1;
}

void console_unlock(void)
{
    if (--console_depth == 0) {
        console_owner = -1;
        spin_unlock(&console_spin);
    }
}

static void serial_putc(char c)
{
    /* Wait (bounded) for THR empty: LSR bit 5. */
    for (int i = 0; i < 100000 && !(inb(SERIAL_PORT + 5) & 0x20); i++)
        pause();
    outb(SERIAL_PORT, c);
}

int putchar(int c)
{
    console_lock();
    serial_putc(c);
    console_unlock();
    return (unsigned char)c;
}

int puts(const char *s)
{
    console_lock();
    while (*s)
        serial_putc(*s++);
    serial_putc('\n');
    console_unlock();
    return 0;
}

/* ------------------------------------------------------------------------
 * printf
 * ---------------------------------------------------------------------- */
struct out {
    char *buf;          /* NULL: write to the serial port */
    size_t size, pos;
};

static void out_char(struct out *o, char c)
{
    if (!o->buf)
        serial_putc(c);
    else if (o->pos + 1 < o->size)
        o->buf[o->pos] = c;
    o->pos++;
}

static void out_pad(struct out *o, char c, int n)
{
    while (n-- > 0)
        out_char(o, c);
}

enum { F_LEFT = 1, F_ZERO = 2, F_PLUS = 4, F_SPACE = 8, F_ALT = 16 };

static void out_number(struct out *o, uint64_t v, bool neg, unsigned base,
                       bool upper, int width, int prec, int flags)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int n = 0;
    while (v) {
        tmp[n++] = digits[v % base];
        v /= base;
    }
    if (prec < 0) {
        prec = 1;
    } else {
        flags &= ~F_ZERO;
    }
    int ndig = n > prec ? n : prec;
    char prefix[3];
    int np = 0;
    if (neg)
        prefix[np++] = '-';
    else if (flags & F_PLUS)
        prefix[np++] = '+';
    else if (flags & F_SPACE)
        prefix[np++] = ' ';
    if ((flags & F_ALT) && base == 16) {
        prefix[np++] = '0';
        prefix[np++] = upper ? 'X' : 'x';
    }
    int pad = width - np - ndig;
    if (!(flags & (F_LEFT | F_ZERO)))
        out_pad(o, ' ', pad);
    for (int i = 0; i < np; i++)
        out_char(o, prefix[i]);
    if ((flags & (F_LEFT | F_ZERO)) == F_ZERO)
        out_pad(o, '0', pad);
    out_pad(o, '0', ndig - n);
    while (n)
        out_char(o, tmp[--n]);
    if (flags & F_LEFT)
        out_pad(o, ' ', pad);
}

static int parse_int(const char **p, va_list *ap)
{
    if (**p == '*') {
        (*p)++;
        return va_arg(*ap, int);
    }
    int v = 0;
    while (**p >= '0' && **p <= '9')
        v = v * 10 + *(*p)++ - '0';
    return v;
}

static void vformat(struct out *o, const char *fmt, va_list ap0)
{
    va_list ap;
    va_copy(ap, ap0);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            out_char(o, *fmt);
            continue;
        }
        const char *start = fmt++;
        int flags = 0;
        for (;; fmt++) {
            if (*fmt == '-') flags |= F_LEFT;
            else if (*fmt == '0') flags |= F_ZERO;
            else if (*fmt == '+') flags |= F_PLUS;
            else if (*fmt == ' ') flags |= F_SPACE;
            else if (*fmt == '#') flags |= F_ALT;
            else break;
        }
        int width = parse_int(&fmt, &ap);
        if (width < 0) {
            flags |= F_LEFT;
            width = -width;
        }
        int prec = -1;
        if (*fmt == '.') {
            fmt++;
            prec = parse_int(&fmt, &ap);
        }
        int size = 0;   /* -2 hh, -1 h, 0 int, 1 long/64-bit */
        for (;; fmt++) {
            if (*fmt == 'h') size--;
            else if (*fmt == 'l' || *fmt == 'z' || *fmt == 'j' || *fmt == 't') size = 1;
            else break;
        }
        uint64_t u;
        int64_t s;
        switch (*fmt) {
        case 'd':
        case 'i':
            s = size > 0 ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (size == -1) s = (short)s;
            if (size <= -2) s = (signed char)s;
            u = s < 0 ? -(uint64_t)s : (uint64_t)s;
            out_number(o, u, s < 0, 10, false, width, prec, flags);
            break;
        case 'u':
        case 'x':
        case 'X':
        case 'o':
            u = size > 0 ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            if (size == -1) u = (unsigned short)u;
            if (size <= -2) u = (unsigned char)u;
            out_number(o, u, false, *fmt == 'u' ? 10 : *fmt == 'o' ? 8 : 16,
                       *fmt == 'X', width, prec, flags);
            break;
        case 'p':
            u = (uintptr_t)va_arg(ap, void *);
            out_number(o, u, false, 16, false, width, prec, flags | F_ALT);
            break;
        case 'c':
            if (!(flags & F_LEFT)) out_pad(o, ' ', width - 1);
            out_char(o, (char)va_arg(ap, int));
            if (flags & F_LEFT) out_pad(o, ' ', width - 1);
            break;
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            int len = 0;
            while (str[len] && (prec < 0 || len < prec))
                len++;
            if (!(flags & F_LEFT)) out_pad(o, ' ', width - len);
            for (int i = 0; i < len; i++)
                out_char(o, str[i]);
            if (flags & F_LEFT) out_pad(o, ' ', width - len);
            break;
        }
        case '%':
            out_char(o, '%');
            break;
        default:        /* unknown conversion: print it verbatim */
            while (start <= fmt && *start)
                out_char(o, *start++);
            if (!*fmt)
                fmt--;
            break;
        }
    }
    va_end(ap);
}

int vprintf(const char *fmt, va_list ap)
{
    struct out o = { NULL, 0, 0 };
    console_lock();
    vformat(&o, fmt, ap);
    console_unlock();
    return (int)o.pos;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    char dummy;
    struct out o = { size ? buf : &dummy, size, 0 };
    vformat(&o, fmt, ap);
    if (size)
        buf[o.pos < size ? o.pos : size - 1] = 0;
    return (int)o.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

/* ------------------------------------------------------------------------
 * Exit
 * ---------------------------------------------------------------------- */
void halt_forever(void)
{
    for (;;)
        asm volatile("cli; hlt" ::: "memory");
}

/* Let a line another CPU is printing finish (bounded), then keep the console. */
static void quiesce_console(void)
{
    if (console_owner == smp_id())
        return;
    uint64_t start = rdtsc();
    while (!spin_trylock(&console_spin) && rdtsc() - start < 2000000000ULL)
        pause();
    console_owner = smp_id();
    console_depth = 1;
}

void exit(int code)
{
    quiesce_console();
    outl(DEBUG_EXIT_PORT, (uint32_t)code);
    halt_forever();
}

void poweroff(void)
{
    quiesce_console();
    outw(ACPI_PM1A_CNT_PORT, 0x2000);   /* SLP_TYP 0 | SLP_EN */
    delay_tsc(1000000000);              /* a VMM may power off asynchronously */
    exit(0);                            /* no ACPI PM device: isa-debug-exit */
}

/* ------------------------------------------------------------------------
 * Test reporting
 * ---------------------------------------------------------------------- */
static int tests_run, tests_failed, tests_skipped;

static void report_line(const char *prefix, const char *fmt, va_list ap)
{
    console_lock();
    printf("%s", prefix);
    vprintf(fmt, ap);
    putchar('\n');
    console_unlock();
}

bool report(bool pass, const char *fmt, ...)
{
    /* Counted before printed: a FAIL line someone can read is already in the
     * count report_summary() takes, whatever CPU reports it. */
    atomic_inc(&tests_run);
    if (!pass)
        atomic_inc(&tests_failed);
    va_list ap;
    va_start(ap, fmt);
    report_line(pass ? "PASS: " : "FAIL: ", fmt, ap);
    va_end(ap);
    return pass;
}

void report_skip(const char *fmt, ...)
{
    atomic_inc(&tests_skipped);
    va_list ap;
    va_start(ap, fmt);
    report_line("SKIP: ", fmt, ap);
    va_end(ap);
}

void report_info(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_line("INFO: ", fmt, ap);
    va_end(ap);
}

void report_summary(void)
{
    console_lock();                     /* after any line being printed now */
    int failed = atomic_read(&tests_failed), skipped = atomic_read(&tests_skipped);
    printf("SUMMARY: %d tests, %d failures", atomic_read(&tests_run), failed);
    if (skipped)
        printf(", %d skipped", skipped);
    putchar('\n');
    console_unlock();
    exit(failed ? 1 : 0);
}

/* ------------------------------------------------------------------------
 * Boot information: multiboot, command line, fw_cfg
 * ---------------------------------------------------------------------- */
extern uint32_t mb_magic, mb_info_addr;     /* saved by entry.S */

const struct multiboot_info *multiboot_info(void)
{
    if (mb_magic != 0x2BADB002)
        return NULL;
    return (const struct multiboot_info *)(uintptr_t)mb_info_addr;
}

const char *cmdline(void)
{
    const struct multiboot_info *mbi = multiboot_info();
    if (!mbi || !(mbi->flags & (1 << 2)) || !mbi->cmdline)
        return "";
    return (const char *)(uintptr_t)mbi->cmdline;
}

/* Find "key=" or the word "key"; returns the text after the key, or NULL. */
static const char *cmdline_find(const char *key)
{
    size_t klen = strlen(key);
    const char *p = cmdline();
    while (*p) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, klen) && (p[klen] == '=' || p[klen] == ' ' || !p[klen]))
            return p + klen;
        while (*p && *p != ' ')
            p++;
    }
    return NULL;
}

bool cmdline_has(const char *key) { return cmdline_find(key) != NULL; }

long cmdline_int(const char *key, long dflt)
{
    const char *p = cmdline_find(key);
    if (!p || *p++ != '=')
        return dflt;
    bool neg = *p == '-';
    if (neg || *p == '+')
        p++;
    unsigned base = 10;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    long v = 0;
    int ndigits = 0;
    for (;; p++, ndigits++) {
        int d;
        if (*p >= '0' && *p <= '9') d = *p - '0';
        else if (base == 16 && *p >= 'a' && *p <= 'f') d = *p - 'a' + 10;
        else if (base == 16 && *p >= 'A' && *p <= 'F') d = *p - 'A' + 10;
        else break;
        v = v * base + d;
    }
    if (!ndigits)
        return dflt;
    return neg ? -v : v;
}

int memory_map(void (*fn)(uint64_t base, uint64_t len, uint32_t type, void *arg), void *arg)
{
    const struct multiboot_info *mbi = multiboot_info();
    if (!mbi || !(mbi->flags & (1 << 6)))
        return 0;
    int n = 0;
    uintptr_t p = mbi->mmap_addr, end = p + mbi->mmap_length;
    while (p < end) {
        const struct multiboot_mmap_entry *e = (const void *)p;
        if (fn)
            fn(e->addr, e->len, e->type, arg);
        n++;
        p += e->size + 4;
    }
    return n;
}

static void add_available(uint64_t base, uint64_t len, uint32_t type, void *arg)
{
    (void)base;
    if (type == 1)
        *(uint64_t *)arg += len;
}

uint64_t ram_size(void)
{
    const struct multiboot_info *mbi = multiboot_info();
    uint64_t total = 0;
    if (!mbi)
        return 0;
    if (memory_map(add_available, &total))
        return total;
    if (mbi->flags & 1)
        return ((uint64_t)mbi->mem_lower + mbi->mem_upper) * 1024;
    return 0;
}

static spinlock_t fw_cfg_spin;

void fw_cfg_read(uint16_t key, void *buf, size_t len)
{
    spin_lock(&fw_cfg_spin);
    outw(FW_CFG_PORT_SEL, key);
    for (size_t i = 0; i < len; i++)
        ((uint8_t *)buf)[i] = inb(FW_CFG_PORT_DATA);
    spin_unlock(&fw_cfg_spin);
}

uint64_t fw_cfg_read_u64(uint16_t key)
{
    uint64_t v = 0;
    fw_cfg_read(key, &v, 8);
    return v;
}

uint16_t fw_cfg_read_u16(uint16_t key)
{
    uint16_t v = 0;
    fw_cfg_read(key, &v, 2);
    return v;
}

bool fw_cfg_present(void)
{
    char sig[4];
    fw_cfg_read(FW_CFG_SIGNATURE, sig, 4);
    return !memcmp(sig, "QEMU", 4);
}

/* ------------------------------------------------------------------------
 * IDT, exceptions and expected faults
 * ---------------------------------------------------------------------- */
struct idt_entry {
    uint16_t offset0, selector;
    uint8_t ist, type;
    uint16_t offset1;
    uint32_t offset2, reserved;
} __attribute__((packed));

struct ex_table_entry {
    uint64_t start, fixup;       /* guarded range [start, fixup) */
};

extern char isr_stubs[];                     /* entry.S: 256 stubs, 16 bytes each */
extern struct ex_table_entry __ex_table_start[], __ex_table_end[];
static struct idt_entry idt[256] __attribute__((aligned(16)));
static irq_handler_t irq_handlers[256];

static void idt_init(void)
{
    for (int v = 0; v < 256; v++) {
        uint64_t a = (uintptr_t)isr_stubs + 16 * v;
        idt[v] = (struct idt_entry){
            .offset0 = a, .selector = 0x08, .type = 0x8E,   /* present interrupt gate */
            .offset1 = a >> 16, .offset2 = a >> 32,
        };
    }
}

static void load_idt(void)
{
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) d = {
        sizeof(idt) - 1, (uintptr_t)idt,
    };
    asm volatile("lidt %0" :: "m"(d));
}

void set_irq_handler(int vector, irq_handler_t fn)
{
    if (vector >= 0 && vector < 256)
        irq_handlers[vector] = fn;
}

const char *exception_mnemonic(int vector)
{
    static const char *const names[32] = {
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
        "#DF", "#CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "",
        "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "", "",
        "", "", "", "", "#HV", "#VC", "#SX", "",
    };
    return vector >= 0 && vector < 32 ? names[vector] : "";
}

void exception_clear(void)
{
    this_cpu()->ex_vector = 0;
    this_cpu()->ex_error_code = 0;
}

int exception_vector(void)
{
    int v = this_cpu()->ex_vector;
    return v ? v - 1 : 0;
}

bool exception_occurred(void) { return this_cpu()->ex_vector != 0; }

uint64_t exception_error_code(void) { return this_cpu()->ex_error_code; }

void isr_dispatch(struct ex_regs *regs);   /* called from entry.S */
void isr_dispatch(struct ex_regs *regs)
{
    unsigned v = regs->vector & 0xFF;

    /* NMI and #MC are asynchronous: never the fault an ASM_TRY range expects. */
    if (v < 32 && v != 2 && v != 18) {
        for (struct ex_table_entry *e = __ex_table_start; e < __ex_table_end; e++) {
            if (regs->rip >= e->start && regs->rip < e->fixup) {
                this_cpu()->ex_vector = v + 1;
                this_cpu()->ex_error_code = regs->error_code;
                regs->rip = e->fixup;
                return;
            }
        }
    }
    if (irq_handlers[v]) {
        irq_handlers[v](regs);
        return;
    }
    if (v == APIC_SPURIOUS_VECTOR)
        return;
    console_lock();
    if (v < 32) {
        printf("UNEXPECTED EXCEPTION: vector %u (%s) at rip 0x%lx error code 0x%lx on cpu %d",
               v, exception_mnemonic(v), regs->rip, regs->error_code, smp_id());
        if (v == PF_VECTOR)
            printf(" cr2 0x%lx", read_cr2());
        putchar('\n');
    } else {
        printf("UNEXPECTED INTERRUPT: vector %u at rip 0x%lx on cpu %d\n", v, regs->rip, smp_id());
    }
    exit(0x7f);
}

int rdmsr_safe(uint32_t msr, uint64_t *val)
{
    uint32_t lo = 0, hi = 0;
    exception_clear();
    asm volatile(ASM_TRY("1f") "rdmsr\n\t1:" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    *val = lo | (uint64_t)hi << 32;
    return exception_vector();
}

int wrmsr_safe(uint32_t msr, uint64_t val)
{
    exception_clear();
    asm volatile(ASM_TRY("1f") "wrmsr\n\t1:"
                 :: "c"(msr), "a"((uint32_t)val), "d"((uint32_t)(val >> 32)) : "memory");
    return exception_vector();
}

/* ------------------------------------------------------------------------
 * Local APIC
 * ---------------------------------------------------------------------- */
#define MSR_APIC_BASE 0x1B
#define APIC_BASE_EXTD (1u << 10)
#define APIC_BASE_EN (1u << 11)
#define MSR_X2APIC_BASE 0x800
#define ICR_BUSY (1u << 12)

static inline volatile uint32_t *xapic_reg(unsigned reg)
{
    return (volatile uint32_t *)(uintptr_t)(APIC_DEFAULT_BASE + reg);
}

bool x2apic_enabled(void) { return this_cpu()->x2apic; }

uint32_t apic_read(unsigned reg)
{
    if (x2apic_enabled())
        return (uint32_t)rdmsr(MSR_X2APIC_BASE + (reg >> 4));
    return *xapic_reg(reg);
}

void apic_write(unsigned reg, uint32_t val)
{
    if (x2apic_enabled())
        wrmsr(MSR_X2APIC_BASE + (reg >> 4), val);
    else
        *xapic_reg(reg) = val;
}

uint32_t apic_id(void)
{
    uint32_t id = apic_read(APIC_ID);
    return x2apic_enabled() ? id : id >> 24;
}

uint32_t cpuid_apic_id(void)
{
    if (cpuid(0).a >= 0xB) {
        struct cpuid r = cpuid_count(0xB, 0);
        if (r.b)
            return r.d;
    }
    return cpuid(1).b >> 24;
}

bool x2apic_supported(void) { return cpuid(1).c & (1u << 21); }

bool enable_x2apic(void)
{
    if (!x2apic_supported())
        return false;
    uint64_t base = rdmsr(MSR_APIC_BASE);
    if (!(base & APIC_BASE_EXTD))
        wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
    this_cpu()->x2apic = true;
    return true;
}

void apic_enable(void)
{
    apic_write(APIC_SPIV, 0x100 | APIC_SPURIOUS_VECTOR);
    apic_write(APIC_TPR, 0);
}

void apic_send_ipi(uint32_t icr_low, uint32_t dest)
{
    if (x2apic_enabled()) {
        wrmsr(MSR_X2APIC_BASE + (APIC_ICR >> 4), (uint64_t)dest << 32 | icr_low);
        return;
    }
    for (int i = 0; i < 1000000 && (*xapic_reg(APIC_ICR) & ICR_BUSY); i++)
        pause();
    *xapic_reg(APIC_ICR + 0x10) = dest << 24;
    *xapic_reg(APIC_ICR) = icr_low;
}

/* ------------------------------------------------------------------------
 * SMP
 * ---------------------------------------------------------------------- */
extern char trampoline_start[], trampoline_end[];
/* The one record of which CPUs are up: a count kept beside it could be read
 * between an AP's two stores and disagree (smp_init() then returned 1 while
 * cpu 1 was already running). */
static volatile uint8_t cpu_is_online[MAX_CPUS];
static void (*volatile ap_main_fn)(int cpu);
static bool bsp_x2apic;

int cpu_count(void)
{
    static int count;
    if (!count) {
        int n = fw_cfg_present() ? fw_cfg_read_u16(FW_CFG_NB_CPUS) : 1;
        count = n < 1 ? 1 : n > MAX_CPUS ? MAX_CPUS : n;
        if (n > MAX_CPUS)   /* never silently: the host started more vCPUs than we use */
            printf("guest runtime: %d vCPUs present, but this guest was built for at most %d "
                   "(MAX_CPUS; build with -DMAX_CPUS=N, N <= 255): using %d\n",
                   n, MAX_CPUS, MAX_CPUS);
    }
    return count;
}

int cpus_online(void)
{
    int online = 0;
    for (int i = 0; i < MAX_CPUS; i++)
        online += cpu_is_online[i] != 0;
    return online;
}

/* entry.S: an AP arrives here on cpu_stacks[index], index = its APIC ID. */
void ap_entry(int index) __attribute__((noreturn));
void ap_entry(int index)
{
    struct percpu *pc = this_cpu();
    pc->index = index;
    pc->x2apic = rdmsr(MSR_APIC_BASE) & APIC_BASE_EXTD;
    pc->ex_vector = 0;
    load_idt();
    if (bsp_x2apic && !pc->x2apic)
        enable_x2apic();
    apic_enable();
    cpu_is_online[index] = 1;
    if (ap_main_fn)
        ap_main_fn(index);
    halt_forever();
}

static bool wait_online(int n, uint64_t cycles)
{
    uint64_t start = rdtsc();
    for (;;) {
        bool all = true;
        for (int i = 1; i < n; i++)
            all &= cpu_is_online[i] != 0;
        if (all)
            return true;
        if (rdtsc() - start > cycles)
            return false;
        pause();
    }
}

int smp_init(void (*ap_main)(int cpu))
{
    int n = cpu_count();
    if (n < 2)
        return 1;
    ap_main_fn = ap_main;
    bsp_x2apic = x2apic_enabled();
    apic_enable();
    memcpy((void *)(uintptr_t)TRAMPOLINE_ADDR, trampoline_start,
           trampoline_end - trampoline_start);
    mb();

    /* INIT, SIPI; a second SIPI only to those that have not started.
     * The in-kernel LAPIC of KVM needs none of the long real-hardware delays. */
    uint32_t sipi = APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12);
    for (int i = 1; i < n; i++)
        if (!cpu_is_online[i])
            apic_send_ipi(APIC_DM_INIT | APIC_LEVEL_ASSERT | APIC_LEVEL_TRIG, i);
    delay_tsc(100000);
    for (int i = 1; i < n; i++)
        if (!cpu_is_online[i])
            apic_send_ipi(sipi, i);
    if (!wait_online(n, 20000000)) {
        for (int i = 1; i < n; i++)
            if (!cpu_is_online[i])
                apic_send_ipi(sipi, i);
        if (!wait_online(n, 10000000000ULL)) {
            for (int i = 1; i < n; i++)
                if (!cpu_is_online[i])
                    printf("smp: cpu %d did not come online\n", i);
        }
    }
    return cpus_online();
}

/* ------------------------------------------------------------------------
 * Start-up (entry.S calls this on the BSP before main)
 * ---------------------------------------------------------------------- */
void runtime_init(void);
void runtime_init(void)
{
    struct percpu *pc = this_cpu();
    pc->index = 0;
    pc->x2apic = false;
    pc->ex_vector = 0;
    cpu_is_online[0] = 1;
    idt_init();
    load_idt();
    /* Mask both 8259 PICs: firmware may have left them routing timer
     * interrupts to vectors that collide with exceptions. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}
