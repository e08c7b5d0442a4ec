/*
 * The real-mode part of the test bzImage: no setup code (the 64-bit boot protocol does not run
 * it), only the setup header at the offsets of Linux Documentation/arch/x86/boot.rst. The
 * builder passes the sizes of the protected-mode part it follows.
 */
	.section .text
	.globl _start
_start:
	.org 0x1f1
	.byte 1			/* setup_sects: one sector after the boot sector */
	.word 0			/* root_flags */
	.long SYSSIZE		/* syssize, 16-byte paragraphs */
	.word 0			/* ram_size */
	.word 0xffff		/* vid_mode */
	.word 0			/* root_dev */
	.org 0x1fe
	.word 0xaa55		/* boot_flag */
	.byte 0xeb, hdr_end - header	/* jump: its offset byte gives the header's end */
header:
	.ascii "HdrS"		/* 0x202 */
	.word PROTOCOL		/* version */
	.long 0			/* realmode_swtch */
	.word 0			/* start_sys_seg */
	.word 0			/* kernel_version */
	.org 0x210
	.byte 0			/* type_of_loader */
	.byte 1			/* loadflags: LOADED_HIGH */
	.word 0			/* setup_move_size */
	.long 0x100000		/* code32_start */
	.long 0, 0		/* ramdisk_image, ramdisk_size */
	.long 0			/* bootsect_kludge */
	.word 0			/* heap_end_ptr */
	.byte 0, 0		/* ext_loader_ver, ext_loader_type */
	.org 0x228
	.long 0			/* cmd_line_ptr */
	.long INITRD_ADDR_MAX	/* initrd_addr_max */
	.long 0x200000		/* kernel_alignment */
	.byte 0			/* relocatable_kernel: no, load at pref_address */
	.byte 21		/* min_alignment */
	.word XLOADFLAGS	/* xloadflags: 1 = XLF_KERNEL_64 */
	.long CMDLINE_SIZE	/* cmdline_size */
	.long 0			/* hardware_subarch */
	.quad 0			/* hardware_subarch_data */
	.org 0x248
	.long PAYLOAD_OFFSET	/* payload_offset, from the protected-mode part's start */
	.long PAYLOAD_LENGTH	/* payload_length */
	.quad 0			/* setup_data */
	.org 0x258
	.quad 0x100000		/* pref_address */
	.long INIT_SIZE		/* init_size */
	.long 0			/* handover_offset */
	.long 0			/* kernel_info_offset */
hdr_end:
	.org 1024
