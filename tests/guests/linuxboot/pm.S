/* The protected-mode part of the test bzImage, loaded at 1 MiB: startup_64 at +0x200. */
	.section .head, "ax"
	.code32
	.globl startup_32
startup_32:		/* the 32-bit protocol's entry: this kernel has XLF_KERNEL_64 */
	hlt
	jmp startup_32
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
