"""Validation against libvirt's own RelaxNG schema, when it is installed.

Debian's libvirt packages install ``/usr/share/libvirt/schemas/domain.rng``
(it includes the other ``.rng`` files).  The compiled schema is cached per
process; without the schema, validation is skipped (``available()`` says so).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any, Optional

SCHEMA_DIR = "/usr/share/libvirt/schemas"
DOMAIN_RNG = os.path.join(SCHEMA_DIR, "domain.rng")


def available(path: str = DOMAIN_RNG) -> bool:
    return os.path.isfile(path)


@lru_cache(maxsize=4)
def _schema(path: str) -> Any:
    from lxml import etree

    return etree.RelaxNG(file=path)


def schema_error(tree: Any, path: str = DOMAIN_RNG) -> Optional[tuple[int, str, str]]:
    """(line, element path, message) of the first schema violation; None when valid.

    None too when the schema is not installed.
    """
    if not available(path):
        return None
    schema = _schema(path)
    if schema.validate(tree):
        return None
    entries = list(schema.error_log)
    if not entries:
        return (0, "/", "does not match libvirt's domain schema")
    # libxml2 logs the innermost failure first, then its ancestors with vaguer
    # messages ("Invalid sequence in interleave").  An element that does not fit
    # an interleave is logged without a line or path ("Extra element vcpu in
    # interleave"): find it under the next entry's element.
    first = entries[0]
    if first.path:
        return (int(first.line or 0), first.path, first.message)
    match = re.search(r"[Ee]lement (\S+)", first.message)
    parent = next((e for e in entries[1:] if e.path), None)
    if parent is not None:
        found = tree.xpath(parent.path)
        if match and found:
            for child in found[0]:
                if isinstance(child.tag, str) and child.tag == match.group(1):
                    return (child.sourceline or 0, tree.getpath(child), first.message)
        return (int(parent.line or 0), parent.path, first.message)
    return (int(first.line or 0), "/", first.message)
