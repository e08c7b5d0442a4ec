/* The PVH test kernel's entry: 32-bit flat, paging off, EBX = struct hvm_start_info. */
	.section .head, "ax"
	.code32
	.globl pvh_start
pvh_start:
	mov $stack_top, %esp
	push %ebx
	call pvh_main
1:	hlt
	jmp 1b

	/* XEN_ELFNOTE_PHYS32_ENTRY (18), Xen xen/include/public/elfnote.h */
	.section .note.Xen, "a", @note
	.p2align 2
	.long 4, 4, 18
	.asciz "Xen"
	.p2align 2
	.long pvh_start

	.section .bss
	.balign 16
	.space 16384
stack_top:
