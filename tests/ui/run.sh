#!/usr/bin/env bash
# tests/ui/run.sh — the playground's browser test (`make test-ui`): installs
# the pinned playwright-core (tests/ui/package-lock.json; no browser download)
# into tests/ui/node_modules when missing or older than the lock file, then
# runs tests/ui/test_ui.mjs against Debian's chromium, bounded in time.
# Environment: NZSERVE (the binary under test), UI_SCREENS (screenshots),
# CHROMIUM (default /usr/bin/chromium), UI_TEST_TIMEOUT_S (default 240).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
chromium=${CHROMIUM:-/usr/bin/chromium}
for tool in node npm; do
    command -v "$tool" >/dev/null || { echo "test-ui: $tool is missing (bash .ci/deps.sh installs it)" >&2; exit 1; }
done
[ -x "$chromium" ] || { echo "test-ui: no $chromium (apt-get install chromium, or bash .ci/deps.sh)" >&2; exit 1; }
if [ ! -f "$here/node_modules/playwright-core/package.json" ] ||
    [ "$here/package-lock.json" -nt "$here/node_modules/.package-lock.json" ]; then
    # npm keeps its download cache under $HOME
    [ -n "${HOME:-}" ] || export npm_config_cache="${TMPDIR:-/tmp}/nzserve-npm-cache"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 timeout 300 npm ci --prefix "$here" --no-audit --no-fund
fi
limit=${UI_TEST_TIMEOUT_S:-240}
# the test has its own watchdog at $limit s; this one (30 s later) is the backstop
exec timeout -k 10 $((limit + 30)) node "$here/test_ui.mjs"
