/*
 * PVH -> Linux 64-bit boot protocol shim, used only to cross-check the
 * guest's 64-bit entry under QEMU (which has no 64-bit Linux loader).
 *
 * build.py links this at 0x400000 and packs it with the guest's code image
 * into one ELF whose PVH note points at shim_entry.  Entered in 32-bit
 * protected mode with EBX = hvm_start_info, it fills a zero page from the
 * start_info (command line, initrd = module 0, memmap -> e820, RSDP), enters
 * long mode on the guest's own identity page tables (guest_pml4, given by
 * the linker) and a Linux-like boot GDT (__BOOT_CS 0x10, __BOOT_DS 0x18),
 * then jumps to the guest's 64-bit entry with RSI = the zero page.
 */

#define ZP_SIZE 4096

	.code32
	.text
	.globl shim_entry
shim_entry:
	cli
	cld
	movl	$shim_stack_top, %esp

	movl	$zero_page, %edi		/* clear the zero page */
	movl	$(ZP_SIZE / 4), %ecx
	xorl	%eax, %eax
	rep stosl

	movw	$0xaa55, zero_page + 0x1fe	/* boot_flag */
	movl	$0x53726448, zero_page + 0x202	/* "HdrS" */
	movw	$0x020f, zero_page + 0x206	/* version */
	movb	$0xff, zero_page + 0x210	/* type_of_loader: undefined */
	movb	$0x01, zero_page + 0x211	/* loadflags: LOADED_HIGH */
	movl	$0x100000, zero_page + 0x214	/* code32_start */
	movl	$2047, zero_page + 0x238	/* cmdline_size */

	movl	24(%ebx), %eax			/* cmdline_paddr -> cmd_line_ptr */
	movl	%eax, zero_page + 0x228
	movl	28(%ebx), %eax
	movl	%eax, zero_page + 0x0c8
	movl	32(%ebx), %eax			/* rsdp_paddr -> acpi_rsdp_addr */
	movl	%eax, zero_page + 0x070
	movl	36(%ebx), %eax
	movl	%eax, zero_page + 0x074

	cmpl	$0, 12(%ebx)			/* nr_modules */
	je	1f
	movl	16(%ebx), %esi			/* module 0 -> ramdisk_image/size */
	movl	0(%esi), %eax
	movl	%eax, zero_page + 0x218
	movl	4(%esi), %eax
	movl	%eax, zero_page + 0x0c0
	movl	8(%esi), %eax
	movl	%eax, zero_page + 0x21c
	movl	12(%esi), %eax
	movl	%eax, zero_page + 0x0c4
1:
	xorl	%ecx, %ecx
	cmpl	$1, 4(%ebx)			/* memmap needs start_info version 1 */
	jb	3f
	movl	48(%ebx), %ecx
	cmpl	$128, %ecx
	jbe	2f
	movl	$128, %ecx
2:	movl	40(%ebx), %esi
	movl	$(zero_page + 0x2d0), %edi
3:	movb	%cl, zero_page + 0x1e8
4:	testl	%ecx, %ecx			/* 24-byte memmap -> 20-byte e820 */
	jz	5f
	movsl
	movsl
	movsl
	movsl
	movsl
	addl	$4, %esi
	decl	%ecx
	jmp	4b
5:
	lgdt	shim_gdt_desc
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	$guest_pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx
	rdmsr
	orl	$0x100, %eax			/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax
	movl	%eax, %cr0
	ljmp	$0x10, $6f

	.code64
6:	movl	$0x18, %eax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movl	$zero_page, %esi
	movl	$0x100200, %eax
	jmp	*%rax

	.section .rodata
	.balign 8
shim_gdt:
	.quad	0
	.quad	0
	.quad	0x00af9a000000ffff		/* 0x10: __BOOT_CS, 64-bit */
	.quad	0x00cf92000000ffff		/* 0x18: __BOOT_DS */
shim_gdt_end:
shim_gdt_desc:
	.word	shim_gdt_end - shim_gdt - 1
	.long	shim_gdt

	.data
	.balign 4096
zero_page:
	.fill	ZP_SIZE, 1, 0
	.fill	1024, 1, 0
shim_stack_top:

	.section .note.GNU-stack, "", @progbits
