#!/usr/bin/env bash
# Install what dockfence, its demo and its tests need on a fresh Debian 12 machine (as root):
# the system tools from apt, then dockfence itself with pip. Idempotent and quiet.
#   scripts/bootstrap.sh          tools + `pip install .`
#   scripts/bootstrap.sh --test   also the test tools and Docker 28.5 (scripts/fetch-docker28.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: run as root (apt-get, network namespaces, dockerd)" >&2
    exit 1
fi
APT=(docker.io iptables nftables conntrack iproute2 busybox-static util-linux curl gcc libc6-dev)
# The tests also run Debian's ufw, fail2ban and Prometheus (server and promtool), inside lab
# namespaces only (ufw installs disabled; its tests keep its state in a copy of /etc/ufw).
if [[ "${1:-}" == "--test" ]]; then
    APT+=(ufw fail2ban prometheus)
fi
missing=()
for pkg in "${APT[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "bootstrap: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Packages must never start their services on this machine (a fail2ban or dockerd on the
    # machine's own network): without a policy-rc.d, one that forbids starts is put in place
    # for the install and removed afterwards.
    guard=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod +x "$guard"
        trap 'rm -f "$guard"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null  # with recommends
    if [[ -n "$guard" ]]; then rm -f "$guard"; fi
fi
# dockerd is started only inside lab namespaces: never let a package start one on the host.
if command -v systemctl >/dev/null && systemctl is-active -q docker 2>/dev/null; then
    echo "bootstrap: note: a system dockerd is running; dockfence's lab does not use it" >&2
fi

extra=""
if [[ "${1:-}" == "--test" ]]; then
    extra="[test]"
    scripts/fetch-docker28.sh /opt/dockfence/docker28 \
        || echo "bootstrap: WARNING: Docker 28.5 unavailable; its lab tests will be skipped" >&2
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore ".${extra}"
