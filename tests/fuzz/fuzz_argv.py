"""QEMU's command-line syntax (``pyhv.shim.argv``): options, QemuOpts lists, JSON arguments.

Input: the arguments, separated by NUL bytes.  Every ``opts`` argument is also
read through each typed accessor (string, bool, number, size, choice), as the
mapping does; a ``key=value`` list written back with ``,,`` escapes must parse
to the same pairs.
"""

from __future__ import annotations

from fuzz.common import (
    Finding,
    args_from_bytes,
    bytes_from_args,
    module_path,
    one_line,
    string_constants,
    string_lists,
    test_files,
    unique,
)
from pyhv.shim import argv
from pyhv.shim.errors import ShimError

MAX_LEN = 4096


def _read_all(opts: argv.Opts) -> None:
    for key in opts.keys():
        for read in (opts.get_str, opts.need_str, opts.get_bool, opts.get_int,
                     lambda k: opts.get_int(k, lo=0, hi=255),
                     lambda k: opts.choice(k, ("on", "off"))):
            try:
                read(key)
            except ShimError as e:
                one_line(e)
        for shift in (0, 20):
            try:
                size = opts.get_size(key, default_shift=shift)
            except ShimError as e:
                one_line(e)
                continue
            if not (isinstance(size, int) and 0 <= size < 1 << 64):
                raise Finding(f"get_size({key!r}) gave {size!r}")
        opts.raw(key)
    if opts.unused():
        raise Finding(f"keys read but still unused: {opts.unused()}")
    try:
        opts.check_keys(())
    except ShimError as e:
        one_line(e)
    argv.describe("device", opts)


def _split_round_trip(text: str, implied: str | None) -> None:
    """A parsed list, written back with ``,,`` escapes, parses to the same pairs."""
    try:
        pairs = argv.split_list(text, implied, "-x")
    except ShimError as e:
        one_line(e)
        return
    again = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)
    if argv.split_list(again, implied, "-x") != pairs:
        raise Finding(f"split_list({text!r}) = {pairs!r}, but {again!r} parses otherwise")


def TARGET(data: bytes) -> None:
    args = args_from_bytes(data)
    for text in args[:4]:
        for implied in (None, "driver"):
            _split_round_trip(text, implied)
    try:
        options = argv.parse(args)
    except ShimError as e:
        one_line(e)
        return
    names = []
    for o in options:
        _ = o.where  # the property formats the argument
        if isinstance(o.value, argv.Opts):
            _read_all(o.value)
            names.append(o.name)
    for name in names:
        merged = argv.merged(options, name)
        if merged is None:
            raise Finding(f"merged({name!r}) is None but the option was given")
        _read_all(merged)


def seeds() -> list[bytes]:
    lists = list(string_lists(test_files("test_shim_argv*.py")))
    out = [bytes_from_args(a) for a in lists]
    # every opts argument alone, behind each option that reads opts
    for args in lists:
        for text in args:
            if not text.startswith("-"):
                out.append(bytes_from_args(["-device", text]))
                out.append(bytes_from_args(["-blockdev", text]))
    out += [bytes_from_args(a) for a in (
        ["-m", "256M", "-smp", "2,sockets=1,cores=2", "-machine", "q35,accel=kvm"],
        ["-device", '{"driver":"virtio-blk-pci","id":"d0","bootindex":1,"addr":"0x3.0x1"}'],
        ["-blockdev", "driver=file,node-name=n,filename=/x,,y,cache.direct=on"],
        ["-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}'],
        ["-chardev", "socket,id=c,path=/tmp/s,server=on,wait=off", "-mon", "chardev=c"],
    )]
    return unique(out)


def dictionary() -> list[bytes]:
    tokens = {f"-{name}" for name in argv.OPTIONS}
    tokens |= string_constants([module_path(argv)])
    tokens |= {",,", "=on", "=off", "0x", "{\"", "\":", "\"}", ".", "\0"}
    return sorted(t.encode() for t in tokens)
