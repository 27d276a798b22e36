#!/usr/bin/env bash
# The node image built here, for real, without pulling anything: Debian's debootstrap, buildah,
# podman and runc (installed with apt when missing; runc runs containers on hosts whose mixed
# cgroup v1 and v2 podman's default crun refuses), the Debian base of debian-base.sh (made once,
# then reused from the local store) and docker/Dockerfile over it with the CPU torch. Prints the
# tag and the image's size. The tests (tests/test_container.py) and CI run this.
#   sudo docker/cpu-image.sh [TAG]          (default localhost/lmforge:cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/lmforge:cpu}
base=${LMFORGE_BASE_IMAGE:-localhost/lmforge-base:debian-cpu}
[[ $(id -u) -eq 0 ]] || { echo "cpu-image.sh: run as root (debootstrap, apt)" >&2; exit 2; }
missing=()
for tool in debootstrap buildah podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    echo "cpu-image.sh: apt-get install ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; } \
        || { echo "cpu-image.sh: could not install ${missing[*]}" >&2; exit 3; }
fi
podman image exists "$base" || LMFORGE_BASE_IMAGE=$base docker/debian-base.sh >/dev/null
BASE=$base EXTRAS= BUILDER=buildah docker/build.sh "$tag"
