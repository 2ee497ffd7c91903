"""A small HTTP server of address lists, good and hostile, for tests (run inside a lab network
namespace: `python3 list_server.py ADDRESS PORT`). Standard library only."""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = "good"
GOOD = b"# office\n203.0.113.10\n2001:db8:1::10/128\n\n198.51.100.7  # branch\n"
SWAPPED = b"203.0.113.100\n2001:db8:9::10\n"  # the strangers' addresses instead of the office's
# More blocks than a staged load's threshold (dockfence.backends.staged.STAGE_MIN) that no
# merge shrinks: every other /64 of 2001:db8:a000::/48 and every other address of
# 198.51.100.128/25 (none of them a lab address)
MANY = "".join([*(f"2001:db8:a000:{2 * i:x}::/64\n" for i in range(12_000)),
                *(f"198.51.100.{i}\n" for i in range(129, 255, 2))]).encode()
HOLD = 45.0  # /held gives up holding after this long (a download may take 60 s in all)
RELEASE = threading.Event()
HELD = {"state": "idle"}  # of /held: idle, holding (a download is in flight), done


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: object) -> None:
        pass

    def send(self, body: bytes, kind: str = "text/plain", status: int = 200,
             length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        global MODE
        path = self.path
        if path.startswith("/set/"):  # what /list answers from now on
            MODE = path[len("/set/"):]
            RELEASE.clear()
            HELD["state"] = "idle"
            self.send(b"ok\n")
            return
        if path == "/release":  # /held sends the rest of its list now
            RELEASE.set()
            self.send(b"ok\n")
            return
        if path == "/held-state":
            self.send(HELD["state"].encode())
            return
        if path == "/list":
            path = f"/{MODE}"
        if path == "/good":
            self.send(GOOD)
        elif path == "/html":
            self.send(b"<!doctype html><html><body>Sign in</body></html>\n", "text/html")
        elif path == "/html-as-text":
            self.send(b"<!doctype html>\n<html>\n<p>moved</p>\n")
        elif path == "/bad":
            self.send(b"203.0.113.10\n198.51.100.0/33\n")
        elif path == "/big":  # no length announced: the reader must stop by itself
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for _ in range(10_000):
                self.wfile.write(b"203.0.113.10\n" * 100)
        elif path == "/huge":  # announces a gigabyte
            self.send(b"203.0.113.10\n", length=1 << 30)
        elif path == "/empty":
            self.send(b"# nothing today\n")
        elif path == "/other":
            self.send(b"198.51.100.50\n")
        elif path == "/swapped":
            self.send(SWAPPED)
        elif path == "/many":  # MANY and the office
            self.send(MANY + GOOD)
        elif path == "/many-swapped":  # MANY and the strangers
            self.send(MANY + SWAPPED)
        elif path == "/held":  # SWAPPED, held open (a comment line every 0.5 s) until /release
            HELD["state"] = "holding"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            deadline = time.monotonic() + HOLD
            try:
                while not RELEASE.wait(0.5) and time.monotonic() < deadline:
                    self.wfile.write(b"# more to come\n")
                    self.wfile.flush()
                self.wfile.write(SWAPPED)
            except OSError:
                return
            finally:
                HELD["state"] = "done"
        elif path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://198.51.100.7/list")
            self.end_headers()
        elif path == "/hop":
            self.send_response(301)
            self.send_header("Location", "/good")
            self.end_headers()
        elif path == "/slow":  # a line every 0.2 s, for ever
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"203.0.113.10\n")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                return
        else:
            self.send(b"not here\n", status=404)


if __name__ == "__main__":
    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
