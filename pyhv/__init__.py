"""pyhv: a KVM hypervisor in Python that libvirt manages like QEMU."""

__version__ = "0.1.0"
