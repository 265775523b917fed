"""pyhv-qemu: QEMU's command line and QMP in front of the engine (to come)."""
