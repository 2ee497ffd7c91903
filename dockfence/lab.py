"""A sandboxed Docker host inside network namespaces, for tests and ``dockfence demo``.

Needs root. Nothing here touches the firewall or routes of the machine's own network namespace:
every address, route, sysctl and firewall rule lives in namespaces that the lab creates, and all
traffic stays between them. Only documentation prefixes are used.

Topology (``NAME`` is the lab's short name)::

    client "{NAME}c" ("the internet")         Docker host "{NAME}h"
      eth0 203.0.113.10/24, 203.0.113.100/24  <-veth->  ext0 203.0.113.1/24
           2001:db8:1::10/64, 2001:db8:9::10/64           2001:db8:1::1/64, 2001:db8:9::1/64
      default via 203.0.113.1, 2001:db8:1::1

    client "{NAME}d" (a second NIC's network)
      eth0 198.51.100.7/24, 198.51.100.50/24  <-veth->  ext1 198.51.100.1/24
           2001:db8:5::7/64                               2001:db8:5::1/64
      default via 198.51.100.1, 2001:db8:5::1

The host forwards IPv4 and IPv6 and runs dockerd (docker0 etc.). The clients' default routes
point at the host, so a client can also route Docker's subnets via the host ("direct routing").
IPv6 duplicate address detection is off everywhere, so addresses work at once.

The host runs its own containerd and dockerd (``nsenter --net``, not ``ip netns exec``, which
would remount /sys and hide the cgroup mounts). Their files live under
``/tmp/dockfence-lab-{NAME}/``. The image ``dftest/busybox`` is imported from the static
``/bin/busybox`` plus a tiny static UDP echo server (``/bin/udpecho``, compiled with gcc at start:
Debian's busybox has neither ``udpsvd`` nor ``nc -u``).

Example::

    with Lab("demo") as lab:
        lab.run_container("web", ["8081:8080"], lab.tcp_server_cmd(8080))
        assert lab.probe(lab.client_ns, CLIENT_V4, HOST_EXT0_V4, 8081)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

# --- fixed addresses of the topology -------------------------------------------------------
HOST_EXT0_V4 = "203.0.113.1"
HOST_EXT0_V6 = "2001:db8:1::1"
HOST_EXT0_V6_ALT = "2001:db8:9::1"
CLIENT_V4 = "203.0.113.10"
CLIENT_V4_ALT = "203.0.113.100"
CLIENT_V6 = "2001:db8:1::10"
CLIENT_V6_ALT = "2001:db8:9::10"

HOST_EXT1_V4 = "198.51.100.1"
HOST_EXT1_V6 = "2001:db8:5::1"
CLIENT2_V4 = "198.51.100.7"
CLIENT2_V4_ALT = "198.51.100.50"
CLIENT2_V6 = "2001:db8:5::7"

IMAGE = "dftest/busybox"
NETNS_DIR = Path("/var/run/netns")
BASE_PREFIX = "/tmp/dockfence-lab-"
READY_TIMEOUT = 90.0
# probe_many(expect=...): how often, and how long at least, a probe that should get in is retried
RETRIES, RETRY_TIMEOUT = 2, 5.0

# A standard PATH: the caller's may be a virtualenv or lack the sbin directories.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_NAME_RE = re.compile(r"[a-z0-9]{1,8}")
_CLONE_NEWNET = 0x40000000

# busybox applets linked into the image (the static Debian build has all of these).
# fmt: off
_APPLETS = (
    "sh", "ash", "cat", "echo", "env", "httpd", "nc", "sleep", "ls", "ps", "ip", "ifconfig",
    "netstat", "ping", "ping6", "kill", "true", "false", "hostname", "wget", "id", "mkdir",
    "rm", "printf", "seq", "timeout", "telnet", "head", "tail", "grep", "sed", "date",
)
# fmt: on

# Answers every UDP datagram with the same bytes; dual-stack when the container has IPv6.
# Handles SIGTERM itself: as PID 1 in a container it would otherwise ignore it.
_UDPECHO_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void bye(int sig) { (void)sig; _exit(0); }

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 5353, zero = 0;
    signal(SIGTERM, bye);
    signal(SIGINT, bye);
    int fd = socket(AF_INET6, SOCK_DGRAM, 0);
    if (fd >= 0) {
        struct sockaddr_in6 a6;
        memset(&a6, 0, sizeof a6);
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons(port);
        a6.sin6_addr = in6addr_any;
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, (struct sockaddr *)&a6, sizeof a6) != 0) { close(fd); fd = -1; }
    }
    if (fd < 0) {
        struct sockaddr_in a4;
        memset(&a4, 0, sizeof a4);
        a4.sin_family = AF_INET;
        a4.sin_port = htons(port);
        a4.sin_addr.s_addr = htonl(INADDR_ANY);
        fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a4, sizeof a4) != 0) {
            perror("bind");
            return 1;
        }
    }
    printf("udpecho listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        char buf[65536];
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
        if (n >= 0) sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
    }
}
"""

# The lab's own containerd: a fixed config so /etc/containerd/config.toml never applies, and
# plugins that would create machine-wide files (/opt/containerd, /var/run/nri) or servers are off.
# Version 2 is read by containerd 1.6 and migrated by 2.x; unknown plugin names are ignored.
_CONTAINERD_TOML = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.internal.v1.opt",
  "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"
"""


class LabError(RuntimeError):
    """The lab could not be built or a lab command failed."""


class LabCommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError, its message includes stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\n{err}" if err else super().__str__()


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell) and capture text output."""
    data = input.decode() if isinstance(input, bytes) else input
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


def _quiet(argv: Sequence[str], timeout: float = 30) -> None:
    """Run a cleanup command, ignoring every failure (stop() must never raise)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(list(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _resolve_bin_dir(path: str) -> str:
    """The directory holding dockerd: path itself or path/bin (fetch-docker28.sh's DEST)."""
    for cand in (Path(path), Path(path) / "bin"):
        if (cand / "dockerd").exists():
            return str(cand.resolve())
    # Failing here beats silently running the system's dockerd found later on PATH.
    raise LabError(f"no dockerd in {path} or {path}/bin")


def socket_in_netns(netns: str, family: int, type_: int) -> socket.socket:
    """Create a socket inside a named network namespace.

    A socket keeps the namespace it was created in, so a short-lived thread enters the
    namespace (setns acts on the calling thread only), creates the socket and exits; the
    rest of the process never changes namespace. Far cheaper than a subprocess per probe.
    """
    path = NETNS_DIR / netns
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(family, type_)
        except BaseException as exc:  # handed to the caller's thread
            box["err"] = exc

    thread = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]
    sock: socket.socket = box["sock"]
    return sock


def _family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _sockaddr(address: str, port: int) -> tuple[Any, ...]:
    return (address, port, 0, 0) if ":" in address else (address, port)


def probe_from(
    netns: str, src: str, dst: str, port: int, proto: str = "tcp", timeout: float = 1.5
) -> bool:
    """From namespace netns with source address src, try dst:port.

    TCP: True when the handshake completes. UDP: True when any reply datagram arrives (the
    datagram is re-sent a few times within the timeout; an ICMP unreachable ends it at once).
    """
    proto = proto.lower()
    if proto not in ("tcp", "udp"):
        raise ValueError(f"proto must be tcp or udp, not {proto!r}")
    family = _family_of(dst)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket_in_netns(netns, family, kind)
    deadline = time.monotonic() + timeout
    try:
        sock.bind(_sockaddr(src, 0))
        if proto == "tcp":
            sock.settimeout(timeout)
            try:
                sock.connect(_sockaddr(dst, port))
            except OSError:  # timeout, refused, unreachable
                return False
            return True
        sock.connect(_sockaddr(dst, port))
        payload = f"dockfence-probe {os.getpid()} {time.monotonic_ns()}".encode()
        while (left := deadline - time.monotonic()) > 0:
            try:
                sock.send(payload)
                sock.settimeout(min(left, 0.4))
                if sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:  # ICMP port/host unreachable reported on the connected socket
                return False
        return False
    finally:
        sock.close()


class Listener:
    """A TCP or UDP echo server on one socket inside a namespace, served by daemon threads.

    Stands in for a host service (sshd) or for a server "on the internet" that containers
    connect to. TCP: every accepted connection first gets `banner`, then its data echoed until
    the peer closes. UDP: every datagram is echoed. Bound to `address` (default `::`, dual-stack,
    so both IPv4 and IPv6 reach it). `accepted` counts TCP connections and UDP datagrams.
    """

    def __init__(
        self,
        netns: str,
        port: int,
        proto: str = "tcp",
        address: str = "::",
        banner: bytes = b"",
    ) -> None:
        proto = proto.lower()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        self.netns, self.port, self.proto, self.banner = netns, port, proto, banner
        self.accepted = 0
        self._stop = threading.Event()
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        family = _family_of(address)
        self._sock = socket_in_netns(netns, family, kind)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._sock.bind(_sockaddr(address, port))
            if proto == "tcp":
                self._sock.listen(128)
            self._sock.settimeout(0.2)
        except BaseException:
            self._sock.close()
            raise
        serve = self._serve_tcp if proto == "tcp" else self._serve_udp
        self._thread = threading.Thread(
            target=serve, name=f"listen-{netns}-{port}/{proto}", daemon=True
        )
        self._thread.start()

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(None)
                if self.banner:
                    conn.sendall(self.banner)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with contextlib.suppress(OSError):
                self._sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Connection:
    """A long-lived TCP connection opened from a namespace (see Lab.connect), to an echo server.

    `echo()` tells whether the connection can still exchange data, e.g. after a policy change.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def echo(self, payload: bytes | None = None, timeout: float = 5.0) -> bool:
        """Send payload; True when the same bytes come back within timeout."""
        data = payload or f"dockfence-echo {time.monotonic_ns()}\n".encode()
        deadline = time.monotonic() + timeout
        got = b""
        try:
            self.sock.sendall(data)
            while len(got) < len(data):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    return False
                got += chunk
        except OSError:  # timeout, reset
            return False
        return got == data

    def close(self) -> None:
        """Close with a reset (SO_LINGER 0): one RST, no FIN retransmitted for minutes through
        a firewall that may drop it."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_from(netns: str, src: str, dst: str, port: int, timeout: float = 5.0) -> Connection:
    """Open a TCP connection from namespace netns, source address src, to dst:port."""
    sock = socket_in_netns(netns, _family_of(dst), socket.SOCK_STREAM)
    try:
        sock.bind(_sockaddr(src, 0))
        sock.settimeout(timeout)
        sock.connect(_sockaddr(dst, port))
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


class Lab:
    """A real dockerd inside its own network namespace plus outside client namespaces."""

    def __init__(
        self,
        name: str,
        docker_bin_dir: str | None = None,
        dockerd_args: Sequence[str] = (),
        iptables: str = "default",
    ) -> None:
        """name: <= 8 chars of [a-z0-9], unique among running labs (namespaces, dirs).

        docker_bin_dir: put first on PATH of containerd/dockerd and used for the docker CLI
        (the bin/ made by scripts/fetch-docker28.sh, or its parent); None = the system's Docker.
        dockerd_args: extra dockerd flags (e.g. ["--ipv6", "--fixed-cidr-v6", "..."]).
        iptables: "default" (the system's alternative, iptables-nft on Debian 12) or "legacy":
        dockerd, and every command run in the host namespace, finds `iptables`, `ip6tables`
        and their -save/-restore first in a folder of links to the `*-legacy` binaries, as on
        a host whose alternatives point at iptables-legacy.
        """
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"lab name must match [a-z0-9]{{1,8}}, not {name!r}")
        if iptables not in ("default", "legacy"):
            raise ValueError(f"iptables must be 'default' or 'legacy', not {iptables!r}")
        self.name = name
        self.docker_bin_dir = _resolve_bin_dir(docker_bin_dir) if docker_bin_dir else None
        self.dockerd_args = list(dockerd_args)
        self.host_ns = f"{name}h"
        self.client_ns = f"{name}c"
        self.client2_ns = f"{name}d"
        self.base = Path(f"{BASE_PREFIX}{name}")
        # exec-root holds unix sockets (108-byte limit): keep it short.
        self.exec_root = self.base / "x"
        self.data_root = self.base / "data"
        self.ctd_dir = self.base / "ctd"
        self.ctd_sock = self.ctd_dir / "containerd.sock"
        self.docker_sock = self.base / "docker.sock"
        self.docker_host = f"unix://{self.docker_sock}"
        self.dockerd_log = self.base / "dockerd.log"
        self.containerd_log = self.base / "containerd.log"
        self.iptables = iptables
        self.xtables_dir = self.base / "xtables" if iptables == "legacy" else None
        first = [str(d) for d in (self.xtables_dir, self.docker_bin_dir) if d]
        self.path_env = ":".join([*first, SYSTEM_PATH])
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._containerd: subprocess.Popen[bytes] | None = None
        self._container_ids: set[str] = set()
        self._listeners: list[Listener] = []
        self.timings: dict[str, float] = {}

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.host_ns, self.client_ns, self.client2_ns)

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Build the namespaces, start containerd + dockerd, import the test image."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, dockerd)")
        for tool in ("ip", "nsenter", "sysctl"):
            if shutil.which(tool, path=SYSTEM_PATH) is None:
                raise LabError(f"{tool} not found")
        if self._dockerd_alive():
            # Never tear down a lab that someone else is running under the same name.
            raise LabError(
                f"lab {self.name!r} is already running ({self.docker_host}); "
                f"Lab({self.name!r}).stop() removes it"
            )
        self.stop()  # leftovers of an earlier, crashed run with the same name
        try:
            t0 = time.monotonic()
            self.base.mkdir(mode=0o700, parents=True)
            self._build_network()
            self._link_xtables()
            self._start_containerd()
            t1 = time.monotonic()
            self._start_dockerd()
            self.timings["dockerd_start"] = time.monotonic() - t1
            self._import_image()
            self.timings["start"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Tear everything down. Idempotent; never raises on partial state."""
        with contextlib.suppress(Exception):
            self._stop_quietly()

    def _stop_quietly(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        # Graceful first: docker removes containers, their cgroups and mounts itself.
        if self._dockerd_alive():
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", check=False, timeout=15).stdout.split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False, timeout=60)
        self._terminate(self._dockerd, self.base / "docker.pid", grace=20)
        self._dockerd = None
        self._terminate(self._containerd, self.ctd_dir / "containerd.pid", grace=10)
        self._containerd = None
        # Whatever is left inside the lab's namespaces (shims, docker-proxy, probes) and every
        # descendant of it (container processes live in unnamed namespaces below the shims).
        for _ in range(5):
            pids = self._lab_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        self._unmount_under(str(self.base))
        for ns in self.namespaces:
            if (NETNS_DIR / ns).exists():
                _quiet(["ip", "netns", "delete", ns])
        self._remove_cgroups()
        if self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)

    def restart_dockerd(self) -> None:
        """Stop dockerd (containers stop as with any dockerd shutdown) and start it again.

        containerd keeps running. Containers with --restart=always come back by themselves.
        """
        self.stop_dockerd()
        t0 = time.monotonic()
        self.start_dockerd()
        self.timings["dockerd_restart"] = time.monotonic() - t0

    def stop_dockerd(self) -> None:
        """Stop dockerd as a shutdown does (its containers stop); containerd keeps running."""
        self._terminate(self._dockerd, self.base / "docker.pid", grace=30)
        self._dockerd = None

    def start_dockerd(self) -> None:
        """Start dockerd again after stop_dockerd(), as a boot does: --restart always
        containers come back by themselves."""
        self._start_dockerd()

    # --- commands ------------------------------------------------------------------------

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
        }
        env["DOCKER_HOST"] = self.docker_host
        # dockfence's record of what it applied: per lab, never the machine's /var/lib
        env["DOCKFENCE_STATE_DIR"] = str(self.base / "state")
        # The lab's iptables variant and Docker first, then the caller's PATH (its python/venv),
        # then the system dirs.
        parts = [str(self.xtables_dir or ""), self.docker_bin_dir or ""]
        parts += os.environ.get("PATH", "").split(":")
        parts += SYSTEM_PATH.split(":")
        env["PATH"] = ":".join(dict.fromkeys(p for p in parts if p))
        if extra:
            env.update(extra)
        return env

    def ns_exec(
        self,
        netns: str,
        *argv: str,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside any of the lab's namespaces (nsenter: /sys and mounts unchanged)."""
        return _run(
            ["nsenter", f"--net={NETNS_DIR / netns}", *argv],
            check=check,
            env=self._env(env),
            timeout=timeout,
            input=input,
        )

    def host_exec(
        self,
        *argv: str,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the Docker host namespace, with DOCKER_HOST set to this lab's daemon."""
        return self.ns_exec(self.host_ns, *argv, check=check, env=env, timeout=timeout, input=input)

    def client_exec(
        self, *argv: str, check: bool = True, timeout: float = 60, client2: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the client namespace ({name}c, or {name}d with client2=True)."""
        ns = self.client2_ns if client2 else self.client_ns
        return self.ns_exec(ns, *argv, check=check, timeout=timeout)

    def docker_cli(self) -> str:
        """Path of the docker CLI matching this lab's daemon."""
        if self.docker_bin_dir:
            own = Path(self.docker_bin_dir) / "docker"
            if own.exists():
                return str(own)
        cli = shutil.which("docker", path=SYSTEM_PATH)
        if cli is None:
            raise LabError("docker CLI not found")
        return cli

    def _docker_argv(self, *args: str) -> list[str]:
        return [self.docker_cli(), "-H", self.docker_host, *args]

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this lab's daemon (runs in the caller's namespace)."""
        return _run(
            self._docker_argv(*args), check=check, env=self._env(), timeout=timeout, input=input
        )

    def docker_info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.docker("info", "--format", "{{json .}}").stdout)
        return info

    def run_container(
        self,
        name: str,
        publish: Iterable[str],
        command: Sequence[str],
        network: str | None = None,
        labels: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        restart: str | None = None,
        stop_timeout: int = 1,
    ) -> str:
        """docker run -d the test image; returns the container id.

        publish: items as for -p ("8081:8080", "5353:5353/udp", "8000-8002:8000-8002",
        "127.0.0.1:8081:8080"). stop_timeout is short because the servers run as PID 1 and may
        ignore SIGTERM, which would make every dockerd restart wait 10 s per container.
        """
        argv = ["run", "-d", "--name", name, "--stop-timeout", str(stop_timeout)]
        for item in publish:
            argv += ["-p", item]
        if network:
            argv += ["--network", network]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        if restart:
            argv += ["--restart", restart]
        argv += [*extra_args, IMAGE, *command]
        cid = self.docker(*argv).stdout.strip()
        self._container_ids.add(cid)
        return cid

    @staticmethod
    def tcp_server_cmd(port: int) -> list[str]:
        """A persistent TCP server (busybox httpd serving /www/index.html)."""
        return ["httpd", "-f", "-p", str(port), "-h", "/www"]

    @staticmethod
    def udp_server_cmd(port: int) -> list[str]:
        """A persistent UDP echo server answering every datagram."""
        return ["/bin/udpecho", str(port)]

    def wait_running(self, name: str, timeout: float = 60) -> None:
        """Wait until a container runs (e.g. a --restart=always one after restart_dockerd)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.docker("inspect", "-f", "{{.State.Running}}", name, check=False)
            if proc.stdout.strip() == "true":
                return
            if time.monotonic() > deadline:
                raise LabError(f"container {name} not running after {timeout} s")
            time.sleep(0.1)

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.docker("inspect", name).stdout)
        return data[0]

    def container_ip(self, name: str, family: int = 4) -> str:
        """The container's first address of the given family (4 or 6) on any network."""
        networks = self.inspect(name)["NetworkSettings"].get("Networks") or {}
        key = "IPAddress" if family == 4 else "GlobalIPv6Address"
        for net in networks.values():
            if net.get(key):
                return str(net[key])
        raise LabError(f"container {name} has no IPv{family} address")

    def listen(self, netns: str, port: int, proto: str = "tcp", banner: bytes = b"") -> Listener:
        """An echo server on [::]:port (dual-stack) inside one of the lab's namespaces, e.g. a
        host service in lab.host_ns; closed by stop() at the latest."""
        listener = Listener(netns, port, proto, banner=banner)
        self._listeners.append(listener)
        return listener

    def connect(
        self, client: str, src: str, dst: str, port: int, timeout: float = 5.0
    ) -> Connection:
        """A long-lived TCP connection from namespace client, source src, to dst:port."""
        return connect_from(client, src, dst, port, timeout)

    def probe(
        self,
        client: str,
        src: str,
        dst: str,
        port: int,
        proto: str = "tcp",
        timeout: float = 1.5,
    ) -> bool:
        """From namespace client (e.g. lab.client_ns), source src, try dst:port (see probe_from)."""
        return probe_from(client, src, dst, port, proto, timeout)

    def probe_many(
        self,
        probes: Sequence[tuple[Any, ...]],
        timeout: float = 1.5,
        expect: Sequence[bool] | None = None,
    ) -> list[bool]:
        """Run probes concurrently; each is (client, src, dst, port[, proto[, timeout]]).

        With `expect` (one bool per probe), a probe expected to get in that did not is tried
        again, up to RETRIES more times with at least RETRY_TIMEOUT: on a loaded machine a SYN
        retransmitted after 1 s or a slow scheduler is not a verdict. A probe expected to be
        blocked gets its single honest attempt (a test pairs it with a baseline), and one that
        got in is a leak whatever a retry would say."""
        if not probes:
            return []
        if expect is not None and len(expect) != len(probes):
            raise ValueError("expect needs one value per probe")

        def one(p: tuple[Any, ...], floor: float = 0.0) -> bool:
            client, src, dst, port, *rest = p
            proto = rest[0] if rest else "tcp"
            tmo = rest[1] if len(rest) > 1 else timeout
            return probe_from(client, src, dst, int(port), proto, max(tmo, floor))

        with ThreadPoolExecutor(max_workers=min(64, len(probes))) as pool:
            got = list(pool.map(one, probes))
            for _ in range(RETRIES if expect is not None else 0):
                again = [i for i, ok in enumerate(got) if expect[i] and not ok]  # type: ignore[index]
                if not again:
                    break
                for i, ok in zip(again, pool.map(lambda i: one(probes[i], RETRY_TIMEOUT), again),
                                 strict=True):
                    got[i] = ok
        return got

    # --- building ------------------------------------------------------------------------

    def _sysctl(self, ns: str, *settings: str) -> None:
        # net.* sysctls are per network namespace: this changes only the lab's namespace.
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])

    def _build_network(self) -> None:
        h, c, d = self.namespaces
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._sysctl(
                ns,
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            )
        self._sysctl(h, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # veths are created directly inside the lab's namespaces.
        for host_side, client in (("ext0", c), ("ext1", d)):
            _run(["ip", "link", "add", host_side, "netns", h, "type", "veth",
                  "peer", "name", "eth0", "netns", client])
        plan: list[tuple[str, str, list[str], list[str], tuple[str, str] | None]] = [
            (
                h,
                "ext0",
                [f"{HOST_EXT0_V4}/24"],
                [f"{HOST_EXT0_V6}/64", f"{HOST_EXT0_V6_ALT}/64"],
                None,
            ),
            (h, "ext1", [f"{HOST_EXT1_V4}/24"], [f"{HOST_EXT1_V6}/64"], None),
            (
                c,
                "eth0",
                [f"{CLIENT_V4}/24", f"{CLIENT_V4_ALT}/24"],
                [f"{CLIENT_V6}/64", f"{CLIENT_V6_ALT}/64"],
                (HOST_EXT0_V4, HOST_EXT0_V6),
            ),
            (
                d,
                "eth0",
                [f"{CLIENT2_V4}/24", f"{CLIENT2_V4_ALT}/24"],
                [f"{CLIENT2_V6}/64"],
                (HOST_EXT1_V4, HOST_EXT1_V6),
            ),
        ]
        for ns, dev, v4, v6, gateways in plan:
            for addr in v4:
                _run(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
            for addr in v6:
                _run(["ip", "-n", ns, "addr", "add", addr, "dev", dev, "nodad"])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            if gateways:
                _run(["ip", "-n", ns, "route", "add", "default", "via", gateways[0]])
                _run(["ip", "-n", ns, "-6", "route", "add", "default", "via", gateways[1]])

    def _link_xtables(self) -> None:
        if self.xtables_dir is None:
            return
        self.xtables_dir.mkdir()
        for fam in ("iptables", "ip6tables"):
            for suffix in ("", "-save", "-restore"):
                target = shutil.which(f"{fam}-legacy{suffix}", path=SYSTEM_PATH)
                if target is None:
                    raise LabError(f"{fam}-legacy{suffix} not found (apt-get install iptables)")
                (self.xtables_dir / f"{fam}{suffix}").symlink_to(target)

    def _which(self, tool: str) -> str:
        found = shutil.which(tool, path=self.path_env)
        if found is None:
            raise LabError(f"{tool} not found on {self.path_env}")
        return found

    def _spawn_in_host(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        # nsenter without --fork execs argv, so the Popen pid is the daemon's pid;
        # a new session keeps terminal signals (Ctrl-C on pytest) away from the daemons.
        env = {"PATH": self.path_env, "HOME": "/root", "LANG": "C.UTF-8"}
        with open(log, "ab") as out:
            return subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / self.host_ns}", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _start_containerd(self) -> None:
        # Our own containerd rather than dockerd's managed one: dockerd silently uses a system
        # containerd whenever /run/containerd/containerd.sock exists.
        self.ctd_dir.mkdir(parents=True, exist_ok=True)
        config = self.ctd_dir / "config.toml"
        config.write_text(
            _CONTAINERD_TOML.format(
                root=self.data_root / "containerd",
                state=self.exec_root / "containerd",
                sock=self.ctd_sock,
            )
        )
        self._containerd = self._spawn_in_host(
            [self._which("containerd"), "--config", str(config)], self.containerd_log
        )
        (self.ctd_dir / "containerd.pid").write_text(str(self._containerd.pid))
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ctd_sock.exists():
            if self._containerd.poll() is not None:
                raise LabError(f"containerd exited:\n{self._log_tail(self.containerd_log)}")
            if time.monotonic() > deadline:
                raise LabError(f"containerd not ready:\n{self._log_tail(self.containerd_log)}")
            time.sleep(0.05)

    def _start_dockerd(self) -> None:
        config = self.base / "daemon.json"
        if not config.exists():
            # An empty config file, so /etc/docker/daemon.json never applies to the lab.
            config.write_text("{}\n")
        argv = [
            self._which("dockerd"),
            "--config-file",
            str(config),
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.base / "docker.pid"),
            "-H",
            self.docker_host,
            "--containerd",
            str(self.ctd_sock),
            "--containerd-namespace",
            self.name,
            "--containerd-plugins-namespace",
            f"{self.name}p",
        ]
        if self.docker_bin_dir and (Path(self.docker_bin_dir) / "docker-proxy").exists():
            # Never fall back to the system docker-proxy of another Docker version.
            argv += ["--userland-proxy-path", str(Path(self.docker_bin_dir) / "docker-proxy")]
        argv += self.dockerd_args
        self._dockerd = self._spawn_in_host(argv, self.dockerd_log)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ping():
            if self._dockerd.poll() is not None:
                raise LabError(f"dockerd exited:\n{self._log_tail(self.dockerd_log)}")
            if time.monotonic() > deadline:
                raise LabError(f"dockerd not ready:\n{self._log_tail(self.dockerd_log)}")
            time.sleep(0.1)

    def _ping(self) -> bool:
        """GET /_ping on the daemon socket: cheaper than `docker info` in a poll loop."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.docker_sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            return reply.startswith(b"HTTP/1.") and reply.rstrip().endswith(b"OK")
        except OSError:
            return False

    def _dockerd_alive(self) -> bool:
        return self.docker_sock.exists() and self._ping()

    def _build_udpecho(self, out: Path) -> None:
        cc = shutil.which("cc", path=SYSTEM_PATH) or shutil.which("gcc", path=SYSTEM_PATH)
        if cc is None:
            raise LabError("a C compiler (gcc, libc6-dev) is needed to build the UDP echo server")
        src = out.with_suffix(".c")
        src.write_text(_UDPECHO_C)
        _run([cc, "-static", "-Os", "-s", "-o", str(out), str(src)], timeout=120)

    def _import_image(self) -> None:
        busybox = Path("/bin/busybox")
        if not busybox.exists():
            raise LabError("/bin/busybox missing (apt-get install busybox-static)")
        udpecho = self.base / "udpecho"
        self._build_udpecho(udpecho)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for d in ("bin", "www", "tmp", "etc", "proc", "sys", "dev"):
                info = tarfile.TarInfo(d)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
            tar.add(str(busybox), arcname="bin/busybox")
            tar.add(str(udpecho), arcname="bin/udpecho")
            for applet in _APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                tar.addfile(link)
            page = b"hello from dockfence lab\n"
            info = tarfile.TarInfo("www/index.html")
            info.size = len(page)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(page))
        proc = subprocess.run(
            [*self._docker_argv("import", "-", IMAGE)],
            input=buf.getvalue(),
            capture_output=True,
            env=self._env(),
            timeout=120,
        )
        if proc.returncode != 0:
            raise LabError(f"docker import failed: {proc.stderr.decode(errors='replace')}")

    # --- teardown helpers ----------------------------------------------------------------

    @staticmethod
    def _log_tail(path: Path, lines: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None, pidfile: Path, grace: float) -> None:
        """SIGTERM a daemon (ours, or one recorded in a pidfile), SIGKILL after grace seconds."""
        pid: int | None = proc.pid if proc is not None else None
        if pid is None:
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                return
            # A stale pidfile may name an unrelated process by now; the caller's sweep of the
            # lab's namespaces catches a daemon that this check skips.
            if _comm(pid) not in ("dockerd", "containerd"):
                return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not _pid_exists(pid):
                return
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def _lab_pids(self) -> set[int]:
        """Every process in the lab's namespaces, plus all their descendants."""
        roots: set[int] = set()
        ns_ids: set[tuple[int, int]] = set()
        for ns in self.namespaces:
            with contextlib.suppress(OSError):
                st = os.stat(NETNS_DIR / ns)
                ns_ids.add((st.st_dev, st.st_ino))
        children: dict[int, list[int]] = {}
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(pid)
                if ns_ids:
                    st = os.stat(f"/proc/{pid}/ns/net")
                    if (st.st_dev, st.st_ino) in ns_ids:
                        roots.add(pid)
            except (OSError, ValueError, IndexError):
                continue
        roots.discard(me)
        result: set[int] = set()
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid in result or pid == me:
                continue
            result.add(pid)
            stack.extend(children.get(pid, ()))
        return result

    @staticmethod
    def _unmount_under(prefix: str) -> None:
        mounts: list[str] = []
        with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == prefix or point.startswith(prefix + "/"):
                    mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            _quiet(["umount", "-l", point])

    def _remove_cgroups(self) -> None:
        # cgroupfs driver: /sys/fs/cgroup[/<controller>]/docker/<id>; docker removes them on
        # `docker rm`, this only sweeps what a killed daemon left behind.
        root = Path("/sys/fs/cgroup")
        if not self._container_ids or not root.exists():
            return
        parents = [root / "docker"] + [p / "docker" for p in root.iterdir() if p.is_dir()]
        for parent in parents:
            for cid in self._container_ids:
                with contextlib.suppress(OSError):
                    (parent / cid).rmdir()


def _pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
