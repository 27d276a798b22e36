#!/usr/bin/env bash
# A base image made from Debian packages, for machines that cannot pull NGC's (CI, this repo's
# tests): Debian bookworm (debootstrap, minbase) with Python 3.11, pip and the CPU build of torch,
# as NGC's image holds its CUDA build. Imported into the local container store (podman and
# buildah share it) as $LMFORGE_BASE_IMAGE (default localhost/lmforge-base:debian-cpu).
#   sudo docker/debian-base.sh [TORCH_REQUIREMENT]          (default torch==2.13.0)
# torch comes through this machine's pip (its find-links and indexes), into the image's
# dist-packages; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
tag=${LMFORGE_BASE_IMAGE:-localhost/lmforge-base:debian-cpu}
torch=${1:-torch==2.13.0}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[[ $(id -u) -eq 0 ]] || { echo "debian-base.sh: run as root (debootstrap)" >&2; exit 2; }
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "debian-base.sh: needs $tool (apt-get install $tool)" >&2; exit 3; }
done
root=$(mktemp -d /var/tmp/lmforge-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root" >&2
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$root" \
    "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Debian marks its Python externally managed; NGC's lets pip install into it, and so does this one
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
python3 -m pip install -q --no-cache-dir --ignore-installed --no-warn-script-location \
    --python-version 3.11 --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --target "$root/usr/local/lib/python3.11/dist-packages" "$torch"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --quiet \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    --message "Debian bookworm, Python 3.11, $torch (CPU)" - "$tag" >/dev/null
echo "$tag"
