"""pyhv test guests: sources, build script and report parser (see README.md)."""

from .build import GuestImages, build_guests
from .report import Report, initrd_checksum, parse_report

__all__ = ["GuestImages", "Report", "build_guests", "initrd_checksum", "parse_report"]
