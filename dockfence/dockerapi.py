"""A minimal Docker Engine API client: HTTP/1.1 GETs over the daemon's socket, standard library
only.

dockfence reads a handful of endpoints (ping, info, networks, containers, events). The Docker
SDK with requests costs ~130 ms of imports on every command, most of a small command's budget;
this costs ~1 ms. What the SDK's `from_env()` did and this keeps: DOCKER_HOST (unix:// and
tcp://, default unix:///var/run/docker.sock), TLS from DOCKER_TLS_VERIFY / DOCKER_CERT_PATH, and
API version negotiation (the daemon's own version from /_ping, never a pinned old one).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_HOST = "unix:///var/run/docker.sock"


class DockerError(Exception):
    """The daemon could not be reached or answered with an error."""


class NotFound(DockerError):
    pass


class Client:
    def __init__(self, host: str | None = None, timeout: float = 15) -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._prefix = ""
        self._connect()
        ping = self._request("/_ping")
        ping.read()  # the body ("OK") must leave the connection before the next answer
        version = ping.headers.get("api-version", "")
        # the daemon's version, as the SDK negotiates it; unversioned paths mean the same
        self._prefix = f"/v{version}" if version.replace(".", "").isdigit() else ""

    def _connect(self) -> None:
        url = urlsplit(self.host)
        try:
            if url.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(url.path)
            elif url.scheme in ("tcp", "http", "https"):
                sock = socket.create_connection((url.hostname or "localhost", url.port or 2375),
                                                timeout=self.timeout)
                sock = self._tls(sock, url.hostname or "localhost", url.scheme == "https")
            else:
                raise DockerError(f"unsupported DOCKER_HOST {self.host!r} (unix:// or tcp://)")
        except OSError as exc:
            raise DockerError(f"cannot connect: {exc}") from None
        self._sock, self._file = sock, sock.makefile("rb")

    @staticmethod
    def _tls(sock: socket.socket, hostname: str, https: bool) -> socket.socket:
        verify = os.environ.get("DOCKER_TLS_VERIFY", "")
        cert_path = os.environ.get("DOCKER_CERT_PATH", "")
        if not (verify or cert_path or https):
            return sock
        import ssl  # only for TLS daemons

        cert_path = cert_path or os.path.join(os.path.expanduser("~"), ".docker")
        ctx = ssl.create_default_context(cafile=os.path.join(cert_path, "ca.pem")
                                         if verify else None)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        cert, key = os.path.join(cert_path, "cert.pem"), os.path.join(cert_path, "key.pem")
        if os.path.exists(cert) and os.path.exists(key):
            ctx.load_cert_chain(cert, key)
        return ctx.wrap_socket(sock, server_hostname=hostname)

    def close(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, path: str, params: dict[str, Any] | None = None,
                 timeout: float | None = None, idle_ok: bool = False) -> _Response:
        if self._sock is None:
            raise DockerError("connection closed")
        target = quote(self._prefix + path) + (f"?{urlencode(params)}" if params else "")
        # idle_ok: a stream that may be silent for hours (`/events`) waits without a deadline;
        # it still ends when the daemon closes the connection
        self._sock.settimeout(None if idle_ok else timeout or self.timeout)
        try:
            self._sock.sendall(f"GET {target} HTTP/1.1\r\nHost: docker\r\n"
                               "User-Agent: dockfence\r\n\r\n".encode())
            resp = _Response(self._file)
        except (OSError, ValueError) as exc:
            raise DockerError(f"{path}: {exc}") from None
        if resp.status >= 400:
            body = resp.read()
            try:
                message = json.loads(body).get("message", "")
            except ValueError:
                message = body.decode(errors="replace").strip()
            raise (NotFound if resp.status == 404 else DockerError)(
                f"{path}: {resp.status} {message}")
        return resp

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        resp = self._request(path, params)
        try:
            return json.loads(resp.read())
        except (OSError, ValueError) as exc:
            raise DockerError(f"{path}: {exc}") from None

    def stream(self, path: str, params: dict[str, Any] | None = None,
               timeout: float | None = None, idle_ok: bool = False
               ) -> Iterator[dict[str, Any]]:
        """JSON objects of a streamed answer (`/events`), as they come, until the daemon ends it.
        The request is made before this returns: once it has, the daemon has accepted it."""
        return self._objects(path, self._request(path, params, timeout, idle_ok))

    @staticmethod
    def _objects(path: str, resp: _Response) -> Iterator[dict[str, Any]]:
        buf = b""
        try:
            for chunk in resp.chunks():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        except (OSError, ValueError) as exc:
            raise DockerError(f"{path}: {exc}") from None


class _Response:
    """One HTTP/1.1 response read from a buffered socket file: status, headers, body by
    Content-Length or chunked transfer encoding."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        status = fh.readline().decode("latin-1").split(None, 2)
        if len(status) < 2 or not status[0].startswith("HTTP/"):
            raise ValueError(f"not an HTTP answer: {' '.join(status)!r}")
        self.status = int(status[1])
        self.headers: dict[str, str] = {}
        while (line := fh.readline().decode("latin-1").strip()):
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()

    def chunks(self) -> Iterator[bytes]:
        if self.status in (204, 304) or self.status < 200:
            return
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self._fh.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._fh.readline().strip():  # trailers
                        pass
                    return
                data = self._fh.read(size)
                self._fh.readline()
                if len(data) < size:
                    raise ValueError("connection closed in the middle of an answer")
                yield data
        elif "content-length" in self.headers:
            length = int(self.headers["content-length"])
            data = self._fh.read(length) if length else b""
            if len(data) < length:
                raise ValueError("connection closed in the middle of an answer")
            yield data
        else:
            yield self._fh.read()

    def read(self) -> bytes:
        return b"".join(self.chunks())
