"""Firmware tables a pyhv guest reads: ACPI (RSDP, XSDT, FADT, MADT, DSDT, ...) and MP.

:func:`write_acpi` places the ACPI tables at :data:`layout.ACPI_ADDR` (RSDP
first, in the BIOS scan area) and :func:`write_mptable` the Intel MP table in
the EBDA; :func:`build_acpi` and :func:`build_mptable` are their pure halves.
"""

from pyhv.engine.acpi.aml import AcpiError
from pyhv.engine.acpi.mptable import MPTABLE_MAX_CPUS, build_mptable, write_mptable
from pyhv.engine.acpi.tables import (
    MAX_CPUS,
    AcpiPlatform,
    AcpiTables,
    build_acpi,
    checksum,
    write_acpi,
)

__all__ = [
    "MAX_CPUS",
    "MPTABLE_MAX_CPUS",
    "AcpiError",
    "AcpiPlatform",
    "AcpiTables",
    "build_acpi",
    "build_mptable",
    "checksum",
    "write_acpi",
    "write_mptable",
]
