#!/usr/bin/env bash
# Make Docker 28.5 (Debian sid's docker.io, docker-cli and containerd 2.x) available under a directory, without
# installing or upgrading anything: sid is added as an apt source pinned to priority 40, the two
# packages are only downloaded and unpacked, and the binaries are linked into DEST/bin.
#
#   scripts/fetch-docker28.sh [DEST]      (default /opt/dockfence/docker28; needs root)
#
# Use it with dockfence.lab.Lab(name, docker_bin_dir=DEST + "/bin"), or for the tests set
# DOCKFENCE_DOCKER28_DIR=DEST. Idempotent: a second run with a complete DEST does nothing.
set -euo pipefail

DEST="${1:-/opt/dockfence/docker28}"
WANT_VERSION="${DOCKFENCE_DOCKER28_VERSION:-28.5}"
SOURCES=/etc/apt/sources.list.d/dockfence-sid.sources
PREFS=/etc/apt/preferences.d/dockfence-sid
BINS=(dockerd docker docker-proxy containerd containerd-shim-runc-v2 ctr)

log() { printf 'fetch-docker28: %s\n' "$*" >&2; }

already_done() {
    local b
    for b in "${BINS[@]}"; do
        [[ -x "$DEST/bin/$b" ]] || return 1
    done
    "$DEST/bin/dockerd" --version 2>/dev/null | grep -q "version ${WANT_VERSION}\."
}

if already_done; then
    log "already present: $("$DEST/bin/dockerd" --version)"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "needs root (apt source, apt-get update)"
    exit 1
fi

# sid as a source that apt never prefers: priority 40 < 100 (installed) < 500 (bookworm), so
# `apt-get upgrade/install` keep choosing bookworm; only an explicit `pkg/sid` reaches it.
if [[ ! -f "$SOURCES" ]]; then
    # Use the Debian mirror this machine is already configured with.
    mirror="$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v security | head -n1 || true)"
    if [[ -z "$mirror" ]]; then
        mirror="$(grep -h -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' \
            | grep -v security | head -n1 || true)"
    fi
    if [[ -z "$mirror" ]]; then
        log "no Debian mirror found in the apt sources"
        exit 1
    fi
    cat >"$SOURCES" <<EOF
# added by dockfence scripts/fetch-docker28.sh: only to download docker.io/containerd 28.x
Types: deb
URIs: ${mirror}
Suites: sid
Components: main
Architectures: $(dpkg --print-architecture)
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
if [[ ! -f "$PREFS" ]]; then
    cat >"$PREFS" <<'EOF'
# added by dockfence scripts/fetch-docker28.sh: never install or upgrade from sid by default
Package: *
Pin: release n=sid
Pin-Priority: 40
EOF
fi

# Refresh only the sid lists: faster, and leaves the other sources' lists as they were.
log "apt-get update (sid only)"
apt-get update -qq \
    -o Dir::Etc::sourcelist="$SOURCES" \
    -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0

work="$(mktemp -d /tmp/dockfence-docker28.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# apt-get download runs as the _apt user: the directory must be writable by it.
chmod 0777 "$work"
# sid splits the CLI out of docker.io (docker-cli); docker-proxy stays in docker.io.
PKGS=(docker.io/sid docker-cli/sid containerd/sid)
log "apt-get download ${PKGS[*]}"
(cd "$work" && apt-get download -qq "${PKGS[@]}")

# Start from a clean tree so no file of an older unpack lingers.
rm -rf "${DEST:?}/root"
mkdir -p "$DEST/root" "$DEST/bin"
for deb in "$work"/*.deb; do
    log "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$DEST/root"
done

# sid's runc is built against a newer glibc than Debian 12's; the system /usr/sbin/runc works.
# (runc is its own package and is not downloaded; this only guards against a future bundling.)
find "$DEST/root" -name runc -type f -delete

for b in "${BINS[@]}"; do
    src=""
    for dir in usr/sbin usr/bin usr/libexec/docker/cli-plugins; do
        if [[ -x "$DEST/root/$dir/$b" ]]; then
            src="$DEST/root/$dir/$b"
            break
        fi
    done
    if [[ -z "$src" ]]; then
        log "missing binary after unpack: $b"
        exit 1
    fi
    ln -sfn "$src" "$DEST/bin/$b"
done
# docker-init (for `docker run --init`) is not in these packages: dockerd finds the system's
# /usr/bin/docker-init (Debian's tini) on PATH.

# Nothing on the system may come from sid: a simulated upgrade must not mention it.
if apt-get -s upgrade 2>/dev/null | grep -E '^Inst ' | grep -q -E '[(/ ]sid[ ,)/]|unstable'; then
    log "WARNING: apt-get -s upgrade would pull packages from sid; check $PREFS"
    exit 1
fi

if ! already_done; then
    log "unpacked, but $DEST/bin/dockerd is not version ${WANT_VERSION}.x:"
    "$DEST/bin/dockerd" --version >&2 || true
    exit 1
fi
log "ready: $("$DEST/bin/dockerd" --version) in $DEST/bin"
