#!/usr/bin/env bash
# Install every Debian package the build, tests, fuzzers and benchmarks need.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential pkg-config clang libclang-rt-14-dev valgrind \
  libjansson-dev libmicrohttpd-dev libzstd-dev libxxhash-dev libcmocka-dev libopenblas-dev libsentencepiece-dev zstd \
  python3 python3-numpy python3-pytest python3-torch python3-sentencepiece python3-requests wrk curl \
  chromium
# (chromium: make test-ui, the playground in a headless browser.)
# tests/python/test_k8s.py: kubectl (kustomize) and Node.js with npm (node and
# npm also for make test-ui). Only where missing: another kubectl build or a
# Node.js that bundles npm may be installed already, and Debian's
# kubernetes-client / npm packages conflict with those.
missing=""
command -v kubectl >/dev/null || missing="$missing kubernetes-client"
command -v node >/dev/null || missing="$missing nodejs"
command -v npm >/dev/null || missing="$missing npm"
[ -z "$missing" ] || $SUDO apt-get install -y -qq --no-install-recommends $missing
