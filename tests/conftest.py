"""Shared fixtures: sandboxed Docker hosts (dockfence.lab.Lab) for tests marked ``lab``.

``lab`` is module-scoped and parametrized over the Docker versions available: the system's
dockerd (Debian 12: 20.10) and Docker 28.5 unpacked by scripts/fetch-docker28.sh into
$DOCKFENCE_DOCKER28_DIR (default /opt/dockfence/docker28). Each module gets one started lab per
version, stopped when the module is done. ``lab_factory`` starts extra labs (other dockerd
flags, e.g. IPv6) that are stopped at the end of the module.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dockfence.lab import SYSTEM_PATH, Lab

DOCKER28_DIR = Path(os.environ.get("DOCKFENCE_DOCKER28_DIR", "/opt/dockfence/docker28"))

# flavour name -> one-letter tag used in lab names
FLAVOURS = {"system": "s", "docker28": "n"}

_counter = itertools.count()

LabFactory = Callable[..., Lab]


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, dockerd)"
    for tool in ("dockerd", "containerd", "nsenter", "ip", "iptables"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            return f"lab tests need {tool} (apt-get install docker.io iptables iproute2)"
    if not Path("/bin/busybox").exists():
        return "lab tests need /bin/busybox (apt-get install busybox-static)"
    if shutil.which("cc", path=SYSTEM_PATH) is None:
        return "lab tests need a C compiler for the UDP echo server (apt-get install gcc)"
    return None


def docker_bin_dir(flavour: str) -> str | None:
    """The docker_bin_dir for a flavour; skips the test when that Docker is not installed."""
    if flavour == "system":
        return None
    bindir = DOCKER28_DIR / "bin"
    if not (bindir / "dockerd").exists():
        pytest.skip(
            f"Docker 28 not found in {DOCKER28_DIR} (run scripts/fetch-docker28.sh "
            "or set DOCKFENCE_DOCKER28_DIR)"
        )
    return str(bindir)


def unique_lab_name(flavour: str) -> str:
    # t + pid + flavour + counter: unique per run and per lab, <= 8 characters.
    return f"t{os.getpid() % 10000}{FLAVOURS[flavour]}{next(_counter) % 100}"


@pytest.fixture(scope="module")
def lab_factory() -> Iterator[LabFactory]:
    """make(flavour="system", dockerd_args=()) -> a started Lab, stopped after the module."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(flavour: str = "system", dockerd_args: Sequence[str] = ()) -> Lab:
        lab = Lab(
            unique_lab_name(flavour),
            docker_bin_dir=docker_bin_dir(flavour),
            dockerd_args=dockerd_args,
        )
        labs.append(lab)
        lab.start()
        return lab

    try:
        yield make
    finally:
        for lab in reversed(labs):
            lab.stop()


@pytest.fixture(scope="module", params=list(FLAVOURS))
def lab(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:
    """A started lab per Docker version (system 20.10, Docker 28.5), shared by a module."""
    return lab_factory(request.param)


def _own_table() -> int | None:
    """The handle of a dockfence table in the network namespace pytest runs in (the machine's
    own, as CI runs it), read over netlink: never changed, only looked at."""
    from dockfence.backends import netlink
    from dockfence.errors import OperationalError

    try:
        return netlink.table_handle("dockfence")
    except (OSError, OperationalError):  # not root: nothing can have been loaded either
        return None


@pytest.fixture(autouse=True)
def _machine_firewall_untouched() -> Iterator[None]:
    """No test may load dockfence's table into the machine's own network namespace: tests act
    only inside namespaces they create. A test that did fails here, by name (the table is left
    for a person to look at and remove: a test never writes to that firewall, even to clean)."""
    before = _own_table()
    yield
    after = _own_table()
    assert after is None or after == before, (
        "this test loaded `table inet dockfence` into the machine's own network namespace "
        "(remove it with `nft delete table inet dockfence`)")


@pytest.fixture(autouse=True)
def _discovery_memo_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests keep listfiles' discovery memo and the memo of file digests out of
    the machine's /run."""
    from dockfence import filedigests, listfiles

    monkeypatch.setattr(listfiles, "MEMO", tmp_path / "discovered.json")
    monkeypatch.setattr(filedigests, "MEMO", tmp_path / "digests.json")
    listfiles._discover.cache_clear()
