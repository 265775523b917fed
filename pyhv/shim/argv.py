"""QEMU's command-line syntax, without I/O: options, QemuOpts and JSON arguments.

``parse(args)`` turns ``qemu-system-x86_64``'s arguments (without argv[0])
into an ordered list of :class:`Option` records; what they mean is
``mapping``'s business.  The syntax follows QEMU 7.2:

* an option is ``-name`` or ``--name``; the option table says whether it takes
  an argument, and how that argument is read;
* ``opts`` arguments are QemuOpts/keyval lists ``key=value,key=value``: ``,,``
  stands for a comma inside a value, a first element without ``=`` is the
  option's *implied* key (``-chardev socket,...`` is ``backend=socket``), a
  later ``key`` alone means ``key=on``, a trailing comma is ignored;
* ``-object``, ``-device``, ``-blockdev``, ``-netdev`` and ``-audiodev`` also
  take a JSON object when the argument starts with ``{`` (what libvirt 9.0
  passes); dotted keys of -blockdev's keyval form (``file.filename=``) nest;
* ``string`` arguments are taken as they are (paths, ``-append``, ``-cpu``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Sequence, Union

from pyhv.shim.errors import ShimUsageError

ArgKind = Literal["none", "string", "opts"]


@dataclass(frozen=True)
class OptionSpec:
    name: str
    arg: ArgKind = "none"
    #: key taken by a first list element that has no ``=``
    implied: Optional[str] = None
    #: the argument may be a JSON object
    json: bool = False
    #: keyval syntax with dotted keys that nest (``-blockdev file.filename=...``)
    nested: bool = False


def _table(*specs: OptionSpec) -> dict[str, OptionSpec]:
    return {s.name: s for s in specs}


def _flag(name: str) -> OptionSpec:
    return OptionSpec(name)


def _string(name: str) -> OptionSpec:
    return OptionSpec(name, "string")


def _opts(name: str, implied: Optional[str] = None, json: bool = False,
          nested: bool = False) -> OptionSpec:
    return OptionSpec(name, "opts", implied, json, nested)


#: every option pyhv-qemu recognises; ``mapping`` decides which it can honour
OPTIONS: dict[str, OptionSpec] = _table(
    # information (answered by pyhv.shim.help before anything else)
    _flag("version"), _flag("help"), _flag("h"),
    # process
    _opts("name", "guest"), _flag("S"), _flag("daemonize"), _string("pidfile"),
    _flag("no-user-config"), _flag("nodefaults"), _flag("nodefconfig"),
    _opts("sandbox", "enable"), _opts("msg"), _opts("overcommit"), _opts("action"),
    _flag("no-shutdown"), _flag("no-reboot"), _opts("compat"), _string("D"),
    _string("d"), _opts("trace", "enable"), _flag("preconfig"), _string("L"),
    _string("watchdog-action"), _string("incoming"), _string("runas"), _string("chroot"),
    # machine
    _opts("machine", "type"), _opts("accel", "accel"), _flag("enable-kvm"),
    _string("cpu"), _opts("m", "size"), _opts("smp", "cpus"), _string("uuid"),
    _opts("rtc"), _opts("global"), _flag("no-acpi"), _flag("no-hpet"), _flag("usb"),
    _opts("numa", "type"), _string("mem-path"), _flag("mem-prealloc"),
    _opts("smbios", "type"), _opts("fw_cfg"), _string("bios"),
    # boot
    _opts("boot", "order"), _string("kernel"), _string("initrd"), _string("append"),
    _string("dtb"),
    # display
    _opts("display", "type"), _flag("nographic"), _string("vga"), _string("vnc"),
    _opts("spice"),
    # character devices and monitors
    _opts("chardev", "backend"), _opts("mon", "chardev"), _string("qmp"),
    _string("qmp-pretty"), _string("monitor"), _string("serial"), _string("parallel"),
    _opts("add-fd"),
    # devices and their backends
    _opts("object", "qom-type", json=True), _opts("device", "driver", json=True),
    _opts("blockdev", json=True, nested=True), _opts("drive"),
    _opts("netdev", "type", json=True), _opts("audiodev", "driver", json=True),
    _opts("fsdev", "fsdriver"), _opts("tpmdev", "type"), _opts("iscsi"),
)

#: other spellings of the same option
ALIASES = {"M": "machine", "?": "help"}

Scalar = Union[str, int, float, bool, None]
JsonValue = Union[Scalar, list["JsonValue"], dict[str, "JsonValue"]]


def _err(where: Optional[str], detail: str) -> ShimUsageError:
    return ShimUsageError(detail, where)


# --------------------------------------------------------------------------- values


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(value: object, what: str, where: Optional[str]) -> bool:
    """``on``/``off`` (and QEMU's other spellings) or a JSON boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise _err(where, f"parameter '{what}' expects 'on' or 'off', not {_show(value)}")


def parse_int(value: object, what: str, where: Optional[str],
              lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """A decimal, ``0x`` hex or ``0`` octal number (QEMU's base-0 parsing) or a JSON integer."""
    n: Optional[int] = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    elif isinstance(value, str):
        t = value.strip()
        neg = t.startswith("-")
        body = t[1:] if neg else t
        try:
            if body[:2].lower() == "0x":
                n = int(body[2:], 16)
            elif len(body) > 1 and body.startswith("0"):
                n = int(body[1:], 8)
            else:
                n = int(body, 10)
        except ValueError:
            n = None
        if n is not None and neg:
            n = -n
    if n is None:
        raise _err(where, f"parameter '{what}' expects a number, not {_show(value)}")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise _err(where, f"parameter '{what}' is {n}, must be {bounds}")
    return n


_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(value: object, what: str, where: Optional[str], default_shift: int = 0) -> int:
    """A size: a JSON integer, or ``N``/``N.F`` with an optional ``B K M G T P E`` suffix.

    Without a suffix the number counts units of ``1 << default_shift`` bytes
    (QEMU's ``-m`` counts MiB, everything else bytes).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _err(where, f"parameter '{what}': negative size {value}")
        if value < 1 << 64:
            return value
    if isinstance(value, str):
        t = value.strip()
        shift = default_shift
        if t and t[-1].lower() in _SUFFIX:
            shift = _SUFFIX[t[-1].lower()]
            t = t[:-1]
        try:
            if t.lower().startswith("0x"):
                number: float = int(t, 16)
            else:
                number = float(t) if "." in t else int(t, 10)
        except ValueError:
            number = -1.0
        # compared before multiplying: a finite number times the unit can overflow
        if 0 <= number < (1 << 64) / (1 << shift):
            size = int(number * (1 << shift))
            if size < 1 << 64:
                return size
    raise _err(where, f"parameter '{what}' expects a size (for example 256M or 1G), "
                      f"not {_show(value)}")


def _show(value: object) -> str:
    return json.dumps(value) if not isinstance(value, str) else f"'{value}'"


# --------------------------------------------------------------------------- option lists


@dataclass
class Opts:
    """The parsed argument of an ``opts`` option: keys in order, later keys winning.

    Values are strings for ``key=value`` lists and JSON values for JSON
    arguments; the accessors accept both, so mappings need not care which form
    libvirt used.
    """

    values: dict[str, JsonValue]
    #: the argument was a JSON object
    json: bool = False
    #: how errors name this option: ``-device virtio-net-pci,id=net0``
    where: str = ""
    #: keys that were read by the mapping (``unused()`` lists the others)
    _read: set[str] = field(default_factory=set, repr=False, compare=False)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> JsonValue:
        self._read.add(key)
        return self.values[key]

    def keys(self) -> list[str]:
        return list(self.values)

    def raw(self, key: str, default: JsonValue = None) -> JsonValue:
        self._read.add(key)
        return self.values.get(key, default)

    def get_str(self, key: str, default: Optional[str] = None) -> Optional[str]:
        self._read.add(key)
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, (int, float, str)):
            return str(value)
        raise _err(self.where, f"parameter '{key}' expects a string")

    def need_str(self, key: str) -> str:
        value = self.get_str(key)
        if value is None or value == "":
            raise _err(self.where, f"parameter '{key}' is missing")
        return value

    def get_bool(self, key: str, default: bool = False) -> bool:
        self._read.add(key)
        if key not in self.values:
            return default
        return parse_bool(self.values[key], key, self.where)

    def get_int(self, key: str, default: Optional[int] = None, lo: Optional[int] = None,
            hi: Optional[int] = None) -> Optional[int]:
        self._read.add(key)
        if key not in self.values:
            return default
        return parse_int(self.values[key], key, self.where, lo, hi)

    def get_size(self, key: str, default: Optional[int] = None,
             default_shift: int = 0) -> Optional[int]:
        self._read.add(key)
        if key not in self.values:
            return default
        return parse_size(self.values[key], key, self.where, default_shift)

    def choice(self, key: str, choices: Sequence[str],
               default: Optional[str] = None) -> Optional[str]:
        value = self.get_str(key, default)
        if value is not None and value not in choices:
            raise _err(self.where, f"parameter '{key}': '{value}' is not one of "
                                   + ", ".join(choices))
        return value

    def unused(self) -> list[str]:
        """Keys no accessor has read, in order."""
        return [k for k in self.values if k not in self._read]

    def check_keys(self, allowed: Iterable[str]) -> None:
        """Refuse any key outside ``allowed`` (QEMU's "Invalid parameter")."""
        ok = set(allowed)
        for key in self.values:
            if key not in ok:
                raise _err(self.where, f"invalid parameter '{key}'")


def split_list(text: str, implied: Optional[str] = None,
               where: Optional[str] = None) -> list[tuple[str, str]]:
    """``a=1,b=x,,y,flag`` → ``[("a", "1"), ("b", "x,y"), ("flag", "on")]``."""
    out: list[tuple[str, str]] = []
    i, n, first = 0, len(text), True
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j < n and text[j] == "=":
            value, i = _read_value(text, j + 1)
            if not name:
                raise _err(where, "a parameter name is empty")
            out.append((name, value))
        elif first and implied is not None:
            value, i = _read_value(text, i)
            out.append((implied, value))
        else:
            i = j
            if not name:
                if i < n:
                    raise _err(where, "empty parameter between commas")
                break
            out.append((name, "on"))
        first = False
        if i < n:  # at the comma ending this element
            i += 1
    return out


def _read_value(text: str, i: int) -> tuple[str, int]:
    """The value at ``i`` up to the first lone comma, ``,,`` unescaped."""
    parts: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                parts.append(",")
                i += 2
                continue
            break
        parts.append(c)
        i += 1
    return "".join(parts), i


def _nest(pairs: list[tuple[str, str]], where: str) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {}
    for key, value in pairs:
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise _err(where, f"parameter '{key}' conflicts with '{p}'")
            node = child
        if isinstance(node.get(leaf), dict):
            raise _err(where, f"parameter '{key}' conflicts with '{key}.*'")
        node[leaf] = value
    return out


def parse_opts(spec: OptionSpec, text: str) -> Opts:
    """The argument of an ``opts`` option."""
    where = f"-{spec.name}"
    if spec.json and text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except ValueError as e:
            raise _err(where, f"invalid JSON argument: {e}") from None
        if not isinstance(loaded, dict):
            raise _err(where, "the JSON argument must be an object")
        opts = Opts(loaded, json=True)
    else:
        pairs = split_list(text, spec.implied, f"{where} {_short(text)}")
        values: dict[str, JsonValue] = (_nest(pairs, where) if spec.nested
                                        else dict(pairs))
        opts = Opts(values)
    opts.where = describe(spec.name, opts)
    return opts


def describe(option: str, opts: Opts) -> str:
    """How messages name an option: ``-device virtio-blk-pci,id=virtio-disk0``."""
    spec = OPTIONS.get(option)
    head = None
    for key in ((spec.implied,) if spec and spec.implied else ()) + ("driver", "qom-type"):
        value = opts.values.get(key)
        if isinstance(value, str) and value:
            head = value
            break
    ident = opts.values.get("id") or opts.values.get("node-name")
    text = head or ""
    if isinstance(ident, str) and ident:
        label = "id" if "id" in opts.values else "node-name"
        text = f"{text},{label}={ident}" if text else f"{label}={ident}"
    return f"-{option} {text}" if text else f"-{option}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class Option:
    """One option of the command line, in order."""

    #: canonical name without dashes (``-M`` gives ``machine``)
    name: str
    #: the argument as given (``None`` for flags)
    arg: Optional[str]
    #: ``None`` for flags, the string for ``string`` options, :class:`Opts` for lists
    value: Union[None, str, Opts]
    #: position of the option in the arguments
    index: int = 0

    @property
    def where(self) -> str:
        if isinstance(self.value, Opts):
            return self.value.where
        if isinstance(self.value, str):
            return f"-{self.name} {_short(self.value)}"
        return f"-{self.name}"

    @property
    def opts(self) -> Opts:
        assert isinstance(self.value, Opts), self.name
        return self.value

    @property
    def text(self) -> str:
        assert isinstance(self.value, str), self.name
        return self.value


def option_name(arg: str) -> Optional[str]:
    """``-foo``/``--foo`` → ``foo``; ``None`` for a non-option argument."""
    if len(arg) < 2 or not arg.startswith("-"):
        return None
    name = arg[2:] if arg.startswith("--") else arg[1:]
    return ALIASES.get(name, name) if name else None


def parse(args: Sequence[str]) -> list[Option]:
    """Arguments (without argv[0]) → options, checking syntax only."""
    out: list[Option] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = option_name(arg)
        if name is None:
            raise _err(_short(arg), "plain arguments (disk images) are not supported; "
                                    "use -blockdev and -device")
        spec = OPTIONS.get(name)
        if spec is None:
            raise _err(arg, "invalid option")
        if spec.arg == "none":
            out.append(Option(name, None, None, i))
            i += 1
            continue
        if i + 1 >= len(args):
            raise _err(f"-{name}", "requires an argument")
        text = args[i + 1]
        value: Union[str, Opts] = parse_opts(spec, text) if spec.arg == "opts" else text
        out.append(Option(name, text, value, i))
        i += 2
    return out


def find(options: Sequence[Option], name: str) -> list[Option]:
    return [o for o in options if o.name == name]


def merged(options: Sequence[Option], name: str) -> Optional[Opts]:
    """QEMU's merged lists (``-machine``, ``-smp``, ``-boot``, ``-m``...): later keys win."""
    found = find(options, name)
    if not found:
        return None
    values: dict[str, JsonValue] = {}
    for o in found:
        values.update(o.opts.values)
    opts = Opts(values)
    opts.where = describe(name, opts)
    return opts
