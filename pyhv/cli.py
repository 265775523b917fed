"""The ``pyhv`` command: run a machine without a daemon, and small tools.

``pyhv run DOMAIN.xml`` or ``pyhv run --kernel K ...`` builds a machine and
runs it in the foreground with COM1 on the terminal (or where ``--serial``
says).  Exit status: 0 when the guest powers off, 2 for bad input, 3 when the
guest triple-faults, 4 when KVM cannot go on (internal error, failed entry, an
exit pyhv does not handle), 128+N when stopped by signal N.  Imports are lazy:
start-up time is part of what a VMM is judged on.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, NoReturn, Optional, Sequence

if TYPE_CHECKING:
    from pyhv.engine.signals import SignalPipe

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TRIPLE_FAULT = 3
EXIT_INTERNAL_ERROR = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    print(f"pyhv: {message}", file=sys.stderr)
    sys.exit(status)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; ``only='run'`` leaves out the other commands' parsers
    (``pyhv run`` is a VM's launch path: building them all costs ~5 ms)."""
    p = _Parser(prog="pyhv", description="A KVM hypervisor that libvirt manages like QEMU.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run a machine in the foreground")
    run.add_argument("domain", nargs="?", metavar="DOMAIN.xml",
                     help="a libvirt domain definition (options below override nothing: "
                          "use either a domain or --kernel)")
    run.add_argument("--kernel", help="bzImage, vmlinux ELF or PVH ELF kernel")
    run.add_argument("--initrd", help="initial ramdisk")
    run.add_argument("--append", default="", help="kernel command line")
    run.add_argument("--memory", "-m", default="256M", help="guest RAM (e.g. 256M, 1G)")
    run.add_argument("--cpus", "--smp", type=int, default=1, help="number of vCPUs")
    run.add_argument("--serial", default="stdio",
                     help="COM1 backend: stdio, file:PATH, pty or null (default stdio)")
    run.add_argument("--boot-protocol", choices=("auto", "linux", "pvh"), default="auto",
                     help="auto (PVH when the ELF has the PVH note), linux (64-bit), pvh")
    run.add_argument("--no-reboot", action="store_true",
                     help="end the machine when the guest resets instead of rebooting it")
    run.add_argument("--trace-io", action="store_true",
                     help="print unclaimed port and MMIO accesses to stderr")
    if only == "run":
        return p

    dx = sub.add_parser("domxml", help="libvirt domain XML tools")
    dxsub = dx.add_subparsers(dest="domxml_command", metavar="COMMAND", parser_class=_Parser)
    dxsub.required = True
    check = dxsub.add_parser("check", help="print the machine a domain XML maps to, or "
                                           "its errors")
    check.add_argument("xml", metavar="DOMAIN.xml")

    img = sub.add_parser("img", help="disk image tools (qemu-img's info and check)")
    imgsub = img.add_subparsers(dest="img_command", metavar="COMMAND", parser_class=_Parser)
    imgsub.required = True
    for name, text in (("info", "format, virtual size, cluster size, backing chain"),
                       ("check", "leaks and corruptions, as qemu-img check reports them "
                                 "(exit 0 clean, 1 not checked, 2 corrupt, 3 leaks)")):
        c = imgsub.add_parser(name, help=text)
        c.add_argument("file", metavar="FILE")
        c.add_argument("-f", "--format", choices=("raw", "qcow2"),
                       help="the image's format (default: probed)")
        c.add_argument("--output", choices=("human", "json"), default="human")
        if name == "info":
            c.add_argument("--backing-chain", action="store_true",
                           help="every image of the backing chain")

    ex = sub.add_parser("extract-vmlinux", help="extract the ELF vmlinux from a bzImage")
    ex.add_argument("bzimage")
    ex.add_argument("output")

    ik = sub.add_parser("import-kernel", help="make a kernel bundle (vmlinux, release, an "
                                              "initramfs with the 9p/virtio modules) for create")
    ik.add_argument("--kernel", metavar="PATH",
                    help="bzImage (default: /boot/vmlinuz-$(uname -r), else the newest "
                         "generic kernel under /var/lib/pyhv/kernels)")
    ik.add_argument("--modules", metavar="DIR",
                    help="its /lib/modules/RELEASE (default: beside --kernel's tree, else "
                         "/lib/modules/RELEASE)")
    ik.add_argument("--output", metavar="DIR",
                    help="the bundle (default: $PYHV_KERNEL_BUNDLE, else ~/.cache/pyhv/kernel)")

    cr = sub.add_parser("create", help="run COMMAND in a fresh VM over directory trees "
                                       "(exit status: the command's)")
    cr.add_argument("--root", action="append", default=[], metavar="DIR",
                    help="a tree for the guest's /; repeat it: later trees hide earlier ones "
                         "(read-only) and writes go to the --upper layer")
    cr.add_argument("--upper", metavar="DIR",
                    help="with several --root trees: the writable top layer, kept (default: "
                         "a temporary directory removed at the end)")
    cr.add_argument("--kernel", metavar="BUNDLE", help="a bundle from import-kernel "
                    "(default: $PYHV_KERNEL_BUNDLE, else ~/.cache/pyhv/kernel)")
    cr.add_argument("--cpus", "--smp", type=int, default=1, help="number of vCPUs")
    cr.add_argument("--memory", "-m", default="256M", help="guest RAM (e.g. 256M, 1G)")
    cr.add_argument("--com1", action="store_true",
                    help="the guest's console on COM1, on stdio (default: a virtio console)")
    cr.add_argument("--readonly", action="store_true", help="the guest cannot write the trees")
    cr.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS")

    p9 = sub.add_parser("9p-serve", help="serve a directory over 9P2000.L on a socket "
                                         "(Linux's trans=tcp / trans=unix)")
    p9.add_argument("--root", required=True, action="append", metavar="DIR",
                    help="the directory to export; repeated: trees combined, later ones "
                         "over earlier ones (read-only; needs --upper or --readonly)")
    p9.add_argument("--upper", metavar="DIR",
                    help="the writable top layer over the --root trees (whiteouts and "
                         "copied-up files land here)")
    p9.add_argument("--readonly", action="store_true", help="refuse every write (EROFS)")
    p9.add_argument("--security-model", choices=("passthrough", "mapped", "squash"),
                    default="passthrough", help="libvirt's accessmode (default passthrough)")
    p9.add_argument("--listen", required=True, metavar="tcp:HOST:PORT|unix:PATH")

    vub = sub.add_parser("vhost-user-blk", help="serve a disk to another VMM (QEMU's "
                                                "vhost-user-blk-pci) over vhost-user")
    vub.add_argument("--socket", required=True, metavar="PATH",
                     help="the unix socket to listen on (one frontend at a time)")
    vub.add_argument("--disk", required=True, metavar="FILE", help="raw or qcow2 image")
    vub.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    vub.add_argument("--readonly", action="store_true")
    vub.add_argument("--cache", choices=("none", "writethrough", "writeback", "directsync",
                                         "unsafe"), help="QEMU's cache modes (default writeback)")
    vub.add_argument("--queues", type=int, default=1, help="request queues (1 to 64)")
    vub.add_argument("--serial", help="the identifier the guest reads (GET_ID)")
    vub.add_argument("--discard", choices=("ignore", "unmap"), default="ignore",
                     help="unmap: offer DISCARD and free the ranges the guest trims "
                          "(default ignore, as QEMU's)")
    vub.add_argument("--poll-us", type=int, default=32, metavar="US",
                     help="watch a ring this long for more requests after a batch before "
                          "sleeping on its kick (default 32, as QEMU's iothreads; 0: never)")

    vun = sub.add_parser("vhost-user-net", help="serve a tap to another VMM (QEMU's "
                                                "-netdev vhost-user) over vhost-user")
    vun.add_argument("--socket", required=True, metavar="PATH",
                     help="the unix socket to listen on (one frontend at a time)")
    vun.add_argument("--tap", required=True, metavar="IFNAME",
                     help="the tap to open (created if missing, brought up)")
    vun.add_argument("--queues", type=int, default=1, help="queue pairs (1 to 16)")

    vuc = sub.add_parser("vhost-user-console",
                         help="serve virtio consoles to another VMM (QEMU's "
                              "vhost-user-device-pci,virtio-id=3) over vhost-user")
    vuc.add_argument("--socket", required=True, metavar="PATH",
                     help="the unix socket to listen on (one frontend at a time)")
    vuc.add_argument("--console", default="stdio", metavar="END",
                     help="port 0, the guest's hvc0: stdio (default), file:PATH, "
                          "unix:PATH (listened on), pty or null")
    vuc.add_argument("--port", action="append", default=[], metavar="NAME=END",
                     help="a named port from port 1 on, the guest's "
                          "/dev/virtio-ports/NAME (repeatable)")

    vur = sub.add_parser("vhost-user-rng", help="serve entropy to another VMM (QEMU's "
                                                "vhost-user-rng-pci) over vhost-user")
    vur.add_argument("--socket", required=True, metavar="PATH",
                     help="the unix socket to listen on (one frontend at a time)")
    vur.add_argument("--source", choices=("/dev/urandom", "/dev/random"),
                     default="/dev/urandom")
    vur.add_argument("--max-bytes", type=int, help="at most this many bytes per --period")
    vur.add_argument("--period", type=int, metavar="MS", help="the rate limit's period")
    return p


def _serial_config(spec: str) -> "object":
    from pyhv.config import parse_host_end

    return parse_host_end(spec, "--serial")


def config_from_args(args: argparse.Namespace) -> "object":
    from pyhv.config import ConfigError, KernelBoot, VmConfig, parse_size

    if args.domain:
        if args.kernel:
            raise ConfigError("give either DOMAIN.xml or --kernel, not both")
        from pyhv.domxml import load_domain

        cfg = load_domain(args.domain)
        if args.trace_io or args.no_reboot:
            import dataclasses

            cfg = dataclasses.replace(cfg, trace_io=args.trace_io or cfg.trace_io,
                                      on_reboot="destroy" if args.no_reboot else cfg.on_reboot)
        return cfg
    if not args.kernel:
        raise ConfigError("run: give a DOMAIN.xml or --kernel")
    return VmConfig(
        boot=KernelBoot(args.kernel, args.initrd, args.append, args.boot_protocol),
        memory=parse_size(args.memory, "M", "--memory"),
        vcpus=args.cpus,
        serial=_serial_config(args.serial),  # type: ignore[arg-type]
        on_reboot="destroy" if args.no_reboot else "restart",
        trace_io=args.trace_io,
    )


def run_machine(config: "object") -> int:
    """Run a machine in the foreground until it ends; its exit status."""
    import signal

    from pyhv.engine.signals import signal_pipe

    # SIGCONT resumes a guest a disk error policy paused (there is no monitor here)
    with signal_pipe(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCONT) as sig:
        return _run_machine(config, sig)


def _run_machine(config: "object", sig: "SignalPipe") -> int:
    import signal

    from pyhv.engine.eventloop import EventLoop
    from pyhv.engine.machine import Machine, MachineEvent, MachineState

    machine = Machine(config)  # type: ignore[arg-type]
    loop = EventLoop()
    status = {"code": EXIT_OK}

    def on_wakeup(fd: int) -> None:
        sig.drain()
        stop = [s for s in sig.caught if s != signal.SIGCONT]
        if stop:
            status["code"] = 128 + stop[0]
            print(f"pyhv: terminating on signal {stop[0]}", file=sys.stderr)
            machine.power_off("host")
            loop.stop()
        elif sig.caught:
            sig.caught.clear()
            if machine.state is MachineState.PAUSED:
                print("pyhv: resuming on SIGCONT", file=sys.stderr)
                machine.resume()

    def on_event(ev: MachineEvent) -> None:
        if ev.kind == "device-broken":
            print(f"pyhv: {ev.message}", file=sys.stderr)
        if ev.kind == "block-io-error":
            print(f"pyhv: {ev.message}", file=sys.stderr)
            if getattr(ev.data, "action", None) == "stop":
                print(f"pyhv: the guest is paused; fix the cause, then kill -CONT "
                      f"{os.getpid()} to retry", file=sys.stderr)
        if ev.kind == "crashed":
            status["code"] = EXIT_TRIPLE_FAULT if ev.detail == "triple-fault" \
                else EXIT_INTERNAL_ERROR
            print(f"pyhv: guest crashed ({ev.detail}): {ev.message}", file=sys.stderr)
            if ev.registers:
                print(f"pyhv: {ev.registers}", file=sys.stderr)
        if machine.finished:
            loop.stop()

    try:
        machine.subscribe(on_event)
        machine.start()
        hs = machine.host_serial
        assert hs is not None
        if hs.pty_path:
            print(f"pyhv: char device redirected to {hs.pty_path} (label serial0)",
                  file=sys.stderr)
        for ident, path in machine.port_ptys():
            print(f"pyhv: char device redirected to {path} (label {ident})",
                  file=sys.stderr)
        machine.attach(loop)
        loop.add_reader(sig.fd, on_wakeup, "signals")
        if not machine.finished:
            loop.run()
    finally:
        machine.close()
        loop.close()
    return status["code"]


def create(args: argparse.Namespace) -> int:
    """``pyhv create``: run the command in a VM over the trees; its exit status."""
    import tempfile

    from pyhv import bundle

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    bundle.check_roots(args.root)
    if not argv:
        raise bundle.BundleError("create: no command given (pyhv create --root DIR -- "
                                 "COMMAND ...)")
    b = bundle.Bundle.open(args.kernel or bundle.default_bundle_dir())
    if args.upper is not None:
        bundle.check_upper(args.upper, args.root)
    with tempfile.TemporaryDirectory(prefix="pyhv-create-") as tmp:
        exit_file = os.path.join(tmp, "exit")
        upper = args.upper
        if upper is None and len(args.root) > 1:
            upper = os.path.join(tmp, "upper")
            os.mkdir(upper, 0o755)
        cfg = bundle.create_config(args.root, argv, b, exit_file, args.cpus, args.memory,
                                   args.com1, args.readonly, upper)
        code = run_machine(cfg)
        with open(exit_file, "a+") as f:
            f.seek(0)
            status = bundle.read_exit_status(f.read())
    if code != EXIT_OK:
        return code
    if status is None:
        print("pyhv: create: the guest ended without reporting the command's exit status",
              file=sys.stderr)
        return bundle.EXIT_NO_STATUS
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser("run" if words[:1] == ["run"] else None).parse_args(words)
    from pyhv.errors import PyhvError

    try:
        if args.command == "extract-vmlinux":
            from pyhv.engine.boot import extract_vmlinux_file

            extract_vmlinux_file(args.bzimage, args.output)
            return EXIT_OK
        if args.command in ("import-kernel", "create"):
            from pyhv import bundle

            if args.command == "create":
                return create(args)
            b = bundle.import_kernel(args.kernel, args.modules, args.output)
            print(f"pyhv: kernel bundle {b.release} in {b.path}")
            return EXIT_OK
        if args.command == "img":
            from pyhv.engine.block import imgtool

            if args.img_command == "check":
                return imgtool.check(args.file, args.format, args.output)
            return imgtool.info(args.file, args.format, args.output, args.backing_chain)
        if args.command == "domxml":
            from pyhv.domxml.check import run_check

            return run_check(args.xml)
        if args.command == "run":
            return run_machine(config_from_args(args))
        if args.command == "9p-serve":
            from pyhv.engine.p9 import serve as p9serve

            return p9serve.run(args.root, args.listen, args.readonly, args.security_model,
                               upper=args.upper)
        if args.command == "vhost-user-net":
            from pyhv.engine.vhost_user import net as vunet

            return vunet.run(args.socket, args.tap, args.queues)
        if args.command == "vhost-user-console":
            from pyhv.engine.vhost_user import console as vucons

            return vucons.run(args.socket, args.console, tuple(args.port))
        if args.command == "vhost-user-rng":
            from pyhv.engine.vhost_user import rng as vurng

            return vurng.serve(args.socket, vurng.make_device(args.source, args.max_bytes,
                                                              args.period))
        if args.command == "vhost-user-blk":
            from pyhv.engine.vhost_user import blk as vublk

            if not 0 <= args.poll_us <= 1000:
                _fail(f"--poll-us {args.poll_us}: 0 to 1000 microseconds", EXIT_USAGE)
            return vublk.serve(args.socket, vublk.make_device(
                args.disk, readonly=args.readonly, cache=args.cache, queues=args.queues,
                fmt=args.format, serial=args.serial, discard=args.discard),
                poll_us=args.poll_us)
    except PyhvError as e:
        _fail(str(e), e.exit_status)
    except KeyboardInterrupt:
        return 128 + 2
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
