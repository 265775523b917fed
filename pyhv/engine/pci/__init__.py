"""PCI: configuration space, functions and bridges, the host bridge's access
mechanisms (port 0xCF8/0xCFC, ECAM), and the firmware's resource assignment."""
