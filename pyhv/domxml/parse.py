"""Reading a libvirt domain definition.

This covers the subset the engine builds today: name, uuid, memory, vcpu,
direct kernel boot (kernel, initrd, cmdline), COM1 as a serial/console, and
the lifecycle actions.  Anything that would change what the guest sees and is
not built is refused with the element's path, never dropped silently.
"""

from __future__ import annotations

from typing import Optional

from pyhv.config import ConfigError, KernelBoot, SerialConfig, VmConfig
from pyhv.errors import PyhvError

_UNITS = {
    "b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
    "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3, "t": 1 << 40, "tib": 1 << 40,
    "tb": 1000 ** 4,
}

#: elements under <devices> that add nothing the guest sees when present like this
_HARMLESS_DEVICES = {"emulator"}


class DomainXmlError(PyhvError):
    """The domain XML is malformed or asks for what pyhv cannot build."""


def _path(el: object) -> str:
    tree = el.getroottree()  # type: ignore[attr-defined]
    return str(tree.getpath(el))


def _text(root: object, xpath: str) -> Optional[str]:
    found = root.xpath(xpath)  # type: ignore[attr-defined]
    if not found:
        return None
    value = found[0].text if hasattr(found[0], "text") else str(found[0])
    return value.strip() if value is not None else ""


def _memory(root: object, name: str) -> Optional[int]:
    found = root.xpath(name)  # type: ignore[attr-defined]
    if not found:
        return None
    el = found[0]
    unit = el.get("unit", "KiB")
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise DomainXmlError(f"{_path(el)}: unknown unit {unit!r}")
    try:
        value = int((el.text or "").strip())
    except ValueError:
        raise DomainXmlError(f"{_path(el)}: {el.text!r} is not a number") from None
    return value * scale


def _serial(root: object) -> SerialConfig:
    chars = root.xpath("devices/serial | devices/console")  # type: ignore[attr-defined]
    if not chars:
        return SerialConfig("null")
    el = chars[0]
    target = el.find("target")
    if target is not None and target.get("type") not in (None, "serial", "isa-serial"):
        raise DomainXmlError(f"{_path(target)}: console target type "
                             f"{target.get('type')!r} is not built yet (supported: serial)")
    kind = el.get("type", "pty")
    source = el.find("source")
    if kind == "file":
        path = source.get("path") if source is not None else None
        if not path:
            raise DomainXmlError(f"{_path(el)}: file serial needs <source path=.../>")
        return SerialConfig("file", path, append=(source.get("append") == "on"))
    if kind in ("pty", "stdio", "null"):
        return SerialConfig(kind)  # type: ignore[arg-type]
    raise DomainXmlError(f"{_path(el)}: serial type {kind!r} is not supported "
                         "(supported: pty, file, stdio, null)")


def parse_domain(xml: bytes, source: str = "<domain>") -> VmConfig:
    from lxml import etree

    try:
        root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as e:
        raise DomainXmlError(f"{source}: malformed XML: {e}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"{source}: root element is <{root.tag}>, expected <domain>")
    for el in root.xpath("devices/*"):
        if el.tag in ("serial", "console") or el.tag in _HARMLESS_DEVICES:
            continue
        if el.tag == "memballoon" and el.get("model") == "none":
            continue
        if el.tag == "controller" and el.get("type") in ("pci", "usb") and \
                el.get("model") in ("pci-root", "pcie-root", "none"):
            continue
        raise DomainXmlError(f"{source}: {_path(el)}: <{el.tag}> is not built by this "
                             "engine yet")
    os_type = _text(root, "os/type")
    if os_type not in (None, "hvm"):
        raise DomainXmlError(f"{source}: /domain/os/type: {os_type!r} is not supported "
                             "(supported: hvm)")
    kernel = _text(root, "os/kernel")
    if not kernel:
        raise DomainXmlError(f"{source}: /domain/os/kernel is missing: pyhv boots "
                             "kernels directly (firmware boot is not supported)")
    memory = _memory(root, "memory") or _memory(root, "currentMemory")
    if memory is None:
        raise DomainXmlError(f"{source}: /domain/memory is missing")
    vcpu_text = _text(root, "vcpu") or "1"
    try:
        vcpus = int(vcpu_text)
    except ValueError:
        raise DomainXmlError(f"{source}: /domain/vcpu: {vcpu_text!r} is not a number") from None
    on_reboot = _text(root, "on_reboot") or "restart"
    if on_reboot not in ("restart", "destroy"):
        raise DomainXmlError(f"{source}: /domain/on_reboot: {on_reboot!r} is not supported "
                             "(supported: restart, destroy)")
    try:
        return VmConfig(
            boot=KernelBoot(kernel, _text(root, "os/initrd") or None,
                            _text(root, "os/cmdline") or ""),
            name=_text(root, "name") or "pyhv",
            uuid=_text(root, "uuid"),
            memory=memory - memory % 4096,
            vcpus=vcpus,
            serial=_serial(root),
            on_reboot=on_reboot,  # type: ignore[arg-type]
        )
    except ConfigError as e:
        raise DomainXmlError(f"{source}: {e}") from None


def load_domain(path: str) -> VmConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DomainXmlError(f"{path}: {e.strerror}") from None
    return parse_domain(data, path)
