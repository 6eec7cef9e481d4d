/*
 * evm probe guest: entry point and the ELF note that marks the image.
 *
 * evm starts every vCPU here, already in 64-bit user mode (CPL3, IOPL3,
 * IF=0, identity-mapped paging) with the System V argument registers set:
 *   rdi = vCPU index, rsi = vCPU count, rdx = command line (NUL-terminated),
 *   rcx = TSC kHz (0 if unknown), r8 = end of usable RAM, r9 = first free byte,
 *   rsp = top of this vCPU's stack (16-byte aligned).
 * Those are exactly probe_main's six arguments, so the entry only fixes the
 * stack alignment and calls it. probe_main never returns; if it did, spin.
 */
	.section .text.entry, "ax", @progbits
	.globl _start
	.type _start, @function
_start:
	xorl	%ebp, %ebp
	andq	$-16, %rsp
	call	probe_main
1:	pause
	jmp	1b
	.size _start, . - _start

/*
 * The marker evm looks for (vmm/src/boot/probe.rs, is_probe_image): an ELF
 * note with name "EVMPROBE", type 1, and a 4-byte descriptor holding the
 * entry ABI version (1). The linker script puts it in the first page.
 */
	.section .note.evmprobe, "a", @note
	.balign 4
	.long	9		/* namesz: "EVMPROBE\0" */
	.long	4		/* descsz */
	.long	1		/* type: NT_EVMPROBE_ABI */
	.asciz	"EVMPROBE"
	.balign 4
	.long	1		/* ABI version */
	.balign 4

	.section .note.GNU-stack, "", @progbits
