/* The protected-mode part of the test bzImage, loaded at 1 MiB: startup_64 at +0x200. */
	.section .head, "ax"
	.code32
	.globl startup_32
startup_32:		/* the 32-bit protocol's entry (used when the header lacks XLF_KERNEL_64) */
	cmpl $0x53726448, 0x202(%esi)	/* ESI = boot_params, its header "HdrS" */
	jne 2f
	mov %cs, %ax
	cmp $0x10, %ax			/* __BOOT_CS */
	jne 2f
	mov %cr0, %eax
	test $0x80000000, %eax		/* paging off */
	jnz 2f
	mov $msg32, %ebx
	mov $0x3f8, %dx
1:	movb (%ebx), %al
	test %al, %al
	jz 3f
	outb %al, %dx
	inc %ebx
	jmp 1b
3:	xor %eax, %eax
	outb %al, $0xf4			/* isa-debug-exit: passed */
	hlt
2:	mov $1, %al
	outb %al, $0xf4			/* failed */
	hlt
msg32:
	.asciz "linuxboot: 32-bit entry, ESI = boot_params\nRESULT: PASS\n"
	.org 0x200
	.code64
	.globl startup_64
startup_64:
	lea stack_top(%rip), %rsp
	mov %rsi, %rdi
	call bz_main
1:	hlt
	jmp 1b

	.section .payload, "a"
	.globl payload_start, payload_end
payload_start:
	.incbin PAYLOAD
payload_end:

	.section .bss
	.balign 16
	.space 16384
stack_top:
