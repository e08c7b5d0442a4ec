/*
 * entry.S - Multiboot v1 header, 32-bit entry, switch to long mode, IDT stubs.
 *
 * The loader enters _start in 32-bit flat protected mode, paging off,
 * EAX = 0x2BADB002, EBX = multiboot info.  We load our own GDT, enable PAE,
 * EFER.LME and paging with static page tables (no run-time fill), jump to
 * 64-bit code, zero .bss and call runtime_init() then main().
 */
#include "guest.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003             /* page-aligned modules, memory info */

#define CR0_PE 0x00000001
#define CR0_MP 0x00000002
#define CR0_EM 0x00000004
#define CR0_TS 0x00000008
#define CR0_NE 0x00000020
#define CR0_WP 0x00010000
#define CR0_NW 0x20000000
#define CR0_CD 0x40000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define CR4_OSFXSR 0x00000200
#define CR4_OSXMMEXCPT 0x00000400
#define MSR_EFER 0xC0000080
#define EFER_LME 0x00000100

#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18

/* Page-table entry bits: present, writable, accessed, dirty, 2 MiB page;
 * PWT|PCD for the top 32 MiB below 4 GiB (LAPIC, IOAPIC, other MMIO). */
#define PTE_TABLE 0x23
#define PDE_2M 0xE3
#define PDE_UC 0x18

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

/* Shared by the BSP and the APs (which arrive from the trampoline). */
.macro ENTER_LONG_MODE
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %cr4, %eax
    orl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    andl $~(CR0_EM | CR0_TS | CR0_NW | CR0_CD), %eax
    orl $(CR0_PG | CR0_WP | CR0_NE | CR0_MP | CR0_PE), %eax
    movl %eax, %cr0
.endm

    .section .boot32, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    movl %eax, mb_magic
    movl %ebx, mb_info_addr
    lgdt gdt_desc
    ljmp $SEL_CODE32, $1f
1:  ENTER_LONG_MODE
    ljmp $SEL_CODE64, $start64

    /* APs: the real-mode trampoline far-jumps here with the GDT loaded. */
    .globl ap_start32
ap_start32:
    ENTER_LONG_MODE
    ljmp $SEL_CODE64, $ap_start64

    .text
    .code64
start64:
    movl $(cpu_stacks + STACK_SIZE), %esp
    /* Zero .bss (the loader normally has; it is small, the stacks are not in it). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $3, %ecx
    xorl %eax, %eax
    rep stosq
    call runtime_init
    call main
    movl %eax, %edi
    call exit

/* An AP's index is its APIC ID (from its LAPIC); it runs on cpu_stacks[index]. */
ap_start64:
    movl $0x1B, %ecx                    /* IA32_APIC_BASE */
    rdmsr
    testl $0x400, %eax                  /* x2APIC mode (kept across INIT)? */
    jz 1f
    movl $0x802, %ecx                   /* x2APIC ID */
    rdmsr
    movl %eax, %ebx
    jmp 2f
1:  movl $(APIC_DEFAULT_BASE + 0x20), %eax
    movl (%rax), %ebx                   /* xAPIC ID register */
    shrl $24, %ebx
2:    cmpl $MAX_CPUS, %ebx
    jae 1f
    imull $STACK_SIZE, %ebx, %eax
    leaq cpu_stacks + STACK_SIZE(%rax), %rsp
    movl %ebx, %edi
    call ap_entry
1:  cli
    hlt
    jmp 1b

/*
 * IDT entry stubs: 256 of them, 16 bytes apart (runtime.c computes their
 * addresses).  Each pushes a dummy error code where the CPU pushes none and
 * the vector, then joins isr_common which saves the GPRs as struct ex_regs.
 */
#define HAS_ERRCODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if !HAS_ERRCODE(vec)
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rbx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call isr_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rbp
    popq %rbx
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp                      /* vector, error code */
    iretq

    .data
    .balign 16
    .globl gdt, gdt_end
gdt:                                    /* trampoline.S knows its size */
    .quad 0
    .quad 0x00AF9B000000FFFF            /* 0x08: 64-bit code */
    .quad 0x00CF93000000FFFF            /* 0x10: flat data */
    .quad 0x00CF9B000000FFFF            /* 0x18: 32-bit code */
gdt_end:
    .balign 8
    .globl gdt_desc
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl mb_magic, mb_info_addr
mb_magic:
    .long 0
mb_info_addr:
    .long 0

/* Static page tables: identity map of 0-4 GiB with 2 MiB pages. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + PTE_TABLE
    .fill 511, 8, 0
pdpt:
    .quad pd + PTE_TABLE
    .quad pd + 0x1000 + PTE_TABLE
    .quad pd + 0x2000 + PTE_TABLE
    .quad pd + 0x3000 + PTE_TABLE
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .if i >= 2032
    .quad (i << 21) | PDE_2M | PDE_UC
    .else
    .quad (i << 21) | PDE_2M
    .endif
    .set i, i + 1
    .endr

    .section .note.GNU-stack, "", @progbits
