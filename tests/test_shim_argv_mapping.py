"""pyhv-qemu: libvirt 9.0's QEMU command lines → ShimPlan (pyhv.shim.mapping)."""

from __future__ import annotations

import json

import pytest

from pyhv.config import BackingFile, PciAddress, SerialConfig
from pyhv.shim.errors import ShimError, ShimUnsupportedError, ShimUsageError
from pyhv.shim.mapping import ShimPlan, build, parse_and_map

DOM = "/var/lib/libvirt/qemu/domain-1-demo"

PROBE = ["-S", "-no-user-config", "-nodefaults", "-nographic",
         "-machine", "none,accel=kvm:tcg",
         "-qmp", "unix:/var/lib/libvirt/qemu/capabilities.monitor.sock,server=on,wait=off",
         "-pidfile", "/var/lib/libvirt/qemu/capabilities.pidfile", "-daemonize"]


def j(**kw: object) -> str:
    return json.dumps(kw).replace("qom_type", "qom-type").replace("node_name", "node-name")


def head(machine: str = "pc-i440fx-7.2", cpu: str = "host", accel: str = "kvm") -> list[str]:
    return [
        "-name", "guest=demo,debug-threads=on", "-S",
        "-object", j(qom_type="secret", id="masterKey0", format="raw",
                     file=f"{DOM}/master-key.aes"),
        "-machine", f"{machine},usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel", accel, "-cpu", cpu, "-m", "256",
        "-object", j(qom_type="memory-backend-ram", id="pc.ram", size=268435456),
        "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "c7a5fdbd-edaf-9455-926a-d65c16db1809", "-display", "none",
        "-no-user-config", "-nodefaults",
        "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on",
        "-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd.img",
        "-append", "console=ttyS0 root=/dev/vda,rw",
    ]


TAIL = ["-audiodev", '{"id":"audio1","driver":"none"}',
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg", "timestamp=on"]

FILE_SERIAL = ["-add-fd", "set=0,fd=32,opaque=serial0-source",
               "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on",
               "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0",'
                          '"index":0}']

PTY_SERIAL = ["-chardev", "pty,id=charserial0",
              "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0",'
                         '"index":0}']


def q35_virtio() -> list[str]:
    ports = []
    for n in range(1, 7):
        ports += ["-device", j(driver="pcie-root-port", port=15 + n, chassis=n, id=f"pci.{n}",
                               bus="pcie.0", multifunction=n == 1,
                               addr="0x2" if n == 1 else f"0x2.0x{n - 1}")]
    return head("pc-q35-7.2") + ports + [
        "-device", j(driver="virtio-serial-pci", id="virtio-serial0", bus="pci.2", addr="0x0"),
        "-blockdev", j(driver="file", filename="/var/lib/libvirt/images/demo.img",
                       node_name="libvirt-1-storage", **{"auto-read-only": True},
                       discard="unmap"),
        "-blockdev", j(node_name="libvirt-1-format", **{"read-only": False}, driver="raw",
                       file="libvirt-1-storage"),
        "-device", j(driver="virtio-blk-pci", bus="pci.3", addr="0x0",
                     drive="libvirt-1-format", id="virtio-disk0", bootindex=1),
        "-netdev", j(type="tap", fd="33", vhost=True, vhostfd="35", id="hostnet0"),
        "-device", j(driver="virtio-net-pci", netdev="hostnet0", id="net0",
                     mac="52:54:00:8b:ae:85", bus="pci.1", addr="0x0"),
        *PTY_SERIAL,
        "-chardev", "socket,id=charchannel0,fd=29,server=on,wait=off",
        "-device", j(driver="virtserialport", bus="virtio-serial0.0", nr=1,
                     chardev="charchannel0", id="channel0", name="org.qemu.guest_agent.0"),
        *TAIL[:2],
        "-device", j(driver="virtio-balloon-pci", id="balloon0", bus="pci.4", addr="0x0"),
        "-object", j(qom_type="rng-random", id="objrng0", filename="/dev/urandom"),
        "-device", j(driver="virtio-rng-pci", rng="objrng0", id="rng0", bus="pci.5",
                     addr="0x0"),
        *TAIL[2:],
    ]


def fails(args: list[str], cls: type[ShimError] = ShimError) -> str:
    with pytest.raises(cls) as e:
        build(args)
    text = str(e.value)
    assert "\n" not in text and text.startswith("pyhv-qemu: ")
    assert e.value.exit_status == 1
    return text


# ----------------------------------------------------------------- whole command lines


def test_capability_probe() -> None:
    plan = build(PROBE)
    assert plan.config is None
    assert plan.machine.name == "none"
    o = plan.options
    assert o.start_paused and o.daemonize
    assert o.pidfile == "/var/lib/libvirt/qemu/capabilities.pidfile"
    (mon,) = o.monitors
    assert mon.chardev.backend == "socket" and mon.chardev.server and not mon.chardev.wait
    assert mon.chardev.path == "/var/lib/libvirt/qemu/capabilities.monitor.sock"


def test_pc_domain_with_file_serial_on_an_fdset() -> None:
    plan = build(head() + FILE_SERIAL + TAIL)
    c = plan.config
    assert c is not None
    assert c.name == "demo" and c.uuid == "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    assert c.memory == 256 << 20 and c.vcpus == 1 and c.machine == "pc-i440fx-7.2"
    assert c.boot.kernel == "/boot/vmlinuz" and c.boot.initrd == "/boot/initrd.img"
    assert c.boot.cmdline == "console=ttyS0 root=/dev/vda,rw"
    assert c.serial.kind == "fd" and c.serial.fd == 32
    assert c.cpu.mode == "host-passthrough" and c.on_reboot == "restart"
    assert not c.shared_memory and c.memory_backing.source == "anonymous"
    o = plan.options
    assert o.name == "demo" and o.debug_threads and o.start_paused and o.no_shutdown
    assert o.msg_timestamp and o.sandbox and not o.daemonize
    assert o.fdsets[0][0].fd == 32 and o.fdsets[0][0].opaque == "serial0-source"
    assert sorted(o.inherited_fds) == [31, 32]
    (mon,) = o.monitors
    assert mon.chardev.fd == 31 and mon.chardev.server and not mon.chardev.wait
    assert mon.id == "monitor"
    assert plan.pending == ()


def test_pty_serial_and_named_cpu() -> None:
    plan = build(head(cpu="qemu64") + PTY_SERIAL + TAIL)
    assert plan.config is not None
    assert plan.config.serial == SerialConfig("pty")
    assert plan.config.cpu.mode == "custom" and plan.config.cpu.model == "qemu64"


def test_serial_logfile_by_path_and_by_fdset() -> None:
    """``logfile=`` (what libvirt passes for ``<log file=>``) is kept, not dropped."""
    pty = ["-chardev", "pty,id=charserial0,logfile=/var/log/console.log,logappend=on",
           *PTY_SERIAL[2:]]
    plan = build(head() + pty + TAIL)
    assert plan.config is not None and plan.pending == ()
    assert plan.config.serial == SerialConfig("pty", log_path="/var/log/console.log",
                                              log_append=True)
    fdset = ["-add-fd", "set=1,fd=33,opaque=serial0-log",
             "-chardev", "pty,id=charserial0,logfile=/dev/fdset/1,logappend=off",
             *PTY_SERIAL[2:]]
    plan = build(head() + fdset + TAIL)
    assert plan.config is not None
    assert plan.config.serial == SerialConfig("pty", log_fd=33, log_append=False)


def test_q35_with_virtio_devices() -> None:
    plan = parse_and_map(q35_virtio())
    c = plan.config
    assert c is not None and c.machine == "pc-q35-7.2"
    (disk,) = c.disks
    assert disk.path == "/var/lib/libvirt/images/demo.img" and not disk.readonly
    assert disk.discard == "unmap" and disk.boot_order == 1 and disk.source_type == "file"
    (net,) = c.nets
    assert net.backend == "tap" and net.fds == (33,) and net.mac == "52:54:00:8b:ae:85"
    assert net.vhost_fds == (35,) and net.queues == 1
    (chan,) = c.channels
    assert chan.name == "org.qemu.guest_agent.0"
    assert chan.chardev.kind == "unix" and chan.chardev.fd == 29 and chan.chardev.server
    (rng,) = c.rngs
    assert rng.source == "/dev/urandom"
    assert c.balloon is not None
    assert c.serial.kind == "pty"
    # libvirt's addresses are kept exactly, in the config's form (bus = controller index)
    assert disk.address == PciAddress(3, 0) and disk.id == "virtio-disk0"
    assert (net.address, rng.address, c.balloon.address) == (
        PciAddress(1, 0), PciAddress(5, 0), PciAddress(4, 0))
    ports = [x for x in c.controllers if x.type == "pci"]
    assert [(x.index, x.id, x.port, x.chassis) for x in ports] == [
        (n, f"pci.{n}", 15 + n, n) for n in range(1, 7)]
    assert [x.address for x in ports] == [PciAddress(0, 2, 0, multifunction=True)] + [
        PciAddress(0, 2, n) for n in range(1, 6)]
    (vs,) = [x for x in c.controllers if x.type == "virtio-serial"]
    assert vs.id == "virtio-serial0" and vs.address == PciAddress(2, 0)
    # addresses and buses are kept for QMP
    assert [b.id for b in plan.bridges] == [f"pci.{n}" for n in range(1, 7)]
    (d,) = [d for d in plan.devices if d.id == "virtio-disk0"]
    assert d.addr is not None and (d.addr.bus, d.addr.slot) == ("pci.3", 0)
    assert plan.nics[0].vhost_fds == (35,)
    assert c.nets[0].vhost_fds == (35,) and c.nets[0].vhost  # the kernel's data path
    assert sorted(plan.options.inherited_fds) == [29, 31, 33, 35]


# ----------------------------------------------------------------- pieces


def test_memory_forms() -> None:
    plan = build(["-m", "size=219136k", "-kernel", "/k"])
    assert plan.config is not None and plan.config.memory == 219136 << 10
    plan = build(["-m", "1G", "-kernel", "/k"])
    assert plan.config is not None and plan.config.memory == 1 << 30
    assert "memory backend" not in " ".join(plan.pending)


def test_memory_must_match_backend() -> None:
    args = head()
    args[args.index("256")] = "512"
    assert "-m asks for" in fails(args + PTY_SERIAL)


def test_shared_memfd_backend() -> None:
    args = ["-machine", "pc,memory-backend=pc.ram", "-kernel", "/k",
            "-object", '{"qom-type":"memory-backend-memfd","id":"pc.ram","size":268435456,'
                       '"share":true,"hugetlb":true,"hugetlbsize":2097152}']
    c = build(args).config
    assert c is not None and c.shared_memory and c.memory_backing.source == "memfd"
    assert c.memory_backing.hugepages and c.memory_backing.hugepage_size == 2 << 20


def test_smp_topology_and_maxcpus() -> None:
    c = build(["-smp", "4,sockets=2,cores=2,threads=1", "-kernel", "/k"]).config
    assert c is not None and c.vcpus == 4
    assert c.cpu.topology is not None and c.cpu.topology.sockets == 2
    c = build(["-smp", "2,maxcpus=4,sockets=4,cores=1,threads=1", "-kernel", "/k"]).config
    assert c is not None and c.vcpus == 2 and c.max_vcpus == 4
    assert "invalid CPU topology" in fails(["-smp", "4,sockets=3,cores=1,threads=1",
                                            "-kernel", "/k"])


def test_cpu_features() -> None:
    c = build(["-cpu", "Skylake-Client,+vmx,avx2=off,pmu=off,migratable=on",
               "-kernel", "/k"]).config
    assert c is not None and c.cpu.model == "Skylake-Client"
    # without enforce, QEMU leaves out (with a warning) a +feature the host lacks
    assert [(f.name, f.policy) for f in c.cpu.features] == [("vmx", "optional"),
                                                            ("avx2", "disable")]
    assert c.features.pmu is False and c.cpu.check == "partial"
    c = build(["-cpu", "Skylake-Client,+vmx,enforce", "-kernel", "/k"]).config
    assert c is not None and c.cpu.check == "full"
    assert [(f.name, f.policy) for f in c.cpu.features] == [("vmx", "require")]


def test_notes_are_one_line() -> None:
    # found by tests/fuzz (target mapping): a note quoted an argument with a line break
    plan = build(["-cpu", "Skylake-Client,migratable=on,phys-bits=x\ny", "-kernel", "/k"])
    assert plan.pending and all("\n" not in p for p in plan.pending)
    assert any("CPU properties" in p and "phys-bits=x" in p for p in plan.pending)
    err = fails(["-cpu", "Skylake-Client,\nid=x", "-kernel", "/k"])
    assert "neither a CPU property nor a feature" in err and "\n" not in err.strip()
    assert "unable to find CPU model 'Pentium9'" in fails(["-cpu", "Pentium9", "-kernel", "/k"])


def test_reboot_and_actions() -> None:
    c = build(["-no-reboot", "-kernel", "/k"]).config
    assert c is not None and c.on_reboot == "destroy"
    plan = build(["-action", "reboot=shutdown,panic=pause", "-kernel", "/k"])
    assert plan.options.no_reboot and plan.options.panic_action == "pause"


def test_rtc() -> None:
    c = build(["-rtc", "base=localtime", "-kernel", "/k"]).config
    assert c is not None and c.clock.offset == "localtime"
    c = build(["-rtc", "base=2020-01-01T00:01:40", "-kernel", "/k"], now=1577836800).config
    assert c is not None and c.clock.offset == "variable" and c.clock.adjustment == 100
    assert "invalid date format" in fails(["-rtc", "base=yesterday", "-kernel", "/k"])


def test_acpi_off_and_globals() -> None:
    plan = build(["-machine", "pc,acpi=off", "-global", "kvm-pit.lost_tick_policy=delay",
                  "-global", "driver=PIIX4_PM,property=disable_s3,value=1", "-kernel", "/k"])
    assert plan.config is not None and plan.config.features.acpi is False
    assert plan.globals == (("kvm-pit", "lost_tick_policy", "delay"),
                            ("PIIX4_PM", "disable_s3", "1"))
    assert not any("-global" in p for p in plan.pending)


def test_legacy_serial_and_default_serial() -> None:
    c = build(["-serial", "file:/tmp/com1.log", "-kernel", "/k"]).config
    assert c is not None and c.serial == SerialConfig("file", "/tmp/com1.log")
    c = build(["-nodefaults", "-kernel", "/k"]).config
    assert c is not None and c.serial.kind == "null"
    c = build(["-nographic", "-kernel", "/k"]).config
    assert c is not None and c.serial.kind == "stdio"


def test_com2_and_virtconsole() -> None:
    args = ["-kernel", "/k", "-chardev", "null,id=a", "-chardev", "pty,id=b",
            "-chardev", "stdio,id=c",
            "-device", "isa-serial,chardev=a,index=1",
            "-device", "virtio-serial-pci,id=vs0", "-device", "virtconsole,chardev=b,bus=vs0.0",
            "-device", "isa-serial,chardev=c"]
    c = build(args).config
    assert c is not None and c.serial.kind == "stdio"
    assert [(p.target, p.index, p.chardev.kind) for p in c.extra_serials] == [
        ("isa-serial", 1, "null"), ("virtio", 0, "pty")]


def test_drive_if_none_and_if_virtio() -> None:
    c = build(["-kernel", "/k", "-drive", "file=/a,,b.img,format=raw,if=none,id=d0,cache=none",
               "-device", "virtio-blk-pci,drive=d0", "-drive", "file=/dev/sdb,if=virtio,"
               "readonly=on"]).config
    assert c is not None
    assert [(d.path, d.cache, d.readonly, d.source_type) for d in c.disks] == [
        ("/a,b.img", "none", False, "file"), ("/dev/sdb", None, True, "block")]


def test_werror_and_rerror() -> None:
    """libvirt's error_policy='stop' arrives as werror=stop,rerror=stop on the device;
    QEMU's defaults (enospc, report) are made explicit; -drive carries them too."""
    node = ["-blockdev", '{"driver":"file","filename":"/a.img","node-name":"s"}',
            "-blockdev", '{"driver":"raw","node-name":"f","file":"s"}']
    c = build(["-kernel", "/k", *node, "-device",
               "virtio-blk-pci,drive=f,id=virtio-disk0,werror=stop,rerror=stop"]).config
    assert c is not None and c.disks[0].error_policies() == ("stop", "stop")
    c = build(["-kernel", "/k", *node, "-device", "virtio-blk-pci,drive=f,werror=ignore"]).config
    assert c is not None and c.disks[0].error_policies() == ("ignore", "report")
    c = build(["-kernel", "/k", *node, "-device", "virtio-blk-pci,drive=f"]).config
    assert c is not None and c.disks[0].error_policies() == ("enospc", "report")
    c = build(["-kernel", "/k", "-drive", "file=/a.img,if=none,id=d,werror=report,"
               "rerror=ignore", "-device", "virtio-blk-pci,drive=d"]).config
    assert c is not None and c.disks[0].error_policies() == ("report", "ignore")
    assert "rerror=enospc" in fails(["-kernel", "/k", *node, "-device",
                                     "virtio-blk-pci,drive=f,rerror=enospc"])
    assert "parameter 'werror' expects" in fails(["-kernel", "/k", *node, "-device",
                                                 "virtio-blk-pci,drive=f,werror=pause"])


def test_vhost_user_fs_needs_shared_memory() -> None:
    base = ["-kernel", "/k", "-chardev", "socket,id=chr-vu-fs0,path=/run/fs.sock",
            "-device", '{"driver":"vhost-user-fs-pci","id":"fs0","chardev":"chr-vu-fs0",'
                       '"tag":"mount_tag","bus":"pci.0","addr":"0x5"}']
    assert "shared guest memory" in fails(base, ShimUsageError)
    shared = ["-machine", "pc,memory-backend=pc.ram",
              "-object", '{"qom-type":"memory-backend-memfd","id":"pc.ram","size":268435456,'
                         '"share":true}']
    plan = build(shared + base)
    (fs,) = plan.vhost_user
    assert fs.tag == "mount_tag" and fs.chardev.path == "/run/fs.sock"
    assert any("vhost-user" in p for p in plan.pending)


def test_vhost_user_blk_is_a_disk_on_its_socket() -> None:
    """libvirt 9.0's <disk type='vhostuser'> with <reconnect timeout='10'/>: a client
    socket chardev with reconnect=10 and vhost-user-blk-pci on it."""
    shared = ["-machine", "pc,memory-backend=pc.ram",
              "-object", '{"qom-type":"memory-backend-memfd","id":"pc.ram","size":67108864,'
                         '"share":true}']
    dev = ["-chardev", "socket,id=chr-vu-virtio-disk0,path=/run/blk.sock,reconnect=10",
           "-device", '{"driver":"vhost-user-blk-pci","chardev":"chr-vu-virtio-disk0",'
                      '"id":"virtio-disk0","bus":"pci.0","addr":"0x4","bootindex":1}']
    assert "shared guest memory" in fails(["-kernel", "/k", *dev], ShimUsageError)
    c = build(["-kernel", "/k", *shared, *dev]).config
    assert c is not None
    (d,) = c.disks
    assert (d.source_type, d.path, d.reconnect, d.boot_order, d.id) == \
        ("vhostuser", "/run/blk.sock", 10, 1, "virtio-disk0")
    assert "vhost-user sockets only" in fails(
        ["-kernel", "/k", "-chardev", "socket,id=c,path=/run/x.sock,reconnect=5",
         "-device", "virtio-serial", "-device", "virtconsole,chardev=c"])
    assert "client unix sockets" in fails(
        ["-kernel", "/k", *shared, "-chardev", "socket,id=c,path=/run/x.sock,server=on,"
         "reconnect=5", "-device", "vhost-user-blk-pci,chardev=c"])


def test_vhost_user_net() -> None:
    plan = build(["-machine", "pc,memory-backend=m", "-kernel", "/k",
                  "-object", "memory-backend-memfd,id=m,size=256M",
                  "-chardev", "socket,id=charnet0,path=/run/vu.sock,server=on",
                  "-netdev", '{"type":"vhost-user","chardev":"charnet0","id":"hostnet0"}',
                  "-device", "virtio-net-pci,netdev=hostnet0,mac=52:54:00:00:00:01"])
    assert plan.config is not None
    (net,) = plan.config.nets
    assert net.backend == "vhost-user" and net.socket == "/run/vu.sock" and net.server
    # pyhv connecting, with libvirt's reconnect, two queue pairs and a host MTU
    plan = build(["-machine", "pc,memory-backend=m", "-kernel", "/k",
                  "-object", "memory-backend-memfd,id=m,size=256M",
                  "-chardev", "socket,id=charnet0,path=/run/vu.sock,reconnect=10",
                  "-netdev", '{"type":"vhost-user","chardev":"charnet0","queues":2,'
                             '"id":"hostnet0"}',
                  "-device", "virtio-net-pci,netdev=hostnet0,mac=52:54:00:00:00:01,mq=on,"
                             "host_mtu=1400"])
    assert plan.config is not None
    (net,) = plan.config.nets
    assert (net.server, net.reconnect, net.queues, net.mtu) == (False, 10, 2, 1400)


# ----------------------------------------------------------------- errors


def test_unsupported_device() -> None:
    text = fails(["-kernel", "/k", "-device", "virtio-gpu-pci"], ShimUnsupportedError)
    assert text == "pyhv-qemu: -device virtio-gpu-pci: device is not supported by pyhv"
    text = fails(["-kernel", "/k", "-device", '{"driver":"qxl-vga","id":"video0"}'])
    assert text == "pyhv-qemu: -device qxl-vga,id=video0: device is not supported by pyhv"


def test_unknown_device_property() -> None:
    text = fails(["-kernel", "/k", "-device", "virtio-rng-pci,colour=blue"], ShimUsageError)
    assert "property 'virtio-rng-pci.colour' not found" in text


def test_bad_property_value() -> None:
    assert "'bootindex' expects a number" in fails(
        ["-kernel", "/k", "-drive", "file=/a,if=none,id=d", "-device",
         "virtio-blk-pci,drive=d,bootindex=first"])


def test_incoming_is_refused() -> None:
    text = fails(head() + ["-incoming", "defer"], ShimUnsupportedError)
    assert text == ("pyhv-qemu: -incoming defer: incoming migration is not supported by "
                    "pyhv")


def test_tcg_is_refused() -> None:
    text = fails(head(cpu="qemu64", accel="tcg"), ShimUnsupportedError)
    assert text.startswith("pyhv-qemu: -accel tcg: accelerator 'tcg': pyhv runs guests only "
                           "with KVM")
    assert "KVM" in fails(["-machine", "none,accel=tcg"])
    assert build(["-machine", "none,accel=kvm:tcg"]).config is None
    assert build(["-enable-kvm", "-kernel", "/k"]).config is not None


def test_unknown_machine_and_property() -> None:
    assert "unsupported machine type" in fails(["-machine", "microvm", "-kernel", "/k"])
    assert "property 'pc-i440fx-7.2-machine.foo' not found" in fails(
        ["-machine", "pc,foo=1", "-kernel", "/k"])


def test_no_kernel() -> None:
    assert "direct kernel boot" in fails(["-machine", "pc"], ShimUnsupportedError)


def test_memory_hotplug_and_size_limits() -> None:
    assert "memory hotplug" in fails(["-m", "1G,slots=16,maxmem=8G", "-kernel", "/k"])
    assert fails(["-m", "2M", "-kernel", "/k"]).startswith("pyhv-qemu: -m: memory 2M is too small")
    assert "expects a size" in fails(["-m", "lots", "-kernel", "/k"])


def test_chardev_errors() -> None:
    assert "chardev 'nope' not found" in fails(
        ["-kernel", "/k", "-device", "isa-serial,chardev=nope"])
    assert "duplicate chardev id" in fails(
        ["-kernel", "/k", "-chardev", "null,id=a", "-chardev", "pty,id=a"])
    assert "'spicevmc' is not supported" in fails(
        ["-kernel", "/k", "-chardev", "spicevmc,id=a,name=vdagent"])
    assert "no -add-fd set=4" in fails(
        ["-kernel", "/k", "-chardev", "file,id=a,path=/dev/fdset/4"])
    assert "already used" in fails(
        ["-kernel", "/k", "-chardev", "pty,id=a", "-device", "isa-serial,chardev=a",
         "-device", "isa-serial,chardev=a,index=1"])
    assert "mode=readline" in fails(["-chardev", "socket,id=m,path=/x,server=on,wait=off",
                                     "-mon", "chardev=m", "-kernel", "/k"])


def test_multiqueue_tap_and_mtu() -> None:
    plan = parse_and_map(["-kernel", "/k", "-netdev",
                          '{"type":"tap","fds":"40:41","vhost":false,"id":"hostnet0"}',
                          "-device", '{"driver":"virtio-net-pci","mq":true,"vectors":6,'
                          '"host_mtu":9000,"netdev":"hostnet0","id":"net0",'
                          '"mac":"52:54:00:00:00:02"}'])
    assert plan.config is not None
    (net,) = plan.config.nets
    assert (net.fds, net.queues, net.mtu, net.id) == ((40, 41), 2, 9000, "net0")


def test_netdev_errors() -> None:
    assert "user networking" in fails(["-kernel", "/k", "-netdev", "user,id=n0"])
    assert "netdev 'n1' not found" in fails(
        ["-kernel", "/k", "-device", "virtio-net-pci,netdev=n1"])
    assert "not a MAC address" in fails(
        ["-kernel", "/k", "-netdev", "tap,id=n0,fd=40", "-device",
         "virtio-net-pci,netdev=n0,mac=nonsense"])
    # found by tests/fuzz (target mapping): a multicast MAC escaped as a
    # ConfigError that did not name the -device
    assert fails(["-kernel", "/k", "-netdev", "tap,id=n0,fd=40", "-device",
                  "virtio-net-pci,netdev=n0,mac=53:54:00:00:00:01"], ShimUsageError) == (
        "pyhv-qemu: -device virtio-net-pci: net: mac '53:54:00:00:00:01' is a multicast "
        "address")


def test_block_errors() -> None:
    vmdk = ["-kernel", "/k",
            "-blockdev", '{"driver":"file","filename":"/a.vmdk","node-name":"s"}',
            "-blockdev", '{"driver":"vmdk","node-name":"f","file":"s"}',
            "-device", "virtio-blk-pci,drive=f,id=virtio-disk0"]
    text = fails(vmdk, ShimUnsupportedError)
    assert text.startswith("pyhv-qemu: -device virtio-blk-pci,id=virtio-disk0: ")
    assert "image format 'vmdk'" in text and "raw and qcow2 are" in text
    assert "if=ide" in fails(["-kernel", "/k", "-drive", "file=/a.img"])


def _qcow2_chain(top_backing: str = '"libvirt-2-format"', base_backing: str = "null",
                 extra: str = "") -> list[str]:
    """A disk on a qcow2 overlay over a qcow2 base, as libvirt 9.0 writes it."""
    return ["-kernel", "/k",
            "-blockdev", j(driver="file", filename="/var/lib/libvirt/images/base.qcow2",
                           node_name="libvirt-2-storage", **{"auto-read-only": True},
                           discard="unmap"),
            "-blockdev", '{"node-name":"libvirt-2-format","read-only":true,"driver":"qcow2",'
                         f'"file":"libvirt-2-storage","backing":{base_backing}}}',
            "-blockdev", j(driver="file", filename="/var/lib/libvirt/images/top.qcow2",
                           node_name="libvirt-1-storage", **{"auto-read-only": True},
                           discard="unmap"),
            "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"discard":"unmap",'
                         '"driver":"qcow2","file":"libvirt-1-storage",'
                         f'"backing":{top_backing}{extra}}}',
            "-device", j(driver="virtio-blk-pci", bus="pci.0", addr="0x4",
                         drive="libvirt-1-format", id="virtio-disk0", bootindex=1)]


def test_qcow2_blockdev_chain() -> None:
    plan = build(_qcow2_chain(extra=',"l2-cache-size":4194304'))
    assert plan.config is not None
    (disk,) = plan.config.disks
    assert (disk.path, disk.format, disk.discard, disk.l2_cache_size) == (
        "/var/lib/libvirt/images/top.qcow2", "qcow2", "unmap", 4 << 20)
    assert disk.backing == (BackingFile("/var/lib/libvirt/images/base.qcow2", "qcow2"),)
    (spec,) = plan.disks
    assert (spec.format, spec.node, spec.file_node) == ("qcow2", "libvirt-1-format",
                                                         "libvirt-1-storage")
    assert spec.backing_nodes == (("libvirt-2-format", "libvirt-2-storage"),)
    # "backing": null on the top: no backing file whatever the header says
    (disk,) = build(_qcow2_chain(top_backing="null")).config.disks  # type: ignore[union-attr]
    assert disk.backing == ()
    # no "backing" key: the image's header names it
    plan = build([a.replace(',"backing":"libvirt-2-format"', "") for a in _qcow2_chain()])
    assert plan.config is not None and plan.config.disks[0].backing is None
    # -drive format=qcow2 takes the header's chain too
    (disk,) = build(["-kernel", "/k", "-drive", "file=/a.qcow2,format=qcow2,if=none,id=d0",
                     "-device", "virtio-blk-pci,drive=d0"]).config.disks  # type: ignore
    assert (disk.format, disk.backing) == ("qcow2", None)


def test_qcow2_blockdev_chain_errors() -> None:
    assert "backing chain loops at 'libvirt-1-format'" in fails(
        _qcow2_chain(base_backing='"libvirt-1-format"'))
    assert "block node 'nope' not found" in fails(_qcow2_chain(top_backing='"nope"'))
    assert "backing format 'file' is not supported" in fails(
        _qcow2_chain(top_backing='"libvirt-2-storage"'), ShimUnsupportedError)


def test_pci_address_errors() -> None:
    dev = '{"driver":"virtio-balloon-pci","id":"b%d","bus":"%s","addr":"%s"}'
    assert "-device: memballoon: PCI address 0000:00:01.0 is taken by the PIIX3" in fails(
        ["-kernel", "/k", "-device", dev % (0, "pci.0", "0x1")])
    assert "bus 'pci.9' not found" in fails(["-kernel", "/k", "-device", dev % (0, "pci.9",
                                                                               "0x3")])
    rng = '{"driver":"virtio-rng-pci","id":"r%d","bus":"pci.0","addr":"0x3"}'
    assert "rng #1: PCI address 0000:00:03.0 is taken by rng #0" in fails(
        ["-kernel", "/k", "-device", rng % 0, "-device", rng % 1])
    assert "slot 0x02 is not available on bus 1 (a pcie-root-port)" in fails(
        ["-kernel", "/k", "-machine", "q35", "-device",
         "pcie-root-port,id=pci.1,chassis=1,bus=pcie.0,addr=0x2", "-device",
         dev % (0, "pci.1", "0x2")])
    assert "pcie-root-port must sit on the q35 root bus" in fails(
        ["-kernel", "/k", "-device", "pcie-root-port,id=pci.1,chassis=1"])



def test_root_port_hotplug_option() -> None:
    plan = build(["-kernel", "/k", "-machine", "q35",
                  "-device", "pcie-root-port,id=pci.1,chassis=1,bus=pcie.0,addr=0x2",
                  "-device", '{"driver":"pcie-root-port","id":"pci.2","chassis":2,'
                             '"bus":"pcie.0","addr":"0x3","hotplug":false}'])
    assert plan.config is not None
    assert [c.hotplug for c in plan.config.controllers if c.type == "pci"] == [True, False]

def test_graphics_refused() -> None:
    assert "graphics (VNC)" in fails(head() + ["-vnc", "127.0.0.1:0"])
    assert "displays are not supported" in fails(["-display", "gtk", "-kernel", "/k"])


def test_bad_uuid() -> None:
    assert "invalid UUID" in fails(["-uuid", "not-a-uuid", "-kernel", "/k"])


def test_plans_are_complete_objects() -> None:
    plan = build(head() + FILE_SERIAL + TAIL)
    assert isinstance(plan, ShimPlan)
    assert set(plan.objects) == {"masterKey0", "pc.ram"}
    assert plan.cpu is not None and plan.cpu.passthrough


def test_usb_controllers_as_libvirt_passes_them() -> None:
    """libvirt 9.0's default USB controllers become config records at their addresses."""
    pc = build(head() + ["-device", j(driver="piix3-usb-uhci", id="usb", bus="pci.0",
                                      addr="0x1.0x2"), "-kernel", "/k"])
    assert pc.config is not None
    (usb,) = pc.config.controllers
    assert (usb.type, usb.model, usb.id, usb.address) == ("usb", "piix3-uhci", "usb",
                                                          PciAddress(0, 1, 2))
    q35 = build(head("pc-q35-7.2") + [
        "-device", j(driver="pcie-root-port", port=16, chassis=1, id="pci.1", bus="pcie.0",
                     multifunction=True, addr="0x2"),
        "-device", j(driver="pcie-root-port", port=17, chassis=2, id="pci.2", bus="pcie.0",
                     addr="0x2.0x1"),
        "-device", j(driver="qemu-xhci", p2=15, p3=15, id="usb", bus="pci.2", addr="0x0"),
        "-kernel", "/k"])
    assert q35.config is not None
    xhci = [c for c in q35.config.controllers if c.type == "usb"]
    assert [(c.model, c.address) for c in xhci] == [("qemu-xhci", PciAddress(2, 0))]
    ehci = build(head("pc-q35-7.2") + [
        "-device", j(driver="ich9-usb-ehci1", id="usb", bus="pcie.0", addr="0x1d.0x7"),
        "-device", j(driver="ich9-usb-uhci1", masterbus="usb.0", firstport=0, bus="pcie.0",
                     multifunction=True, addr="0x1d"),
        "-device", j(driver="ich9-usb-uhci2", masterbus="usb.0", firstport=2, bus="pcie.0",
                     addr="0x1d.0x1"),
        "-kernel", "/k"])
    assert ehci.config is not None
    assert [(c.model, c.index, c.master_port, c.address) for c in ehci.config.controllers] == [
        ("ich9-ehci1", 0, None, PciAddress(0, 0x1D, 7)),
        ("ich9-uhci1", 0, 0, PciAddress(0, 0x1D, 0, multifunction=True)),
        ("ich9-uhci2", 0, 2, PciAddress(0, 0x1D, 1))]
    legacy = build(head() + ["-usb", "-kernel", "/k"])
    assert legacy.config is not None
    assert [(c.model, c.address) for c in legacy.config.controllers] == [
        ("piix3-uhci", PciAddress(0, 1, 2))]
    assert "masterbus 'usb.9' not found" in fails(
        head() + ["-device", j(driver="ich9-usb-uhci1", masterbus="usb.9", bus="pci.0",
                               addr="0x5"), "-kernel", "/k"])


def test_virtio_rng_and_transitional_names() -> None:
    """virtio-rng-pci and its modern-only name map to the same device; a transitional
    device is refused with one line."""
    rng = ["-object", j(qom_type="rng-random", id="objrng0", filename="/dev/urandom")]
    for driver in ("virtio-rng-pci", "virtio-rng-pci-non-transitional"):
        plan = build(head() + rng + ["-device", j(driver=driver, rng="objrng0", id="rng0",
                                                   bus="pci.0", addr="0x5"), "-kernel", "/k"])
        assert plan.config is not None
        (r,) = plan.config.rngs
        assert (r.source, r.id, r.address) == ("/dev/urandom", "rng0", PciAddress(0, 5))
    text = fails(head() + rng + ["-device", j(driver="virtio-rng-pci-transitional",
                                              rng="objrng0"), "-kernel", "/k"])
    assert "transitional virtio devices" in text and "modern only" in text


def test_fsdev_and_virtio_9p_pci() -> None:
    """libvirt 9.0's 9p filesystem: -fsdev local + -device virtio-9p-pci."""
    plan = parse_and_map([
        "-kernel", "/k",
        "-fsdev", "local,security_model=mapped,id=fsdev-fs0,path=/srv/share",
        "-device", '{"driver":"virtio-9p-pci","id":"fs0","fsdev":"fsdev-fs0",'
                   '"mount_tag":"hostshare","bus":"pci.0","addr":"0x3"}',
        "-fsdev", "local,security_model=none,id=fsdev-fs1,path=/srv/ro,readonly=on",
        "-device", "virtio-9p-pci,id=fs1,fsdev=fsdev-fs1,mount_tag=ro"])
    assert plan.config is not None
    a, b = plan.config.filesystems
    assert (a.source, a.tag, a.accessmode, a.readonly, a.id) == \
        ("/srv/share", "hostshare", "mapped", False, "fs0")
    assert a.address is not None and (a.address.bus, a.address.slot) == (0, 3)
    assert (b.accessmode, b.readonly, b.tag) == ("squash", True, "ro")


def test_fsdev_errors() -> None:
    assert "fsdev 'nope' not found" in fails(
        ["-kernel", "/k", "-device", "virtio-9p-pci,fsdev=nope,mount_tag=t"])
    assert "fsdev driver 'proxy'" in fails(
        ["-kernel", "/k", "-fsdev", "proxy,id=f,sock_fd=3"])
    assert "already used" in fails(
        ["-kernel", "/k", "-fsdev", "local,id=f,path=/s,security_model=none",
         "-device", "virtio-9p-pci,fsdev=f,mount_tag=a",
         "-device", "virtio-9p-pci,fsdev=f,mount_tag=b"])


def test_cpu_host_migratable() -> None:
    c = build(["-kernel", "/k", "-cpu", "host,migratable=off"]).config
    assert c is not None and not c.cpu.migratable and c.cpu.mode == "host-passthrough"
    c = build(["-kernel", "/k", "-cpu", "host,migratable=on"]).config
    assert c is not None and c.cpu.migratable


def test_vmcoreinfo_is_accepted_with_a_note() -> None:
    """OpenStack Nova's <vmcoreinfo/> reaches pyhv-qemu as -device vmcoreinfo: no
    fw_cfg to build it on, so it is noted and nothing else changes."""
    plan = build(["-kernel", "/k", "-device", '{"driver":"vmcoreinfo"}'])
    assert plan.config is not None
    assert any("vmcoreinfo: not built" in n for n in plan.pending), plan.pending
    assert "sits on no bus" in fails(["-kernel", "/k", "-device", "vmcoreinfo,bus=pci.0"])


@pytest.mark.parametrize("name", ["PIIX4_PM", "ICH9-LPC"])
def test_machine_built_in_devices_cannot_be_added(name: str) -> None:
    """Found by the mapping fuzzer: -device PIIX4_PM raised AttributeError."""
    assert f"device '{name}' is part of the machine" in fails(
        ["-kernel", "/k", "-device", name])
