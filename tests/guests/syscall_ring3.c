/*
 * SYSCALL/SYSRET between ring 3 and ring 0 in long mode, with the MSR layout Linux uses
 * (Intel SDM vol. 2B "SYSCALL", "SYSRET"; AMD APM vol. 2 section 6.1.1 "SYSCALL and SYSRET").
 *
 * The test gives the runtime's GDT Linux's user segments (0x23 32-bit code, 0x2B data, 0x33
 * 64-bit code, each DPL 3) and a TSS whose RSP0 is on this CPU's stack, sets EFER.SCE, STAR
 * (kernel CS 0x08 in 47:32, SYSRET base 0x23 in 63:48), LSTAR and SFMASK, copies a small
 * position-independent ring-3 blob to a 2 MiB page of its own that it maps user-accessible
 * (the runtime's page tables are supervisor-only; the kernel pages stay so, as Linux's are) and
 * drops to it with IRETQ. The blob sets DF and AC and calls SYSCALL; the LSTAR handler records
 * CS, SS, RCX, R11 and RFLAGS and returns with SYSRETQ; the blob records its CS/SS/RFLAGS and
 * calls SYSCALL again, and the handler then returns to the ring-0 code that dropped to ring 3.
 * Any exception on the way (an LSTAR fetch at CPL 3 is a #PF, a SYSRETQ at CPL 3 a #GP) is
 * recorded (vector, error code, CS, RIP, CR2) and ends the ring-3 excursion, so every check is
 * reported whatever KVM did.
 */
#include "guest.h"

#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_SYSCALL_MASK 0xC0000084
#define EFER_SCE 0x1

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER32_CS 0x23          /* STAR[63:48]: SYSRETQ loads CS = base + 16, SS = base + 8 */
#define USER_DS 0x2B
#define USER_CS 0x33
#define TSS_SEL 0x38

#define RFLAGS_TF (1ul << 8)
#define RFLAGS_IF (1ul << 9)
#define RFLAGS_DF (1ul << 10)
#define RFLAGS_AC (1ul << 18)
#define SYSCALL_MASK (RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_AC)

#define PTE_USER 0x4ul
#define PAGE_2M (2ul << 20)

/* What the LSTAR handler saw (kernel memory: supervisor pages). */
struct syscall_record {
    uint64_t calls, cs, ss, rcx, r11, rflags;
};
struct syscall_record first_syscall;
uint64_t syscall_calls;
uint64_t kernel_rsp;            /* run_user's stack, where both ways back resume */

/* What an exception taken during the excursion saw. */
static struct {
    bool taken;
    uint64_t vector, error_code, cs, rip, cr2, rcx, r11, rflags;
} fault;

extern char user_blob_start[], user_blob_end[], user_after_first_syscall[];
extern char user_cs_after_sysret[], user_ss_after_sysret[], user_rflags_after_sysret[];
extern char __image_end[];
extern uint64_t pml4[];
void syscall_entry(void);
void user_resume_kernel(void);
/* Drops to ring 3 at `rip` with stack `rsp`; returns once the excursion ended either way. */
void run_user(uint64_t rip, uint64_t rsp);

asm(
    ".text\n"
    ".globl run_user, user_resume_kernel, syscall_entry\n"
    "run_user:\n"
    "    pushq %rbx; pushq %rbp; pushq %r12; pushq %r13; pushq %r14; pushq %r15\n"
    "    movq %rsp, kernel_rsp(%rip)\n"
    "    pushq $0x2B\n"                         /* SS */
    "    pushq %rsi\n"                          /* RSP */
    "    pushq $0x2\n"                          /* RFLAGS: IF off, nothing else */
    "    pushq $0x33\n"                         /* CS */
    "    pushq %rdi\n"                          /* RIP */
    "    iretq\n"
    "user_resume_kernel:\n"
    "    movq kernel_rsp(%rip), %rsp\n"
    "    popq %r15; popq %r14; popq %r13; popq %r12; popq %rbp; popq %rbx\n"
    "    ret\n"
    /* LSTAR. SYSCALL switches no stack: RSP is still the user's (a user page). */
    "syscall_entry:\n"
    "    incq syscall_calls(%rip)\n"
    "    cmpl $2, %eax\n"
    "    je user_resume_kernel\n"
    "    movq %rcx, first_syscall+24(%rip)\n"
    "    movq %r11, first_syscall+32(%rip)\n"
    "    movq %cs, %rdx\n"
    "    movq %rdx, first_syscall+8(%rip)\n"
    "    movq %ss, %rdx\n"
    "    movq %rdx, first_syscall+16(%rip)\n"
    "    pushfq\n"
    "    popq %rdx\n"
    "    movq %rdx, first_syscall+40(%rip)\n"
    "    movq syscall_calls(%rip), %rdx\n"
    "    movq %rdx, first_syscall(%rip)\n"
    "    sysretq\n"

    /* The ring-3 blob: position independent (it runs from a copy), data inside it. */
    ".balign 64\n"
    ".globl user_blob_start, user_blob_end, user_after_first_syscall\n"
    ".globl user_cs_after_sysret, user_ss_after_sysret, user_rflags_after_sysret\n"
    "user_blob_start:\n"
    "    pushfq\n"
    "    orq $0x40400, (%rsp)\n"                /* DF | AC: SFMASK must clear them */
    "    popfq\n"
    "    movl $1, %eax\n"
    "    syscall\n"
    "user_after_first_syscall:\n"
    "    pushfq\n"
    "    popq %rdx\n"
    "    movq %rdx, user_rflags_after_sysret(%rip)\n"
    "    cld\n"
    "    movq %cs, %rdx\n"
    "    movq %rdx, user_cs_after_sysret(%rip)\n"
    "    movq %ss, %rdx\n"
    "    movq %rdx, user_ss_after_sysret(%rip)\n"
    "    movl $2, %eax\n"
    "    syscall\n"
    "    ud2\n"
    ".balign 8\n"
    "user_cs_after_sysret: .quad 0\n"
    "user_ss_after_sysret: .quad 0\n"
    "user_rflags_after_sysret: .quad 0\n"
    "user_blob_end:\n"
);

struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3, iomap_base;
} __attribute__((packed));

extern uint64_t gdt[];                          /* entry.S: null, code64, data, code32 */
static uint64_t test_gdt[9] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static volatile bool excursion_active;

static void load_gdt_with_user_segments(uint64_t rsp0)
{
    for (int i = 0; i < 4; i++)
        test_gdt[i] = gdt[i];
    test_gdt[USER32_CS >> 3] = 0x00CFFB000000FFFF;     /* 32-bit code, DPL 3 */
    test_gdt[USER_DS >> 3] = 0x00CFF3000000FFFF;       /* data, DPL 3 */
    test_gdt[USER_CS >> 3] = 0x00AFFB000000FFFF;       /* 64-bit code, DPL 3 */
    tss.rsp[0] = rsp0;
    tss.iomap_base = sizeof(tss);                      /* no I/O bitmap */
    uint64_t base = (uintptr_t)&tss, limit = sizeof(tss) - 1;
    test_gdt[TSS_SEL >> 3] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89ul << 40
                             | ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56;
    test_gdt[(TSS_SEL >> 3) + 1] = base >> 32;
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) d = {
        sizeof(test_gdt) - 1, (uintptr_t)test_gdt,
    };
    asm volatile("lgdt %0; ltr %w1" :: "m"(d), "r"(TSS_SEL) : "memory");
}

/* Sets the U bit on every level that maps the 2 MiB page at `va` (identity map, 2 MiB pages). */
static void map_user_page(uint64_t va)
{
    uint64_t *pml4e = &pml4[(va >> 39) & 511];
    uint64_t *pdpt = (uint64_t *)(*pml4e & ~0xFFFul);
    uint64_t *pdpte = &pdpt[(va >> 30) & 511];
    uint64_t *pd = (uint64_t *)(*pdpte & ~0xFFFul);
    *pml4e |= PTE_USER;
    *pdpte |= PTE_USER;
    pd[(va >> 21) & 511] |= PTE_USER;
    asm volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

static void excursion_fault(struct ex_regs *regs)
{
    if (!excursion_active) {
        printf("UNEXPECTED EXCEPTION: vector %lu (%s) at rip 0x%lx error code 0x%lx\n",
               regs->vector, exception_mnemonic(regs->vector), regs->rip, regs->error_code);
        exit(0x7f);
    }
    excursion_active = false;
    fault.taken = true;
    fault.vector = regs->vector;
    fault.error_code = regs->error_code;
    fault.cs = regs->cs;
    fault.rip = regs->rip;
    fault.cr2 = regs->vector == PF_VECTOR ? read_cr2() : 0;
    fault.rcx = regs->rcx;
    fault.r11 = regs->r11;
    fault.rflags = regs->rflags;
    regs->rip = (uintptr_t)user_resume_kernel;
    regs->cs = KERNEL_CS;
    regs->ss = KERNEL_DS;
    regs->rsp = kernel_rsp;
    regs->rflags = 0x2;
}

int main(void)
{
    uint64_t user_base = ((uintptr_t)__image_end + PAGE_2M - 1) & ~(PAGE_2M - 1);
    uint64_t blob_size = user_blob_end - user_blob_start;
    if (ram_size() < user_base + PAGE_2M) {
        report(false, "RAM (%#lx bytes) holds the user page at %#lx", ram_size(), user_base);
        report_summary();
    }
    for (int v = 0; v < 32; v++)
        if (v != NMI_VECTOR && v != MC_VECTOR)
            set_irq_handler(v, excursion_fault);

    uint64_t rsp;
    asm volatile("mov %%rsp, %0" : "=r"(rsp));
    load_gdt_with_user_segments((rsp - 2048) & ~15ul);  /* below our frames, on this CPU's stack */
    map_user_page(user_base);
    /* Diagnostic: with the handler's page user-accessible too, a SYSCALL that kept CPL 3 runs
     * the handler in ring 3 (its CS says so) instead of faulting on the fetch. */
    bool lstar_on_user_page = cmdline_has("lstar_on_user_page");
    if (lstar_on_user_page)
        map_user_page((uintptr_t)syscall_entry);
    memcpy((void *)user_base, user_blob_start, blob_size);

    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
    uint64_t star = (uint64_t)USER32_CS << 48 | (uint64_t)KERNEL_CS << 32;
    wrmsr(MSR_STAR, star);
    wrmsr(MSR_LSTAR, (uintptr_t)syscall_entry);
    wrmsr(MSR_SYSCALL_MASK, SYSCALL_MASK);
    report(rdmsr(MSR_EFER) & EFER_SCE, "EFER.SCE set");
    report(rdmsr(MSR_STAR) == star && rdmsr(MSR_LSTAR) == (uintptr_t)syscall_entry
           && rdmsr(MSR_SYSCALL_MASK) == SYSCALL_MASK,
           "STAR %#lx, LSTAR %#lx, SFMASK %#lx read back as written",
           rdmsr(MSR_STAR), rdmsr(MSR_LSTAR), rdmsr(MSR_SYSCALL_MASK));

    uint64_t return_rip = user_base + (user_after_first_syscall - user_blob_start);
    report_info("user code at %#lx (user page), LSTAR handler at %#lx (%s page)",
                user_base, (uint64_t)(uintptr_t)syscall_entry,
                lstar_on_user_page ? "user" : "supervisor");
    excursion_active = true;
    run_user(user_base, user_base + PAGE_2M - 64);
    excursion_active = false;

    if (fault.taken)
        report_info("exception during the ring-3 excursion: vector %lu (%s) error code %#lx "
                    "cs %#lx rip %#lx rflags %#lx cr2 %#lx rcx %#lx r11 %#lx; "
                    "LSTAR %#lx, return RIP %#lx; %lu syscall(s) reached the handler",
                    fault.vector, exception_mnemonic(fault.vector), fault.error_code, fault.cs,
                    fault.rip, fault.rflags, fault.cr2, fault.rcx, fault.r11,
                    (uint64_t)(uintptr_t)syscall_entry, return_rip, syscall_calls);
    if (first_syscall.calls)
        report_info("LSTAR handler ran: CS %#lx SS %#lx RCX %#lx R11 %#lx RFLAGS %#lx",
                    first_syscall.cs, first_syscall.ss, first_syscall.rcx, first_syscall.r11,
                    first_syscall.rflags);
    report(!fault.taken, "no exception between IRETQ to ring 3 and the second SYSCALL");
    report(first_syscall.calls == 1, "first SYSCALL reached the LSTAR handler");
    report(first_syscall.cs == KERNEL_CS && (first_syscall.cs & 3) == 0,
           "handler runs with CS = STAR[47:32] (%#x), CPL 0: CS %#lx", KERNEL_CS,
           first_syscall.cs);
    report(first_syscall.ss == KERNEL_DS, "handler SS = STAR[47:32] + 8 (%#x): %#lx",
           KERNEL_DS, first_syscall.ss);
    report(first_syscall.rcx == return_rip, "RCX = the return RIP %#lx: %#lx", return_rip,
           first_syscall.rcx);
    report((first_syscall.r11 & (RFLAGS_DF | RFLAGS_AC)) == (RFLAGS_DF | RFLAGS_AC),
           "R11 = the user's RFLAGS (DF and AC set): %#lx", first_syscall.r11);
    report(first_syscall.calls == 1 && (first_syscall.rflags & SYSCALL_MASK) == 0,
           "SFMASK cleared IF, TF, DF and AC in the handler: RFLAGS %#lx", first_syscall.rflags);
    uint64_t user_cs = *(uint64_t *)(user_base + (user_cs_after_sysret - user_blob_start));
    uint64_t user_ss = *(uint64_t *)(user_base + (user_ss_after_sysret - user_blob_start));
    uint64_t user_rflags = *(uint64_t *)(user_base + (user_rflags_after_sysret - user_blob_start));
    report(user_cs == USER_CS && user_ss == USER_DS,
           "SYSRETQ returns to CS = STAR[63:48] + 16 (%#x), SS = STAR[63:48] + 8 (%#x): "
           "CS %#lx SS %#lx", USER_CS, USER_DS, user_cs, user_ss);
    report((user_rflags & (RFLAGS_DF | RFLAGS_AC)) == (RFLAGS_DF | RFLAGS_AC),
           "SYSRETQ restores RFLAGS from R11: %#lx", user_rflags);
    report(syscall_calls == 2, "second SYSCALL returned to ring 0 through LSTAR (%lu calls)",
           syscall_calls);
    report_summary();
}
