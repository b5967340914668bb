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
  python3 python3-numpy python3-pytest python3-torch python3-sentencepiece python3-requests wrk curl
