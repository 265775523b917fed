/*
 * Entry points of the pyhv test guest.
 *
 * The image is linked at physical 0x100000 and the same bytes serve the PVH
 * ELF, the vmlinux-like ELF and the protected-mode part of the bzImage:
 *
 *   0x100000  linux32_entry  Linux 32-bit boot protocol (code32_start), ESI = boot_params
 *   0x100040  pvh_entry      PVH (XEN_ELFNOTE_PHYS32_ENTRY), EBX = hvm_start_info
 *   0x100200  entry64        Linux 64-bit boot protocol, RSI = boot_params
 *
 * All three reach guest_main(protocol, info_paddr) in 64-bit mode on the
 * guest's own GDT, stack and page tables (identity map of the low 4 GiB with
 * 2 MiB pages).  The 32-bit entries go from protected mode straight to long
 * mode (PAE, CR3, EFER.LME, then CR0.PG); paging is never on without LME.
 */

#define PROTO_PVH     1
#define PROTO_LINUX64 2
#define PROTO_LINUX32 3

#define SEL_CODE32 0x08
#define SEL_DATA   0x10
#define SEL_CODE64 0x18

	.section .text.head, "ax"
	.code32

	.globl linux32_entry
linux32_entry:
	cli
	cld
	movl	$PROTO_LINUX32, %edi
	movl	%esi, %ebp
	jmp	enter_long_mode

	.org	0x40
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl	$PROTO_PVH, %edi
	movl	%ebx, %ebp
enter_long_mode:
	lgdt	gdt_desc
	ljmp	$SEL_CODE32, $1f
1:	movw	$SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	$stack_top, %esp
	movl	%cr4, %eax
	orl	$0x20, %eax		/* CR4.PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx	/* IA32_EFER */
	rdmsr
	orl	$0x100, %eax		/* EFER.LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* CR0.PG | CR0.PE */
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $long_mode32

	.code64
long_mode32:
	movl	$stack_top, %esp
	jmp	start_c

	.org	0x200
	.globl entry64
entry64:
	cli
	cld
	movl	$PROTO_LINUX64, %edi
	movq	%rsi, %rbp
	movl	$stack_top, %esp
	lgdt	gdt_desc
	movl	$pml4, %eax
	movq	%rax, %cr3
	pushq	$SEL_CODE64
	pushq	$start_c
	lretq

start_c:
	movw	$SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	%edi, %ebx
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	shrl	$3, %ecx
	xorl	%eax, %eax
	rep stosq
	movl	%ebx, %edi
	movq	%rbp, %rsi
	call	guest_main
2:	cli
	hlt
	jmp	2b

/* ---- exceptions and interrupts ------------------------------------------ */
	.text
	.code64

.macro EXC_NOERR n
exc_\n:
	pushq	$0
	pushq	$\n
	jmp	exc_common
.endm
.macro EXC_ERR n
exc_\n:
	pushq	$\n
	jmp	exc_common
.endm

	.irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
	EXC_NOERR \n
	.endr
	.irp n, 8,10,11,12,13,14,17,21,29,30
	EXC_ERR \n
	.endr

exc_common:
	movq	%rsp, %rdi
	andq	$-16, %rsp
	call	guest_exception
1:	cli
	hlt
	jmp	1b

	.globl irq_stub
irq_stub:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	cld
	call	guest_irq
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	iretq

	.globl spurious_stub
spurious_stub:
	iretq

/*
 * AP trampoline: copied to a page below 1 MiB and started by SIPI in real
 * mode with CS = page >> 4, IP = 0.  It counts itself in and halts.
 */
	.code16
	.globl ap_tramp_start, ap_tramp_end, ap_tramp_counter
ap_tramp_start:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	lock incl (ap_tramp_counter - ap_tramp_start)
1:	hlt
	jmp	1b
	.balign 4
ap_tramp_counter:
	.long	0
ap_tramp_end:
	.code64

/* ---- data ---------------------------------------------------------------- */
	.section .rodata
	.balign 16
	.globl exc_stub_table
exc_stub_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad	exc_\n
	.endr

	.balign 16
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: 32-bit code */
	.quad	0x00cf92000000ffff	/* 0x10: data */
	.quad	0x00af9a000000ffff	/* 0x18: 64-bit code */
gdt_end:
	.balign 16
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

/* bzImage kernel_info (boot protocol 2.15), found via kernel_info_offset */
	.balign 8
	.globl kernel_info
kernel_info:
	.ascii	"LToP"
	.long	16			/* size */
	.long	16			/* size_total */
	.long	0			/* setup_type_max */

/* Identity map of 0..4 GiB: PML4 -> PDPT -> 4 page directories of 2 MiB pages */
	.section .data.pgt, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad	pdpt + 0x3
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0003
	.quad	pd + 0x1003
	.quad	pd + 0x2003
	.quad	pd + 0x3003
	.fill	508, 8, 0
pd:
	.set	pgaddr, 0
	.rept	2048
	.quad	pgaddr + 0x83
	.set	pgaddr, pgaddr + 0x200000
	.endr

	.section .note.GNU-stack, "", @progbits

	.section .bss.stack, "aw", @nobits
	.balign 16
	.skip	16384
	.globl stack_top
stack_top:
