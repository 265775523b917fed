"""The vCPU state at the kernel entry point, and the tables it points at.

Everything here is plain data: the engine copies :class:`EntryState` into
KVM's registers, so this module knows nothing about KVM.  Segment limits are
byte-granular (``0xffffffff`` for a flat segment), as KVM's ``kvm_segment``
expects; :meth:`Segment.descriptor` gives the 8-byte GDT encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyhv.engine.layout import (
    BOOT_GDT_ADDR,
    BOOT_IDT_ADDR,
    BOOT_STACK_POINTER,
    PAGE_TABLES_ADDR,
    PAGE_TABLES_END,
    PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
)
from pyhv.engine.memory import GuestMemory

# control register and EFER bits
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

# page table entry bits
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7

# GDT selectors (Linux's __BOOT_CS / __BOOT_DS, then a TSS)
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT_ENTRIES = 5

# segment types (S=1: code/data; S=0: system)
TYPE_CODE_EXEC_READ_ACCESSED = 0xB
TYPE_DATA_RW_ACCESSED = 0x3
TYPE_LDT = 0x2
TYPE_TSS_BUSY = 0xB
TSS_LIMIT = 0x67

PML4_ADDR = PAGE_TABLES_ADDR
PDPT_ADDR = PAGE_TABLES_ADDR + 0x1000
PD_ADDR = PAGE_TABLES_ADDR + 0x2000
#: number of page directories: each maps 1 GiB with 2 MiB pages
PD_COUNT = 4


@dataclass(frozen=True)
class Segment:
    """A segment register's visible selector and hidden descriptor cache."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int
    unusable: int

    def descriptor(self) -> int:
        """This segment as an 8-byte GDT descriptor."""
        limit = self.limit >> 12 if self.g else self.limit
        access = (self.present << 7) | (self.dpl << 5) | (self.s << 4) | self.type
        flags = (self.g << 3) | (self.db << 2) | (self.l << 1) | self.avl
        return ((limit & 0xFFFF) | ((self.base & 0xFFFFFF) << 16) | (access << 40)
                | (((limit >> 16) & 0xF) << 48) | (flags << 52)
                | (((self.base >> 24) & 0xFF) << 56))

    @classmethod
    def from_descriptor(cls, selector: int, desc: int) -> Segment:
        """Decode an 8-byte GDT descriptor loaded with ``selector``."""
        base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
        limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
        access = (desc >> 40) & 0xFF
        flags = (desc >> 52) & 0xF
        g = flags >> 3 & 1
        return cls(
            base=base,
            limit=(limit << 12) | 0xFFF if g else limit,
            selector=selector,
            type=access & 0xF,
            present=access >> 7 & 1,
            dpl=access >> 5 & 3,
            db=flags >> 2 & 1,
            s=access >> 4 & 1,
            l=flags >> 1 & 1,
            g=g,
            avl=flags & 1,
            unusable=0 if access >> 7 & 1 else 1,
        )


def flat_segment(selector: int, *, code: bool, long_mode: bool) -> Segment:
    """A flat 4 GiB code or data segment (base 0, 4 KiB granularity)."""
    return Segment(
        base=0, limit=0xFFFFFFFF, selector=selector,
        type=TYPE_CODE_EXEC_READ_ACCESSED if code else TYPE_DATA_RW_ACCESSED,
        present=1, dpl=0, db=0 if (code and long_mode) else 1, s=1,
        l=1 if (code and long_mode) else 0, g=1, avl=0, unusable=0,
    )


#: the task register: a busy TSS (what VM entry requires and LTR would leave)
BOOT_TR = Segment(base=0, limit=TSS_LIMIT, selector=BOOT_TSS, type=TYPE_TSS_BUSY,
                  present=1, dpl=0, db=0, s=0, l=0, g=0, avl=0, unusable=0)
#: no LDT
BOOT_LDT = Segment(base=0, limit=0, selector=0, type=TYPE_LDT, present=0, dpl=0,
                   db=0, s=0, l=0, g=0, avl=0, unusable=1)


@dataclass(frozen=True)
class EntryState:
    """Registers of the boot vCPU at the kernel entry point."""

    rip: int
    rsp: int
    rbp: int
    rsi: int
    rbx: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)


def write_gdt(memory: GuestMemory, code: Segment, data: Segment) -> int:
    """Write null, null, code (0x10), data (0x18), TSS (0x20); return the limit.

    The IDT the entry state names is empty (limit 0), so its memory is never
    read and the TSS descriptor may share it.
    """
    entries = [0, 0, code.descriptor(), data.descriptor(), BOOT_TR.descriptor()]
    for i, desc in enumerate(entries):
        memory.write_u64(BOOT_GDT_ADDR + 8 * i, desc)
    return 8 * len(entries) - 1


def write_identity_page_tables(memory: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; return the PML4 address."""
    memory.fill(PAGE_TABLES_ADDR, PAGE_TABLES_END - PAGE_TABLES_ADDR)
    memory.write_u64(PML4_ADDR, PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE)
    for i in range(PD_COUNT):
        pd = PD_ADDR + i * 0x1000
        memory.write_u64(PDPT_ADDR + 8 * i, pd | PTE_PRESENT | PTE_WRITABLE)
        entries = bytearray(0x1000)
        for j in range(512):
            phys = (i << 30) | (j << 21)
            value = phys | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
            entries[8 * j:8 * j + 8] = value.to_bytes(8, "little")
        memory.write(pd, entries)
    return PML4_ADDR


def linux64_entry_state(memory: GuestMemory, entry: int) -> EntryState:
    """Write page tables and GDT; the 64-bit boot protocol's entry state."""
    code = flat_segment(BOOT_CS, code=True, long_mode=True)
    data = flat_segment(BOOT_DS, code=False, long_mode=True)
    gdt_limit = write_gdt(memory, code, data)
    cr3 = write_identity_page_tables(memory)
    return EntryState(
        rip=entry, rsp=BOOT_STACK_POINTER, rbp=BOOT_STACK_POINTER,
        rsi=ZERO_PAGE_ADDR, rbx=0, rflags=RFLAGS_RESERVED,
        cr0=CR0_PE | CR0_ET | CR0_PG, cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=BOOT_TR, ldt=BOOT_LDT,
        gdt_base=BOOT_GDT_ADDR, gdt_limit=gdt_limit, idt_base=BOOT_IDT_ADDR, idt_limit=0,
    )


def pvh_entry_state(memory: GuestMemory, entry: int) -> EntryState:
    """Write the GDT; the PVH entry state (32-bit protected mode, no paging)."""
    code = flat_segment(BOOT_CS, code=True, long_mode=False)
    data = flat_segment(BOOT_DS, code=False, long_mode=False)
    gdt_limit = write_gdt(memory, code, data)
    return EntryState(
        rip=entry, rsp=0, rbp=0, rsi=0, rbx=PVH_INFO_ADDR, rflags=RFLAGS_RESERVED,
        cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0,
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=BOOT_TR, ldt=BOOT_LDT,
        gdt_base=BOOT_GDT_ADDR, gdt_limit=gdt_limit, idt_base=BOOT_IDT_ADDR, idt_limit=0,
    )
