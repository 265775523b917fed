"""What the kernel-loader targets share: a small guest RAM and the seed images."""

from __future__ import annotations

from pathlib import Path

from pyhv.engine.layout import MiB
from pyhv.engine.memory import GuestMemory

#: the test guests ``scripts/setup`` builds (tests/guests/build.py), when present
GUESTS = Path("/var/lib/pyhv/guests")
MAX_LEN = 1 << 16

_MEMORY: list[GuestMemory] = []


def memory() -> GuestMemory:
    """16 MiB at 0 and 1 MiB above 4 GiB, bytearray-backed, made once and reused.

    What an input leaves in guest RAM does not matter to the next one.
    """
    if not _MEMORY:
        _MEMORY.append(GuestMemory.from_bytearrays([(0, 16 * MiB), (1 << 32, MiB)]))
    return _MEMORY[0]


def _guest_images(pattern: str) -> list[bytes]:
    if not GUESTS.is_dir():
        return []
    return [p.read_bytes() for p in sorted(GUESTS.glob(pattern))
            if p.is_file() and p.stat().st_size <= MAX_LEN]


def bzimage_seeds() -> list[bytes]:
    """bzImages of the boot tests' builder, header variants, and the test guests."""
    from test_boot_kernel import make_bzimage

    code = bytes(range(256)) * 4
    out = [
        make_bzimage(code=code, pref_address=0x100000, init_size=0x2000),
        make_bzimage(code=code, pref_address=0x200000, init_size=0x400000),
        make_bzimage(code=code, relocatable=False, pref_address=0x100000, init_size=0x1000),
        make_bzimage(code=code, setup_sects=0, pref_address=0x100000),
        make_bzimage(code=code, version=0x020C, header_end=0x248),
        make_bzimage(code=code, version=0x0208, header_end=0x250),
        make_bzimage(code=code, version=0x0206, header_end=0x23C, xloadflags=0),
        make_bzimage(code=code, kernel_alignment=0, pref_address=0x300001),
        make_bzimage(code=code, cmdline_size=0, initrd_addr_max=0),
        make_bzimage(),
    ]
    return out + _guest_images("bzImage*")


def elf_seeds() -> list[bytes]:
    """ELF kernels of the boot tests' builder (with and without a PVH note), and the guests."""
    from test_boot_kernel import make_elf, pvh_note

    body = bytes(range(256)) * 2
    out = [
        make_elf([(0x100000, 0xFFFFFFFF81000000, body, 0x1000)], 0x100000),
        make_elf([(0x100000, 0xFFFFFFFF81000000, body, 0x1000)], 0xFFFFFFFF81000010),
        make_elf([(0x100000, 0x100000, body, 0x2000), (0x200000, 0x200000, body, len(body))],
                 0x200000, notes=[pvh_note(0x100040)]),
        make_elf([(0x100000, 0x100000, body, 0x1000)], 0x100000,
                 notes=[pvh_note(0x100040, 8), (b"GNU", 3, b"\x01\x02\x03\x04")]),
        make_elf([(0x100000, 0x100000, body, len(body))], 0x100000,
                 notes=[(b"Xen", 18, b"\x00")]),
        make_elf([(1 << 32, 1 << 32, body, 0x1000)], 1 << 32),
        make_elf([], 0),
        make_elf([], 0, elfclass=32),
        make_elf([(0x100000, 0x100000, body, 0x1000)], 0x100000, machine=3),
    ]
    return out + _guest_images("*.elf")
