"""pyhv-qemu's command-line syntax (pyhv.shim.argv) and information options (help)."""

from __future__ import annotations

import pytest

from pyhv.shim import registry
from pyhv.shim.argv import Opts, merged, parse, parse_size, split_list
from pyhv.shim.errors import ShimError, ShimUnsupportedError, ShimUsageError
from pyhv.shim.help import handle_info_options


def one_line(e: pytest.ExceptionInfo[ShimError]) -> str:
    text = str(e.value)
    assert "\n" not in text and text.startswith("pyhv-qemu: ")
    assert e.value.exit_status == 1
    return text


# ----------------------------------------------------------------- QemuOpts lists


def test_implied_first_key_and_flags() -> None:
    assert split_list("socket,id=charmonitor,fd=31,server,wait=off", "backend") == [
        ("backend", "socket"), ("id", "charmonitor"), ("fd", "31"), ("server", "on"),
        ("wait", "off")]


def test_double_comma_escapes_a_comma_in_values() -> None:
    pairs = split_list("file,id=c,,x,path=/tmp/a,,b,,,append=on", "backend")
    assert dict(pairs) == {"backend": "file", "id": "c,x", "path": "/tmp/a,b,", "append": "on"}


def test_implied_value_may_hold_escaped_commas() -> None:
    assert split_list("guest=a,,b,debug-threads=on", "guest") == [
        ("guest", "a,b"), ("debug-threads", "on")]
    assert split_list("we,,ird,debug-threads=on", "guest")[0] == ("guest", "we,ird")


def test_no_implied_key_means_flag_and_trailing_comma_is_ignored() -> None:
    assert split_list("mem-lock=off,") == [("mem-lock", "off")]
    assert split_list("timestamp") == [("timestamp", "on")]


def test_value_keeps_equals_signs() -> None:
    assert split_list("a=b=c") == [("a", "b=c")]


def test_empty_parameter_name_is_an_error() -> None:
    with pytest.raises(ShimUsageError):
        split_list("=x")


# ----------------------------------------------------------------- options


def test_parse_records_in_order_with_aliases() -> None:
    opts = parse(["-M", "q35", "--smp", "2", "-S", "-kernel", "/k,x"])
    assert [o.name for o in opts] == ["machine", "smp", "S", "kernel"]
    assert opts[0].opts.values == {"type": "q35"}
    assert opts[1].opts.get_int("cpus") == 2
    assert opts[2].value is None
    assert opts[3].text == "/k,x"  # string options are not QemuOpts


def test_json_arguments() -> None:
    (o,) = parse(["-device", '{"driver":"isa-serial","chardev":"charserial0",'
                             '"id":"serial0","index":0}'])
    assert o.opts.json and o.opts.values["index"] == 0
    assert o.where == "-device isa-serial,id=serial0"
    (b,) = parse(["-blockdev", '{"driver":"file","filename":"/a.img",'
                               '"node-name":"libvirt-1-storage","cache":{"direct":true}}'])
    assert b.opts.values["cache"] == {"direct": True}


def test_blockdev_keyval_dotted_keys_nest() -> None:
    (b,) = parse(["-blockdev", "driver=raw,node-name=f,file.driver=file,file.filename=/x"])
    assert b.opts.values == {"driver": "raw", "node-name": "f",
                             "file": {"driver": "file", "filename": "/x"}}


def test_json_only_where_qemu_takes_it() -> None:
    (c,) = parse(["-chardev", "{x"])  # -chardev has no JSON form: '{x' is the backend
    assert c.opts.values == {"backend": "{x"}


def test_bad_json_is_one_line() -> None:
    with pytest.raises(ShimUsageError) as e:
        parse(["-object", '{"qom-type": '])
    assert one_line(e).startswith("pyhv-qemu: -object: invalid JSON argument")
    (o,) = parse(["-device", "[1]"])  # not JSON: a driver named "[1]" (refused by mapping)
    assert o.opts.values == {"driver": "[1]"}


def test_unknown_option() -> None:
    with pytest.raises(ShimUsageError) as e:
        parse(["-foo"])
    assert one_line(e) == "pyhv-qemu: -foo: invalid option"


def test_missing_argument() -> None:
    with pytest.raises(ShimUsageError) as e:
        parse(["-S", "-m"])
    assert one_line(e) == "pyhv-qemu: -m: requires an argument"


def test_plain_argument_is_refused() -> None:
    with pytest.raises(ShimUsageError) as e:
        parse(["disk.img"])
    assert "disk.img" in one_line(e)


def test_line_breaks_in_the_option_at_fault_keep_the_message_one_line() -> None:
    # found by tests/fuzz (target argv): the option named in a message held a CR
    with pytest.raises(ShimUsageError) as e:
        parse(["\r-m", "1G"])
    assert one_line(e).startswith("pyhv-qemu: -m: plain arguments")
    assert "\r" not in str(e.value)
    with pytest.raises(ShimUsageError) as e:
        parse(["-device", "virtio-rng-pci\n,id=a\n,=x"])
    assert "\n" not in one_line(e)


def test_merged_lists_later_keys_win() -> None:
    opts = parse(["-machine", "pc,usb=off", "-machine", "accel=kvm,usb=on"])
    m = merged(opts, "machine")
    assert m is not None and m.values == {"type": "pc", "usb": "on", "accel": "kvm"}


# ----------------------------------------------------------------- values


def test_typed_accessors_accept_strings_and_json() -> None:
    o = Opts({"a": "on", "b": True, "n": "0x10", "j": 7, "s": "1G", "o": "010"}, where="-x")
    assert o.get_bool("a") and o.get_bool("b") and not o.get_bool("missing")
    assert o.get_int("n") == 16 and o.get_int("j") == 7 and o.get_int("o") == 8
    assert o.get_size("s") == 1 << 30
    assert o.unused() == []
    assert Opts({"x": "1", "y": "2"}).unused() == ["x", "y"]


def test_bad_values_name_the_parameter() -> None:
    o = Opts({"a": "maybe", "n": "x1", "big": "300"}, where="-smp 2")
    with pytest.raises(ShimUsageError, match="'a' expects 'on' or 'off'"):
        o.get_bool("a")
    with pytest.raises(ShimUsageError, match="'n' expects a number"):
        o.get_int("n")
    with pytest.raises(ShimUsageError, match="between 0 and 255"):
        o.get_int("big", lo=0, hi=255)
    with pytest.raises(ShimUsageError) as e:
        o.check_keys(("n",))
    assert one_line(e) == "pyhv-qemu: -smp 2: invalid parameter 'a'"


def test_sizes() -> None:
    assert parse_size("256", "size", None, 20) == 256 << 20
    assert parse_size("219136k", "size", None, 20) == 219136 << 10
    assert parse_size("1.5G", "size", None) == 3 << 29
    assert parse_size(268435456, "size", None) == 268435456
    with pytest.raises(ShimUsageError):
        parse_size("lots", "size", None)


# ----------------------------------------------------------------- information options


def test_version() -> None:
    text = handle_info_options(["-version"])
    assert text is not None
    first = text.splitlines()[0]
    assert first == "QEMU emulator version 7.2.0 (pyhv 0.1.0)"
    assert text.splitlines()[1].startswith("Copyright (c) 2003-2022 Fabrice Bellard")


def test_help_lists_options() -> None:
    text = handle_info_options(["-nodefaults", "-help"])
    assert text is not None and "usage: pyhv-qemu" in text and "-blockdev" in text


def test_machine_help_lists_aliases_and_default() -> None:
    text = handle_info_options(["-machine", "help"])
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "Supported machines are:"
    assert any(ln.startswith("pc ") and "(alias of pc-i440fx-7.2)" in ln for ln in lines)
    assert any(ln.startswith("q35 ") and "(alias of pc-q35-7.2)" in ln for ln in lines)
    assert any(ln.startswith("pc-i440fx-7.2 ") and ln.endswith("(default)") for ln in lines)
    assert handle_info_options(["-M", "?"]) == text


def test_device_help_and_properties() -> None:
    text = handle_info_options(["-device", "help"])
    assert text is not None
    assert 'name "virtio-blk-pci", bus PCI, alias "virtio-blk"' in text
    assert 'name "isa-serial", bus ISA' in text
    props = handle_info_options(["-device", "virtio-net-pci,help"])
    assert props is not None and props.startswith("virtio-net-pci options:")
    assert "  netdev=<str>" in props and "mac=<str>" in props
    with pytest.raises(ShimUnsupportedError) as e:
        handle_info_options(["-device", "virtio-gpu-pci,help"])
    assert "not a valid device model name" in one_line(e)


def test_cpu_help() -> None:
    text = handle_info_options(["-cpu", "help"])
    assert text is not None and text.startswith("Available CPUs:")
    assert "x86 host" in text and "x86 qemu64" in text


def test_no_info_option() -> None:
    probe = ("-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg "
             "-qmp unix:/tmp/m.sock,server=on,wait=off -pidfile /tmp/p -daemonize").split()
    assert handle_info_options(probe) is None
    assert handle_info_options(["-device", '{"driver":"help"}']) is None
    assert handle_info_options(["-bogus", "-version"]) is None


# ----------------------------------------------------------------- registry


def test_registry_is_consistent() -> None:
    assert registry.default_machine().name == "pc-i440fx-7.2"
    assert registry.find_machine("pc") is registry.find_machine("pc-i440fx-7.2")
    q35 = registry.find_machine("q35")
    assert q35 is not None and q35.root_bus == "pcie.0" and q35.qom_type == "pc-q35-7.2-machine"
    assert sum(m.is_default for m in registry.MACHINES) == 1
    for d in registry.DEVICES.values():
        names = [p.name for p in d.properties]
        assert len(names) == len(set(names)), d.name
        assert not set(names) & set(registry.DEVICE_OPTIONS), d.name
    assert registry.find_device("virtio-net") is registry.DEVICES["virtio-net-pci"]
    assert registry.find_cpu_model("host") is not None
    assert registry.find_cpu_model("host").typename == "host-x86_64-cpu"  # type: ignore[union-attr]


def test_command_line_options_advertise_what_libvirt_checks() -> None:
    opts = registry.COMMAND_LINE_OPTIONS
    # libvirt 9.0 passes -chardev fd=, -sandbox, -overcommit, -msg, -name guest= only
    # when query-command-line-options lists them
    assert "fd" in opts["chardev"] and "append" in opts["chardev"]
    assert "enable" in opts["sandbox"] and "elevateprivileges" in opts["sandbox"]
    assert "overcommit" in opts and "timestamp" in opts["msg"]
    assert {"guest", "debug-threads"} <= set(opts["name"])
    assert "strict" in opts["boot-opts"] and "dies" in opts["smp-opts"]
    assert "numa" not in opts and "reconnect" not in opts["chardev"]


def test_sizes_that_overflow_in_the_product() -> None:
    """Found by tests/fuzz (target size): '.3e308' is finite, times 1 MiB it is not."""
    from pyhv.shim.argv import parse_size
    from pyhv.shim.errors import ShimError

    for text in (".3e308", "1e300G", "1.7e308"):
        with pytest.raises(ShimError, match="expects a size"):
            parse_size(text, "size", "-m", 20)
    assert parse_size("1.5G", "size", "-m", 20) == 3 << 29
