/*
 * trampoline.S - real-mode start code for the APs.
 *
 * smp_init() copies trampoline_start..trampoline_end to TRAMPOLINE_ADDR
 * (page-aligned, below 1 MiB) and sends SIPI with vector TRAMPOLINE_ADDR >> 12,
 * so an AP starts here with CS = TRAMPOLINE_ADDR >> 4, IP = 0.  The code is
 * position independent: it loads the main GDT (whose address it carries),
 * enters protected mode and far-jumps to ap_start32 in entry.S.
 */
#include "guest.h"

    .section .trampoline, "ax"
    .code16
    .globl trampoline_start, trampoline_end
trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tramp_gdt_desc - trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_start32            /* 32-bit code selector */

    .balign 8
tramp_gdt_desc:
    .word 4 * 8 - 1                     /* entry.S's GDT: 4 descriptors */
    .long gdt
trampoline_end:

    .section .note.GNU-stack, "", @progbits
