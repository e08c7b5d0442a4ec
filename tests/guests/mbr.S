/* A boot sector for the firmware-boot tests: runs in real mode at 0:7C00 as a BIOS loads it.
 *
 * It prints "MBR: hello" on COM1 (direct port writes), reads LBA 1 with int 13h AH=42h and checks
 * the marker the test put there, writes a 512-byte pattern to LBA 2 with AH=43h, reads it back and
 * compares, prints "MBR: ok", then powers off through ACPI PM1a_CNT (port 0x604, SLP_EN).
 * A failed step writes its number to isa-debug-exit (port 0xF4), so the test sees which.
 *
 * With 'R' after the marker (the reboot test), the first boot sets byte 0 of LBA 3 to 1, prints
 * "MBR: rebooting" and pulses the i8042 reset line; the boot after the reset sees the 1, prints
 * "MBR: booted again" and goes on as above. With 'T' instead, the first boot triple-faults
 * (an empty IDT, then an exception), which a PC turns into a reset as well.
 */
    .code16
    .section .text
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7C00, %sp
    sti
    mov %dl, boot_drive

    mov $msg_hello, %si
    call puts

    /* 1: read LBA 1 to 0x8000 */
    movw $0x8000, dap_buffer
    movl $1, dap_lba
    mov $0x42, %ah
    mov boot_drive, %dl
    mov $dap, %si
    int $0x13
    mov $1, %al
    jc fail
    /* 2: the marker */
    mov $0x8000, %si
    mov $marker, %di
    mov $marker_end - marker, %cx
    cld
    repe cmpsb
    mov $2, %al
    jne fail
    mov (%si), %bl      /* the mode: 'R', 'T' or anything else */
    cmp $'R', %bl
    je boot_count
    cmp $'T', %bl
    jne write_test
boot_count:

    /* 6: the reboot test's boot count in LBA 3 */
    movw $0xB000, dap_buffer
    movl $3, dap_lba
    mov $0x42, %ah
    mov boot_drive, %dl
    mov $dap, %si
    int $0x13
    mov $6, %al
    jc fail
    cmpb $0, 0xB000
    jne booted_again
    movb $1, 0xB000
    mov $0x43, %ah
    xor %al, %al
    mov boot_drive, %dl
    mov $dap, %si
    int $0x13
    mov $7, %al
    jc fail
    mov $msg_rebooting, %si
    call puts
    cmp $'T', %bl
    je triple_fault
    mov $0xFE, %al      /* i8042: pulse the reset line */
    out %al, $0x64
    hlt
triple_fault:            /* in 32-bit protected mode, where every KVM delivers faults */
    cli
    lgdt gdt_descriptor
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmp $0x08, $protected
    .code32
protected:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    lidt empty_idt      /* limit 0: the #UD cannot be delivered, nor the #GP, nor the #DF */
    ud2
    .code16
booted_again:
    mov $msg_again, %si
    call puts

write_test:
    /* 3: fill 0x9000 with the pattern (byte i = i ^ 0x5A) and write it to LBA 2 */
    mov $0x9000, %di
    xor %cx, %cx
1:  mov %cl, %al
    xor $0x5A, %al
    stosb
    inc %cx
    cmp $512, %cx
    jne 1b
    movw $0x9000, dap_buffer
    movl $2, dap_lba
    mov $0x43, %ah
    xor %al, %al
    mov boot_drive, %dl
    mov $dap, %si
    int $0x13
    mov $3, %al
    jc fail

    /* 4: read LBA 2 back to 0xA000 and compare */
    movw $0xA000, dap_buffer
    movl $2, dap_lba
    mov $0x42, %ah
    mov boot_drive, %dl
    mov $dap, %si
    int $0x13
    mov $4, %al
    jc fail
    mov $0x9000, %si
    mov $0xA000, %di
    mov $512, %cx
    repe cmpsb
    mov $5, %al
    jne fail

    mov $msg_ok, %si
    call puts
    mov $0x604, %dx
    mov $0x2000, %ax
    out %ax, %dx
    hlt

fail:
    out %al, $0xF4
    hlt

/* Print the NUL-terminated string at DS:SI on COM1. */
puts:
    lodsb
    test %al, %al
    jz 2f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
2:  ret

boot_drive: .byte 0
empty_idt: .word 0
    .long 0
    .balign 8
gdt: .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF   /* null, flat code, flat data */
gdt_descriptor: .word 23
    .long gdt
    .balign 4
dap:
    .byte 16, 0
    .word 1            /* sectors */
dap_buffer:
    .word 0, 0         /* offset, segment */
dap_lba:
    .long 0, 0
marker: .ascii "HVVMM-LBA-1"
marker_end:
msg_hello: .asciz "MBR: hello\r\n"
msg_ok: .asciz "MBR: ok\r\n"
msg_rebooting: .asciz "MBR: rebooting\r\n"
msg_again: .asciz "MBR: booted again\r\n"

    .org 510
    .byte 0x55, 0xAA
