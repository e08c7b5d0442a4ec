/*
 * guest.h - the hvvmm guest runtime: a tiny freestanding x86-64 environment
 * for test guests and the built-in default guest.
 *
 * The runtime boots from Multiboot v1 (32-bit protected mode), switches to
 * 64-bit long mode with the first 4 GiB identity-mapped (2 MiB pages, the
 * 0xFE000000-0xFFFFFFFF MMIO range uncached), enables SSE, installs an IDT,
 * masks the legacy 8259 PICs, then calls `int main(void)` with interrupts
 * disabled; returning from main calls exit(ret).
 *
 * Guest code runs in ring 0.  Guests must not contain instructions that some
 * KVM implementations cannot run in ring 0 (vmcall/vmmcall, int n, int3,
 * cmpxchg16b, the xsave family): the builder refuses images holding them.
 * To test faults, cause real ones (see ASM_TRY below).
 */
#ifndef HVVMM_GUEST_H
#define HVVMM_GUEST_H

#ifndef MAX_CPUS
#define MAX_CPUS 64            /* override with -DMAX_CPUS=N (all files); hvvmm runs at most
                                  255 vCPUs (xAPIC IDs 0-254); cpu_count() says so if the
                                  machine has more than MAX_CPUS */
#endif
#define STACK_SIZE 16384       /* per-CPU stack; must stay a power of two */

/* Exception vectors. */
#define DE_VECTOR 0
#define DB_VECTOR 1
#define NMI_VECTOR 2
#define BP_VECTOR 3
#define OF_VECTOR 4
#define BR_VECTOR 5
#define UD_VECTOR 6
#define NM_VECTOR 7
#define DF_VECTOR 8
#define TS_VECTOR 10
#define NP_VECTOR 11
#define SS_VECTOR 12
#define GP_VECTOR 13
#define PF_VECTOR 14
#define MF_VECTOR 16
#define AC_VECTOR 17
#define MC_VECTOR 18
#define XM_VECTOR 19

/* Well-known ports and addresses of the hvvmm machine. */
#define SERIAL_PORT 0x3F8
#define DEBUG_EXIT_PORT 0xF4
#define FW_CFG_PORT_SEL 0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_RAM_SIZE 0x0003
#define FW_CFG_NB_CPUS 0x0005
#define ACPI_PM1A_CNT_PORT 0x604
#define APIC_DEFAULT_BASE 0xFEE00000
#define TRAMPOLINE_ADDR 0x8000 /* real-mode AP start page (SIPI vector 0x08) */

#ifndef __ASSEMBLER__
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------
 * Console (COM1, 16550A) and exit
 * ---------------------------------------------------------------------- */
int putchar(int c);
int puts(const char *s);                              /* appends '\n' */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
/* %d %i %u %x %X %o %p %s %c %%, flags '-' '0' '+' ' ' '#', width/precision
 * (also '*'), length hh h l ll z j t.  Returns characters written. */
int snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* printf() calls are atomic with respect to each other: SMP output lines
 * never interleave mid-call.  Use console_lock()/console_unlock() to group
 * several calls (re-entrant on the same CPU). */
void console_lock(void);
void console_unlock(void);

/* isa-debug-exit: the VMM exits with status (code << 1) | 1. */
void exit(int code) __attribute__((noreturn));
/* ACPI PM1a S5 at port 0x604: the VMM exits with status 0.  Falls back to
 * exit(0) (status 1) if the VM is still running a moment later. */
void poweroff(void) __attribute__((noreturn));
/* Halt this CPU forever (interrupts off). */
void halt_forever(void) __attribute__((noreturn));

/* ------------------------------------------------------------------------
 * Test reporting (kvm-unit-tests style)
 * ---------------------------------------------------------------------- */
/* Prints "PASS: msg" or "FAIL: msg"; returns pass.  Callable on any CPU. */
bool report(bool pass, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void report_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* "SKIP: msg" */
void report_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* "INFO: msg" */
/* Prints "SUMMARY: N tests, M failures[, K skipped]" and exit(M ? 1 : 0):
 * process status 1 when everything passed, 3 otherwise. */
void report_summary(void) __attribute__((noreturn));

/* ------------------------------------------------------------------------
 * Boot information
 * ---------------------------------------------------------------------- */
const char *cmdline(void);                  /* full multiboot command line ("" if none);
                                               the first word is the kernel name */
/* Value of "key=N" in the command line (decimal, 0x hex, optional '-'), else dflt. */
long cmdline_int(const char *key, long dflt);
/* True if the command line has the word `key` or a word "key=...". */
bool cmdline_has(const char *key);
uint64_t ram_size(void);                    /* usable RAM: sum of available multiboot
                                               memory-map regions (or mem_lower+mem_upper) */
struct multiboot_info;
const struct multiboot_info *multiboot_info(void);
/* Iterate over the multiboot memory map: calls fn for each entry; returns count. */
int memory_map(void (*fn)(uint64_t base, uint64_t len, uint32_t type, void *arg), void *arg);

/* QEMU-style fw_cfg (selector 0x510, data 0x511). */
bool fw_cfg_present(void);                  /* "QEMU" signature */
void fw_cfg_read(uint16_t key, void *buf, size_t len);
uint64_t fw_cfg_read_u64(uint16_t key);     /* little-endian u64 */
uint16_t fw_cfg_read_u16(uint16_t key);

/* ------------------------------------------------------------------------
 * Interrupts and exceptions
 * ---------------------------------------------------------------------- */
struct ex_regs {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rdi, rsi, rbp, rbx, rdx, rcx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;       /* the hardware frame */
};
typedef void (*irq_handler_t)(struct ex_regs *regs);

/* Route `vector` (0-255) to fn (NULL to unregister).  Handlers of external
 * interrupts must call apic_eoi() themselves.  A handler may change regs
 * (e.g. regs->rip) to resume elsewhere.  Unhandled exceptions print
 * "UNEXPECTED EXCEPTION: vector N (#XX) at rip 0x... error code 0x... on cpu K"
 * and exit(0x7f). */
void set_irq_handler(int vector, irq_handler_t fn);
const char *exception_mnemonic(int vector); /* "#GP", ... or "" */

/*
 * Expected faults.  ASM_TRY(catch) starts a guarded range that ends at the
 * asm label `catch`: an exception raised by any instruction in between
 * resumes at `catch` and records the vector.  Use inside an extended asm
 * statement (one with ':' operands) and clear the record first:
 *
 *     exception_clear();
 *     asm volatile(ASM_TRY("1f") "wrmsr\n\t1:" :: "c"(msr), "a"(0), "d"(0) : "memory");
 *     vec = exception_vector();
 */
#define ASM_TRY(catch)                                              \
    ".pushsection .ex_table, \"a\"\n\t.balign 8\n\t"                \
    ".quad 1111f, " catch "\n\t.popsection\n\t1111:\n\t"
void exception_clear(void);
int exception_vector(void);                 /* vector recorded by ASM_TRY, 0 if none */
bool exception_occurred(void);              /* tells #DE (vector 0) from "none" */
uint64_t exception_error_code(void);

/* Run an instruction string guarded by ASM_TRY; evaluates to the vector of
 * the first exception (0 if none).  It is extended asm: write registers as
 * %%rax.  rax rcx rdx rsi rdi r8-r11 and the flags may be clobbered.
 * e.g. asm_try("mov $0x8000, %%ecx; xor %%eax, %%eax; xor %%edx, %%edx; wrmsr"). */
#define asm_try(insns)                                              \
    ({ exception_clear();                                           \
       asm volatile(ASM_TRY("1112f") insns "\n\t1112:" :::         \
                    "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9",  \
                    "r10", "r11", "cc", "memory");                  \
       exception_vector(); })
/* #UD test helper: vector of executing insns (UD_VECTOR expected). */
#define expect_ud(insns) (asm_try(insns) == UD_VECTOR)

int rdmsr_safe(uint32_t msr, uint64_t *val);  /* 0 or the vector (GP_VECTOR) */
int wrmsr_safe(uint32_t msr, uint64_t val);

/* ------------------------------------------------------------------------
 * CPU helpers
 * ---------------------------------------------------------------------- */
struct cpuid { uint32_t a, b, c, d; };

static inline struct cpuid cpuid_count(uint32_t leaf, uint32_t subleaf)
{
    struct cpuid r;
    asm volatile("cpuid" : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d)
                 : "a"(leaf), "c"(subleaf));
    return r;
}
static inline struct cpuid cpuid(uint32_t leaf) { return cpuid_count(leaf, 0); }

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return lo | (uint64_t)hi << 32;
}
static inline void wrmsr(uint32_t msr, uint64_t val)
{
    asm volatile("wrmsr" :: "c"(msr), "a"((uint32_t)val), "d"((uint32_t)(val >> 32))
                 : "memory");
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return lo | (uint64_t)hi << 32;
}

static inline void outb(uint16_t port, uint8_t v) { asm volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { asm volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { asm volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void pause(void) { asm volatile("pause" ::: "memory"); }
static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
/* Enable interrupts and halt until the next one (atomic: no lost wake-up). */
static inline void safe_halt(void) { asm volatile("sti; hlt" ::: "memory"); }
static inline void halt(void) { asm volatile("hlt" ::: "memory"); }
static inline uint64_t read_rflags(void) { uint64_t f; asm volatile("pushfq; popq %0" : "=r"(f)); return f; }
static inline uint64_t read_cr0(void) { uint64_t v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr2(void) { uint64_t v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }

/* Barriers.  mb() is a locked add (as Linux uses): a full barrier for
 * ordinary memory. */
static inline void barrier(void) { asm volatile("" ::: "memory"); }
static inline void mb(void) { asm volatile("lock addl $0, -4(%%rsp)" ::: "memory", "cc"); }
static inline void rmb(void) { barrier(); }
static inline void wmb(void) { barrier(); }

/* Atomics on 32/64-bit values (lock xadd / xchg / lock cmpxchg). */
#define atomic_read(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define atomic_set(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define atomic_inc(p) __atomic_add_fetch((p), 1, __ATOMIC_SEQ_CST)      /* new value */
#define atomic_dec(p) __atomic_sub_fetch((p), 1, __ATOMIC_SEQ_CST)
#define atomic_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define atomic_xchg(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
/* Returns true and stores `new` if *p == old. */
#define atomic_cmpxchg(p, old, new) ({ __typeof__(*(p)) __o = (old); \
    __atomic_compare_exchange_n((p), &__o, (new), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); })

typedef struct { volatile uint32_t locked; } spinlock_t;
#define SPINLOCK_INIT { 0 }
static inline bool spin_trylock(spinlock_t *l) { return __atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE) == 0; }
static inline void spin_lock(spinlock_t *l)
{
    while (!spin_trylock(l))
        while (l->locked)
            pause();
}
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* Busy-wait for about `cycles` TSC cycles (keep it short). */
void delay_tsc(uint64_t cycles);

/* ------------------------------------------------------------------------
 * Local APIC (xAPIC MMIO or x2APIC MSRs, whichever this CPU is in)
 * ---------------------------------------------------------------------- */
#define APIC_ID 0x20
#define APIC_LVR 0x30
#define APIC_TPR 0x80
#define APIC_EOI 0xB0
#define APIC_LDR 0xD0
#define APIC_SPIV 0xF0
#define APIC_ISR 0x100
#define APIC_IRR 0x200
#define APIC_ESR 0x280
#define APIC_ICR 0x300           /* ICR2 (0x310) is folded in by apic_send_ipi */
#define APIC_LVTT 0x320
#define APIC_LVT0 0x350
#define APIC_LVT1 0x360
#define APIC_LVTERR 0x370
#define APIC_TMICT 0x380
#define APIC_TMCCT 0x390
#define APIC_TDCR 0x3E0

#define APIC_DM_FIXED 0x000
#define APIC_DM_NMI 0x400
#define APIC_DM_INIT 0x500
#define APIC_DM_STARTUP 0x600
#define APIC_LEVEL_ASSERT 0x4000
#define APIC_LEVEL_TRIG 0x8000
#define APIC_DEST_SELF 0x40000
#define APIC_DEST_ALL 0x80000
#define APIC_DEST_ALLBUT 0xC0000
#define APIC_SPURIOUS_VECTOR 0xFF

uint32_t apic_read(unsigned reg);           /* reg: xAPIC MMIO offset */
void apic_write(unsigned reg, uint32_t val);
uint32_t apic_id(void);                     /* this CPU's LAPIC ID register */
uint32_t cpuid_apic_id(void);               /* what CPUID says (leaf 0xB, else leaf 1) */
void apic_enable(void);                     /* software-enable via SVR (vector 0xFF), TPR 0 */
bool x2apic_supported(void);                /* CPUID.1:ECX[21] */
bool enable_x2apic(void);                   /* this CPU; APs started later follow the BSP */
bool x2apic_enabled(void);                  /* this CPU's cached mode */
/* icr_low: vector | delivery mode | level | shorthand; dest: APIC ID. */
void apic_send_ipi(uint32_t icr_low, uint32_t dest);
static inline void apic_eoi(void) { apic_write(APIC_EOI, 0); }
static inline void apic_set_tpr(uint32_t tpr) { apic_write(APIC_TPR, tpr); }

/* ------------------------------------------------------------------------
 * SMP
 * ---------------------------------------------------------------------- */
int cpu_count(void);            /* from fw_cfg (1 without fw_cfg), capped at MAX_CPUS */
int smp_id(void);               /* this CPU's index: 0 = BSP, an AP's is its APIC ID */
int cpus_online(void);
/* Start the APs: INIT, SIPI (and a second SIPI if needed) to APIC IDs
 * 1..cpu_count()-1 (hvvmm numbers vCPU i with APIC ID i), then wait, bounded,
 * until each has checked in.  Each AP runs the real-mode trampoline (copied
 * to TRAMPOLINE_ADDR), enters long mode on the shared page tables, takes the
 * stack and index given by its APIC ID (< MAX_CPUS), loads the IDT, follows
 * the BSP into x2APIC mode if the BSP is in it, enables its LAPIC and calls
 * ap_main(index); when ap_main returns the AP halts with interrupts off.
 * Returns the number of CPUs online (prints a line for each missing one). */
int smp_init(void (*ap_main)(int cpu));

/* ------------------------------------------------------------------------
 * Small libc subset
 * ---------------------------------------------------------------------- */
void *memset(void *s, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ------------------------------------------------------------------------
 * Multiboot v1 information (as handed over by the VMM)
 * ---------------------------------------------------------------------- */
struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;           /* KiB; flags bit 0 */
    uint32_t boot_device;
    uint32_t cmdline;                        /* flags bit 2 */
    uint32_t mods_count, mods_addr;          /* flags bit 3 */
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;         /* flags bit 6 */
} __attribute__((packed));

struct multiboot_mmap_entry {
    uint32_t size;                           /* of the rest of the entry */
    uint64_t addr, len;
    uint32_t type;                           /* 1 = available RAM */
} __attribute__((packed));

struct multiboot_module {
    uint32_t mod_start, mod_end, string, reserved;
} __attribute__((packed));

#endif /* !__ASSEMBLER__ */
#endif /* HVVMM_GUEST_H */
