#!/usr/bin/env bash
# Build lmforge's node image from docker/Dockerfile with whichever builder this machine has
# (docker, podman or buildah) and print its tag and size.
#   docker/build.sh [TAG] [-- EXTRA BUILD ARGS]     (default tag lmforge:<version>)
# Environment: BASE (default: the Dockerfile's NGC image), EXTRAS (default gpu-image; empty for a
# CPU base), BUILDER (docker|podman|buildah, default: the first found), CA_BUNDLE (default
# $PIP_CERT, $SSL_CERT_FILE or pip's configured cert: the CA bundle pip needs where a proxy
# intercepts TLS; lent to the build as a secret).
#   GPU nodes:  docker/build.sh registry.example.org/ml/lmforge:0.1.0
#   CPU, here:  BASE=$(sudo docker/debian-base.sh) EXTRAS= sudo -E docker/build.sh lmforge:cpu
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
tag=${1:-lmforge:$version}
shift $(( $# > 0 ? 1 : 0 ))
[[ ${1:-} == -- ]] && shift
args=(--build-arg "VERSION=$version" --build-arg "EXTRAS=${EXTRAS-gpu-image}")
[[ -n ${BASE:-} ]] && args+=(--build-arg "BASE=$BASE")
ca=${CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-$(python3 -m pip config get global.cert 2>/dev/null || true)}}}
[[ -n $ca ]] && args+=(--secret "id=ca_bundle,src=$ca")
builder=${BUILDER:-$(command -v docker podman buildah | head -1 | xargs -r basename)}
case "$builder" in
    docker) docker build -f docker/Dockerfile -t "$tag" "${args[@]}" "$@" . >&2
            size=$(docker image inspect -f '{{.Size}}' "$tag") ;;
    # chroot isolation: RUN steps need no OCI runtime (nor cgroups, nor raised rlimits)
    podman|buildah) buildah build --isolation chroot --layers -f docker/Dockerfile -t "$tag" \
                        "${args[@]}" "$@" . >&2
            size=$(podman image inspect -f '{{.Size}}' "$tag") ;;
    *) echo "build.sh: no docker, podman or buildah here" >&2; exit 3 ;;
esac
echo "$tag $((size / 1000000)) MB"
