"""CPU model answers for QMP: definitions, expansion, baseline, comparison.

Every answer is computed the way the engine builds a vCPU
(:func:`pyhv.engine.cpuid.guest_cpu` on this host's KVM_GET_SUPPORTED_CPUID),
so what ``query-cpu-model-expansion`` says a model has is the CPUID a guest
started with that model sees, and ``unavailable-features`` in
``query-cpu-definitions`` is what starting it with ``enforce`` would refuse.
Feature names are QEMU's spellings of libvirt's CPU map names.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from pyhv.config import ConfigError, CpuConfig, CpuFeature, FeaturesConfig
from pyhv.cpumodel import (
    CpuMap,
    CpuModelError,
    Model,
    cpu_map,
    decode_signature,
    vendor_string,
)
from pyhv.engine.cpuid import (
    FEATURE_MSRS,
    CpuidEntry,
    GuestCpu,
    flat_topology,
    guest_cpu,
    words_of,
)
from pyhv.shim.qmp import QmpError

#: libvirt's names that QEMU spells differently (libvirt translates these back)
_QEMU_SPELLING = {"pclmuldq": "pclmulqdq"}

_supported: Optional[list[CpuidEntry]] = None
_feature_msrs: dict[int, int] = {}


def host_cpuid() -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID of this host (read once, with the feature MSRs)."""
    global _supported
    if _supported is None:
        from pyhv.engine.kvm import Kvm, KvmError

        try:
            kvm = Kvm()
        except KvmError as e:
            raise QmpError(f"CPU models need KVM: {e}") from None
        try:
            _supported = kvm.get_supported_cpuid()
            _feature_msrs.update(kvm.get_feature_msrs(list(FEATURE_MSRS)))
        finally:
            kvm.close()
    return _supported


def qemu_name(name: str) -> str:
    """QEMU's spelling of a map feature name (``lahf_lm`` → ``lahf-lm``)."""
    return _QEMU_SPELLING.get(name, name.replace("_", "-"))


def _map() -> CpuMap:
    try:
        return cpu_map()
    except CpuModelError as e:
        raise QmpError(str(e)) from None


def _config(model: dict[str, Any]) -> tuple[CpuConfig, CpuMap]:
    """A QMP CpuModelInfo as the CpuConfig the engine would build (and the map it
    names a model of: ``base`` with properties is a model of its own)."""
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise QmpError("Invalid parameter 'model': needs a name")
    name = model["name"]
    props = model.get("props") or {}
    if not isinstance(props, dict):
        raise QmpError("Invalid parameter 'props': expected an object")
    cmap = _map()
    features: dict[str, CpuFeature] = {}
    vendor = model_id = None
    migratable = True
    for key, value in props.items():
        if key == "migratable":
            migratable = bool(value)
        elif key == "vendor" and isinstance(value, str):
            vendor = value
        elif key == "model-id" and isinstance(value, str):
            model_id = value
        elif isinstance(value, bool):
            try:
                canonical = cmap.feature_name(key, "props")
            except CpuModelError:
                raise QmpError(f"Property '{key}' not found") from None
            features[canonical] = CpuFeature(canonical, "optional" if value else "disable")
        # numeric props (family, level...) describe the model; not changes pyhv applies
    if name in ("host", "max"):
        mode = "host-model" if migratable else "host-passthrough"
        cfg_model = None
    elif name == "base":
        # QEMU's static expansion result: no feature but those the props turn on
        # (libvirt sends one back for a full expansion)
        on = frozenset(f.name for f in features.values() if f.policy == "optional")
        vendor_name = next((k for k, v in cmap.vendors.items() if v == vendor), None)
        base = Model("base", vendor_name, _num(props, "family"), _num(props, "model"),
                     _num(props, "stepping"), on)
        cmap = replace(cmap, models={**cmap.models, "base": base})
        features = {k: f for k, f in features.items() if f.policy == "disable"}
        mode, cfg_model = "custom", "base"
    else:
        try:
            cfg_model = cmap.model(name).name
        except CpuModelError:
            raise QmpError(f"The CPU definition '{name}' cannot be used") from None
        mode = "custom"
    try:
        cfg = CpuConfig(mode, cfg_model, features=tuple(features.values()),  # type: ignore
                        check="none", vendor=vendor, model_id=model_id)
    except ConfigError as e:
        raise QmpError(str(e)) from None
    return cfg, cmap


def _num(props: dict[str, Any], key: str) -> int:
    value = props.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def guest_of(model: dict[str, Any]) -> GuestCpu:
    cfg, cmap = _config(model)
    try:
        return guest_cpu(host_cpuid(), cfg, FeaturesConfig(), feature_msrs=_feature_msrs,
                         cmap=cmap)
    except (ConfigError, CpuModelError) as e:
        raise QmpError(str(e)) from None


def guest_features(cpu: GuestCpu) -> set[str]:
    """The map features the guest's CPUID (vCPU 0) shows."""
    table = cpu.table(0, flat_topology(1))
    return _map().present(words_of(table))


def _props(cpu: GuestCpu, full: bool) -> dict[str, Any]:
    cmap = _map()
    table = cpu.table(0, flat_topology(1))
    words = words_of(table)
    present = cmap.present(words)
    props: dict[str, Any] = {}
    for f in sorted(cmap.features.values(), key=lambda f: f.name):
        if not f.cpuid:
            continue
        props[qemu_name(f.name)] = f.name in present
        if full and qemu_name(f.name) != f.name:
            props[f.name] = f.name in present
    family, model, stepping = decode_signature(words.get((1, 0, 0), 0))
    props["family"], props["model"], props["stepping"] = family, model, stepping
    props["vendor"] = vendor_string(words.get((0, 0, 1), 0), words.get((0, 0, 3), 0),
                                    words.get((0, 0, 2), 0)).rstrip("\0")
    brand = b"".join(words.get((fn, 0, i), 0).to_bytes(4, "little")
                     for fn in (0x80000002, 0x80000003, 0x80000004) for i in range(4))
    props["model-id"] = brand.split(b"\0")[0].decode("ascii", "replace").strip()
    return props


def expansion(kind: str, model: dict[str, Any]) -> dict[str, Any]:
    """``query-cpu-model-expansion``: ``static`` gives ``base`` plus properties that
    recreate the model; ``full`` the model's name with every property."""
    if kind not in ("static", "full"):
        raise QmpError(f"Invalid parameter 'type': {kind!r}")
    cpu = guest_of(model)
    name = model["name"] if kind == "full" else "base"
    return {"model": {"name": name, "props": _props(cpu, kind == "full")}}


def definitions(models: Any) -> list[dict[str, Any]]:
    """``query-cpu-definitions``: each model with the features this host lacks."""
    out = []
    try:
        supported: Optional[list[CpuidEntry]] = host_cpuid()
    except QmpError:
        supported = None  # no KVM here: usability unknown (the field is left out)
    cmap = _map()
    for m in models:
        unavailable: list[str] = []
        if supported is not None and not (m.passthrough or m.static):
            try:
                cpu = guest_cpu(supported, CpuConfig("custom", m.name, check="none"),
                                FeaturesConfig(), feature_msrs=_feature_msrs, cmap=cmap)
                unavailable = [qemu_name(f) for f in cpu.filtered]
            except (ConfigError, CpuModelError):
                continue
        d = {"name": m.name, "typename": m.typename, "static": m.static,
             "migration-safe": m.migration_safe, "deprecated": False}
        if supported is not None:
            d["unavailable-features"] = unavailable
        out.append(d)
    return out


def comparison(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    fa, fb = guest_features(guest_of(a)), guest_features(guest_of(b))
    if fa == fb:
        result = "identical"
    elif fa > fb:
        result = "superset"
    elif fa < fb:
        result = "subset"
    else:
        result = "incompatible"
    return {"result": result, "responsible-properties": sorted(qemu_name(f) for f in fa ^ fb)}


def baseline(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The features both models have, as a static (``base``) model."""
    common = guest_features(guest_of(a)) & guest_features(guest_of(b))
    cmap = _map()
    props = {qemu_name(f.name): f.name in common for f in cmap.features.values() if f.cpuid}
    return {"model": {"name": "base", "props": props}}


__all__ = ["baseline", "comparison", "definitions", "expansion", "guest_features", "guest_of",
           "host_cpuid", "qemu_name"]
