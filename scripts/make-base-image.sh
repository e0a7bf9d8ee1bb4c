#!/usr/bin/env bash
# Build a local Python 3.11 base image without any registry: debootstrap a Debian bookworm
# rootfs, add python3 + venv + pip, trust this host's extra CA certificates (so pip can reach
# PyPI through a TLS-intercepting proxy), and `docker import` it. Then build the app with
#
#     docker compose build --build-arg BASE_IMAGE=<tag>        (or: make setup BASE_IMAGE=<tag>)
#
# For air-gapped or Docker-Hub-less machines where Debian's archive (or a mirror of it) and PyPI
# are still reachable. Needs root (debootstrap chroots), debootstrap and a running Docker engine.
#
# usage: scripts/make-base-image.sh [TAG]            default TAG: chatglm-base:py3.11-bookworm
# env:   SUITE=bookworm  MIRROR=http://deb.debian.org/debian
#        EXTRA_CA_DIR=/usr/local/share/ca-certificates  (every *.crt there is trusted in the image)
#        FORCE=1  rebuild even if TAG already exists
set -euo pipefail

TAG=${1:-chatglm-base:py3.11-bookworm}
SUITE=${SUITE:-bookworm}   # bookworm's python3 is 3.11, the version the pins are tested with
MIRROR=${MIRROR:-http://deb.debian.org/debian}
EXTRA_CA_DIR=${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
FORCE=${FORCE:-0}

die() { echo "make-base-image: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs chroot); try: sudo $0 $*"
command -v debootstrap >/dev/null || die "debootstrap is not installed; apt-get install -y debootstrap"
command -v docker >/dev/null || die "docker CLI not found; apt-get install -y docker.io"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start it: dockerd >/tmp/dockerd.log 2>&1 &"

if [ "$FORCE" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "make-base-image: $TAG already exists (FORCE=1 rebuilds it)"
    exit 0
fi

work=$(mktemp -d /tmp/base-rootfs.XXXXXX)
root=$work/rootfs
cleanup() {
    local status=$?
    set +e  # a failing clean-up step must not replace the script's own exit status
    # debootstrap mounts /proc and /sys inside the target and can leave them behind when it
    # fails: unmount everything under the rootfs first, so rm can never reach the host's files.
    grep -o " $root[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$work"
    exit "$status"
}
trap cleanup EXIT

start=$(date +%s)
echo "make-base-image: debootstrap $SUITE from $MIRROR (a few minutes)"
# minbase + only what a Python app needs; python-is-python3 gives the `python` that
# python:3.11-slim has, so either base works with the same Dockerfile.
debootstrap --variant=minbase --components=main \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above); check MIRROR=$MIRROR is reachable"; }

n_ca=0
if [ -d "$EXTRA_CA_DIR" ]; then
    for crt in "$EXTRA_CA_DIR"/*.crt; do
        [ -e "$crt" ] || continue
        cp "$crt" "$root/usr/local/share/ca-certificates/"
        n_ca=$((n_ca + 1))
    done
fi
chroot "$root" update-ca-certificates >/dev/null
echo "make-base-image: trusted $n_ca extra CA certificate(s) from $EXTRA_CA_DIR"

# Keep the image small: package lists, caches and docs are not needed at run time.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log

# pip (23.x on bookworm) uses its own bundled CA list unless told otherwise: point it, requests
# and Python's ssl at the system bundle that now includes the extra CAs.
bundle=/etc/ssl/certs/ca-certificates.crt
tar --numeric-owner -C "$root" -c . | docker import \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV SSL_CERT_FILE=$bundle" \
    --change "ENV PIP_CERT=$bundle" \
    --change "ENV REQUESTS_CA_BUNDLE=$bundle" \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null

docker run --rm "$TAG" python -c "import ssl, sys, venv; print('make-base-image: python', sys.version.split()[0])"
size=$(docker image inspect -f '{{.Size}}' "$TAG")
echo "make-base-image: $TAG built in $(( $(date +%s) - start ))s, $((size / 1000000)) MB"
