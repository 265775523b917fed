"""libvirt domain XML → :class:`pyhv.config.VmConfig`."""

from pyhv.domxml.parse import DomainXmlError, load_domain, parse_domain

__all__ = ["DomainXmlError", "load_domain", "parse_domain"]
