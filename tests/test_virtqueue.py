"""The split virtqueue (pyhv/engine/virtio/queue.py) against a driver writing real
rings into bytearray guest memory, well-behaved and not."""

from __future__ import annotations

import struct

import pytest
from virtio_driver import Driver, memory

from pyhv.engine.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    ChainError,
    QueueError,
    SplitQueue,
)


def echo(q: SplitQueue, mem, upper: bool = True) -> int:
    """A device that answers each request with its bytes upper-cased."""
    served = 0
    while True:
        try:
            chain = q.pop(mem)
        except ChainError:
            raise
        if chain is None:
            return served
        data = chain.reader().read(chain.reader().available)
        w = chain.writer()
        w.write(data.upper() if upper else data)
        q.add_used(mem, chain.head, w.written)
        served += 1


@pytest.mark.parametrize("indirect", [False, True])
def test_requests_round_trip(indirect: bool) -> None:
    mem = memory()
    drv = Driver(mem, indirect=indirect)
    q = drv.queue()
    h1, out1 = drv.add([b"hello ", b"world"], [4, 7], indirect=indirect)
    h2, out2 = drv.add([b"x"], [1], indirect=indirect)
    assert q.pending(mem) == 2
    assert echo(q, mem) == 2
    assert drv.take_used() == [(h1, 11), (h2, 1)]
    assert mem.read(out1[0][0], 4) + mem.read(out1[1][0], 7) == b"HELLO WORLD"
    assert mem.read(out2[0][0], 1) == b"X"
    assert q.pop(mem) is None


def test_indexes_wrap_around_65536() -> None:
    mem = memory()
    drv = Driver(mem, size=4)
    q = drv.queue()
    drv.avail_idx = q.next_avail = q.next_used = drv.last_used = 0xFFFE
    mem.write_u16(drv.used + 2, 0xFFFE)
    for _ in range(5):
        head, _out = drv.add([b"a"], [1])
        assert echo(q, mem) == 1
        assert drv.take_used() == [(head, 1)]
        drv.free = list(range(drv.size))  # the driver takes its descriptors back
    assert q.next_avail == 3 and q.next_used == 3


def test_a_descriptor_loop_fails_the_request_not_the_vmm() -> None:
    mem = memory()
    drv = Driver(mem)
    q = drv.queue()
    a, _ = drv.alloc(b"abc")
    drv.write_desc(drv.desc, 0, a, 3, DESC_F_NEXT, 1)
    drv.write_desc(drv.desc, 1, a, 3, DESC_F_NEXT, 0)   # 0 -> 1 -> 0 -> ...
    drv.publish(0)
    with pytest.raises(ChainError, match="loops"):
        q.pop(mem)
    q.add_used(mem, 0, 0)          # the device fails it and goes on
    assert drv.take_used() == [(0, 0)]
    drv.free = list(range(2, 16))
    head, out = drv.add([b"ok"], [2])
    assert echo(q, mem) == 1 and mem.read(out[0][0], 2) == b"OK"


def test_pop_valid_answers_an_unwalkable_chain_and_goes_on() -> None:
    """The loop above, through pop_valid: the looping chain comes back empty (its
    head on the used ring, length 0) and the good one after it is served."""
    mem = memory()
    drv = Driver(mem)
    q = drv.queue()
    a, _ = drv.alloc(b"abc")
    drv.write_desc(drv.desc, 0, a, 3, DESC_F_NEXT, 1)
    drv.write_desc(drv.desc, 1, a, 3, DESC_F_NEXT, 0)
    drv.publish(0)
    drv.free = list(range(2, 16))
    head, _out = drv.add([b"ok"], [2])
    chain = q.pop_valid(mem)
    assert chain is not None and chain.head == head
    q.add_used(mem, chain.head, 0)
    assert q.pop_valid(mem) is None
    assert drv.take_used() == [(0, 0), (head, 0)]


def test_no_interrupt_when_nothing_was_used() -> None:
    mem = memory()
    drv = Driver(mem)
    q = drv.queue()
    assert not q.needs_notification(mem)  # nothing used yet
    head, _ = drv.add([b"x"], [])
    chain = q.pop(mem)
    assert chain is not None
    q.add_used(mem, chain.head, 0)
    assert q.needs_notification(mem)
    assert not q.needs_notification(mem)  # the same used index: nothing new


@pytest.mark.parametrize("case,error", [
    ("indirect-loop", "loops"),
    ("indirect-in-indirect", "another indirect"),
    ("indirect-with-next", "only one"),
    ("indirect-bad-length", "indirect table of 20 bytes"),
    ("indirect-outside-ram", "not guest RAM"),
    ("indirect-not-negotiated", "without RING_INDIRECT_DESC"),
    ("next-beyond-table", "beyond the table"),
    ("readable-after-writable", "follows a writable"),
    ("wraps-2-64", "wraps around"),
    ("descriptor-table-entry", None),
])
def test_malformed_chains(case: str, error: str) -> None:
    mem = memory()
    drv = Driver(mem, indirect=case != "indirect-not-negotiated")
    q = drv.queue()
    buf, _ = drv.alloc(16)
    table, _ = drv.alloc(64)
    d = drv.desc
    if case == "indirect-loop":
        drv.write_desc(table, 0, buf, 4, DESC_F_NEXT, 1)
        drv.write_desc(table, 1, buf, 4, DESC_F_NEXT, 0)
        drv.write_desc(d, 0, table, 32, DESC_F_INDIRECT)
    elif case == "indirect-in-indirect":
        drv.write_desc(table, 0, table, 16, DESC_F_INDIRECT)
        drv.write_desc(d, 0, table, 16, DESC_F_INDIRECT)
    elif case == "indirect-with-next":
        drv.write_desc(d, 0, table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    elif case == "indirect-bad-length":
        drv.write_desc(d, 0, table, 20, DESC_F_INDIRECT)
    elif case == "indirect-outside-ram":
        drv.write_desc(d, 0, 1 << 40, 32, DESC_F_INDIRECT)
    elif case == "indirect-not-negotiated":
        drv.write_desc(d, 0, table, 16, DESC_F_INDIRECT)
    elif case == "next-beyond-table":
        drv.write_desc(d, 0, buf, 4, DESC_F_NEXT, 200)
    elif case == "readable-after-writable":
        drv.write_desc(d, 0, buf, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
        drv.write_desc(d, 1, buf, 4, 0)
    elif case == "wraps-2-64":
        drv.write_desc(d, 0, (1 << 64) - 8, 16, 0)
    else:  # a chain of buffers outside RAM parses; reading it is what fails
        drv.write_desc(d, 0, 1 << 40, 8, 0)
    drv.publish(0)
    if error is None:
        chain = q.pop(mem)
        assert chain is not None
        with pytest.raises(ChainError, match="not guest RAM"):
            chain.reader().read(8)
    else:
        with pytest.raises(ChainError, match=error):
            q.pop(mem)


def test_zero_and_huge_lengths() -> None:
    mem = memory()
    drv = Driver(mem)
    q = drv.queue()
    a, _ = drv.alloc(8)
    drv.write_desc(drv.desc, 0, a, 0, DESC_F_NEXT, 1)            # zero length: fine
    drv.write_desc(drv.desc, 1, a, 0xFFFF_FFFF, DESC_F_WRITE)    # 4 GiB: past RAM
    drv.publish(0)
    chain = q.pop(mem)
    assert chain is not None and chain.reader().available == 0
    with pytest.raises(ChainError, match="needs 1 more bytes"):
        chain.reader().read(1)
    w = chain.writer()
    assert w.available == 0xFFFF_FFFF
    w.write(b"x" * 16)  # only what is accessed is checked: these 16 bytes are RAM
    with pytest.raises(ChainError, match="not guest RAM"):
        w.write(b"x" * (5 << 20))  # past the end of the 4 MiB of RAM


def test_a_runaway_available_index_breaks_the_queue() -> None:
    mem = memory()
    drv = Driver(mem, size=8)
    q = drv.queue()
    mem.write_u16(drv.avail + 2, 9)            # 9 chains available in a queue of 8
    with pytest.raises(QueueError, match="ahead"):
        q.pop(mem)
    mem.write_u16(drv.avail + 2, 1)
    mem.write_u16(drv.avail + 4, 99)           # head beyond the table
    with pytest.raises(QueueError, match="descriptor 99"):
        q.pop(mem)


def test_validate_rejects_bad_rings() -> None:
    mem = memory(1 << 20)
    q = SplitQueue(256)
    q.desc_addr, q.avail_addr, q.used_addr = 0x1008, 0x2000, 0x3000
    with pytest.raises(QueueError, match="16-byte aligned"):
        q.validate(mem)
    q.desc_addr, q.used_addr = 0x1000, 0xFFFF_F000
    with pytest.raises(QueueError, match="used ring.*not guest RAM"):
        q.validate(mem)
    q.used_addr, q.size = 0x4000, 100
    with pytest.raises(QueueError, match="power of two"):
        q.validate(mem)
    with pytest.raises(ValueError):
        SplitQueue(3)


def test_notification_suppression() -> None:
    mem = memory()
    drv = Driver(mem)
    q = drv.queue()
    drv.add([b"a"], [1])
    echo(q, mem)
    assert q.needs_notification(mem)
    drv.suppress_interrupts(True)
    drv.add([b"b"], [1])
    echo(q, mem)
    assert not q.needs_notification(mem)


def test_event_idx() -> None:
    mem = memory()
    drv = Driver(mem, event_idx=True)
    q = drv.queue()
    for _ in range(3):
        drv.add([b"a"], [1])
    echo(q, mem)
    # the device tells the driver how far it has read (avail_event)
    assert struct.unpack("<H", mem.read(drv.used + 4 + 8 * drv.size, 2))[0] == 3
    assert q.needs_notification(mem)        # the first time: always
    drv.set_used_event(4)                   # "interrupt me when used passes 4"
    drv.free = list(range(3, 16))
    drv.add([b"b"], [1])
    echo(q, mem)                            # used is 4: not past the event yet
    assert not q.needs_notification(mem)
    drv.add([b"c"], [1])
    echo(q, mem)                            # used is 5: past it
    assert q.needs_notification(mem)


def test_event_idx_a_device_that_finds_the_ring_empty_asks_for_a_kick() -> None:
    """A receive queue looks (pending) before each frame and pops only what it knew
    of; once it finds the ring empty, avail_event names the next index, so the
    driver kicks when it adds buffers (else the device would wait forever)."""
    mem = memory()
    drv = Driver(mem, event_idx=True)
    q = drv.queue()
    avail_event = drv.used + 4 + 8 * drv.size
    for _ in range(3):
        drv.add([b"x"], [1])
    assert q.pending(mem) == 3
    for _ in range(3):
        chain = q.pop(mem)
        assert chain is not None
        q.add_used(mem, chain.head, 1)
    assert mem.read_u16(avail_event) == 0   # not told while it served what it knew of
    assert q.pending(mem) == 0
    assert mem.read_u16(avail_event) == 3
    drv.add([b"y"], [1])                    # published after: the device sees it
    assert q.pending(mem) == 1
