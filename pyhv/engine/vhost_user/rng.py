"""``pyhv vhost-user-rng``: entropy served over vhost-user until SIGTERM or SIGINT.

The device is the engine's :class:`~pyhv.engine.virtio.rng.VirtioRng`: the host's
random source, optionally rate limited (its timer runs on the serving loop).
"""

from __future__ import annotations

from typing import Optional

from pyhv.config import ConfigError, RngConfig
from pyhv.engine.vhost_user.serve import serve
from pyhv.engine.virtio.rng import VirtioRng

__all__ = ["make_device", "serve"]


def make_device(source: str = "/dev/urandom", max_bytes: Optional[int] = None,
                period_ms: Optional[int] = None) -> VirtioRng:
    """The device; :class:`~pyhv.config.ConfigError` (one line) for bad options."""
    if (max_bytes is None) != (period_ms is None):
        raise ConfigError("vhost-user-rng: --max-bytes and --period go together")
    cfg = RngConfig(source, max_bytes, period_ms)
    return VirtioRng(cfg.source, cfg.rate_bytes, cfg.rate_period_ms)
