"""The KVM userspace ABI (x86_64): kernel structs for cffi, ioctl numbers, constants.

Declared once here, from ``linux/kvm.h`` and ``asm/kvm.h``; every ioctl number
is derived from its ``_IO/_IOR/_IOW/_IOWR`` definition and the size of the
struct it carries.  ``tests/test_kvm_abi.py`` compiles a C program against the
host's kernel headers and checks every size, offset and number below.
"""

from __future__ import annotations

CDEF = r"""
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags;
    uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[4];
};
struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw, fsw; uint8_t ftwx, pad1; uint16_t last_opcode;
    uint64_t last_ip, last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr, pad2;
};
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx; uint32_t padding[3];
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_pic_state {
    uint8_t last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll,
            special_mask, init_state, auto_eoi, rotate_on_auto_eoi,
            special_fully_nested_mode, init4, elcr, elcr_mask;
};
struct kvm_ioapic_state {
    uint64_t base_address; uint32_t ioregsel, id, irr, pad;
    uint64_t redirtbl[24];
};
struct kvm_irqchip {
    uint32_t chip_id; uint32_t pad;
    union { char dummy[512]; struct kvm_pic_state pic; struct kvm_ioapic_state ioapic; } chip;
};
struct kvm_pit_config { uint32_t flags; uint32_t pad[15]; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
struct kvm_irq_routing_msi { uint32_t address_lo, address_hi, data, devid; };
struct kvm_irq_routing_entry {
    uint32_t gsi, type, flags, pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
};
struct kvm_irq_routing { uint32_t nr; uint32_t flags; struct kvm_irq_routing_entry entries[]; };
struct kvm_irqfd { uint32_t fd, gsi, flags, resamplefd; uint8_t pad[16]; };
struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; uint8_t pad[36];
};
struct kvm_msi { uint32_t address_lo, address_hi, data, flags, devid; uint8_t pad[12]; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_vcpu_events {
    struct { uint8_t injected, nr, has_error_code, pending; uint32_t error_code; } exception;
    struct { uint8_t injected, nr, soft, shadow; } interrupt;
    struct { uint8_t injected, pending, masked, pad; } nmi;
    uint32_t sipi_vector; uint32_t flags;
    struct { uint8_t smm, pending, smm_inside_nmi, latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};
struct kvm_enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; uint8_t pad[64]; };
struct kvm_run {
    uint8_t request_interrupt_window; uint8_t immediate_exit; uint8_t padding1[6];
    uint32_t exit_reason; uint8_t ready_for_interrupt_injection; uint8_t if_flag; uint16_t flags;
    uint64_t cr8; uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                 uint64_t data_offset; } io;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        char padding[256];
    };
    uint64_t kvm_valid_regs; uint64_t kvm_dirty_regs;
};
int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
"""

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def io(nr: int) -> int:
    """``_IO(KVMIO, nr)``"""
    return _ioc(_IOC_NONE, nr, 0)


def ior(nr: int, size: int) -> int:
    """``_IOR(KVMIO, nr, type)``: the kernel writes ``size`` bytes back."""
    return _ioc(_IOC_READ, nr, size)


def iow(nr: int, size: int) -> int:
    """``_IOW(KVMIO, nr, type)``: the kernel reads ``size`` bytes."""
    return _ioc(_IOC_WRITE, nr, size)


def iowr(nr: int, size: int) -> int:
    """``_IOWR(KVMIO, nr, type)``"""
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


#: (name, constructor, nr, struct whose size is encoded, or None)
IOCTL_DEFS: tuple[tuple[str, str, int, str | None], ...] = (
    # system ioctls
    ("KVM_GET_API_VERSION", "io", 0x00, None),
    ("KVM_CREATE_VM", "io", 0x01, None),
    ("KVM_GET_MSR_INDEX_LIST", "iowr", 0x02, "struct kvm_msr_list"),
    ("KVM_CHECK_EXTENSION", "io", 0x03, None),
    ("KVM_GET_VCPU_MMAP_SIZE", "io", 0x04, None),
    ("KVM_GET_SUPPORTED_CPUID", "iowr", 0x05, "struct kvm_cpuid2"),
    # VM ioctls
    ("KVM_CREATE_VCPU", "io", 0x41, None),
    ("KVM_SET_USER_MEMORY_REGION", "iow", 0x46, "struct kvm_userspace_memory_region"),
    ("KVM_SET_TSS_ADDR", "io", 0x47, None),
    ("KVM_SET_IDENTITY_MAP_ADDR", "iow", 0x48, "uint64_t"),
    ("KVM_CREATE_IRQCHIP", "io", 0x60, None),
    ("KVM_IRQ_LINE", "iow", 0x61, "struct kvm_irq_level"),
    ("KVM_GET_IRQCHIP", "iowr", 0x62, "struct kvm_irqchip"),
    ("KVM_SET_IRQCHIP", "ior", 0x63, "struct kvm_irqchip"),
    ("KVM_IRQ_LINE_STATUS", "iowr", 0x67, "struct kvm_irq_level"),
    ("KVM_SET_GSI_ROUTING", "iow", 0x6A, "struct kvm_irq_routing"),
    ("KVM_IRQFD", "iow", 0x76, "struct kvm_irqfd"),
    ("KVM_CREATE_PIT2", "iow", 0x77, "struct kvm_pit_config"),
    ("KVM_IOEVENTFD", "iow", 0x79, "struct kvm_ioeventfd"),
    ("KVM_ENABLE_CAP", "iow", 0xA3, "struct kvm_enable_cap"),
    ("KVM_SIGNAL_MSI", "iow", 0xA5, "struct kvm_msi"),
    # vCPU ioctls
    ("KVM_RUN", "io", 0x80, None),
    ("KVM_GET_REGS", "ior", 0x81, "struct kvm_regs"),
    ("KVM_SET_REGS", "iow", 0x82, "struct kvm_regs"),
    ("KVM_GET_SREGS", "ior", 0x83, "struct kvm_sregs"),
    ("KVM_SET_SREGS", "iow", 0x84, "struct kvm_sregs"),
    ("KVM_GET_MSRS", "iowr", 0x88, "struct kvm_msrs"),
    ("KVM_SET_MSRS", "iow", 0x89, "struct kvm_msrs"),
    ("KVM_GET_FPU", "ior", 0x8C, "struct kvm_fpu"),
    ("KVM_SET_FPU", "iow", 0x8D, "struct kvm_fpu"),
    ("KVM_GET_LAPIC", "ior", 0x8E, "struct kvm_lapic_state"),
    ("KVM_SET_LAPIC", "iow", 0x8F, "struct kvm_lapic_state"),
    ("KVM_SET_CPUID2", "iow", 0x90, "struct kvm_cpuid2"),
    ("KVM_GET_CPUID2", "iowr", 0x91, "struct kvm_cpuid2"),
    ("KVM_GET_MP_STATE", "ior", 0x98, "struct kvm_mp_state"),
    ("KVM_SET_MP_STATE", "iow", 0x99, "struct kvm_mp_state"),
    ("KVM_GET_VCPU_EVENTS", "ior", 0x9F, "struct kvm_vcpu_events"),
    ("KVM_SET_VCPU_EVENTS", "iow", 0xA0, "struct kvm_vcpu_events"),
    ("KVM_SET_TSC_KHZ", "io", 0xA2, None),
    ("KVM_GET_TSC_KHZ", "io", 0xA3, None),
    ("KVM_KVMCLOCK_CTRL", "io", 0xAD, None),
)

KVM_API_VERSION = 12

# capabilities (KVM_CAP_*)
CAP_IRQCHIP = 0
CAP_HLT = 1
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_EXT_CPUID = 7
CAP_NR_VCPUS = 9
CAP_MP_STATE = 14
CAP_IRQ_ROUTING = 25
CAP_IRQ_INJECT_STATUS = 26
CAP_IRQFD = 32
CAP_PIT2 = 33
CAP_IOEVENTFD = 36
CAP_VCPU_EVENTS = 41
CAP_GET_TSC_KHZ = 61
CAP_MAX_VCPUS = 66
CAP_SIGNAL_MSI = 77
CAP_X2APIC_API = 129
CAP_IMMEDIATE_EXIT = 136
CAP_GET_MSR_FEATURES = 153
CAP_PMU_CAPABILITY = 212
CAP_COALESCED_PIO = 162
#: ``KVM_(UN)REGISTER_COALESCED_MMIO``: struct kvm_coalesced_mmio_zone (addr u64,
#: size u32, pio u32) is 16 bytes; the ring's page in a vCPU's mapping (x86)
REGISTER_COALESCED_MMIO = iow(0x67, 16)
UNREGISTER_COALESCED_MMIO = iow(0x68, 16)
COALESCED_MMIO_PAGE_OFFSET = 2

#: KVM_CAP_PMU_CAPABILITY's argument: no virtual PMU for the VM's vCPUs
PMU_CAP_DISABLE = 1 << 0

# exit reasons (KVM_EXIT_*)
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_NMI = 16
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
EXIT_IOAPIC_EOI = 26

EXIT_IO_IN = 0
EXIT_IO_OUT = 1

SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3
MP_STATE_SIPI_RECEIVED = 4

IRQ_ROUTING_IRQCHIP = 1
IRQ_ROUTING_MSI = 2
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

IRQFD_FLAG_DEASSIGN = 1 << 0
IRQFD_FLAG_RESAMPLE = 1 << 1
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2

PIT_SPEAKER_DUMMY = 1
MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1
CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
