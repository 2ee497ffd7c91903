"""One bounded HTTP(S) download with the standard library, for dockfence.listurls.

Kept apart so that only a download pays for importing http.client, urllib.request and ssl.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .listurls import MAX_REDIRECTS, FetchError, said


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        scheme = urllib.parse.urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a {scheme or 'relative'} "
                                         "URL refused (http and https only)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, timeout: float, deadline: float, max_bytes: int) -> bytes:
    opener = urllib.request.build_opener(_Redirects())
    request = urllib.request.Request(url, headers={"User-Agent": "dockfence",
                                                   "Accept": "text/plain"})
    try:
        with opener.open(request, timeout=timeout) as resp:
            kind = resp.headers.get_content_type()
            if kind in ("text/html", "application/xhtml+xml"):
                raise FetchError(f"the answer is an HTML page ({kind}), not a list of addresses")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"the answer is {int(length):,} bytes, more than the "
                                 f"{max_bytes:,} a list may have")
            chunks, size = [], 0
            while chunk := resp.read1(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"the answer is more than the {max_bytes:,} bytes a list "
                                     "may have")
                if time.monotonic() > deadline:
                    raise FetchError("the answer is arriving too slowly (no complete answer "
                                     "within the time allowed)")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"HTTP {exc.code}: {said(exc.reason)}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot download: {said(exc.reason)}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed answers
        raise FetchError(f"cannot download: {said(exc)}") from None
    except http.client.HTTPException as exc:
        raise FetchError(f"malformed answer: {said(repr(exc))}") from None
    data = b"".join(chunks)
    if data.lstrip()[:1] == b"<":
        raise FetchError("the answer looks like HTML or XML, not a list of addresses")
    return data
