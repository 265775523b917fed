"""The native KVM virtual machine monitor.

Nothing in this package knows about libvirt XML or QEMU's command line: it is
driven by :class:`pyhv.config.VmConfig`.
"""
