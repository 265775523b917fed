"""Named x86 CPU models, read from libvirt's CPU map at run time.

The map (``/usr/share/libvirt/cpu_map``, installed with libvirt) lists vendors,
every feature as CPUID bits (or MSR bits) and every model as a vendor, a
family/model/stepping signature and a feature list, possibly on top of another
model.  pyhv reads it lazily, the first time a named model, ``host-model`` or a
feature change is asked for, and adds QEMU's spellings: feature names with
``_``, ``-`` or ``.`` (``sse4.1``/``sse4_1``/``sse4-1``), the aliases the map
gives (``pclmulqdq``, ``sse3``...), versioned model names (``EPYC-Rome-v1``) and
the models QEMU defines without a vendor in the map (``qemu64``, ``kvm64``).

The CPUID table a model gives a guest is built by :mod:`pyhv.engine.cpuid`;
this module only knows the map and the ``-cpu`` option's syntax.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterable, Optional

from pyhv.config import ConfigError

#: where libvirt installs the map; ``PYHV_CPU_MAP`` overrides it
CPU_MAP_DIR = "/usr/share/libvirt/cpu_map"

REGS = ("eax", "ebx", "ecx", "edx")

#: (leaf, subleaf, register index 0-3)
Word = tuple[int, int, int]

#: QEMU's signatures for the models the map lists without vendor and signature
#: (vendor name, family, model, stepping)
_QEMU_SIGNATURES = {
    "qemu64": ("AMD", 15, 107, 1),
    "qemu32": ("Intel", 6, 6, 3),
    "kvm64": ("Intel", 15, 6, 1),
    "kvm32": ("Intel", 15, 6, 1),
    "cpu64-rhel6": ("AMD", 6, 13, 3),
    "cpu64-rhel5": ("AMD", 6, 2, 3),
    "486": ("Intel", 4, 8, 0),
    "pentium": ("Intel", 5, 4, 3),
    "pentium2": ("Intel", 6, 5, 2),
    "pentium3": ("Intel", 6, 7, 3),
    "pentiumpro": ("Intel", 6, 1, 3),
}

#: names that are not models in the map but QEMU accepts for ``-cpu``
SPECIAL_MODELS = ("host", "max", "base")

#: what QEMU's KVM accelerator changes in every named model
KVM_DEFAULT_ON = ("x2apic",)
KVM_DEFAULT_OFF = ("acpi", "monitor", "svm")


class CpuModelError(ConfigError):
    """A CPU model, feature or property the map or pyhv does not know."""


def normalize(name: str) -> str:
    """The key QEMU's spellings of one feature share (``sse4.1`` → ``sse4-1``)."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


@dataclass(frozen=True)
class Feature:
    name: str
    #: CPUID bits: (word, mask)
    cpuid: tuple[tuple[Word, int], ...] = ()
    #: MSR bits: (index, 64-bit mask)
    msr: tuple[tuple[int, int], ...] = ()
    migratable: bool = True


@dataclass(frozen=True)
class Model:
    name: str
    vendor: Optional[str]
    family: int
    model: int
    stepping: int
    features: frozenset[str]

    @property
    def signature(self) -> int:
        """CPUID leaf 1 EAX for this family/model/stepping."""
        return encode_signature(self.family, self.model, self.stepping)


def encode_signature(family: int, model: int, stepping: int) -> int:
    ext_family = max(family - 15, 0) if family >= 15 else 0
    base_family = 15 if family >= 15 else family
    return ((ext_family & 0xFF) << 20) | (((model >> 4) & 0xF) << 16) | \
        ((base_family & 0xF) << 8) | ((model & 0xF) << 4) | (stepping & 0xF)


def decode_signature(eax: int) -> tuple[int, int, int]:
    """(family, model, stepping) from CPUID leaf 1 EAX."""
    base_family = (eax >> 8) & 0xF
    family = base_family + ((eax >> 20) & 0xFF if base_family == 15 else 0)
    model = (eax >> 4) & 0xF
    if base_family in (6, 15):
        model |= ((eax >> 16) & 0xF) << 4
    return family, model, eax & 0xF


def vendor_words(vendor: str) -> tuple[int, int, int]:
    """A 12-character vendor string as CPUID leaf 0 (EBX, EDX, ECX)."""
    raw = vendor.encode("ascii", "replace")[:12].ljust(12, b" ")
    return (int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little"),
            int.from_bytes(raw[8:12], "little"))


def vendor_string(ebx: int, edx: int, ecx: int) -> str:
    raw = b"".join(v.to_bytes(4, "little") for v in (ebx, edx, ecx))
    return raw.decode("ascii", "replace")


def _int(text: Optional[str]) -> int:
    return int(text, 0) if text else 0


@dataclass
class CpuMap:
    """The parsed map: vendors, features (with every spelling) and models."""

    vendors: dict[str, str] = field(default_factory=dict)
    features: dict[str, Feature] = field(default_factory=dict)
    #: normalized spelling → the map's feature name
    spellings: dict[str, str] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)

    # ---- look-ups ---------------------------------------------------------------
    def feature_name(self, name: str, where: str = "cpu") -> str:
        canonical = self.spellings.get(normalize(name))
        if canonical is None:
            raise CpuModelError(f"{where}: unknown CPU feature {name!r}")
        return canonical

    def model(self, name: str, where: str = "cpu") -> Model:
        m = self.models.get(name)
        if m is None and name.endswith("-v1"):
            m = self.models.get(name[:-3])
        if m is None:
            lower = {k.lower(): v for k, v in self.models.items()}
            m = lower.get(name.lower())
        if m is None:
            raise CpuModelError(f"{where}: unknown CPU model {name!r} (the models are "
                                f"libvirt's CPU map, {map_dir()})")
        return m

    def words(self) -> set[Word]:
        """Every CPUID register that holds a feature the map knows."""
        return {w for f in self.features.values() for w, _ in f.cpuid}

    def bits(self, names: Iterable[str]) -> dict[Word, int]:
        out: dict[Word, int] = {}
        for n in names:
            for w, mask in self.features[n].cpuid:
                out[w] = out.get(w, 0) | mask
        return out

    def msr_bits(self, names: Iterable[str]) -> dict[int, int]:
        out: dict[int, int] = {}
        for n in names:
            for index, mask in self.features[n].msr:
                out[index] = out.get(index, 0) | mask
        return out

    def present(self, words: dict[Word, int]) -> set[str]:
        """The CPUID features whose bits are all set in ``words``."""
        return {f.name for f in self.features.values() if f.cpuid and
                all(words.get(w, 0) & m == m for w, m in f.cpuid)}

    def usable_models(self) -> list[str]:
        return sorted(self.models)


def map_dir() -> str:
    return os.environ.get("PYHV_CPU_MAP", CPU_MAP_DIR)


_cache: dict[str, CpuMap] = {}


def cpu_map(directory: Optional[str] = None) -> CpuMap:
    """The map in ``directory`` (default :func:`map_dir`), parsed once."""
    d = directory or map_dir()
    if d not in _cache:
        _cache[d] = load(d)
    return _cache[d]


def load(directory: str) -> CpuMap:
    """Parse ``index.xml`` and the x86 files it includes."""
    index = os.path.join(directory, "index.xml")
    try:
        root = ET.parse(index).getroot()
    except FileNotFoundError:
        raise CpuModelError(f"CPU models need libvirt's CPU map: {index} is missing "
                            "(install libvirt's data files)") from None
    except (ET.ParseError, OSError) as e:
        raise CpuModelError(f"{index}: {e}") from None
    arch = next((a for a in root.iter("arch") if a.get("name") == "x86"), None)
    if arch is None:
        raise CpuModelError(f"{index}: no x86 section")
    cmap = CpuMap()
    pending: list[ET.Element] = []
    for inc in arch.iter("include"):
        path = os.path.join(directory, inc.get("filename", ""))
        try:
            part = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            raise CpuModelError(f"{path}: {e}") from None
        for el in part:
            if el.tag == "vendor":
                cmap.vendors[el.get("name", "")] = el.get("string", "")
            elif el.tag == "feature":
                _read_feature(cmap, el, path)
            elif el.tag == "model":
                pending.append(el)
    # nested elements of the top-level tags also count (the file may wrap them)
    for el in pending:
        _read_model(cmap, el)
    return cmap


def _read_feature(cmap: CpuMap, el: ET.Element, path: str) -> None:
    name = el.get("name", "")
    cpuid: list[tuple[Word, int]] = []
    msr: list[tuple[int, int]] = []
    for c in el.findall("cpuid"):
        leaf = _int(c.get("eax_in"))
        sub = c.get("ecx_in")
        for i, reg in enumerate(REGS):
            mask = _int(c.get(reg))
            if mask:
                cpuid.append(((leaf, _int(sub), i), mask))
    for m in el.findall("msr"):
        msr.append((_int(m.get("index")), (_int(m.get("edx")) << 32) | _int(m.get("eax"))))
    cmap.features[name] = Feature(name, tuple(cpuid), tuple(msr),
                                  el.get("migratable", "yes") != "no")
    cmap.spellings[normalize(name)] = name
    for alias in el.findall("alias"):
        cmap.spellings.setdefault(normalize(alias.get("name", "")), name)


def _read_model(cmap: CpuMap, el: ET.Element) -> None:
    name = el.get("name", "")
    vendor: Optional[str] = None
    family = model = stepping = 0
    features: set[str] = set()
    base = el.find("model")
    if base is not None and base.get("name") in cmap.models:
        parent = cmap.models[base.get("name", "")]
        vendor, family, model, stepping = (parent.vendor, parent.family, parent.model,
                                           parent.stepping)
        features |= parent.features
    v = el.find("vendor")
    if v is not None:
        vendor = v.get("name")
    sig = el.find("signature")
    if sig is not None:
        family, model = _int(sig.get("family")), _int(sig.get("model"))
        steps = sig.get("stepping")
        if steps:
            stepping = int(steps.split("-")[-1])
    if vendor is None and name in _QEMU_SIGNATURES:
        vendor, family, model, stepping = _QEMU_SIGNATURES[name]
    for f in el.findall("feature"):
        fname = f.get("name", "")
        if fname in cmap.features:
            features.add(fname)
    cmap.models[name] = Model(name, vendor, family, model, stepping, frozenset(features))


# --------------------------------------------------------------------------- -cpu syntax

#: QEMU -cpu properties that are not feature flags and that pyhv applies
CPU_PROPERTIES = ("check", "enforce", "migratable", "pmu", "vendor", "model-id", "kvm",
                  "l3-cache", "host-phys-bits", "phys-bits", "host-cache-info",
                  "kvm-no-smi-migration", "tsc-frequency", "level", "xlevel", "min-level",
                  "min-xlevel", "family", "model", "stepping", "hv-vendor-id")

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(value: str, what: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise CpuModelError(f"-cpu: property {what!r} takes on or off, not {value!r}")


@dataclass
class CpuOption:
    """``-cpu MODEL,+feat,-feat,feat=on,prop=value`` taken apart."""

    model: str
    #: (feature as written, on?) in order; later ones win
    flags: list[tuple[str, bool]] = field(default_factory=list)
    props: dict[str, str] = field(default_factory=dict)

    @property
    def enforce(self) -> bool:
        return parse_bool(self.props.get("enforce", "off"), "enforce")

    @property
    def check(self) -> bool:
        return parse_bool(self.props.get("check", "on"), "check")


def parse_cpu_option(text: str) -> CpuOption:
    """Split a ``-cpu`` value; feature flags and properties are told apart by the
    map's feature names (``hv-*`` enlightenments are refused here)."""
    model, *rest = text.split(",")
    if not model:
        raise CpuModelError("-cpu: a model name is needed ('-cpu help' lists them)")
    opt = CpuOption(model)
    for item in rest:
        if not item:
            continue
        if item[0] in "+-":
            opt.flags.append((item[1:], item[0] == "+"))
            continue
        key, sep, value = item.partition("=")
        if not sep:
            value = "on"
        if normalize(key).startswith("hv-") and key != "hv-vendor-id":
            raise CpuModelError(f"-cpu: Hyper-V enlightenment {key!r} is not built in pyhv")
        if key in CPU_PROPERTIES:
            opt.props[key] = value
        elif value.lower() in _TRUE + _FALSE:
            opt.flags.append((key, value.lower() in _TRUE))
        else:
            raise CpuModelError(f"-cpu: {key!r} is neither a CPU property nor a feature "
                                f"(a feature takes on or off, not {value!r})")
    return opt


__all__ = ["CPU_MAP_DIR", "CPU_PROPERTIES", "CpuMap", "CpuModelError", "CpuOption", "Feature",
           "Model", "SPECIAL_MODELS", "Word", "cpu_map", "decode_signature",
           "encode_signature", "load", "map_dir", "normalize", "parse_cpu_option",
           "vendor_string", "vendor_words"]
