"""pyhv.shim.schema and pyhv.shim.commands: what libvirt sees over QMP."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pytest

from pyhv.shim import schema as qapi
from pyhv.shim.commands import Commands, CpuidWord, QmpSession, VcpuInfo
from pyhv.shim.qmp import QmpConnection, QmpError


@dataclass
class FakeMachine:
    """A MachineControl for tests: records what it was asked to do."""

    name: Optional[str] = "guest1"
    uuid: Optional[str] = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    cpu_type: str = "host-x86_64-cpu"
    state: str = "prelaunch"
    balloon: Optional[int] = None
    io_status: Optional[str] = None
    threshold: tuple[int, Optional[str]] = (0, None)
    calls: list[str] = field(default_factory=list)

    def status(self) -> str:
        return self.state

    def cont(self) -> None:
        self.calls.append("cont")
        self.state = "running"

    def stop(self) -> None:
        self.calls.append("stop")
        self.state = "paused"

    def powerdown(self) -> None:
        self.calls.append("powerdown")

    def reset(self) -> None:
        self.calls.append("reset")

    def quit(self) -> None:
        self.calls.append("quit")
        self.state = "shutdown"

    def chardevs(self) -> Sequence[tuple[str, str, bool]]:
        return [("charserial0", "pty:/dev/pts/7", True), ("charmonitor", "unix:/x,server", True)]

    def vcpus(self) -> Sequence[VcpuInfo]:
        return [VcpuInfo(0, 4001, 0, 0, 0), VcpuInfo(1, 4002, 0, 1, 0)]

    def cpuid_words(self) -> Sequence[CpuidWord]:
        return [(1, None, "EDX", 0x178BFBFF), (1, None, "ECX", 0xF6D83203),
                (7, 0, "EBX", 0x219C07AB)]

    def peripherals(self) -> Sequence[tuple[str, str]]:
        return [("virtio-disk0", "virtio-blk-pci"), ("net0", "virtio-net-pci")]

    def balloon_actual(self) -> Optional[int]:
        return self.balloon

    def set_balloon(self, target: int) -> None:
        self.balloon = target

    def balloon_path(self) -> Optional[str]:
        return "/machine/peripheral/balloon0" if self.balloon is not None else None

    def balloon_stats(self) -> dict:
        return {"stats": {"stat-free-memory": 123}, "last-update": 42}

    def set_balloon_stats_period(self, seconds: int) -> None:
        self.stats_period = seconds

    def block_devices(self):
        from pyhv.shim.commands import BlockDevice

        return [BlockDevice("/machine/peripheral/virtio-disk0/virtio-backend",
                            "libvirt-1-format", "libvirt-1-storage", "/img/a.raw", False,
                            "file", 1 << 30, 4096,
                            {"rd_bytes": 512, "wr_bytes": 1024, "rd_operations": 1,
                             "wr_operations": 2, "flush_operations": 3}, self.io_status,
                            *self.threshold)]

    def resize_block(self, qdev: str, size: int) -> None:
        self.calls.append(f"resize {qdev} {size}")

    def set_write_threshold(self, qdev: str, node: str, threshold: int) -> None:
        self.calls.append(f"threshold {qdev} {node} {threshold}")
        self.threshold = (threshold, node)

    def set_link(self, name: str, up: bool) -> None:
        if name not in ("net0", "hostnet0"):
            raise QmpError(f"Device '{name}' not found", "DeviceNotFound")
        self.calls.append(f"link {name} {'up' if up else 'down'}")

    def rx_filters(self, name: Optional[str]) -> list[dict[str, Any]]:
        if name not in (None, "net0"):
            raise QmpError(f"Device '{name}' not found", "DeviceNotFound")
        return [{"name": "net0", "promiscuous": True, "multicast": "normal",
                 "unicast": "normal", "vlan": "all", "broadcast-allowed": True,
                 "multicast-overflow": False, "unicast-overflow": False,
                 "main-mac": "52:54:00:12:34:56", "vlan-table": [], "unicast-table": [],
                 "multicast-table": []}]

    def rtc_reset_reinjection(self) -> None:
        self.calls.append("rtc-reset-reinjection")

    def device_add(self, args: dict[str, Any]) -> None:
        if args.get("bus") != "pci.1":
            raise QmpError("Bus 'pcie.0' does not support hotplugging")
        self.calls.append(f"device_add {args.get('driver')}")

    def device_del(self, ident: str) -> None:
        if ident != "net0":
            raise QmpError(f"Device '{ident}' not found", "DeviceNotFound")
        self.calls.append(f"device_del {ident}")

    def netdev_add(self, args: dict[str, Any], take_fd: Any) -> None:
        if "fd" in args:
            take_fd(args["fd"])
        self.calls.append(f"netdev_add {args.get('id')}")

    def netdev_del(self, ident: str) -> None:
        self.calls.append(f"netdev_del {ident}")

    def blockdev_add(self, args: dict[str, Any]) -> None:
        self.calls.append(f"blockdev-add {args.get('node-name')}")

    def blockdev_del(self, name: str) -> None:
        self.calls.append(f"blockdev-del {name}")

    def add_fd(self, fdset: Optional[int], fd: int, opaque: Optional[str]) -> int:
        self.calls.append(f"add-fd {fdset} {opaque}")
        os.close(fd)
        return 5 if fdset is None else fdset

    def remove_fd(self, fdset: int, fd: Optional[int]) -> None:
        if fdset != 5:
            raise QmpError(f"File descriptor named 'fdset-id={fdset}' not found")
        self.calls.append(f"remove-fd {fdset} {fd}")

    def fdsets(self) -> Sequence[tuple[int, Sequence[tuple[int, Optional[str]]]]]:
        return [(0, [(32, "serial0-source")]), (3, [(40, None), (41, None)])]


class Client:
    """libvirt's side: send a command, read one line back."""

    def __init__(self, machine: Optional[FakeMachine] = None) -> None:
        self.session = QmpSession(Commands(machine))
        self.greeting = json.loads(self.session.start())
        self.n = 0

    def raw(self, msg: dict[str, Any]) -> dict[str, Any]:
        out = self.session.feed(json.dumps(msg).encode() + b"\r\n")
        assert out.endswith(b"\r\n") and out.count(b"\r\n") == 1
        return json.loads(out)

    def call(self, name: str, **args: Any) -> dict[str, Any]:
        self.n += 1
        msg: dict[str, Any] = {"execute": name, "id": f"libvirt-{self.n}"}
        if args:
            msg["arguments"] = args
        reply = self.raw(msg)
        assert reply["id"] == f"libvirt-{self.n}"
        if "return" in reply:
            cmd = qapi.SCHEMA.commands[name]
            if cmd.returns:
                qapi.check_value(reply["return"], cmd.returns, "return")
            else:
                assert reply["return"] == {}
        return reply

    def ok(self, name: str, **args: Any) -> Any:
        reply = self.call(name, **args)
        assert "return" in reply, reply
        return reply["return"]

    def err(self, name: str, **args: Any) -> tuple[str, str]:
        reply = self.call(name, **args)
        assert "error" in reply, reply
        return reply["error"]["class"], reply["error"]["desc"]


def negotiated(machine: Optional[FakeMachine] = None) -> Client:
    c = Client(machine)
    c.ok("qmp_capabilities")
    return c


# ---------------------------------------------------------------- schema graph


def test_schema_is_a_consistent_graph() -> None:
    entries = qapi.introspect()
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "libvirt refuses duplicate names"
    by_name = {e["name"]: e for e in entries}

    def refs(e: dict[str, Any]) -> list[str]:
        mt = e["meta-type"]
        if mt in ("command",):
            return [e["arg-type"], e["ret-type"]]
        if mt == "event":
            return [e["arg-type"]]
        if mt == "array":
            return [e["element-type"]]
        if mt == "object":
            return [m["type"] for m in e["members"]] + [v["type"] for v in e.get("variants", [])]
        if mt == "alternate":
            return [m["type"] for m in e["members"]]
        return []

    for e in entries:
        for r in refs(e):
            assert r in by_name, f"{e['name']} refers to undefined {r}"
        if e["meta-type"] == "object" and "tag" in e:
            tag = next(m for m in e["members"] if m["name"] == e["tag"])
            values = by_name[tag["type"]]["values"]
            assert {v["case"] for v in e["variants"]} <= set(values)
            for v in e["variants"]:
                assert by_name[v["type"]]["meta-type"] == "object"
        if e["meta-type"] == "enum":
            assert [m["name"] for m in e["members"]] == e["values"]
    qapi.check_value(entries, "[SchemaInfo]", "return")


def test_every_command_has_a_handler_and_back() -> None:
    handlers = Commands().handlers
    assert set(handlers) == set(qapi.SCHEMA.commands)
    cmds = {e["name"] for e in qapi.introspect() if e["meta-type"] == "command"}
    assert cmds == set(qapi.SCHEMA.commands)
    extra = {n[4:].replace("_", "-") for n in dir(Commands) if n.startswith("cmd_")}
    assert extra == {n.replace("_", "-") for n in qapi.SCHEMA.commands}


# ------------------------------------------------ libvirt's schema queries


def _lookup(schema: dict[str, dict[str, Any]], name: str, query: list[str]) -> bool:
    """virQEMUQAPISchemaPathGet's semantics, reimplemented from its documentation."""
    cur = schema.get(name)
    if cur is None:
        return False
    if not query:
        return True
    q, rest = query[0], query[1:]
    mod = "" if q[:1].isalpha() else q[0]
    key = q if not mod else q[1:]
    mt = cur["meta-type"]
    if mod == "$":
        return key in cur.get("features", []) and not rest
    if mt in ("command", "event"):
        return not mod and key in cur and _lookup(schema, cur[key], rest)
    if mt == "array":
        return _lookup(schema, cur["element-type"], query)
    if mt == "enum":
        return mod == "^" and key in [m["name"] for m in cur["members"]] and not rest
    if mt == "alternate":
        return any(_lookup(schema, m["type"], query) for m in cur["members"])
    if mt == "object":
        if mod == "+":
            hit = [v["type"] for v in cur.get("variants", []) if v["case"] == key]
        else:
            ms = [m for m in cur["members"] if m["name"] == key]
            if mod == "*":
                ms = [m for m in ms if "default" in m]
            hit = [m["type"] for m in ms]
        return bool(hit) and _lookup(schema, hit[0], rest)
    return False


def schema_has(path: str) -> bool:
    schema = {e["name"]: e for e in qapi.introspect()}
    first, *rest = path.split("/")
    return _lookup(schema, first, rest)


@pytest.mark.parametrize("path", [
    "object-add/arg-type/qom-type/^secret",
    "device_add/$json-cli-hotplug",
    "netdev_add/arg-type/type/^dgram",
    "blockdev-add/arg-type/+file/$dynamic-auto-read-only",
    "human-monitor-command/$savevm-monitor-nodes",
    "query-named-block-nodes/arg-type/flat",
    "blockdev-add/arg-type/discard",
    "blockdev-add/arg-type/detect-zeroes",
    "query-cpu-definitions",
    "query-cpu-model-expansion",
    "SHUTDOWN",
    "DEVICE_DELETED",
    "getfd",
])
def test_libvirt_finds(path: str) -> None:
    assert schema_has(path)


@pytest.mark.parametrize("path", [
    "query-display-options/ret-type/+egl-headless",
    "query-display-options/ret-type/+sdl",
    "query-hotpluggable-cpus/ret-type/props/die-id",
    "blockdev-add/arg-type/+file/aio/^io_uring",
    "blockdev-add/arg-type/+file/drop-cache",
    "blockdev-add/arg-type/+nvme",
    "chardev-add/arg-type/backend/+socket/data/reconnect",
    "netdev_add/arg-type/+stream",
    "netdev_add/arg-type/+vhost-vdpa",
    "object-add/arg-type/+sev-guest/kernel-hashes",
    "object-add/arg-type/+iothread/thread-pool-max",
    "screendump/arg-type/device",
    "set-action",
    "blockdev-reopen",
    "query-vnc",
    "MIGRATION",
])
def test_libvirt_does_not_find(path: str) -> None:
    assert not schema_has(path)


def test_path_lookup_helper_sanity() -> None:
    assert schema_has("blockdev-add/arg-type/+raw/file/+file/filename")
    assert schema_has("query-status/ret-type/status/^running")
    assert not schema_has("query-status/ret-type/status/^nonsense")
    assert schema_has("qmp_capabilities/arg-type/*enable")
    assert not schema_has("qom-get/arg-type/*path")


# ------------------------------------------------------------ argument checks


@pytest.mark.parametrize("name, args, cls, desc", [
    ("no-such-command", {}, "CommandNotFound", "The command no-such-command has not been found"),
    ("query-status", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ("qom-get", {"path": "/"}, "GenericError", "Parameter 'property' is missing"),
    ("qom-get", {"path": 1, "property": "x"}, "GenericError",
     "Invalid parameter type for 'path', expected: string"),
    ("balloon", {"value": "1"}, "GenericError",
     "Invalid parameter type for 'value', expected: integer"),
    ("balloon", {"value": True}, "GenericError",
     "Invalid parameter type for 'value', expected: integer"),
    ("qom-list-types", {"abstract": 1}, "GenericError",
     "Invalid parameter type for 'abstract', expected: boolean"),
    ("object-add", {"qom-type": "sev-guest", "id": "s"}, "GenericError",
     "Parameter 'qom-type' does not accept value 'sev-guest'"),
    ("object-add", {"qom-type": "secret", "id": "s", "bogus": 1}, "GenericError",
     "Parameter 'bogus' is unexpected"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": {"driver": "file"}},
     "GenericError", "Parameter 'file.filename' is missing"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]},
     "GenericError", "Parameter 'capabilities[0].capability' does not accept value 'xbzrle'"),
])
def test_argument_errors(name: str, args: dict[str, Any], cls: str, desc: str) -> None:
    c = negotiated()
    assert c.err(name, **args) == (cls, desc)


def test_open_arguments_of_device_add() -> None:
    c = negotiated()
    cls, desc = c.err("device_add", driver="pcie-root-port", id="d", addr="0x5")
    assert cls == "GenericError" and "there is no machine" in desc
    assert c.err("device_add", driver="nonsense")[1] == \
        "'nonsense' is not a valid device model name"



def test_getfd_names_the_descriptor_that_came_with_it() -> None:
    m = FakeMachine()
    c = negotiated(m)
    assert c.err("getfd", fdname="tap0") == (
        "GenericError", "No file descriptor supplied via SCM_RIGHTS")
    r, w = os.pipe()
    c.session.conn.receive_fds([r])
    assert c.ok("getfd", fdname="tap0") == {}
    assert c.err("getfd", fdname="0bad")[1] == "Parameter 'fdname' may not start with a digit"
    assert c.ok("netdev_add", type="tap", id="hostnet1", fd="tap0") == {}
    assert m.calls[-1] == "netdev_add hostnet1"
    assert c.err("netdev_add", type="tap", id="hostnet2", fd="tap0")[1] == \
        "File descriptor named 'tap0' has not been found"  # taken by the first
    os.close(r)
    c.session.conn.receive_fds([os.dup(w)])
    assert c.ok("add-fd", opaque="rw:/x")["fdset-id"] == 5
    assert c.err("add-fd")[1] == "No file descriptor supplied via SCM_RIGHTS"
    c.ok("remove-fd", **{"fdset-id": 5})
    c.session.conn.receive_fds([w])
    c.ok("getfd", fdname="w")
    assert c.ok("closefd", fdname="w") == {}
    with pytest.raises(OSError):
        os.fstat(w)  # closed by closefd
    assert c.err("closefd", fdname="w")[1] == "File descriptor named 'w' not found"


def test_hotplug_commands_reach_the_machine() -> None:
    m = FakeMachine()
    c = negotiated(m)
    c.ok("blockdev-add", driver="file", filename="/x", **{"node-name": "s"})
    c.ok("device_add", driver="virtio-blk-pci", drive="s", id="d", bus="pci.1")
    assert c.err("device_add", driver="virtio-blk-pci", drive="s", id="d")[1] == \
        "Bus 'pcie.0' does not support hotplugging"
    c.ok("device_del", id="net0")
    assert c.err("device_del", id="nope") == ("DeviceNotFound", "Device 'nope' not found")
    c.ok("netdev_del", id="hostnet0")
    c.ok("blockdev-del", **{"node-name": "s"})
    assert m.calls == ["blockdev-add s", "device_add virtio-blk-pci", "device_del net0",
                       "netdev_del hostnet0", "blockdev-del s"]


# ------------------------------------------------------------ the probe


def test_libvirt_probe_sequence() -> None:
    c = Client()
    assert c.greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert c.ok("qmp_capabilities") == {}
    assert c.err("qmp_capabilities")[0] == "CommandNotFound"
    v = c.ok("query-version")
    assert (v["qemu"]["major"], v["qemu"]["minor"]) >= (4, 2) and v["package"]
    assert c.ok("query-target") == {"arch": "x86_64"}
    schema = c.ok("query-qmp-schema")
    assert {e["name"] for e in schema} >= {"query-cpu-definitions", "SHUTDOWN"}
    assert {"name": "qom-get"} in c.ok("query-commands")
    assert c.ok("query-kvm") == {"enabled": True, "present": True}

    types = {t["name"]: t for t in c.ok("qom-list-types")}
    # only what the engine builds is offered (domcapabilities lists nothing else)
    assert "isa-serial" in types and "max-x86_64-cpu" in types
    assert "vhost-user-fs-pci" not in types and "virtio-net-pci" in types
    assert "virtio-blk-pci" in types and "virtio-blk-pci-non-transitional" in types
    # modern-only virtio: the "-non-transitional" name is what makes libvirt put
    # virtio devices on PCI Express ports
    assert "virtio-rng-pci-non-transitional" in types
    assert "virtio-rng-pci-transitional" not in types
    assert {"qemu-xhci", "piix3-usb-uhci", "ich9-usb-ehci1"} <= set(types)
    assert "secret" in types and "memory-backend-memfd" in types
    assert "tcg-accel" not in types  # KVM only: libvirt must not offer TCG
    assert not any(t.get("abstract") for t in types.values())
    pci = {t["name"] for t in c.ok("qom-list-types", implements="pci-device")}
    assert "pcie-root-port" in pci and "isa-serial" not in pci
    assert "device" in {t["name"] for t in c.ok("qom-list-types", abstract=True)}

    props = {p["name"]: p for p in c.ok("device-list-properties", typename="PIIX4_PM")}
    assert props["disable_s3"]["default-value"] == 1  # S3/S4 off: pyhv offers S5 only
    for absent in ("scsi-hd", "ide-hd", "kvm-pit", "usb-host"):
        assert c.err("device-list-properties", typename=absent) == (
            "DeviceNotFound", f"Device '{absent}' not found")
    assert c.err("device-list-properties", typename="secret")[0] == "GenericError"

    cpu_props = {p["name"] for p in c.ok("qom-list-properties", typename="max-x86_64-cpu")}
    assert "unavailable-features" not in cpu_props  # so libvirt reads feature-words
    assert "migratable" in cpu_props
    mem = {p["name"] for p in c.ok("qom-list-properties", typename="memory-backend-memfd")}
    assert {"size", "hugetlb", "share"} <= mem
    # libvirt 9.0 dereferences the property list of memory-backend-file without
    # checking for an error (seen: libvirtd segfaults), so the type must exist
    props = {p["name"] for p in c.ok("qom-list-properties", typename="memory-backend-file")}
    assert {"size", "mem-path", "share", "discard-data"} <= props
    none = {p["name"] for p in c.ok("qom-list-properties", typename="none-machine")}
    assert "confidential-guest-support" not in none

    machines = c.ok("query-machines")
    default = [m for m in machines if m.get("is-default")]
    assert len(default) == 1 and default[0].get("alias") == "pc"
    assert all(m["deprecated"] is False for m in machines)
    pc = default[0]
    assert pc["default-ram-id"] == "pc.ram" and pc["cpu-max"] >= 1

    cpus = {d["name"]: d for d in c.ok("query-cpu-definitions")}
    assert cpus["host"]["typename"] == "host-x86_64-cpu"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        # qemu64's SSE3 (pni) is its one feature a KVM may lack (svm is off under KVM)
        from pyhv.engine.kvm import Kvm
        leaf1 = next(e for e in Kvm().get_supported_cpuid() if e[0] == 1)
        assert cpus["qemu64"]["unavailable-features"] == ([] if leaf1[5] & 1 else ["pni"])
        assert cpus["host"]["unavailable-features"] == []
    assert pc["default-cpu-type"] in {d["typename"] for d in cpus.values()}

    assert c.ok("query-tpm-models") == [] and c.ok("query-tpm-types") == []
    assert isinstance(c.ok("query-command-line-options"), list)
    # libvirt turns "events" on at every start (migrate-set-capabilities)
    assert c.ok("query-migrate-capabilities") == [{"capability": "events", "state": False}]
    assert c.err("query-sev-capabilities")[0] == "GenericError"
    assert c.err("query-sgx-capabilities")[0] == "GenericError"
    assert c.ok("query-status") == {"status": "prelaunch", "singlestep": False,
                                    "running": False}
    assert c.ok("quit") == {}
    assert c.session.done


# ------------------------------------------------------------ a running guest


def test_guest_lifecycle() -> None:
    m = FakeMachine()
    c = negotiated(m)
    assert c.ok("query-status")["status"] == "prelaunch"
    assert c.ok("human-monitor-command", **{"command-line": "info status"}) == \
        "VM status: paused (prelaunch)\r\n"
    c.ok("cont")
    assert c.ok("query-status") == {"status": "running", "singlestep": False, "running": True}
    assert c.ok("human-monitor-command", **{"command-line": "info status"}) == \
        "VM status: running\r\n"
    c.ok("stop")
    assert c.ok("query-status")["status"] == "paused"
    c.ok("cont")
    c.ok("system_powerdown")
    c.ok("system_reset")
    m.state = "shutdown"
    assert c.err("cont") == ("GenericError", "Resetting the Virtual Machine is required")
    c.ok("quit")
    assert m.calls == ["cont", "stop", "cont", "powerdown", "reset", "quit"]
    assert c.session.done


def test_vcpus_chardevs_and_qom() -> None:
    m = FakeMachine()
    c = negotiated(m)
    cpus = c.ok("query-cpus-fast")
    assert [(x["cpu-index"], x["thread-id"], x["qom-path"]) for x in cpus] == [
        (0, 4001, "/machine/unattached/device[0]"), (1, 4002, "/machine/unattached/device[1]")]
    assert cpus[1]["props"] == {"socket-id": 0, "core-id": 1, "thread-id": 0}
    hot = c.ok("query-hotpluggable-cpus")
    assert hot[0]["type"] == "host-x86_64-cpu" and hot[0]["vcpus-count"] == 1
    assert c.ok("human-monitor-command", **{"command-line": "info cpus"}) == \
        "* CPU #0: thread_id=4001\r\n  CPU #1: thread_id=4002\r\n"
    assert "unknown command" in c.ok("human-monitor-command", **{"command-line": "foo bar"})

    (pty, _) = c.ok("query-chardev")
    assert pty == {"label": "charserial0", "filename": "pty:/dev/pts/7", "frontend-open": True}

    words = c.ok("qom-get", path="/machine/unattached/device[0]", property="feature-words")
    assert words[0] == {"cpuid-input-eax": 1, "cpuid-register": "EDX", "features": 0x178BFBFF}
    assert words[2]["cpuid-input-ecx"] == 0
    filtered = c.ok("qom-get", path="/machine/unattached/device[0]",
                    property="filtered-features")
    assert all(w["features"] == 0 for w in filtered) and len(filtered) == len(words)
    names = {p["name"] for p in c.ok("qom-list", path="/machine/unattached/device[0]")}
    assert {"feature-words", "filtered-features"} <= names
    assert c.err("qom-get", path="/machine/unattached/device[9]", property="type")[0] == \
        "DeviceNotFound"
    assert c.err("qom-get", path="/machine/unattached/device[0]", property="nope")[0] == \
        "GenericError"
    periph = c.ok("qom-list", path="/machine/peripheral")
    assert {"name": "virtio-disk0", "type": "child<virtio-blk-pci>"} in periph
    assert c.err("qom-list", path="/nowhere")[0] == "DeviceNotFound"

    assert c.ok("query-name") == {"name": "guest1"}
    assert c.ok("query-uuid") == {"UUID": "c7a5fdbd-edaf-9455-926a-d65c16db1809"}
    assert c.ok("query-iothreads") == []
    qdev = "/machine/peripheral/virtio-disk0/virtio-backend"
    (blk,) = c.ok("query-block")
    assert blk["qdev"] == qdev and blk["inserted"]["node-name"] == "libvirt-1-format"
    assert blk["inserted"]["image"]["virtual-size"] == 1 << 30
    assert "io-status" not in blk                  # errors never stop this disk
    m.io_status = "nospace"                        # werror=enospc stopped the machine
    assert c.ok("query-block")[0]["io-status"] == "nospace"
    nodes = c.ok("query-named-block-nodes", flat=True)
    assert [(n["node-name"], n["drv"]) for n in nodes] == [
        ("libvirt-1-format", "raw"), ("libvirt-1-storage", "file")]
    assert all(n["image"]["actual-size"] == 4096 for n in nodes)
    (stats,) = c.ok("query-blockstats", **{"query-nodes": False})
    assert stats["qdev"] == qdev and stats["stats"]["wr_operations"] == 2
    assert [x["node-name"] for x in c.ok("query-blockstats", **{"query-nodes": True})] == [
        "libvirt-1-format", "libvirt-1-storage"]
    assert {"name": "SHUTDOWN"} in c.ok("query-events")


def test_block_resize() -> None:
    """block_resize finds the disk by either of its nodes (libvirt's blockdev names)
    or its device id, and refuses what QEMU refuses."""
    m = FakeMachine()
    c = negotiated(m)
    qdev = "/machine/peripheral/virtio-disk0/virtio-backend"
    assert c.ok("block_resize", **{"node-name": "libvirt-1-format", "size": 2 << 30}) == {}
    assert c.ok("block_resize", **{"node-name": "libvirt-1-storage", "size": 4096}) == {}
    assert c.ok("block_resize", device="virtio-disk0", size=512) == {}
    assert m.calls[-3:] == [f"resize {qdev} {2 << 30}", f"resize {qdev} 4096",
                            f"resize {qdev} 512"]
    assert c.err("block_resize", **{"node-name": "nope", "size": 1})[1] == \
        "Cannot find device= nor node-name=nope"
    assert c.err("block_resize", size=1)[1] == "Either 'device' or 'node-name' must be set"
    assert c.err("block_resize", **{"node-name": "libvirt-1-format", "size": -1})[1] == \
        "Parameter 'size' expects a >0 size"
    assert c.err("block_resize", **{"node-name": "libvirt-1-format"})[0] == "GenericError"
    assert len(m.calls) == 3


def test_block_set_write_threshold() -> None:
    """The threshold is set through a node and shows on that node only (libvirt's
    domstats block.N.threshold reads query-named-block-nodes)."""
    m = FakeMachine()
    c = negotiated(m)
    nodes = c.ok("query-named-block-nodes", flat=True)
    assert [n["write_threshold"] for n in nodes] == [0, 0]
    assert c.ok("block-set-write-threshold",
                **{"node-name": "libvirt-1-storage", "write-threshold": 1 << 20}) == {}
    assert m.calls[-1] == ("threshold /machine/peripheral/virtio-disk0/virtio-backend "
                           f"libvirt-1-storage {1 << 20}")
    nodes = c.ok("query-named-block-nodes", flat=True)
    assert [(n["node-name"], n["write_threshold"]) for n in nodes] == [
        ("libvirt-1-format", 0), ("libvirt-1-storage", 1 << 20)]
    assert c.err("block-set-write-threshold",
                 **{"node-name": "nope", "write-threshold": 1}) == \
        ("GenericError", "Device 'nope' not found")
    assert {"name": "BLOCK_WRITE_THRESHOLD"} in c.ok("query-events")


def test_set_link_and_query_rx_filter() -> None:
    m = FakeMachine()
    c = negotiated(m)
    def run(command: str, **args: Any) -> dict[str, Any]:
        # "name" is these commands' argument and also Client.call's parameter
        return c.raw({"execute": command, "arguments": args})

    assert run("set_link", name="net0", up=False) == {"return": {}}
    assert m.calls[-1] == "link net0 down"
    assert run("set_link", name="nope", up=True)["error"] == {
        "class": "DeviceNotFound", "desc": "Device 'nope' not found"}
    assert run("set_link", name="net0")["error"]["class"] == "GenericError"
    (info,) = run("query-rx-filter", name="net0")["return"]
    assert info["name"] == "net0" and info["main-mac"] == "52:54:00:12:34:56"
    assert {"name": "NIC_RX_FILTER_CHANGED"} in c.ok("query-events")


def test_balloon() -> None:
    m = FakeMachine()
    c = negotiated(m)
    assert c.err("query-balloon") == ("DeviceNotActive", "No balloon device has been activated")
    assert c.err("balloon", value=1 << 30)[0] == "DeviceNotActive"
    m.balloon = 2 << 30
    assert c.ok("query-balloon") == {"actual": 2 << 30}
    c.ok("balloon", value=1 << 30)
    assert m.balloon == 1 << 30
    assert c.err("balloon", value=0)[0] == "GenericError"
    # what libvirt does for dommemstat: find the balloon's properties, set the period,
    # read the statistics
    path = "/machine/peripheral/balloon0"
    names = {p["name"] for p in c.ok("qom-list", path=path)}
    assert {"guest-stats", "guest-stats-polling-interval"} <= names
    c.ok("qom-set", path=path, property="guest-stats-polling-interval", value=5)
    assert m.stats_period == 5
    assert c.ok("qom-get", path=path, property="guest-stats")["last-update"] == 42
    assert c.err("qom-set", path=path, property="guest-stats-polling-interval",
                 value=-1)[0] == "GenericError"
    assert c.err("qom-set", path="/machine/peripheral/nope", property="x",
                 value=1)[0] == "DeviceNotFound"


def test_reconnect_queries() -> None:
    """What libvirtd asks a running emulator when it reconnects after a restart:
    no jobs, no migration, and the fd sets the command line created."""
    c = negotiated(FakeMachine())
    assert c.ok("query-jobs") == []
    assert c.ok("query-block-jobs") == []
    assert c.ok("query-migrate") == {}
    assert c.ok("query-fdsets") == [
        {"fdset-id": 0, "fds": [{"fd": 32, "opaque": "serial0-source"}]},
        {"fdset-id": 3, "fds": [{"fd": 40}, {"fd": 41}]}]


def test_events_through_session() -> None:
    s = QmpSession(Commands(FakeMachine()), QmpConnection(clock=lambda: 5.5))
    assert s.event("STOP") == b""
    s.feed(b'{"execute": "qmp_capabilities"}\r\n')
    ev = json.loads(s.event("STOP"))
    assert ev == {"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 500000}}


def test_handler_exceptions_become_errors() -> None:
    class Broken(FakeMachine):
        def status(self) -> str:
            raise RuntimeError("engine gone")

    c = negotiated(Broken())
    cls, desc = c.err("query-status")
    assert cls == "GenericError" and "engine gone" in desc
    assert c.ok("query-kvm")["present"] is True  # still serving


def test_commands_execute_raises_qmp_error() -> None:
    with pytest.raises(QmpError) as e:
        Commands().execute("qom-get", {}, QmpConnection())
    assert e.value.desc == "Parameter 'path' is missing"


class Qcow2Machine(FakeMachine):
    """One qcow2 disk over a -blockdev chain: top.qcow2 → base.qcow2 → (nothing)."""

    def block_devices(self):
        from pyhv.shim.commands import BlockDevice, ImageDesc

        chain = (ImageDesc("/img/top.qcow2", "qcow2", 1 << 30, 200704, 65536,
                           "/img/base.qcow2", "qcow2", file_length=196624,
                           node="libvirt-1-format", file_node="libvirt-1-storage"),
                 ImageDesc("/img/base.qcow2", "qcow2", 1 << 29, 4096, 65536,
                           file_length=327680, node="libvirt-2-format",
                           file_node="libvirt-2-storage"))
        return [BlockDevice("/machine/peripheral/virtio-disk0/virtio-backend",
                            "libvirt-1-format", "libvirt-1-storage", "/img/top.qcow2", False,
                            "file", 1 << 30, 200704,
                            {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0,
                             "wr_operations": 0, "flush_operations": 0},
                            format="qcow2", chain=chain)]


def test_qcow2_chain_in_query_block() -> None:
    """query-block and query-named-block-nodes describe a qcow2 disk and its backing
    chain as QEMU does (drv, backing_file, backing_file_depth, backing-image); the
    answers are checked against the schema by the session helper."""
    c = negotiated(Qcow2Machine())
    (blk,) = c.ok("query-block")
    ins = blk["inserted"]
    assert (ins["drv"], ins["file"], ins["backing_file"], ins["backing_file_depth"]) == (
        "qcow2", "/img/top.qcow2", "/img/base.qcow2", 1)
    image = ins["image"]
    assert (image["format"], image["cluster-size"], image["backing-filename"],
            image["backing-filename-format"]) == ("qcow2", 65536, "/img/base.qcow2", "qcow2")
    assert image["backing-image"]["filename"] == "/img/base.qcow2"
    assert image["backing-image"]["virtual-size"] == 1 << 29
    assert "backing-image" not in image["backing-image"]
    nodes = c.ok("query-named-block-nodes", flat=True)
    assert [(n["node-name"], n["drv"], n["ro"]) for n in nodes] == [
        ("libvirt-1-format", "qcow2", False), ("libvirt-1-storage", "file", False),
        ("libvirt-2-format", "qcow2", True), ("libvirt-2-storage", "file", True)]
    assert nodes[1]["image"]["virtual-size"] == 196624  # a file node: the file's length
    assert nodes[2]["backing_file_depth"] == 0 and "backing_file" not in nodes[2]
