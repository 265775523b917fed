/*
 * Real-mode setup of the test guest's bzImage (Linux boot protocol, the
 * 16-bit entry a BIOS boot loader jumps to at setup + 0x200).  build.py puts
 * this code at offset 0x280 of the setup sectors (linked there: every address
 * below is an offset from the start of the setup, i.e. relative to DS) and
 * writes the setup header around it.
 *
 * Entered with DS = ES = SS = setup segment, CS = setup segment + 0x20.
 * It builds a zero page (boot_params) at setup + BP_OFF: zeroed, the setup
 * header copied in, the BIOS e820 map (INT 15h, AX=E820h) filled in; then it
 * switches to 32-bit protected mode on a flat GDT and jumps to code32_start
 * with ESI = the zero page, as the Linux 32-bit boot protocol says.
 */

#define BP_OFF   0x1000			/* zero page: setup + 4 KiB */
#define HDR_START 0x1f1
#define HDR_END  0x26c
#define SMAP     0x534d4150

	.code16
	.text
	.globl rm_entry
rm_entry:
	cli
	cld
	movw	%ds, %ax
	movw	%ax, %es
	movw	%ax, %ss
	movw	$0xe000, %sp

	movw	$BP_OFF, %di			/* zero the zero page */
	movw	$2048, %cx
	xorw	%ax, %ax
	rep stosw
	movw	$HDR_START, %si			/* copy the setup header */
	movw	$(BP_OFF + HDR_START), %di
	movw	$(HDR_END - HDR_START), %cx
	rep movsb

	xorl	%ebx, %ebx			/* BIOS e820 map */
	movw	$(BP_OFF + 0x2d0), %di
1:	movl	$0xe820, %eax
	movl	$20, %ecx
	movl	$SMAP, %edx
	int	$0x15
	jc	2f
	cmpl	$SMAP, %eax
	jne	2f
	addw	$20, %di
	incb	(BP_OFF + 0x1e8)
	cmpb	$128, (BP_OFF + 0x1e8)
	jae	2f
	testl	%ebx, %ebx
	jnz	1b
2:
	cli
	xorl	%ebx, %ebx
	movw	%ds, %bx
	shll	$4, %ebx			/* linear address of the setup */
	leal	gdt(%ebx), %eax
	movl	%eax, (gdt_desc + 2)
	leal	pm32(%ebx), %eax
	movl	%eax, (farptr)
	lgdtl	(gdt_desc)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	*(farptr)

	.code32
pm32:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	leal	BP_OFF(%ebx), %esi
	movl	0x214(%esi), %eax		/* code32_start */
	jmp	*%eax

	.balign 8
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff		/* 0x08: flat 32-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: flat data */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	0
farptr:
	.long	0
	.word	0x08

	.section .note.GNU-stack, "", @progbits
