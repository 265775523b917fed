"""A small vhost-user frontend for tests: what QEMU does, over a socket, by hand.

:class:`Frontend` owns guest memory on a memfd split into two regions whose guest
addresses are far apart and whose user addresses are neither (so the backend must
translate user addresses, not assume them equal to guest ones), lays out rings
with :class:`virtio_driver.Driver`, and speaks the protocol with
:mod:`pyhv.engine.vhost_user.message`: requests, replies, descriptors.  Helpers
make blk requests and wait for the call eventfd.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from typing import Optional, Sequence

from virtio_driver import Driver

from pyhv.engine.memory import GuestMemory
from pyhv.engine.vhost_user.message import (
    HEADER,
    INFLIGHT,
    U64,
    VRING_NOFD,
    Body,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Request,
    VringAddr,
    VringState,
    decode_reply,
    encode,
)

MiB = 1 << 20
#: region 0: guest [0, 1 MiB) at memfd offset 0; region 1: guest [4 GiB, 4 GiB + 3 MiB)
#: at offset 1 MiB; user addresses: USER_BASE + memfd offset
REGION1_GUEST = 1 << 32
USER_BASE = 0x7F12_3400_0000
BLK_HDR = struct.Struct("<IIQ")
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


class Frontend:
    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self.timeout = timeout
        self.memfd = os.memfd_create("vhost-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 4 * MiB)
        self.regions = (MemoryRegion(0, 1 * MiB, USER_BASE, 0),
                        MemoryRegion(REGION1_GUEST, 3 * MiB, USER_BASE + MiB, MiB))
        self.memory = GuestMemory.from_fds(
            (r.guest_addr, r.size, os.dup(self.memfd), r.mmap_offset) for r in self.regions)
        self.drivers: list[Driver] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.errs: list[int] = []

    # ---- the wire ---------------------------------------------------------------------
    def send(self, request: Request | int, body: Body = None, fds: Sequence[int] = (),
             need_reply: bool = False) -> None:
        data = encode(request, body, need_reply=need_reply)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_reply(self) -> tuple[int, bytes]:
        head = self._exactly(HEADER.size)
        _req, _flags, size = HEADER.unpack(head)
        body = self._exactly(size)
        req, _flags, payload = decode_reply(head + body)
        return req, payload

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("the backend hung up")
            buf += chunk
        return buf

    def get(self, request: Request, body: Body = None) -> bytes:
        self.send(request, body)
        req, payload = self.recv_reply()
        assert req == request
        return payload

    def get_u64(self, request: Request) -> int:
        return int(U64.unpack(self.get(request))[0])

    def ack(self, request: Request | int, body: Body = None, fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; the u64 status (0: success)."""
        self.send(request, body, fds, need_reply=True)
        req, payload = self.recv_reply()
        assert req == int(request)
        return int(U64.unpack(payload)[0])

    def hung_up(self) -> bool:
        """Whether the backend closed the connection (within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # ---- inflight tracking ------------------------------------------------------------------
    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[Inflight, int]:
        """GET_INFLIGHT_FD: the backend's answer and the descriptor it sent."""
        self.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
        want = HEADER.size + INFLIGHT.size
        data, fds, _flags, _addr = socket.recv_fds(self.sock, want, 4)
        if not data:
            raise ConnectionResetError("the backend hung up")
        data += self._exactly(want - len(data))
        req, _f, payload = decode_reply(data)
        assert req == Request.GET_INFLIGHT_FD and len(fds) == 1, (req, fds)
        return Inflight(*INFLIGHT.unpack(payload)), fds[0]

    def set_inflight(self, info: Inflight, fd: int) -> int:
        """SET_INFLIGHT_FD (with NEED_REPLY): the status."""
        return self.ack(Request.SET_INFLIGHT_FD, info, [fd])

    def reconnect(self, sock: socket.socket) -> None:
        """Go on with the same guest memory and rings over a new connection (a
        restarted backend): the rings must be set up again with :meth:`restart_ring`."""
        self.sock.close()
        sock.settimeout(self.timeout)
        self.sock = sock
        for fd in [*self.kicks, *self.calls, *self.errs]:
            os.close(fd)
        self.kicks, self.calls, self.errs = [], [], []

    def restart_ring(self, index: int, base: int) -> None:
        """Hand an existing ring (:attr:`drivers`) to the backend again, from
        available index ``base`` (after a crash QEMU gives the used index)."""
        d = self.drivers[index]
        assert self.ack(Request.SET_VRING_NUM, VringState(index, d.size)) == 0
        assert self.ack(Request.SET_VRING_BASE, VringState(index, base)) == 0
        assert self.ack(Request.SET_VRING_ADDR, VringAddr(
            index, 0, self.user(d.desc), self.user(d.used), self.user(d.avail))) == 0
        for fds, req in ((self.calls, Request.SET_VRING_CALL),
                         (self.errs, Request.SET_VRING_ERR),
                         (self.kicks, Request.SET_VRING_KICK)):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds.append(fd)
            assert self.ack(req, index, [fd]) == 0
        assert self.ack(Request.SET_VRING_ENABLE, VringState(index, 1)) == 0

    # ---- addresses ------------------------------------------------------------------------
    def user(self, guest: int) -> int:
        for r in self.regions:
            if r.guest_addr <= guest < r.guest_addr + r.size:
                return r.user_addr + guest - r.guest_addr
        raise ValueError(f"{guest:#x} is not guest memory")

    def mem_table(self) -> tuple[MemoryTable, list[int]]:
        return MemoryTable(self.regions), [os.dup(self.memfd) for _ in self.regions]

    # ---- a whole setup, as QEMU does it ------------------------------------------------------
    def negotiate(self, features: Optional[int] = None) -> int:
        offered = self.get_u64(Request.GET_FEATURES)
        self.send(Request.SET_OWNER)
        pf = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert self.ack(Request.SET_PROTOCOL_FEATURES, pf) == 0
        taken = offered if features is None else features
        assert self.ack(Request.SET_FEATURES, taken) == 0
        return offered

    def set_mem_table(self) -> int:
        table, fds = self.mem_table()
        try:
            return self.ack(Request.SET_MEM_TABLE, table, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def add_ring(self, index: int, size: int = 16, event_idx: bool = True,
                 kick: bool = True) -> Driver:
        base = REGION1_GUEST + 0x10000 + index * 0x20000
        d = Driver(self.memory, size=size, base=base,
                   heap=REGION1_GUEST + 0x100000 + index * 0x80000, event_idx=event_idx,
                   indirect=True)
        self.drivers.append(d)
        assert self.ack(Request.SET_VRING_NUM, VringState(index, size)) == 0
        assert self.ack(Request.SET_VRING_BASE, VringState(index, 0)) == 0
        assert self.ack(Request.SET_VRING_ADDR, VringAddr(
            index, 0, self.user(d.desc), self.user(d.used), self.user(d.avail))) == 0
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.calls.append(call)
        self.errs.append(err)
        assert self.ack(Request.SET_VRING_CALL, index, [call]) == 0
        assert self.ack(Request.SET_VRING_ERR, index, [err]) == 0
        k = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kicks.append(k)
        if kick:
            assert self.ack(Request.SET_VRING_KICK, index, [k]) == 0
            assert self.ack(Request.SET_VRING_ENABLE, VringState(index, 1)) == 0
        return d

    # ---- blk requests ------------------------------------------------------------------
    def blk(self, ring: int, rtype: int, sector: int, data: bytes = b"",
            read_len: int = 0) -> tuple[int, bytes, int]:
        """One request, kicked and waited for: (status, data read, used length)."""
        d = self.drivers[ring]
        readable = [BLK_HDR.pack(rtype, 0, sector)] + ([data] if data else [])
        writable = ([read_len] if read_len else []) + [1]
        head, outs = d.add(readable, writable, indirect=True)
        self.kick(ring)
        assert self.wait_call(ring), "no call after the kick"
        used = d.take_used()
        d.set_used_event(d.last_used)  # as a driver does: interrupt me for the next one
        assert [h for h, _ in used] == [head], used
        status = self.memory.read_u8(outs[-1][0])
        got = self.memory.read(*outs[0]) if read_len else b""
        d.free.append(head)  # the one (indirect) descriptor back to the free list
        return status, got, used[0][1]

    def kick(self, ring: int) -> None:
        os.eventfd_write(self.kicks[ring], 1)

    def wait_call(self, ring: int, timeout: Optional[float] = None) -> bool:
        return self._wait(self.calls[ring], timeout)

    def wait_err(self, ring: int, timeout: Optional[float] = None) -> bool:
        return self._wait(self.errs[ring], timeout)

    def _wait(self, fd: int, timeout: Optional[float]) -> bool:
        r, _, _ = select.select([fd], [], [], self.timeout if timeout is None else timeout)
        if not r:
            return False
        os.eventfd_read(fd)
        return True

    def close(self) -> None:
        self.sock.close()
        for fd in [*self.kicks, *self.calls, *self.errs, self.memfd]:
            os.close(fd)
        self.kicks, self.calls, self.errs = [], [], []
        self.memory.close()


def nofd(index: int) -> int:
    return index | VRING_NOFD
