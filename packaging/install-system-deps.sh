#!/usr/bin/env bash
# Install the Debian packages diversityd needs on a fresh Debian 12 machine, and only those
# that are missing. When everything is present it runs no apt and no package manager query
# that is not needed: a no-op in well under a second.
#
#   packaging/install-system-deps.sh            install what is missing (root, or sudo)
#   packaging/install-system-deps.sh --check    list what is missing; exit 1 if anything is
#   packaging/install-system-deps.sh --dry-run  show what apt-get would do (apt-get -s)
#   ... --for demo|lab|test                     what for: the demo (default: test, all)
#   ... --log FILE                              apt-get's output there, not on the terminal
#   ... [PACKAGE...]                            also require these Debian packages
set -euo pipefail

# package|probe: the probe is a shell test that passes when what the project uses from the
# package is already there (maybe from elsewhere, e.g. a pyenv python); only when it fails do
# we ask dpkg. The python probes test the python3 on PATH, the one packaging/ scripts run.
# What the demo needs (build the servers, run a private user manager):
demo_requirements=(
    "cmake|command -v cmake"                        # build-llama-server.sh, llama-cpp-python's build
    "ninja-build|command -v ninja"
    "gcc|command -v gcc"
    "g++|command -v g++"
    "make|command -v make"
    "git|command -v git"
    "ca-certificates|test -s /etc/ssl/certs/ca-certificates.crt"  # pip over HTTPS
    "python3|command -v python3"
    "python3-venv|python_has venv"                  # venv + ensurepip (Debian splits them out)
    "python3-pip|python_has pip"                    # fetch-llama-sdist.sh: python3 -m pip download
    "python3-dev|python_has headers"
    "systemd|command -v systemd-analyze && command -v journalctl && command -v systemctl && systemd_binaries"
    "dbus|command -v dbus-daemon"
    "dbus-user-session|test -e /usr/lib/systemd/user/dbus.socket"  # the user manager's session bus
)
# The lab's (`demo.sh --hosts N`, and its tests):
lab_requirements=(
    "iproute2|command -v ip"                        # the lab's network namespaces and veth links
    "redis-server|test -x /usr/bin/redis-server"    # the lab's Redis (it runs the binary itself)
    "redis-tools|command -v redis-cli"
)
# The test suite's alone (the observability tests):
test_requirements=(
    "prometheus|command -v promtool && command -v prometheus"  # promtool (also enables a system Prometheus, :9090)
)

mode=install
purpose=test
log=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check) mode=check ;;
        --dry-run) mode=dry-run ;;
        --for) purpose="${2:-}"; shift ;;
        --for=*) purpose="${1#--for=}" ;;
        --log) log="${2:-}"; shift ;;
        --log=*) log="${1#--log=}" ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) echo "install-system-deps: unknown option $1" >&2; exit 2 ;;
        *) extra+=("$1") ;;
    esac
    shift
done
case "$purpose" in
    demo) requirements=("${demo_requirements[@]}") ;;
    lab) requirements=("${demo_requirements[@]}" "${lab_requirements[@]}") ;;
    test) requirements=("${demo_requirements[@]}" "${lab_requirements[@]}" "${test_requirements[@]}") ;;
    *) echo "install-system-deps: --for takes demo, lab or test, not '$purpose'" >&2; exit 2 ;;
esac

# apt-get's own output, to the log when one is given (the terminal gets a line or two)
quietly() {
    if [[ -z "$log" ]]; then
        "$@"
        return
    fi
    if ! "$@" >>"$log" 2>&1; then
        echo "install-system-deps: '$*' failed; the end of $log:" >&2
        tail -n 30 "$log" >&2
        return 1
    fi
}

python_report=""
python_has() {
    # One python3 start answers all three python probes.
    if [[ -z "$python_report" ]]; then
        python_report="$(python3 - <<'EOF' 2>/dev/null || true
import importlib.util, os, sysconfig
found = []
if importlib.util.find_spec("venv") and importlib.util.find_spec("ensurepip"):
    found.append("venv")
if importlib.util.find_spec("pip"):
    found.append("pip")
if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    found.append("headers")
print(" ".join(found) or "-")
EOF
)"
    fi
    [[ " $python_report " == *" $1 "* ]]
}

systemd_binaries() {
    # /lib is /usr/lib on merged-/usr Debian 12, but not on every machine.
    local dir
    for dir in /usr/lib/systemd /lib/systemd; do
        if [[ -x "$dir/systemd" && -x "$dir/systemd-journald" ]]; then return 0; fi
    done
    return 1
}

dpkg_installed() {
    command -v dpkg-query >/dev/null \
        && [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

find_missing() {
    missing=()
    local entry package probe
    for entry in "${requirements[@]}"; do
        package="${entry%%|*}"
        probe="${entry#*|}"
        if eval "$probe" >/dev/null 2>&1 || dpkg_installed "$package"; then continue; fi
        missing+=("$package")
    done
    for package in "${extra[@]}"; do
        dpkg_installed "$package" || missing+=("$package")
    done
}

find_missing
if [[ ${#missing[@]} -eq 0 ]]; then
    [[ "$mode" == check ]] && echo "install-system-deps: nothing missing"
    exit 0
fi
if [[ "$mode" == check ]]; then
    echo "install-system-deps: missing: ${missing[*]}"
    exit 1
fi

if ! command -v apt-get >/dev/null; then
    echo "install-system-deps: missing ${missing[*]}, and this is not a Debian-like system (no apt-get): install them by hand" >&2
    exit 1
fi
as_root=()
if [[ "$(id -u)" -ne 0 ]]; then
    if ! command -v sudo >/dev/null; then
        echo "install-system-deps: missing ${missing[*]}; run this script as root (sudo is not available)" >&2
        exit 1
    fi
    as_root=(sudo)
fi
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q
     -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

if [[ "$mode" == dry-run ]]; then
    echo "install-system-deps: missing: ${missing[*]}; apt-get would do:"
    "${apt[@]}" --simulate install --no-install-recommends "${missing[@]}"
    exit 0
fi

# Installing redis-server would start a system Redis on :6379 (and enable it at boot); the
# lab runs its own. A policy-rc.d that denies keeps invoke-rc.d/deb-systemd-invoke from
# starting it (unless the machine has one already, as Docker images do); afterwards it is
# disabled (and stopped, in case an existing policy allowed the start).
our_policy=""
if [[ " ${missing[*]} " == *" redis-server "* && ! -e /usr/sbin/policy-rc.d ]]; then
    our_policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# install-system-deps.sh: start no service while it installs\nexit 101\n' \
        | "${as_root[@]}" tee "$our_policy" >/dev/null
    "${as_root[@]}" chmod 0755 "$our_policy"
    trap '"${as_root[@]}" rm -f "$our_policy"' EXIT
fi
redis_was_missing=0
[[ " ${missing[*]} " == *" redis-server "* ]] && redis_was_missing=1

echo "install-system-deps: installing ${missing[*]} (for the $purpose)${log:+; the output of apt-get in $log}"
start=$(date +%s)
# A fresh machine (or container) often has no package lists at all.
quietly "${apt[@]}" update
quietly "${apt[@]}" install --no-install-recommends "${missing[@]}"

if [[ "$redis_was_missing" -eq 1 ]]; then
    if [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]; then
        "${as_root[@]}" systemctl disable --now redis-server.service >/dev/null 2>&1 || true
    elif [[ -x /etc/init.d/redis-server ]]; then
        "${as_root[@]}" /etc/init.d/redis-server stop >/dev/null 2>&1 || true
        "${as_root[@]}" update-rc.d redis-server disable >/dev/null 2>&1 || true
    fi
fi

python_report=""
hash -r
find_missing
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "install-system-deps: still missing after apt-get: ${missing[*]}" >&2
    exit 1
fi
echo "install-system-deps: done in $(( $(date +%s) - start )) s"
