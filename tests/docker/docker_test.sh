#!/usr/bin/env bash
# Build the Dockerfile and run the image without a Docker engine: Debian's
# podman with runc, a private containers.conf, and a base image made with
# debootstrap from the machine's apt mirror (no registry is reachable).
# Usage: tests/docker/docker_test.sh [--keep]   (run as root, from anywhere)
#   --keep  keep the image (localhost/nzserve:test) and the build cache
#
# Checks: the image (non-root numeric user, exec-form entry point, HEALTHCHECK,
# port 8080, no curl/wget/compilers, the baked demo model verifies), then two
# containers published on loopback only (-p 127.0.0.1::8080, podman picks a
# free host port):
#   1. the baked config and model: /ready within 120 s, a translation of
#      "Open the file.", the memory gauges in /metrics, the HEALTHCHECK
#      (podman healthcheck run), PID 1 is nzserve and not root, and
#      `podman stop -t 20` (SIGTERM) ends it with exit code 0 in time;
#   2. models/demo mounted read-only at /models, the model and the port
#      (9090) set with NZSERVE_* variables: /ready, /v1/models and a
#      translation name the mounted model, the HEALTHCHECK follows the port.
# Containers and (without --keep) the image are removed on any exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
keep=0
for a in "$@"; do
  case $a in
    --keep) keep=1 ;;
    *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
  esac
done
work=${NZ_DOCKER_WORK:-/var/tmp/nzserve-docker}
mkdir -p "$work"
export DEBIAN_FRONTEND=noninteractive
t_start=$SECONDS
need=""
for p in podman runc netavark iptables fuse-overlayfs slirp4netns uidmap debootstrap curl python3; do
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
[network]
network_backend = "netavark"
CONF
export CONTAINERS_CONF="$work/containers.conf"

# The base image, trimmed as the official bookworm-slim is (no docs, man
# pages, locales, apt lists or caches, also for later installs); rebuilt
# when its label is not base_rev.
base_rev=2
if [ "$(podman image inspect debian:bookworm-slim --format '{{index .Labels "nzserve.base"}}' 2>/dev/null)" != "$base_rev" ]; then
  t0=$SECONDS
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\?\([^ ]*\) bookworm .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  r="$work/rootfs"
  rm -rf "$r"
  debootstrap --variant=minbase bookworm "$r" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; echo "docker-test: FAIL: debootstrap from $mirror" >&2; exit 1; }
  cat > "$r/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
CFG
  cat > "$r/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
  find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$r"/usr/share/{info,man,locale,groff,linda}/* "$r"/usr/share/lintian/overrides/* \
    "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/log/*.log
  tar -C "$r" -c . | podman import -q --change "LABEL nzserve.base=$base_rev" - debian:bookworm-slim > /dev/null
  rm -rf "$r"
  echo "base image debian:bookworm-slim made with debootstrap in $((SECONDS - t0)) s"
fi

tag=localhost/nzserve:test
c1=nzserve-test-$$-baked
c2=nzserve-test-$$-mounted
grace=20
ok=0
cleanup() {
  if [ "$ok" != 1 ]; then
    for c in "$c1" "$c2"; do
      podman container exists "$c" 2>/dev/null || continue
      echo "--- podman logs $c (last 40 lines)" >&2
      podman logs --tail 40 "$c" >&2 2>&1 || true
    done
  fi
  # one at a time: podman 4.3's `rm -f A B` removes nothing when B does not exist
  for c in "$c1" "$c2"; do
    if podman container exists "$c" 2>/dev/null; then podman rm -f -v -t 0 "$c" > /dev/null 2>&1 || true; fi
  done
  if [ "$keep" != 1 ]; then
    # the image and every layer this run added (layers cached before it stay)
    podman rmi -f "$tag" > /dev/null 2>&1 || true
    local new
    new=$(podman images -a -q --no-trunc | sort -u | comm -13 "$work/images.before" -)
    [ -z "$new" ] || podman rmi -f $new > /dev/null 2>&1 || true
  fi
}
podman images -a -q --no-trunc | sort -u > "$work/images.before"
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { echo "docker-test: FAIL: $*" >&2; exit 1; }
# podman without the noise of a host without systemd: podman schedules
# HEALTHCHECKs with systemd timers and logs an error (nothing fails) when
# there is no systemd; `podman healthcheck run` below runs the check itself.
pm() {
  local rc=0
  podman "$@" 2> "$work/podman.err" || rc=$?
  grep -v 'unable to get systemd connection' "$work/podman.err" >&2 || true
  return $rc
}

# ------------------------------------------------------------------ the image
t0=$SECONDS
# --format docker: the OCI image format has no HEALTHCHECK
podman build --format docker --pull=never -t "$tag" . > "$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; fail "podman build (log: $work/build.log)"; }
size=$(podman image inspect "$tag" --format '{{.Size}}')
echo "image built in $((SECONDS - t0)) s; image size: $size bytes ($((size / 1000000)) MB)"

user=$(podman image inspect "$tag" --format '{{.Config.User}}')
[ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] && [ -n "$user" ] || fail "image user is '$user'"
ep=$(podman image inspect "$tag" --format '{{json .Config.Entrypoint}}')
[ "$ep" = '["/usr/local/bin/nzserve"]' ] || fail "entry point is $ep, expected exec form of nzserve"
hc=$(podman image inspect "$tag" --format '{{json .Config.Healthcheck.Test}}')
[ "$hc" = '["CMD","/usr/local/bin/nzserve","--health-check"]' ] || fail "HEALTHCHECK is $hc"
podman image inspect "$tag" --format '{{json .Config.ExposedPorts}}' | grep -q '"8080/tcp"' || fail "8080 not exposed"
pm run --rm --network none --entrypoint /bin/sh "$tag" -c \
  'for p in curl wget gcc cc g++ c++ make; do command -v $p && exit 1; done; exit 0' \
  || fail "the runtime image has tools it does not need (above)"
pm run --rm --network none --entrypoint /usr/local/bin/nzp "$tag" verify /opt/nzserve/models/demo/nat-ende.nzp \
  | grep -q ": OK:" || fail "nzp verify of the baked demo model"
echo "image: user $user, entry point $ep, HEALTHCHECK $hc, no curl/wget/compilers"

# ------------------------------------------------------------------ helpers
# host_port NAME CPORT: the loopback port podman published for CPORT
host_port() {
  local hp
  hp=$(podman port "$1" "$2" | head -n1)
  case $hp in 127.0.0.1:*) echo "${hp##*:}" ;; *) fail "$1: $2 published as '$hp', not on 127.0.0.1" ;; esac
}
# wait_ready NAME PORT: /ready answers 200 within 120 s (or the container died)
wait_ready() {
  local t=$SECONDS
  while [ $((SECONDS - t)) -lt 120 ]; do
    [ "$(podman inspect "$1" --format '{{.State.Running}}')" = true ] || fail "$1 exited while starting"
    curl -fsS --max-time 5 -o /dev/null "http://127.0.0.1:$2/ready" 2>/dev/null && {
      echo "$1: ready after $((SECONDS - t)) s"
      return 0
    }
    sleep 1
  done
  fail "$1: /ready did not answer 200 within 120 s"
}
# translate PORT BODY MODEL: POST /v1/translate, check a non-empty translation from MODEL without
# <unk> (the model's default decoding fills every mask); print it
translate() {
  local out
  out=$(curl -sS --max-time 60 -H 'Content-Type: application/json' -d "$2" "http://127.0.0.1:$1/v1/translate") \
    || fail "POST /v1/translate"
  python3 -c '
import json, sys
r = json.loads(sys.argv[1])
t = r["translations"][0]["text"]
assert r["model"] == sys.argv[2] and t.strip() and "<unk>" not in t, r
print(t)' "$out" "$3" || fail "bad translation response: $out"
}
# healthcheck NAME: the image HEALTHCHECK passes (podman runs the command in the container)
healthcheck() {
  pm healthcheck run "$1" || fail "$1: podman healthcheck run: unhealthy"
  local st
  st=$(podman inspect "$1" --format '{{.State.Health.Status}}')
  [ "$st" = healthy ] || fail "$1: health status '$st'"
}
# stop_clean NAME: SIGTERM via podman stop; exit code 0 within the grace period
stop_clean() {
  local t=$SECONDS code
  pm stop -t "$grace" "$1" > /dev/null
  local took=$((SECONDS - t))
  code=$(podman inspect "$1" --format '{{.State.ExitCode}}')
  [ "$code" = 0 ] || fail "$1: exit code $code after podman stop (137 = killed after the grace period)"
  [ "$took" -lt "$grace" ] || fail "$1: took $took s to stop (grace $grace s)"
  local log
  log=$(podman logs "$1" 2>&1)
  grep -q 'event=signal.*SIGTERM\|"event": *"signal".*SIGTERM' <<< "$log" || fail "$1: no SIGTERM in the log"
  echo "$1: SIGTERM -> exit code 0 in $took s"
}

# ------------------------------------------- 1. the baked model and config
t0=$SECONDS
pm run -d --name "$c1" -p 127.0.0.1::8080 "$tag" > /dev/null
port=$(host_port "$c1" 8080)
wait_ready "$c1" "$port"
de=$(translate "$port" '{"text": "Open the file."}' nat-ende)
echo "$c1: 'Open the file.' -> '$de'"
out=$(curl -sS --max-time 60 -d '{"context": ["Where are you going?"], "distinct": true}' \
  "http://127.0.0.1:$port/v1/dialogue") || fail "POST /v1/dialogue"
python3 -c '
import json, sys
r = json.loads(sys.argv[1])
assert r["model"] == "dialogue" and r["responses"] and all(x["text"].strip() for x in r["responses"]), r
print("dialogue: %d responses, best (decoder %d): %s" % (len(r["responses"]), r["responses"][0]["decoder"],
                                                         r["responses"][0]["text"][:60]))' "$out" \
  || fail "bad dialogue response: $out"
metrics=$(curl -fsS --max-time 10 "http://127.0.0.1:$port/metrics") || fail "GET /metrics"
for m in 'nzserve_weights_compressed_bytes{model="nat-ende"}' 'nzserve_weights_decoded_equivalent_bytes{model="nat-ende"}' \
  nzserve_tile_cache_bytes nzserve_tile_cache_limit_bytes nzserve_resident_memory_bytes \
  nzserve_resident_memory_peak_bytes 'nzserve_ready 1'; do
  grep -qF "$m" <<< "$metrics" || fail "/metrics has no $m"
done
healthcheck "$c1"
comm=$(podman exec "$c1" cat /proc/1/comm)
[ "$comm" = nzserve ] || fail "PID 1 is '$comm', not nzserve"
uid=$(podman exec "$c1" sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' /proc/1/status)
[ -n "$uid" ] && [ "$uid" != 0 ] || fail "nzserve runs as uid '$uid'"
echo "$c1: /metrics memory gauges, healthy, PID 1 = nzserve as uid $uid"
stop_clean "$c1"

# ------------------------ 2. a mounted models volume, settings from NZSERVE_*
pm run -d --name "$c2" -p 127.0.0.1::9090 -v "$PWD/models/demo:/models:ro" \
  -e NZSERVE_MODELS=mounted:translate:/models/nat-ende.nzp -e NZSERVE_PORT=9090 \
  -e NZSERVE_LOG_FORMAT=json -e NZSERVE_TILE_CACHE_BYTES=0 "$tag" > /dev/null
port=$(host_port "$c2" 9090)
wait_ready "$c2" "$port"
curl -fsS --max-time 10 "http://127.0.0.1:$port/v1/models" | grep -q '"mounted"' || fail "/v1/models lacks 'mounted'"
de=$(translate "$port" '{"text": "Open the file.", "model": "mounted"}' mounted)
echo "$c2: /models/nat-ende.nzp (mounted) -> '$de'"
healthcheck "$c2"
stop_clean "$c2"
echo "containers took $((SECONDS - t0)) s"

ok=1
echo "docker-test: OK ($((SECONDS - t_start)) s; image size $((size / 1000000)) MB)"
