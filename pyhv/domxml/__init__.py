"""libvirt domain XML ↔ :class:`pyhv.config.VmConfig`.

``load_domain(path)`` is what ``pyhv run DOMAIN.xml`` uses (it refuses what the
engine cannot build yet); ``parse_domain``/``map_domain`` give the full
mapping; ``to_xml`` writes a config back; ``check.run_check`` is
``pyhv domxml check``.
"""

from pyhv.domxml.parse import (
    DomainMapping,
    DomainXmlError,
    load_domain,
    map_domain,
    parse_domain,
)
from pyhv.domxml.write import to_xml

__all__ = ["DomainMapping", "DomainXmlError", "load_domain", "map_domain", "parse_domain",
           "to_xml"]
