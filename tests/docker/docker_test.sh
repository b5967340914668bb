#!/usr/bin/env bash
# Build the Dockerfile and run the image without a Docker engine: Debian's
# podman with runc, a private containers.conf, and a base image made with
# debootstrap from the machine's apt mirror (no registry is reachable).
# Usage: tests/docker/docker_test.sh [--keep]   (run as root, from the repo root)
set -euo pipefail
cd "$(dirname "$0")/../.."
keep=${1:-}
work=${NZ_DOCKER_WORK:-/var/tmp/nzserve-docker}
mkdir -p "$work"
export DEBIAN_FRONTEND=noninteractive
need=""
for p in podman runc fuse-overlayfs slirp4netns uidmap debootstrap; do
  dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
[ -z "$need" ] || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $need; }

# crun fails here (cgroups in hybrid mode); podman's default ulimits exceed
# the hard limits; do not touch /etc: a private config file instead.
hn=$(ulimit -Hn)
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$hn:$hn", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$work/containers.conf"

if ! podman image exists debian:bookworm-slim; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log"
  tar -C "$work/rootfs" -c . | podman import - debian:bookworm-slim > /dev/null
  rm -rf "$work/rootfs"
fi

tag=localhost/nzserve:test
podman build --pull=never -q -t "$tag" . > /dev/null
echo "image size: $(podman image inspect "$tag" --format '{{.Size}}') bytes"

# a model to look at: the bundled demo model
out=$(podman run --rm --network none -v "$PWD/models/demo:/models:ro" "$tag" verify /models/nat-ende.nzp)
echo "$out"
grep -q ": OK:" <<< "$out"
user=$(podman run --rm --network none --entrypoint id "$tag" -u)
[ "$user" != 0 ] || { echo "image runs as root" >&2; exit 1; }
podman run --rm --network none "$tag" info /models/missing.nzp && { echo "expected failure" >&2; exit 1; }
if [ "$keep" != "--keep" ]; then
  podman rmi -f "$tag" > /dev/null
  podman image prune -f > /dev/null
fi
echo "docker-test: OK"
