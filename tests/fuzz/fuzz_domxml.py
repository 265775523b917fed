"""libvirt domain XML → ``VmConfig`` (``pyhv.domxml.map_domain``), without schema validation.

Accepted: a mapping, or a :class:`PyhvError` (``DomainXmlError``) with a one-line
message.  An accepted domain must also survive what ``pyhv domxml check`` and
``pyhv run`` do next (the support check and the device plan), and write back
to XML that maps to an equal config (``parse_domain(to_xml(cfg)) == cfg``, the
round trip ``pyhv.domxml.write`` promises).
"""

from __future__ import annotations

import importlib
from typing import Any

from fuzz.common import ROOT, Finding, module_path, one_line, string_constants, unique
from pyhv.domxml import map_domain, to_xml
from pyhv.domxml import parse as domparse
from pyhv.domxml.check import describe, plan_devices
from pyhv.engine.support import issues
from pyhv.errors import PyhvError

MAX_LEN = 8192
SOURCE = "fuzz.xml"


def TARGET(data: bytes) -> None:
    try:
        mapping = map_domain(data, SOURCE, validate=False)
    except PyhvError as e:
        one_line(e)
        return
    cfg = mapping.config
    issues(cfg)
    plan_devices(cfg)
    describe(cfg, mapping.notes)
    xml = to_xml(cfg)
    try:
        again = map_domain(xml.encode(), "to_xml", validate=False).config
    except PyhvError as e:
        raise Finding(f"to_xml wrote XML that does not map back: {e}\n{xml}") from e
    if again != cfg:
        raise Finding(f"round trip changed the config:\n{cfg}\n{again}\n{xml}")


def _test_xmls() -> list[str]:
    try:
        tests: Any = importlib.import_module("test_domxml")
    except Exception:  # the seeds are a help, not a requirement
        return []
    out = [xml for xml, _ in getattr(tests, "ERRORS", [])]
    dom = getattr(tests, "dom", None)
    if callable(dom):
        out.append(dom())
    full = getattr(tests, "_full_config", None)
    if callable(full):
        out.append(to_xml(full()))
    return out


def seeds() -> list[bytes]:
    out = [p.read_bytes() for p in sorted((ROOT / "examples" / "domains").glob("*.xml"))]
    out += [x.encode() for x in _test_xmls()]
    return unique(out)


def dictionary() -> list[bytes]:
    from lxml import etree

    tokens = set()
    for path in sorted((ROOT / "examples" / "domains").glob("*.xml")):
        for el in etree.fromstring(path.read_bytes()).iter():
            if isinstance(el.tag, str):
                tokens |= {f"<{el.tag}", f"</{el.tag}>", f"<{el.tag}/>"}
                tokens |= {f" {name}='" for name in el.attrib}
    tokens |= {f"'{s}'" for s in string_constants([module_path(domparse)])
               if s.isidentifier() or s.replace("-", "").isalnum()}
    tokens |= {"/>", "'>", "<!--", "-->", "<![CDATA[", "]]>", "&amp;", "&#10;", "xmlns="}
    return sorted(t.encode() for t in tokens)
