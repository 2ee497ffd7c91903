"""Address lists downloaded from a URL (`lists: {cdn: {url: https://..., refresh: 6h}}`).

Only `apply` (and watch, through refresh_due/refresh_lists) downloads; everything else reads the
last good copy kept in the state directory (`lists/<name>.txt`, with `lists/<name>.json`: the
URL, when it was fetched and the copy's digest). A download that fails, or whose answer is not a
list of addresses, leaves that copy in force and says so: a network outage never opens or closes
anything by surprise. With no good copy at all the policy does not load (exit 1).

Downloads use the standard library: http and https only, a timeout per network operation, a
bound on the whole download (a slow trickle ends), a size limit, and a bounded number of
redirects (a redirect loop ends).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import filedigests
from .errors import OperationalError
from .statedir import state_dir

# A list's name (`lists: {office: ...}`): a word, so that it never reads as an address, and safe
# as a file name in the state directory (downloaded lists are saved under it). Here, not in
# dockfence.model: the no-op `apply` checks the names of downloaded lists without the rules.
LIST_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

MAX_URL = 2048
TIMEOUT = 10.0  # seconds per connect or read
TOTAL = 60.0  # seconds for the whole download
MAX_BYTES = 64 * 1024 * 1024
MAX_REDIRECTS = 5
# Held while a new copy and its description are written (two replacements: a reader in between
# would find a copy that is not the one described, and refuse it). watch downloads beside its
# loop and passes the host lock, which every apply holds while it reads the copies.
Keeping = Callable[[], AbstractContextManager[object]]
MIN_REFRESH = 60  # seconds: a list is never fetched more often than this
DEFAULT_REFRESH = 86400
RETRY = 300  # after a failed download, seconds before refresh_due() says try again
_DURATION_RE = re.compile(r"^(\d{1,9})([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class FetchError(Exception):
    """A download that failed or whose answer was refused (str: why)."""


class MissingCopy(OperationalError):
    """A downloaded list with no good copy yet: nothing can be enforced from it."""


def check_url(value: str) -> str:
    """An http or https URL with a host, at most MAX_URL characters, nothing unprintable."""
    if len(value) > MAX_URL:
        raise ValueError(f"a list URL is at most {MAX_URL} characters")
    if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("a list URL is printable ASCII without spaces (percent-encode the rest)")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a list URL starts with http:// or https:// and names a host")
    return value


def parse_refresh(value: object) -> int:
    """Seconds from `90s`, `10m`, `6h`, `1d`, `1w` (or a number of seconds), at least a minute."""
    m = _DURATION_RE.match(str(value).strip().lower()) if isinstance(value, int | str) \
        and not isinstance(value, bool) else None
    if not m:
        raise ValueError("refresh is a duration: 90s, 10m, 6h, 1d or 1w")
    seconds = int(m[1]) * _UNITS[m[2]]
    if seconds < MIN_REFRESH:
        raise ValueError(f"refresh is at least {MIN_REFRESH} seconds")
    return seconds


@dataclass(frozen=True)
class ListURL:
    """A list the policy downloads, and how often."""

    name: str  # validated against LIST_NAME_RE: it names files in the state directory
    url: str
    refresh: int = DEFAULT_REFRESH  # seconds

    def __post_init__(self) -> None:
        if not LIST_NAME_RE.match(self.name):  # it becomes a file name: never a path
            raise ValueError(f"not a list name: {self.name!r}")

    def label(self) -> str:
        """How plan, status and errors name the list: its name and where it comes from."""
        return f"list {self.name!r} from {self.url}"

    @property
    def copy(self) -> Path:
        return state_dir() / "lists" / f"{self.name}.txt"

    @property
    def meta(self) -> Path:
        return state_dir() / "lists" / f"{self.name}.json"


def _meta(lu: ListURL) -> dict[str, Any] | None:
    try:
        doc = json.loads(lu.meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("url") == lu.url else None


def _described(lu: ListURL) -> dict[str, Any] | None:
    """The description of this URL's last good copy, None when there is none (never fetched,
    another URL)."""
    meta = _meta(lu)
    return None if meta is None or not isinstance(meta.get("fetched"), int | float) else meta


def good_copy(lu: ListURL) -> Path | None:
    """Where the last good copy of this URL's list is, by its description (the bytes are not
    checked: for the stamp's digest, which any change to them changes anyway, and a full load
    then verifies), or None (never fetched, another URL)."""
    return None if _described(lu) is None else lu.copy


def saved_read(lu: ListURL) -> tuple[bytes, filedigests.Hashed] | None:
    """The last good copy of this URL's list and its digest, or None (never fetched, another
    URL, damaged: not the bytes its description records)."""
    meta = _described(lu)
    if meta is None:
        return None
    try:
        data, hashed = filedigests.read(lu.copy)
    except OSError:
        return None
    return (data, hashed) if hashed.digest == meta.get("sha256") else None


def saved(lu: ListURL) -> bytes | None:
    """The bytes of saved_read()."""
    found = saved_read(lu)
    return None if found is None else found[0]


def read_saved(lu: ListURL) -> tuple[bytes, filedigests.Hashed]:
    found = saved_read(lu)
    if found is None:
        raise MissingCopy(f"{lu.label()}: no good copy has been downloaded yet (`dockfence "
                          f"apply` or `watch` downloads it; nothing is enforced from an empty "
                          "list)")
    return found


def due(lu: ListURL, now: float | None = None) -> bool:
    """Is the saved copy older than `refresh` (or missing), and no failed try recent?"""
    now = time.time() if now is None else now
    meta = _meta(lu)
    if meta is None:
        return True
    fetched, tried = meta.get("fetched"), meta.get("tried", 0)
    if not isinstance(fetched, int | float) or not isinstance(tried, int | float):
        return True
    return now - fetched >= lu.refresh and now - tried >= min(lu.refresh, RETRY)


def fetch(url: str, timeout: float = TIMEOUT, total: float = TOTAL,
          max_bytes: int = MAX_BYTES) -> bytes:
    """The body of a successful answer; FetchError when it fails, is too big or too slow."""
    result: list[bytes | BaseException] = []
    deadline = time.monotonic() + total

    from .download import download  # http.client, urllib.request, ssl: only when downloading

    def work() -> None:
        try:
            result.append(download(url, timeout, deadline, max_bytes))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    # The whole download runs under one deadline, headers included: a server that trickles
    # them is given up on too (the thread ends at its next socket timeout).
    worker = threading.Thread(target=work, daemon=True, name="dockfence-fetch")
    worker.start()
    worker.join(total + 1)
    if not result:
        raise FetchError(f"no complete answer within {total:g} seconds")
    if isinstance(result[0], bytes):
        return result[0]
    raise result[0]


def said(what: object, limit: int = 200) -> str:
    """What a server (or the network stack) said, on one line, printable and short: a status
    line's reason is the server's to choose."""
    text = " ".join(str(what).split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def save(lu: ListURL, data: bytes, now: float) -> None:
    """Keep a good copy: the list, then its description, each replaced atomically."""
    lu.copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace(lu.copy, data)
    _replace(lu.meta, json.dumps({"url": lu.url, "fetched": now,
                                  "sha256": filedigests.of_bytes(data)}).encode())


def _note_failure(lu: ListURL, now: float) -> None:
    meta = _meta(lu)
    if meta is not None:  # a good copy stays in force; try again after RETRY
        meta["tried"] = now
        _replace(lu.meta, json.dumps(meta).encode())


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def refresh(lu: ListURL, now: float | None = None, keeping: Keeping | None = None,
            **limits: Any) -> str | None:
    """Download one list and keep it if it is a good list (`keeping` held while it is written);
    a warning when the last good copy stays in force (or there is none)."""
    from . import listfiles
    from .errors import PolicyError

    now = time.time() if now is None else now
    try:
        data = fetch(lu.url, **limits)
        v4, v6 = listfiles.parse_at(lu.label(), data)  # all validated before it is kept
        if not v4 and not v6:  # a truncated or emptied upstream file, not a decision
            raise FetchError("the answer holds no addresses")
    except (FetchError, PolicyError) as exc:
        # a read-only state directory, the host lock not had: the next try tells
        with contextlib.suppress(OSError, OperationalError), (keeping or contextlib.nullcontext)():
            _note_failure(lu, now)
        meta = _meta(lu)
        kept = "there is no good copy"
        if meta is not None and saved(lu) is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(meta["fetched"]))
            kept = f"the copy downloaded {when} stays in force"
        why = str(exc) if isinstance(exc, FetchError) else f"rejected: {exc}"
        return f"{lu.label()}: {why}; {kept}"
    try:
        with (keeping or contextlib.nullcontext)():
            save(lu, data, now)
    except OSError as exc:
        return f"{lu.label()}: cannot keep the download in {lu.copy.parent}: {exc.strerror}"
    except OperationalError as exc:  # `keeping` not had (another dockfence holds the host)
        return f"{lu.label()}: the download is not kept: {exc}"
    return None


def refresh_lists(policy_path: str, force: bool = False, text: str | None = None,
                  keeping: Keeping | None = None) -> list[str]:
    """Download the policy's lists whose copy is older than their `refresh` (all with force);
    warnings for those that keep their last good copy. A policy that cannot be read or names
    no URL lists costs a read of its text (none when the caller read it: `text`)."""
    warnings = []
    for lu in of_policy(policy_path, text):
        if force or due(lu):
            warning = refresh(lu, keeping=keeping)
            if warning:
                warnings.append(warning)
    return warnings


def refresh_due(policy_path: str) -> bool:
    """Is any of the policy's downloaded lists due (what watch asks on each tick: it reads the
    policy's text and one small file per list)?"""
    return any(due(lu) for lu in of_policy(policy_path))


def of_policy(policy_path: str, text: str | None = None) -> list[ListURL]:
    """The valid URL lists a policy names, found without validating the rest of it (the full
    load does that, with its errors): nothing invalid is ever downloaded."""
    from . import listfiles

    text = listfiles.read_text(policy_path) if text is None else text
    if text is None:
        return []
    found = listfiles.discover(text, policy_path)
    out = []
    for name, kind, value in found or []:
        if kind != "url" or not isinstance(value, dict):
            continue
        try:
            if not LIST_NAME_RE.match(name):
                continue
            out.append(ListURL(name, check_url(str(value.get("url"))),
                               parse_refresh(value.get("refresh", DEFAULT_REFRESH))))
        except ValueError:
            continue
    return out
