"""A private libvirtd + virtlogd for tests (a helper, not a pytest plugin).

Why a mount namespace: a libvirtd running as root is "privileged", and a
privileged libvirt 9.0 uses fixed paths that no option moves: ``qemu.conf`` and
the persistent domain definitions under ``/etc/libvirt``, the driver state and
virtlogd's socket under ``/run/libvirt`` (``/run/libvirt/virtlogd-sock``: not
configurable, libvirtd connects there), the domain homes and monitor sockets
under ``/var/lib/libvirt``, probed emulator capabilities under
``/var/cache/libvirt`` and the per-domain logs under ``/var/log/libvirt``.
Only libvirtd's own client sockets (``unix_sock_dir``) and log can be placed by
config.  So both daemons run inside a private mount namespace (``unshare
--mount``) in which those five directories are bind mounts of directories
under the helper's temp dir; the system instance's files are never read or
written, and the namespace (with its mounts) ends with the daemons.  The only
trace outside the temp dir: empty mount-point directories are created for any
of the five that did not exist (``mkdir -p``; nothing is written into them).

Use::

    with LibvirtDaemon(tmp_path) as d:
        subprocess.run(["virsh", "-c", d.uri, "list"])
        d.host_path("/var/log/libvirt/qemu/guest.log")   # the file as seen from here

Emulators libvirtd starts run inside the same namespace, as root by default
(``qemu.conf``: user/group root, ``namespaces = []``, ``cgroup_controllers =
[]``, ``security_driver = "none"``, ``stdio_handler = "file"``).  Paths the
emulator or XML use outside the five directories are the host's own.
``stop()`` destroys running domains, stops libvirtd then virtlogd, and kills
whatever else still lives in the namespace (emulators libvirt left behind).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from types import TracebackType
from typing import Optional

#: the fixed directories of a privileged libvirt, and the name of their private copy
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}


class LibvirtDaemonError(RuntimeError):
    """The private daemons could not be started (the message has the log's tail)."""


def unavailable_reason() -> Optional[str]:
    """Why a private daemon cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private libvirtd needs root (a privileged qemu driver and mount namespaces)"
    for tool in ("libvirtd", "virtlogd", "unshare", "mount"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a mount namespace: {probe.stderr.strip()}"
    return None


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


class LibvirtDaemon:
    """A libvirtd (qemu driver) and its virtlogd, private to one temp dir."""

    def __init__(self, base: os.PathLike[str] | str, *, qemu_user: str = "root",
                 qemu_group: str = "root", namespaces: Optional[list[str]] = None,
                 log_filters: str = "3:*",
                 extra_qemu_conf: str = "", extra_libvirtd_conf: str = "",
                 net_namespace: bool = False) -> None:
        self.base = Path(base).resolve()
        self.qemu_user = qemu_user
        self.qemu_group = qemu_group
        #: qemu.conf ``namespaces``: ``None`` gives ``[]`` (none), a list is written
        #: as given; ``["mount"]`` is libvirt's default (a private /dev per domain)
        self.namespaces = [] if namespaces is None else namespaces
        self.log_filters = log_filters
        self.extra_qemu_conf = extra_qemu_conf
        self.extra_libvirtd_conf = extra_libvirtd_conf
        #: also a private network namespace (``unshare --net``, loopback up): libvirt's
        #: networks, bridges and taps are made there and end with it
        self.net_namespace = net_namespace
        self.sock_dir = self.base / "sock"
        #: libvirtd's own log (log_outputs), and virtlogd's
        self.log_path = self.base / "libvirtd.log"
        self.virtlogd_log_path = self.base / "virtlogd.log"
        #: stdout/stderr of the launcher shell and both daemons
        self.console_path = self.base / "daemons.out"
        self.socket_path = self.sock_dir / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket_path}"
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._ns: Optional[str] = None

    # ---- paths ------------------------------------------------------------
    def host_path(self, path: str) -> Path:
        """Where a path under one of the private directories lies outside the namespace."""
        for fixed, name in PRIVATE_DIRS.items():
            if path == fixed or path.startswith(fixed + "/"):
                return self.base / name / path[len(fixed):].lstrip("/")
        return Path(path)

    def in_namespace(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command in the daemons' mount namespace (a mount made there is seen by
        libvirtd and its emulators; one made outside is not: propagation is private)."""
        pid = self._pid("libvirtd")
        assert pid is not None, "libvirtd is not running"
        return subprocess.run(["nsenter", "-t", str(pid), "-m", *argv], capture_output=True,
                              text=True, timeout=60)

    def libvirtd_pid(self) -> int:
        """The running libvirtd's pid (to enter its namespaces)."""
        pid = self._pid("libvirtd")
        assert pid is not None, "libvirtd is not running"
        return pid

    def in_net_namespace(self, *argv: str, timeout: float = 60
                         ) -> subprocess.CompletedProcess[str]:
        """Run a command in the daemons' network (and mount) namespace."""
        assert self.net_namespace, "the daemons share this host's network namespace"
        return subprocess.run(["nsenter", "-t", str(self.libvirtd_pid()), "-m", "-n", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def namespace_path(self, path: os.PathLike[str] | str) -> Path:
        """``path`` as the daemons see it, reachable from here (through /proc)."""
        pid = self._pid("libvirtd")
        assert pid is not None, "libvirtd is not running"
        return Path(f"/proc/{pid}/root") / str(path).lstrip("/")

    def domain_log(self, name: str) -> Path:
        """The QEMU driver's log of domain ``name`` (argv at the top, then emulator stderr)."""
        return self.host_path(f"/var/log/libvirt/qemu/{name}.log")

    # ---- lifecycle ----------------------------------------------------------
    def _write_configs(self) -> None:
        for name in PRIVATE_DIRS.values():
            (self.base / name).mkdir(parents=True, exist_ok=True)
        for sub in ("lib/qemu", "log/qemu", "cache/qemu", "etc/qemu"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("libvirtd.pid", "virtlogd.pid"):
            (self.base / stale).unlink(missing_ok=True)
        (self.base / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            f'log_filters = "{self.log_filters}"\n'
            f'log_outputs = "1:file:{self.log_path}"\n'
            f'host_uuid = "{uuidlib.uuid4()}"\n'
            + self.extra_libvirtd_conf)
        (self.base / "virtlogd.conf").write_text(
            f'log_outputs = "3:file:{self.virtlogd_log_path}"\n')
        (self.base / "etc" / "qemu.conf").write_text(
            f'user = "{self.qemu_user}"\n'
            f'group = "{self.qemu_group}"\n'
            f'namespaces = [ {", ".join(f"{chr(34)}{n}{chr(34)}" for n in self.namespaces)} ]\n'
            'cgroup_controllers = [ ]\n'
            'security_driver = "none"\n'
            'stdio_handler = "file"\n'
            'remember_owner = 0\n'
            + self.extra_qemu_conf)
        # libvirtd reads these when they exist; empty is the default everywhere
        for conf in ("libvirt.conf", "virtlogd.conf"):
            (self.base / "etc" / conf).touch()

    def _launcher(self) -> str:
        b = self.base
        lines = ["set -e"]
        if self.net_namespace:
            lines.append("ip link set lo up")
        for fixed, name in PRIVATE_DIRS.items():
            lines.append(f"mkdir -p {fixed}")
            lines.append(f"mount --bind {shlex.quote(str(b / name))} {fixed}")
        lines += [
            f"{_which('virtlogd')} --config {shlex.quote(str(b / 'virtlogd.conf'))} "
            f"--pid-file {shlex.quote(str(b / 'virtlogd.pid'))} &",
            "i=0",
            "while [ ! -S /run/libvirt/virtlogd-sock ]; do",
            "  i=$((i+1)); [ $i -lt 400 ] || { echo 'virtlogd did not start' >&2; exit 1; }",
            "  sleep 0.05",
            "done",
            f"{_which('libvirtd')} --config {shlex.quote(str(b / 'libvirtd.conf'))} "
            f"--pid-file {shlex.quote(str(b / 'libvirtd.pid'))} &",
            "wait",
        ]
        return "\n".join(lines)

    def start(self, timeout: float = 60.0) -> "LibvirtDaemon":
        if self._proc is not None:
            raise LibvirtDaemonError("already started")
        why = unavailable_reason()
        if why:
            raise LibvirtDaemonError(why)
        self._write_configs()
        out = open(self.console_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        env["LC_ALL"] = "C"
        try:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private",
                 *(["--net"] if self.net_namespace else []), "--", "/bin/sh", "-c",
                 self._launcher()],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LibvirtDaemonError(
                    f"the daemons exited with status {self._proc.returncode}: {self._tail()}")
            if self._ns is None:
                # the namespace is libvirtd's own (the launcher may not have called
                # unshare(2) yet when Popen returns); never the one we run in
                pid = self._pid("libvirtd")
                ns = _mnt_ns(pid) if pid is not None else None
                if ns is not None and ns != _mnt_ns(os.getpid()):
                    self._ns = ns
            if self._ns is not None and self.socket_path.exists():
                r = subprocess.run(["virsh", "-c", self.uri, "uri"], capture_output=True,
                                   text=True, timeout=30, env=self.client_env())
                if r.returncode == 0:
                    return
            time.sleep(0.1)
        raise LibvirtDaemonError(f"libvirtd did not answer on {self.socket_path}: {self._tail()}")

    def restart_libvirtd(self, timeout: float = 60.0) -> None:
        """Stop libvirtd (SIGTERM, as a package upgrade does) and start it again in the
        same namespace; running emulators and virtlogd are left alone."""
        pid = self._pid("libvirtd")
        if pid is None or self._ns is None or _mnt_ns(pid) != self._ns:
            raise LibvirtDaemonError("libvirtd is not running")
        holder = self._pid("virtlogd")
        if holder is None or _mnt_ns(holder) != self._ns:
            raise LibvirtDaemonError("virtlogd is not running: nothing holds the namespace")
        _terminate(pid, timeout)
        self.socket_path.unlink(missing_ok=True)
        (self.base / "libvirtd.pid").unlink(missing_ok=True)
        out = open(self.console_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        env["LC_ALL"] = "C"
        try:
            subprocess.run(
                ["nsenter", f"--mount=/proc/{holder}/ns/mnt", "--", _which("libvirtd"),
                 "--daemon", "--config", str(self.base / "libvirtd.conf"),
                 "--pid-file", str(self.base / "libvirtd.pid")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                check=True, timeout=timeout)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._pid("libvirtd")
            if pid is not None and self.socket_path.exists():
                r = subprocess.run(["virsh", "-c", self.uri, "uri"], capture_output=True,
                                   text=True, timeout=30, env=self.client_env())
                if r.returncode == 0:
                    return
            time.sleep(0.1)
        raise LibvirtDaemonError(f"libvirtd did not come back: {self._tail()}")

    def client_env(self) -> dict[str, str]:
        """Environment for virsh/virt-install: no user config that names another URI."""
        env = dict(os.environ)
        env.pop("LIBVIRT_DEFAULT_URI", None)
        env["LIBVIRT_DEFAULT_URI"] = self.uri
        return env

    def _tail(self, n: int = 2000) -> str:
        parts = []
        for p in (self.console_path, self.log_path):
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"[{p.name}] ...{text[-n:].strip()}")
        return " | ".join(parts) or "(no output)"

    def _pid(self, name: str) -> Optional[int]:
        try:
            return int((self.base / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _destroy_domains(self) -> None:
        r = subprocess.run(["virsh", "-c", self.uri, "list", "--name"], capture_output=True,
                           text=True, timeout=30, env=self.client_env())
        if r.returncode != 0:
            return
        for name in r.stdout.split():
            subprocess.run(["virsh", "-c", self.uri, "destroy", name], capture_output=True,
                           timeout=60, env=self.client_env())

    def stop(self, timeout: float = 20.0) -> None:
        """Destroy running domains, stop both daemons, end the namespace.  Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None and self.socket_path.exists():
                try:
                    self._destroy_domains()
                except (subprocess.SubprocessError, OSError):
                    pass
            for name in ("libvirtd", "virtlogd"):
                pid = self._pid(name)
                if pid is not None and self._ns is not None and _mnt_ns(pid) == self._ns:
                    _terminate(pid, timeout)
            # emulators or helpers libvirt left behind in the namespace
            if self._ns is not None:
                for pid in _pids_in_ns(self._ns):
                    if pid != proc.pid:
                        _terminate(pid, 5.0)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        finally:
            self._proc = None

    def __enter__(self) -> "LibvirtDaemon":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, et: Optional[type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()


def _mnt_ns(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_ns(ns: str) -> list[int]:
    """Processes in the private namespace (never in the one this process runs in)."""
    if ns == _mnt_ns(os.getpid()):
        raise RuntimeError("refusing to list the processes of the host mount namespace")
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _mnt_ns(int(entry)) == ns:
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
