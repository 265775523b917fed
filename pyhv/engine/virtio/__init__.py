"""Virtio: the split virtqueue and, on it, the transport and devices."""
