"""The Linux x86 boot protocol image (bzImage): header parsing and loading.

Offsets follow Documentation/arch/x86/boot.rst; the setup header starts at
0x1f1 in the file and is copied to the same offset of the zero page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyhv.engine.boot.errors import KernelError, size_text
from pyhv.engine.boot.image import KernelImage
from pyhv.engine.layout import CMDLINE_MAX, HIMEM_START
from pyhv.engine.memory import GuestMemory

SETUP_HEADER_OFFSET = 0x1F1
#: the zero page's ``hdr`` ends where ``edd_mbr_sig_buffer`` begins
SETUP_HEADER_LIMIT = 0x290
HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_VERSION = 0x0206
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
#: initrd_addr_max of protocols before 2.03
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF
#: offset of the 64-bit entry point from the start of the protected-mode code
ENTRY64_OFFSET = 0x200


def version_text(version: int) -> str:
    """``0x020f`` as ``"2.15"``."""
    return f"{version >> 8}.{version & 0xFF:02d}"


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage setup header this package uses."""

    setup_sects: int
    syssize: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    #: the raw header bytes, from 0x1f1 to the end the jump at 0x200 gives
    raw: bytes

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode code: boot sector plus setup sectors."""
        return (self.setup_sects + 1) * 512


def is_bzimage(data: bytes) -> bool:
    """Whether ``data`` starts like a bzImage (``HdrS`` at 0x202)."""
    return data[0x202:0x206] == HDRS_MAGIC


def _field(data: bytes, fmt: str, offset: int, version: int, since: int) -> int:
    """A header field, 0 when the protocol version or header length lacks it."""
    end = 0x202 + data[0x201]
    if version < since or offset + struct.calcsize(fmt) > min(len(data), end):
        return 0
    return int(struct.unpack_from(fmt, data, offset)[0])


def parse_setup_header(data: bytes, path: str) -> SetupHeader:
    """Validate and decode the setup header at the start of ``data``."""
    if len(data) < 0x206 or not is_bzimage(data):
        raise KernelError(f"{path}: not a Linux kernel (no bzImage header, not ELF)")
    if len(data) < 0x208:
        raise KernelError(f"{path}: truncated bzImage ({len(data)} bytes)")
    boot_flag, = struct.unpack_from("<H", data, 0x1FE)
    if boot_flag != BOOT_FLAG:
        raise KernelError(f"{path}: bad bzImage boot flag 0x{boot_flag:04x} (need 0xaa55)")
    version, = struct.unpack_from("<H", data, 0x206)
    if version < MIN_VERSION:
        raise KernelError(f"{path}: boot protocol {version_text(version)} too old "
                          f"(need {version_text(MIN_VERSION)})")
    end = min(0x202 + data[0x201], SETUP_HEADER_LIMIT)
    if end > len(data) or end < 0x23C:
        raise KernelError(f"{path}: truncated bzImage setup header "
                          f"(header ends at 0x{end:x}, file is {len(data)} bytes)")
    setup_sects = data[0x1F1] or 4
    return SetupHeader(
        setup_sects=setup_sects,
        syssize=_field(data, "<I", 0x1F4, version, 0x0204),
        version=version,
        loadflags=data[0x211],
        initrd_addr_max=_field(data, "<I", 0x22C, version, 0x0203) or DEFAULT_INITRD_ADDR_MAX,
        kernel_alignment=_field(data, "<I", 0x230, version, 0x0205),
        relocatable_kernel=bool(_field(data, "<B", 0x234, version, 0x0205)),
        xloadflags=_field(data, "<H", 0x236, version, 0x020C),
        cmdline_size=_field(data, "<I", 0x238, version, 0x0206),
        payload_offset=_field(data, "<I", 0x248, version, 0x0208),
        payload_length=_field(data, "<I", 0x24C, version, 0x0208),
        pref_address=_field(data, "<Q", 0x258, version, 0x020A),
        init_size=_field(data, "<I", 0x260, version, 0x020A),
        raw=bytes(data[SETUP_HEADER_OFFSET:end]),
    )


def protected_mode_code(data: bytes, hdr: SetupHeader, path: str) -> memoryview:
    """The protected-mode part of the image (what is loaded at 1 MiB or higher)."""
    start = hdr.setup_size
    if start >= len(data):
        raise KernelError(f"{path}: truncated bzImage (file is {len(data)} bytes, "
                          f"setup alone needs {start})")
    code = memoryview(data)[start:]
    if hdr.syssize and len(code) < hdr.syssize * 16:
        raise KernelError(f"{path}: truncated bzImage (kernel is {len(code)} bytes, "
                          f"header says {hdr.syssize * 16})")
    return code


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align if align > 1 else value


def _runtime_start(hdr: SetupHeader, load: int) -> int:
    """Where the kernel decompresses itself when entered at ``load + 0x200``.

    This mirrors the 64-bit ``startup_64`` code: a relocatable kernel runs at
    its load address aligned up to ``kernel_alignment`` but never below
    ``pref_address`` (LOAD_PHYSICAL_ADDR); any other runs at ``pref_address``.
    """
    if not hdr.pref_address:
        return load
    if hdr.relocatable_kernel:
        return max(_align_up(load, hdr.kernel_alignment), hdr.pref_address)
    return hdr.pref_address


def _claim(hdr: SetupHeader, load: int, size: int) -> tuple[int, int, int]:
    """``(runtime start, start, end)`` of the memory a kernel loaded at ``load`` uses."""
    runtime = _runtime_start(hdr, load)
    start = min(load, runtime)
    end = max(load + size, runtime + hdr.init_size)
    return runtime, start, end


def _fits(memory: GuestMemory, hdr: SetupHeader, load: int, size: int) -> bool:
    runtime, _, _ = _claim(hdr, load, size)
    return memory.contains(load, size) and memory.contains(runtime, max(hdr.init_size, 1))


def load_bzimage(memory: GuestMemory, data: bytes, path: str) -> KernelImage:
    """Copy a bzImage's protected-mode code into guest RAM (64-bit protocol)."""
    hdr = parse_setup_header(data, path)
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise KernelError(f"{path}: bzImage has no 64-bit entry point (boot protocol "
                          f"{version_text(hdr.version)}, XLF_KERNEL_64 not set)")
    code = protected_mode_code(data, hdr, path)
    size = len(code)
    load = HIMEM_START
    if (hdr.version >= 0x020A and hdr.relocatable_kernel and hdr.pref_address
            and _fits(memory, hdr, hdr.pref_address, size)):
        load = hdr.pref_address
    if not _fits(memory, hdr, load, size):
        _, start, end = _claim(hdr, load, size)
        raise KernelError(f"{path}: kernel does not fit in {size_text(memory.size)} of RAM "
                          f"(it needs 0x{start:x}-0x{end - 1:x})")
    memory.write(load, code)
    _, _, end = _claim(hdr, load, size)
    cmdline_max = min(hdr.cmdline_size, CMDLINE_MAX - 1) if hdr.cmdline_size else 255
    return KernelImage(
        path=path,
        format="bzimage",
        protocol="linux64",
        entry=load + ENTRY64_OFFSET,
        load_start=load,
        load_end=end,
        setup_header=hdr.raw,
        protocol_version=hdr.version,
        cmdline_max=cmdline_max,
        initrd_addr_max=hdr.initrd_addr_max,
    )
