#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: Debian packages, a working CRIU,
# and .venv with hybridmig and pycriu installed. A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CRIU_VERSION=4.2.1
LAST_UNPATCHED_CRIU=4.2.1  # the last release known to lack the fixes of scripts/criu-patches
CRIU_TARBALL=criu_${CRIU_VERSION}.orig.tar.xz
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CRIU_DIR=$ROOT/build/criu
CRIU_SRC=$CRIU_DIR/criu-$CRIU_VERSION
VENV=$ROOT/.venv

# Build dependencies of CRIU, plus the tools the tests and demo use.
DEB_PACKAGES=(
    build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
    protobuf-c-compiler protobuf-compiler uuid-dev libaio-dev
    iproute2 util-linux procps xz-utils dpkg-dev patch redis-server
    podman runc busybox-static
)

say() { printf '== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (CRIU and userfaultfd of other processes need it)" >&2
    exit 1
fi

apt_updated=0
apt_update_once() {
    if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
}

missing=()
for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- CRIU source: always kept (pycriu is built from it, and criu/uffd.c is
# the protocol reference). Fetched with apt's own tools from the suite that
# carries 4.2.1 (sid), on the mirror this machine's apt sources already use.
fetch_criu_source() {
    local mirror lists
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | grep -v security | awk '{print $2}' | head -n1 || true)
    mirror=${mirror%/}
    if [ -z "$mirror" ]; then
        echo "setup: no Debian mirror found in /etc/apt/sources.list*; cannot fetch the CRIU source" >&2
        exit 1
    fi
    lists=$CRIU_DIR/apt
    mkdir -p "$lists/lists/partial"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" > "$lists/sources.list"
    local aptopts=(-o Dir::Etc::SourceList="$lists/sources.list" -o Dir::Etc::SourceParts=/dev/null
                   -o Dir::State::Lists="$lists/lists" -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" update -qq
    # apt-get source may fail on the debian/ tarball while the orig tarball
    # arrives: the checksum below is what decides.
    (cd "$CRIU_DIR" && apt-get "${aptopts[@]}" source --download-only "criu=${CRIU_VERSION}-*" >/dev/null 2>&1 || \
        apt-get "${aptopts[@]}" source --download-only criu >/dev/null 2>&1 || true)
}

mkdir -p "$CRIU_DIR"
if ! echo "$CRIU_SHA256  $CRIU_DIR/$CRIU_TARBALL" | sha256sum -c --status 2>/dev/null; then
    say "fetching CRIU $CRIU_VERSION source"
    fetch_criu_source
    if ! echo "$CRIU_SHA256  $CRIU_DIR/$CRIU_TARBALL" | sha256sum -c --status 2>/dev/null; then
        echo "setup: $CRIU_TARBALL missing or its sha256 is not $CRIU_SHA256" >&2
        exit 1
    fi
fi
if [ ! -f "$CRIU_SRC/Makefile" ]; then
    tar -C "$CRIU_DIR" -xf "$CRIU_DIR/$CRIU_TARBALL"
fi
# Fixes of CRIU bugs that hybridmig runs into (each patch says which), applied
# once to the source; the CRIU we install records which set it was built with.
# A changed set goes onto a fresh tree, in order: later patches touch what
# earlier ones did, so applying the set again onto a patched tree (patch
# --forward) half-applies an earlier one where a later one moved its context.
PATCHES_SUM=$(cat "$ROOT"/scripts/criu-patches/*.patch | sha256sum | cut -d' ' -f1)
CRIU_STAMP=/usr/local/sbin/.criu-hybridmig-patches
if [ "$(cat "$CRIU_SRC/.hybridmig-patches" 2>/dev/null)" != "$PATCHES_SUM" ]; then
    say "applying scripts/criu-patches to a fresh $CRIU_SRC"
    rm -rf "$CRIU_SRC"
    tar -C "$CRIU_DIR" -xf "$CRIU_DIR/$CRIU_TARBALL"
    for p in "$ROOT"/scripts/criu-patches/*.patch; do
        patch -d "$CRIU_SRC" -p1 --forward --silent <"$p" >/dev/null || \
            { echo "setup: cannot apply $p to a fresh $CRIU_SRC" >&2; exit 1; }
    done
    echo "$PATCHES_SUM" >"$CRIU_SRC/.hybridmig-patches"
fi

# CRIU keeps what it probes of the kernel at start (kerndat: ~40 ms, an
# `iptables -L` among them) in $RUNDIR/criu.kdat, but only on a tmpfs, as
# /run usually is. Where it is not (these VMs), every CRIU start probes
# again, inside the restore and so inside the blackout: our CRIU then keeps
# its cache in a root-only tmpfs of its own. (After a reboot that dir is no
# tmpfs until the next `make setup`: CRIU then just probes again.)
CRIU_RUNDIR=/run
if [ "$(stat -f -c %T /run)" != tmpfs ]; then
    CRIU_RUNDIR=/run/hybridmig-criu
    mkdir -p -m 0700 "$CRIU_RUNDIR"
    if [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ]; then
        mount -t tmpfs -o mode=0700,size=1m hybridmig-criu "$CRIU_RUNDIR" || \
            say "note: cannot mount a tmpfs on $CRIU_RUNDIR: CRIU will probe the kernel at every start"
    fi
fi
# CRIU stamps its kerndat cache with SOURCE_DATE_EPOCH, else the build's
# time: another build (a second checkout's) would find the cache stale,
# probe again inside a restore and overwrite it for every CRIU. Stamp it
# with what the cache holds: the code that probes, and its layout.
KDAT_STAMP=$((16#$(cat "$CRIU_SRC"/criu/kerndat.c "$CRIU_SRC"/criu/include/kerndat.h | sha256sum | cut -c1-7)))
CRIU_BUILD="$PATCHES_SUM rundir=$CRIU_RUNDIR kdat=$KDAT_STAMP"

criu_ok() {
    local v
    command -v criu >/dev/null || return 1
    v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$v" ] || return 1
    # >= 4.2: 3.17 fails on kernels >= 6.13, 4.1 cannot dump inet sockets on >= 6.16.
    [ "$(printf '%s\n4.2\n' "$v" | sort -V | head -n1)" = 4.2 ] || return 1
    # Up to 4.2.1, only a CRIU this set-up built carries the fixes of
    # scripts/criu-patches (it is rebuilt when they or its RUNDIR change): a
    # released one is replaced by ours in /usr/local/sbin, ahead on PATH.
    if [ "$(printf '%s\n%s\n' "$v" "$LAST_UNPATCHED_CRIU" | sort -V | tail -n1)" = "$LAST_UNPATCHED_CRIU" ]; then
        [ "$(command -v criu)" = /usr/local/sbin/criu ] || return 1
        [ "$(cat "$CRIU_STAMP" 2>/dev/null)" = "$CRIU_BUILD" ] || return 1
    fi
    criu check >/dev/null 2>&1
}

if ! criu_ok; then
    say "building CRIU $CRIU_VERSION"
    rm -f "$CRIU_SRC/criu/kerndat.o"  # RUNDIR is compiled into it, and make does not track it
    SOURCE_DATE_EPOCH=$KDAT_STAMP make -C "$CRIU_SRC" -j"$(nproc)" criu RUNDIR="$CRIU_RUNDIR" >"$CRIU_DIR/build.log" 2>&1 || \
        { tail -20 "$CRIU_DIR/build.log"; exit 1; }
    # under a temp name, then renamed: a criu started meanwhile (another
    # checkout's tests) finds the old binary or the new one, never none
    install -m 0755 "$CRIU_SRC/criu/criu" /usr/local/sbin/.criu.new
    mv -f /usr/local/sbin/.criu.new /usr/local/sbin/criu
    echo "$CRIU_BUILD" >"$CRIU_STAMP"
    hash -r
    criu_ok || { echo "setup: the freshly built CRIU fails 'criu check'" >&2; criu check >&2 || true; exit 1; }
fi
if [ ! -f "$CRIU_SRC/lib/pycriu/rpc_pb2.py" ]; then
    make -C "$CRIU_SRC" lib >"$CRIU_DIR/lib.log" 2>&1 || { tail -20 "$CRIU_DIR/lib.log"; exit 1; }
fi

# --- the virtualenv: the light set-up of scripts/venv.sh, plus pycriu.
bash scripts/venv.sh test,bench,lint
if ! "$VENV/bin/python" -c 'import pycriu.images' 2>/dev/null; then
    say "installing pycriu into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$CRIU_SRC/lib" >/dev/null 2> >(grep -v 'is ignored' >&2)
fi
"$VENV/bin/python" -c 'import pycriu.images, hybridmig._native, matplotlib' || { echo "setup: pycriu or the native module does not import" >&2; exit 1; }
say "ready: $VENV/bin/hybridmig, $(criu --version | head -n1 | tr -s ' ')"
