"""virtio-9p driven through the virtio-pci transport as Linux's 9pnet_virtio drives it
(bytearray guest memory, real rings): each request a chain with the T-message in
readable buffers and room for the R-message in writable ones, the zero-copy layout
(payload in buffers of its own) included; the server behind it is pyhv's own."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import pytest
from test_virtio_pci import PciDriver
from virtio_driver import Driver, memory

from pyhv.engine.devices import RecordingLine
from pyhv.engine.p9 import protocol as p
from pyhv.engine.p9.server import Export
from pyhv.engine.virtio.device import F_VERSION_1
from pyhv.engine.virtio.p9 import F_MOUNT_TAG, Virtio9p
from pyhv.engine.virtio.pci import (
    MODERN_BAR,
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VirtioPciFunction,
)

MSIZE = 8192
O_RDONLY, O_WRONLY = 0, 1
ROOT = 1


class Guest:
    """9pnet_virtio: a client connection whose requests go through the virtqueue."""

    def __init__(self, root: Path, readonly: bool = False, tag: str = "share") -> None:
        self.mem = memory(8 << 20)
        self.dev = Virtio9p(Export(str(root), readonly), tag)
        self.fn = VirtioPciFunction(self.dev, self.mem, "fs0")
        self.fn.intx = RecordingLine()
        self.drv = PciDriver(self.fn)
        self.bring_up(0x10000, 0x100000)

    def bring_up(self, base: int, heap: int) -> None:
        """Negotiate, set up the queue, DRIVER_OK, then Tversion (a new 9P session)."""
        self.offered = self.drv.negotiate(F_VERSION_1 | F_MOUNT_TAG)
        self.ring = Driver(self.mem, size=128, base=base, heap=heap)
        self.drv.setup_queue(0, self.ring)
        self.drv.w(0x14, 1, self.drv.status() | STATUS_DRIVER_OK)
        self.conn = p.Connection(p.Role.CLIENT, max_msize=MSIZE)
        self.tag = 0
        assert self.rpc(p.Tversion(MSIZE, p.VERSION), tag=p.NOTAG) == \
            p.Rversion(MSIZE, p.VERSION)

    def raw(self, readable: list[bytes], writable: list[int]) -> tuple[int, bytes]:
        """One chain as given; (used length, the bytes written)."""
        head, outs = self.ring.add(readable, writable)
        self.drv.kick(0)
        used = dict(self.ring.take_used())
        n = used[head]
        data = b"".join(self.mem.read(a, ln) for a, ln in outs)[:n]
        return n, data

    def rpc(self, msg: p.Message, tag: Optional[int] = None, split: int = 0,
            room: tuple[int, ...] = (MSIZE,)) -> p.Message:
        """A request; ``split`` puts its last bytes in a buffer of their own (as the
        zero-copy path puts a write's payload), ``room`` the writable buffers."""
        if tag is None:
            self.tag = (self.tag + 1) % 0xFFFF
            tag = self.tag
        data = self.conn.send(tag, msg)
        readable = [data[:len(data) - split], data[len(data) - split:]] if split else [data]
        n, reply = self.raw(readable, list(room))
        assert n > 0, "the device answered nothing"
        self.conn.receive_data(reply)
        ev = self.conn.next_event()
        assert isinstance(ev, p.Received) and ev.tag == tag
        return ev.message


def test_mount_tag_in_the_configuration(tmp_path: Path) -> None:
    g = Guest(tmp_path, tag="hostshare")
    assert g.offered & F_MOUNT_TAG
    cfg = bytes(g.fn.bar_read(MODERN_BAR, g.drv.caps[4][1] + i, 1) for i in range(11))
    assert struct.unpack_from("<H", cfg)[0] == 9 and cfg[2:11] == b"hostshare"


def test_files_through_the_queue(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_bytes(b"hello from the host\n")
    g = Guest(tmp_path)
    assert isinstance(g.rpc(p.Tattach(ROOT, p.NOFID, "root", "", 0)), p.Rattach)
    assert isinstance(g.rpc(p.Twalk(ROOT, 2, ("hello.txt",))), p.Rwalk)
    assert isinstance(g.rpc(p.Tlopen(2, O_RDONLY)), p.Rlopen)
    # a zero-copy read: the reply header in one buffer, the data in pages after it
    r = g.rpc(p.Tread(2, 0, 4096), room=(11, 4096))
    assert isinstance(r, p.Rread) and r.data == b"hello from the host\n"
    # create and write, the payload in a buffer of its own (the zero-copy write)
    assert isinstance(g.rpc(p.Twalk(ROOT, 3, ())), p.Rwalk)
    assert isinstance(g.rpc(p.Tlcreate(3, "new.bin", O_WRONLY | os.O_CREAT, 0o644, 0)),
                      p.Rlcreate)
    payload = bytes(range(256)) * 8
    w = g.rpc(p.Twrite(3, 0, payload), split=len(payload))
    assert isinstance(w, p.Rwrite) and w.count == len(payload)
    assert isinstance(g.rpc(p.Tclunk(3)), p.Rclunk)
    assert (tmp_path / "new.bin").read_bytes() == payload
    assert g.dev.answered >= 8 and g.dev.refused == 0


def test_read_only_export_through_the_queue(tmp_path: Path) -> None:
    g = Guest(tmp_path, readonly=True)
    g.rpc(p.Tattach(ROOT, p.NOFID, "root", "", 0))
    g.rpc(p.Twalk(ROOT, 2, ()))
    r = g.rpc(p.Tlcreate(2, "x", O_WRONLY | os.O_CREAT, 0o644, 0))
    assert isinstance(r, p.Rlerror) and r.ecode == 30  # EROFS
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("lie", [+1, -1, 10_000_000], ids=["longer", "shorter", "huge"])
def test_a_size_that_lies_fails_alone(tmp_path: Path, lie: int) -> None:
    g = Guest(tmp_path)
    msg = bytearray(g.conn.send(7, p.Tclunk(5)))
    struct.pack_into("<I", msg, 0, len(msg) + lie)
    n, _ = g.raw([bytes(msg)], [MSIZE])
    assert n == 0 and g.dev.refused == 1
    assert not g.drv.status() & STATUS_NEEDS_RESET
    # the connection's own view of tag 7 is still pending: a fresh client goes on
    g.conn = p.Connection(p.Role.CLIENT, max_msize=MSIZE)
    g.conn.send(0xFFFF, p.Tversion(MSIZE, p.VERSION))
    n, reply = g.raw([p.encode(p.NOTAG, p.Tversion(MSIZE, p.VERSION))], [MSIZE])
    assert n > 0


def test_no_room_for_the_reply(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    g.rpc(p.Tattach(ROOT, p.NOFID, "root", "", 0))
    n, _ = g.raw([p.encode(9, p.Tgetattr(ROOT, 0x7FF))], [8])
    assert n == 0 and g.dev.refused == 1
    assert not g.drv.status() & STATUS_NEEDS_RESET


def test_a_broken_session_asks_for_a_reset_and_the_next_one_works(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    g.rpc(p.Tattach(ROOT, p.NOFID, "root", "", 0))
    # a size past the negotiated msize: the 9P connection is broken
    big = p.encode(3, p.Twrite(ROOT, 0, bytes(MSIZE)))
    g.ring.add([big], [MSIZE])
    g.drv.kick(0)
    assert g.drv.status() & STATUS_NEEDS_RESET
    g.drv.w(0x14, 1, 0)  # the driver resets the device: the session starts over
    g.bring_up(0x50000, 0x400000)
    assert isinstance(g.rpc(p.Tattach(ROOT, p.NOFID, "root", "", 0)), p.Rattach)
