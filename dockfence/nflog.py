"""A minimal NFLOG (nfnetlink_log) subscriber: the packets nftables' `log group N` hands to
userspace, read with the stdlib.

Why by hand: pyroute2 (0.9) knows the subsystem number but has no NFLOG messages or socket;
the `nflog` binding has been unmaintained since 2016; ulogd2 would be a second daemon to deploy
and supervise just to turn these messages into lines. The protocol part needed is small: bind a
group, ask for the first bytes of each packet, read back prefix + payload.

NFLOG groups belong to the network namespace, so this works in any namespace with
CAP_NET_ADMIN and changes no machine-wide setting."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .backends.netlink import attr, attrs
from .errors import OperationalError

NETLINK_NETFILTER = 12
_SUBSYS_ULOG = 4
_MSG_PACKET, _MSG_CONFIG = (_SUBSYS_ULOG << 8) | 0, (_SUBSYS_ULOG << 8) | 1
_NLMSG_ERROR, _NLM_F_REQUEST, _NLM_F_ACK = 2, 1, 4
_CFG_CMD, _CFG_MODE, _CFG_QTHRESH, _CFG_TIMEOUT = 1, 2, 5, 4
_CMD_BIND, _COPY_PACKET = 1, 2
_ATTR_TIMESTAMP, _ATTR_PAYLOAD, _ATTR_PREFIX = 3, 9, 10
COPY_RANGE = 80  # the IP header (IPv4 with options: 60) and the transport ports


class GroupBusy(OperationalError):
    """Another process (e.g. `dockfence watch`) already reads this group in this namespace."""


@dataclass(frozen=True)
class Packet:
    """One logged packet: when, the log prefix, and the addresses it carried."""

    time: float
    prefix: str
    proto: str  # "tcp", "udp", or the IP protocol number
    src: str
    sport: int | None
    dst: str
    dport: int | None


_PROTOS = {6: "tcp", 17: "udp"}


def parse_payload(payload: bytes) -> tuple[str, str, str, int | None, int | None] | None:
    """(proto, src, dst, sport, dport) of an IPv4 or IPv6 packet's first bytes."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header, number = (payload[0] & 0x0F) * 4, payload[9]
        src, dst = (str(ipaddress.IPv4Address(payload[i:i + 4])) for i in (12, 16))
    elif version == 6 and len(payload) >= 40:
        header, number = 40, payload[6]  # extension headers: ports left unknown
        src, dst = (str(ipaddress.IPv6Address(payload[i:i + 16])) for i in (8, 24))
    else:
        return None
    sport = dport = None
    if number in _PROTOS and len(payload) >= header + 4:
        sport, dport = struct.unpack_from("!HH", payload, header)
    return _PROTOS.get(number, str(number)), src, dst, sport, dport


def parse_message(data: bytes) -> Iterator[Packet]:
    """The packets in one netlink datagram (several messages may share it)."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            return
        if kind == _MSG_PACKET:
            fields = {kind: data[a:b] for kind, a, b in  # after nlmsghdr + nfgenmsg
                      attrs(data, off + 20, off + length)}
            got = parse_payload(fields.get(_ATTR_PAYLOAD, b""))
            if got is not None:
                when = time.time()
                if _ATTR_TIMESTAMP in fields and len(fields[_ATTR_TIMESTAMP]) == 16:
                    sec, usec = struct.unpack("!QQ", fields[_ATTR_TIMESTAMP])
                    when = sec + usec / 1e6
                prefix = fields.get(_ATTR_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
                proto, src, dst, sport, dport = got
                yield Packet(when, prefix, proto, src, sport, dst, dport)
        off += (length + 3) & ~3


class Subscriber:
    """Bound to one NFLOG group of the current network namespace until closed."""

    def __init__(self, group: int, rcvbuf: int = 1 << 20) -> None:
        self.group = group
        self.lost = 0  # datagrams the kernel dropped because we were too slow (ENOBUFS)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._configure(attr(_CFG_CMD, bytes([_CMD_BIND])))
            self._configure(attr(_CFG_MODE, struct.pack("!IBx", COPY_RANGE, _COPY_PACKET))
                            # batch up to 32 packets or 0.1 s: fewer wakeups in a flood
                            + attr(_CFG_QTHRESH, struct.pack("!I", 32))
                            + attr(_CFG_TIMEOUT, struct.pack("!I", 10)))
        except BaseException:
            self.sock.close()
            raise

    def _configure(self, attrs: bytes) -> None:
        nfgen = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.group)
        body = nfgen + attrs
        self.sock.send(struct.pack("=IHHII", 16 + len(body), _MSG_CONFIG,
                                   _NLM_F_REQUEST | _NLM_F_ACK, 1, 0) + body)
        reply = self.sock.recv(4096)
        _, kind = struct.unpack_from("=IH", reply)
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, 16)[0]
            # the kernel answers EPERM when another socket holds the group
            if code == errno.EBUSY or (code == errno.EPERM and os.geteuid() == 0):
                raise GroupBusy(f"NFLOG group {self.group} is already read by another process")
            if code:
                raise OperationalError(f"cannot read NFLOG group {self.group}: "
                                       f"{errno.errorcode.get(code, code)} ({code})")

    def read(self, timeout: float) -> list[Packet]:
        """The packets that arrive within `timeout` seconds (empty if none)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.lost += 1
                return []
            raise
        return list(parse_message(data))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
