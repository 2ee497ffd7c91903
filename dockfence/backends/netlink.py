"""Set and map element updates sent to nf_tables over netlink, as one atomic batch.

Why not `nft -f`: nft 1.0.x reads every element of every set in the table into its cache before
it adds or deletes a single element, so one element update costs seconds when an allow-list
holds 100,000 entries. A batch of NEWSETELEM/DELSETELEM messages touches only the elements it
names: the cost no longer depends on the size of the lists.

Only what watch, bans and the stamp need is encoded: keys of type inet_service, ifname,
ipv4_addr/ipv6_addr (alone or concatenated with inet_service); data that is a verdict (accept,
drop, jump CHAIN); an element comment and timeout; interval sets as nft lays them out (a start
element carrying the data and an end element, flagged, at last + 1); a flush of a whole set.
Anything the kernel refuses aborts the whole batch.
"""

from __future__ import annotations

import errno
import ipaddress
import operator
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

from ..errors import OperationalError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without the nested and byte-order flags
NFPROTO_INET = 1
# attribute numbers from linux/netfilter/nf_tables.h
LIST_TABLE, LIST_SET, LIST_ELEMENTS, LIST_ELEM = 1, 2, 3, 1
ELEM_KEY, ELEM_DATA, ELEM_FLAGS, ELEM_TIMEOUT, ELEM_USERDATA = 1, 2, 3, 4, 6
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
INTERVAL_END = 1
UDATA_COMMENT = 0
_VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4}
IFNAMSIZ = 16
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # root may raise its buffers past net.core.*mem_max
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
# What one acknowledgement takes of the receive buffer (its socket buffer's true size, with
# room to spare): a batch's acks all arrive before the first is read.
ACK_ROOM = 2048
# An element list is one attribute, whose length field has 16 bits: big updates are cut into
# messages of this many elements (an IPv6 interval element takes 36 bytes).
ELEMENTS_PER_MESSAGE = 1024


@dataclass(frozen=True)
class Element:
    """One element as nft writes it: `key` bytes (already encoded), an optional verdict
    ("accept", "drop", "jump allow_0"), an optional comment and timeout (milliseconds, on an
    interval's start element, as nft puts it); `end` for an interval's end."""

    key: bytes
    verdict: str | None = None
    comment: str | None = None
    end: bool = False
    timeout_ms: int | None = None


@dataclass(frozen=True)
class Op:
    add: bool  # False: delete
    set: str
    elements: tuple[Element, ...]
    flush: bool = False  # a delete of every element the set holds (`elements` empty)
    encoded: tuple[bytes, ...] = ()  # more elements, already encoded (block_ops)


# --- keys ------------------------------------------------------------------------------------

def port_key(port: int) -> bytes:
    return struct.pack("!H", port)


def ifname_key(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {name!r}")
    return raw.ljust(IFNAMSIZ, b"\0")


def addr_port_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    # concatenations pad every field to a multiple of 4 bytes
    return address.packed + struct.pack("!H", port) + b"\0\0"


def successor(key: bytes) -> bytes | None:
    """key + 1 as a big-endian number of the same width (None on overflow): the end element
    of an interval that ends at key."""
    n = int.from_bytes(key, "big") + 1
    return None if n >> (8 * len(key)) else n.to_bytes(len(key), "big")


def interval(first: bytes, last: bytes, verdict: str | None = None,
             comment: str | None = None, timeout_ms: int | None = None,
             ) -> tuple[Element, ...]:
    """The elements of the closed interval [first, last] in an interval set."""
    end = successor(last)
    if end is None:
        raise ValueError("an interval reaching the largest key cannot be updated "
                               "element by element")
    return (Element(first, verdict, comment, timeout_ms=timeout_ms), Element(end, end=True))


def block_ops(add: bool, name: str, bits: int, blocks: Sequence[int],
              timeouts_ms: Sequence[int | None] | None = None) -> list[Op]:
    """Ops adding (or deleting) in set `name` the interval elements of address blocks
    (dockfence.addresses: start << 8 | prefix length) of a `bits`-bit family, each start with
    its timeout if given, ELEMENTS_PER_MESSAGE per message. The bytes interval() Elements
    would encode, made by C loops (map): a ban set or a list change may hold 100,000s of
    blocks, and an Element and its encoding cost microseconds each."""
    width = bits // 8  # 4 or 16: no attribute below needs padding
    starts = list(map(operator.rshift, blocks, repeat(8)))
    size = {p: 1 << (bits - p) for p in range(bits + 1)}
    ends = list(map(operator.add, starts,
                    map(size.__getitem__, map(operator.and_, blocks, repeat(0xFF)))))
    if ends and max(ends) >> bits:
        raise ValueError("an interval reaching the largest key cannot be updated "
                         "element by element")
    key = struct.pack("=HH", 8 + width, ELEM_KEY | NLA_F_NESTED) + \
        struct.pack("=HH", 4 + width, DATA_VALUE)

    def head(extra: int) -> bytes:  # an element's own header, then its key's
        return struct.pack("=HH", 4 + 8 + width + extra, LIST_ELEM | NLA_F_NESTED) + key

    bare, timed, end = head(0), head(12), head(8)
    firsts = map(int.to_bytes, starts, repeat(width), repeat("big"))
    if timeouts_ms is None:
        opened = list(map(bare.__add__, firsts))
    else:
        timeout = struct.pack("=HH", 12, ELEM_TIMEOUT)
        opened = [bare + k if ms is None else timed + k + timeout + struct.pack("!Q", ms)
                  for k, ms in zip(firsts, timeouts_ms, strict=True)]
    flag = _u32(ELEM_FLAGS, INTERVAL_END)
    closed = map(operator.add, map(end.__add__, map(int.to_bytes, ends, repeat(width),
                                                    repeat("big"))), repeat(flag))
    encoded = list(chain.from_iterable(zip(opened, closed, strict=True)))
    return [Op(add, name, (), encoded=tuple(encoded[i:i + ELEMENTS_PER_MESSAGE]))
            for i in range(0, len(encoded), ELEMENTS_PER_MESSAGE)]


# --- encoding --------------------------------------------------------------------------------

def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def _str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!i", value))


def _verdict(text: str) -> bytes:
    word, _, chain = text.partition(" ")
    if word not in _VERDICTS or bool(chain) != (word in ("jump", "goto")):
        raise OperationalError(f"unsupported verdict {text!r}")
    body = _u32(VERDICT_CODE, _VERDICTS[word]) + (_str(VERDICT_CHAIN, chain) if chain else b"")
    return attr(DATA_VERDICT, body, nested=True)


def _comment(text: str) -> bytes:
    raw = text.encode()[:127] + b"\0"
    return struct.pack("BB", UDATA_COMMENT, len(raw)) + raw


def _element(e: Element) -> bytes:
    body = attr(ELEM_KEY, attr(DATA_VALUE, e.key), nested=True)
    if e.end:
        body += _u32(ELEM_FLAGS, INTERVAL_END)
    if e.timeout_ms is not None:
        body += attr(ELEM_TIMEOUT, struct.pack("!Q", e.timeout_ms))
    if e.verdict is not None:
        body += attr(ELEM_DATA, _verdict(e.verdict), nested=True)
    if e.comment is not None:
        body += attr(ELEM_USERDATA, _comment(e.comment))
    return attr(LIST_ELEM, body, nested=True)


def _message(kind: int, flags: int, seq: int, payload: bytes, res_id: int = 0) -> bytes:
    nfgen = struct.pack("!BBH", NFPROTO_INET, 0, res_id)
    body = nfgen + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def batch(table: str, ops: list[Op], seq: int = 1) -> tuple[bytes, list[int]]:
    """The netlink batch for `ops` and the sequence numbers whose acks to wait for."""
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, b"", NFNL_SUBSYS_NFTABLES)]
    acked = []
    for op in ops:
        seq += 1
        cmd = NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if op.add else 0)
        if op.flush and (op.add or op.elements or op.encoded):
            raise ValueError("a flush deletes, and names no element")
        payload = _str(LIST_TABLE, table) + _str(LIST_SET, op.set)
        if not op.flush:  # without an element list the kernel deletes them all
            payload += attr(LIST_ELEMENTS, b"".join(_element(e) for e in op.elements)
                            + b"".join(op.encoded), True)
        out.append(_message((NFNL_SUBSYS_NFTABLES << 8) | cmd, flags, seq, payload))
        acked.append(seq)
    seq += 1
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(out), acked


def commit(table: str, ops: list[Op]) -> None:
    """Send `ops` as one transaction in the caller's network namespace: all or nothing."""
    if not ops:
        return
    seq0 = int.from_bytes(os.urandom(3), "big")
    data, pending = batch(table, ops, seq0)
    waiting = set(pending)
    for kind, seq, reply, pos, _ in _replies(data, acks=len(pending)):
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, pos + 16)
            if error != 0:
                raise OperationalError(
                    f"the kernel refused the element update: {os.strerror(-error)}")
            waiting.discard(seq)
            if not waiting:
                return


def _replies(data: bytes, acks: int = 1) -> Iterator[tuple[int, int, bytes, int, int]]:
    """Send `data` on a fresh nf_tables netlink socket; yield (type, seq, buffer, offset,
    length) of every message the kernel answers, until the caller stops reading. `acks`: how
    many messages ask for one."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(10)
        if len(data) > 1 << 16:  # the kernel refuses a batch larger than the send buffer
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + (1 << 16))
        # An ack past the receive buffer is dropped and recv() says ENOBUFS, though the
        # kernel committed the batch (about 250 acks fit by default): room for all of them,
        # and a refusal's ack without a copy of the (up to 64 KiB) message it refuses.
        if acks * ACK_ROOM > 1 << 17:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, acks * ACK_ROOM)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        sock.send(data)
        while True:
            reply = sock.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(reply):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", reply, pos)
                yield kind, seq, reply, pos, length
                pos += (length + 3) & ~3 if length else len(reply)


NFT_MSG_GETTABLE, NFT_MSG_NEWTABLE = 1, 0
TABLE_NAME, TABLE_HANDLE = 1, 4
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN, NFT_MSG_NEWSET, NFT_MSG_GETSET = 3, 4, 9, 10
CHAIN_TABLE, CHAIN_NAME = 1, 3
SET_TABLE, SET_NAME, SET_FLAGS = 1, 2, 3
SET_ANONYMOUS, SET_MAP = 0x1, 0x8
OBJECT_KINDS = {1: "counter", 2: "quota", 3: "ct helper", 4: "limit", 5: "ct timeout"}
NFT_MSG_GETSETELEM = 13
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
OBJ_TABLE, OBJ_NAME, OBJ_TYPE, OBJ_DATA = 1, 2, 3, 4
OBJECT_COUNTER = 1
COUNTER_PACKETS = 2
NLM_F_DUMP = 0x300
NLMSG_DONE = 3


def _query(command: int, flags: int, payload: bytes, answer: int, what: str,
           ) -> list[tuple[bytes, int, int]] | None:
    """Ask nf_tables once (a get, or a dump with NLM_F_DUMP): (buffer, start, end) of the
    attributes of every `answer` message, past its nfgenmsg; None when the kernel says there
    is no such object (ENOENT); OperationalError for any other refusal."""
    seq = int.from_bytes(os.urandom(3), "big")
    msg = _message((NFNL_SUBSYS_NFTABLES << 8) | command, NLM_F_REQUEST | flags, seq, payload)
    found: list[tuple[bytes, int, int]] = []
    for kind, _, reply, pos, length in _replies(msg):
        if kind == NLMSG_DONE:
            return found
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, pos + 16)
            if error == 0:
                return found
            if -error == errno.ENOENT:
                return None
            raise OperationalError(f"cannot read {what}: {os.strerror(-error)}")
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | answer:
            found.append((reply, pos + 20, pos + length))
    return found


def table_handle(table: str) -> int | None:
    """The kernel's handle of `table inet TABLE`, None when there is none. A table that was
    deleted and created again (a full apply, `nft flush ruleset`, restore) has a new handle:
    watch knows whether the table is still the one it last wrote, without listing it."""
    answers = _query(NFT_MSG_GETTABLE, NLM_F_ACK, _str(TABLE_NAME, table), NFT_MSG_NEWTABLE,
                     f"table {table}")
    for reply, start, stop in answers or ():
        for kind, a, _ in attrs(reply, start, stop):
            if kind == TABLE_HANDLE:
                return int(struct.unpack_from("!Q", reply, a)[0])
    return None


def element_comments(table: str, name: str) -> list[str] | None:
    """The comment of every element of set `name` in `table inet TABLE` (a small set: the
    stamp), or None when there is no such set (or table). A dump, read straight from the
    kernel: no nft process, no cache of the table's other sets."""
    answers = _query(NFT_MSG_GETSETELEM, NLM_F_DUMP,
                     _str(LIST_TABLE, table) + _str(LIST_SET, name), NFT_MSG_NEWSETELEM,
                     f"set {name}")
    if answers is None:
        return None
    comments: list[str] = []
    for reply, start, stop in answers:
        for a_kind, a, b in attrs(reply, start, stop):
            if a_kind != LIST_ELEMENTS:
                continue
            for e_kind, e, f in attrs(reply, a, b):
                for u_kind, u, v in attrs(reply, e, f) if e_kind == LIST_ELEM else ():
                    if u_kind == ELEM_USERDATA:
                        comments += _udata_comments(reply[u:v])
    return comments


def attrs(data: bytes, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of the attributes in data[start:stop]."""
    while start + 4 <= stop:
        alen, atype = struct.unpack_from("=HH", data, start)
        if alen < 4:
            return
        yield atype & NLA_TYPE_MASK, start + 4, start + alen
        start += (alen + 3) & ~3


def _udata_comments(udata: bytes) -> list[str]:
    """The comment records of an element's user data (type, length, value records)."""
    out, at = [], 0
    while at + 2 <= len(udata):
        utype, ulen = udata[at], udata[at + 1]
        if utype == UDATA_COMMENT:
            out.append(udata[at + 2:at + 2 + ulen].rstrip(b"\0").decode(errors="replace"))
        at += 2 + ulen
    return out


def counters(table: str) -> dict[str, int] | None:
    """Packets counted by each named counter of `table inet TABLE`, or None when there is no
    such table. Read as objects, over netlink: nft 1.0.6 would fetch every set element of the
    table into its cache first (1.6 s at 100,000 addresses) just to list the counters."""
    answers = _query(NFT_MSG_GETOBJ, NLM_F_DUMP,
                     _str(OBJ_TABLE, table) + attr(OBJ_TYPE, struct.pack("!I", OBJECT_COUNTER)),
                     NFT_MSG_NEWOBJ, f"the counters of {table}")
    if answers is None:
        return None
    out: dict[str, int] = {}
    for reply, start, stop in answers:
        name, packets, ours = "", 0, False
        for a_kind, a, b in attrs(reply, start, stop):
            if a_kind == OBJ_TABLE:
                ours = reply[a:b].rstrip(b"\0").decode() == table
            elif a_kind == OBJ_NAME:
                name = reply[a:b].rstrip(b"\0").decode()
            elif a_kind == OBJ_DATA:
                for c_kind, c, _ in attrs(reply, a, b):
                    if c_kind == COUNTER_PACKETS:
                        (packets,) = struct.unpack_from("!Q", reply, c)
        if ours and name:
            out[name] = packets
    # a dump filtered on a table that does not exist is merely empty
    return None if not out and table_handle(table) is None else out


def table_objects(table: str) -> list[tuple[str, str]] | None:
    """(kind, name) of every named chain, set, map and stateful object of `table inet TABLE`
    ("chain", "set", "map", "counter", "limit", ...; "object N" for a type without a name
    here), or None when there is no such table. Declarations only, over netlink: no element
    is read, whatever the sets hold. Anonymous sets belong to their rules and are left out."""
    if table_handle(table) is None:
        return None
    out: list[tuple[str, str]] = []
    for command, answer, table_attr, name_attr, what in (
            (NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN, CHAIN_TABLE, CHAIN_NAME, "chains"),
            (NFT_MSG_GETSET, NFT_MSG_NEWSET, SET_TABLE, SET_NAME, "sets"),
            (NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ, OBJ_TABLE, OBJ_NAME, "objects")):
        # dumps of every table of the family: the table is told apart here
        for reply, start, stop in _query(command, NLM_F_DUMP, _str(table_attr, table), answer,
                                         f"the {what} of {table}") or ():
            found: dict[int, bytes] = {k: reply[a:b] for k, a, b in attrs(reply, start, stop)}
            if found.get(table_attr, b"").rstrip(b"\0").decode() != table:
                continue
            name = found.get(name_attr, b"").rstrip(b"\0").decode(errors="replace")
            if command == NFT_MSG_GETCHAIN:
                kind = "chain"
            elif command == NFT_MSG_GETSET:
                (flags,) = struct.unpack("!I", found.get(SET_FLAGS, bytes(4))[:4])
                if flags & SET_ANONYMOUS:
                    continue
                kind = "map" if flags & SET_MAP else "set"
            else:
                (number,) = struct.unpack("!I", found.get(OBJ_TYPE, bytes(4))[:4])
                kind = OBJECT_KINDS.get(number, f"object {number}")
            out.append((kind, name))
    return out
