#!/bin/bash
# The server tests N times in a row under ASan/UBSan while BURN busy loops keep the cores busy (timing
# flakes show up here first). Usage: tests/load/asan_soak.sh [N=10] (env BURN=2, BUILD=build-asan).
# Builds the ASan tree first; stops at the first failing run and keeps its log in $BUILD/soak-K.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10}
BURN=${BURN:-2}
BUILD=${BUILD:-build-asan}
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
make -s -j2 all BUILD="$BUILD" OPT=-O1 SAN="$SAN"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq "$BURN"); do (while :; do :; done) & pids+=($!); done
for k in $(seq "$N"); do
    t0=$(date +%s)
    if NZP=$PWD/$BUILD/nzp NZSERVE=$PWD/$BUILD/nzserve /usr/bin/python3 -m pytest -q -p no:cacheprovider \
        tests/python/test_server.py tests/python/test_dialogue_server.py tests/python/test_concurrency_parity.py \
        >"$BUILD/soak-$k.log" 2>&1; then
        echo "run $k/$N: $(tail -1 "$BUILD/soak-$k.log") ($(($(date +%s) - t0)) s)"
    else
        echo "run $k/$N FAILED ($(($(date +%s) - t0)) s): see $BUILD/soak-$k.log"
        tail -30 "$BUILD/soak-$k.log"
        exit 1
    fi
done
echo "all $N runs passed with $BURN busy loops"
