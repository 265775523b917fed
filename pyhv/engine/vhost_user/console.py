"""``pyhv vhost-user-console``: virtio consoles served over vhost-user until SIGTERM
or SIGINT.

The device is the engine's :class:`~pyhv.engine.virtio.console.VirtioConsole`
(virtio-serial with MULTIPORT): port 0 is a console (the guest's hvc0), and each
``--port NAME=END`` a named port (the guest's /dev/virtio-ports/NAME), in order
from port 1.  Each port's host end is one of the engine's: ``stdio``,
``file:PATH``, ``unix:PATH`` (pyhv listens; one client at a time), ``pty`` or
``null``.  The device has ``2 * (ports + 1)`` queues: port 0's pair, the control
pair, then each further port's pair; a generic front (QEMU's
``vhost-user-device-pci,virtio-id=3,num_vqs=N,config_size=12``) must ask for
that many.
"""

from __future__ import annotations

import re

from pyhv.config import ConfigError, SerialConfig, parse_host_end
from pyhv.engine.chardev import ConsoleError, HostEnd, open_end
from pyhv.engine.vhost_user.serve import serve
from pyhv.engine.virtio.console import Port, VirtioConsole

#: named ports a guest can be given (the device's limit is 31 ports with port 0)
MAX_NAMED = 30
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def port_spec(spec: str) -> tuple[str, SerialConfig]:
    """``NAME=END`` of ``--port``."""
    name, eq, end = spec.partition("=")
    if not eq or not _NAME.fullmatch(name):
        raise ConfigError(f"--port {spec}: expected NAME=END, NAME of letters, digits "
                          f"and _.:- (as org.qemu.guest_agent.0)")
    return name, parse_host_end(end, f"--port {name}=", unix=True)


def make_device(console: str = "stdio", ports: tuple[str, ...] = ()) -> VirtioConsole:
    """The device with its host ends open; :class:`ConfigError` or
    :class:`~pyhv.engine.chardev.ConsoleError` (one line) for bad options or ends
    that cannot be opened (the ones already opened are closed)."""
    if len(ports) > MAX_NAMED:
        raise ConfigError(f"vhost-user-console: {len(ports)} named ports, at most "
                          f"{MAX_NAMED}")
    named = [port_spec(p) for p in ports]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError("vhost-user-console: a --port name is given twice")
    specs = [("console", parse_host_end(console, "--console", unix=True))] + named
    ends: list[HostEnd] = []
    try:
        for what, cfg in specs:
            ends.append(open_end(cfg, f"vhost-user-console {what}"))
    except (ConsoleError, ConfigError):
        for end in ends:
            end.close()
        raise
    made = [Port(0, ends[0], None, True, "console0")]
    made += [Port(nr, end, name, False, name)
             for nr, ((name, _cfg), end) in enumerate(zip(named, ends[1:]), start=1)]
    return VirtioConsole(made, max_ports=len(made))


def run(socket_path: str, console: str = "stdio", ports: tuple[str, ...] = ()) -> int:
    """Serve the consoles at ``socket_path``; the exit status."""
    device = make_device(console, ports)
    try:
        return serve(socket_path, device)
    finally:
        for port in device.ports.values():
            port.end.close()
