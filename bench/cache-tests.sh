#!/usr/bin/env bash
# Runs the independent HTTP caching test suite (https://github.com/http-tests/cache-tests)
# through the gateway and scores its required tests, as the suite normally runs (25 at once)
# and one at a time.
#
#   bench/cache-tests.sh DIR     DIR: a checkout of http-tests/cache-tests (needs Node >= 14
#                                and `npm install` there; the suite's code is not vendored here)
#
# CHUNKS (default "25 1") says how many tests run at once in each pass; one at a time takes
# about 15 minutes, 25 at once about one.
#
# The gateway (target/debug, built if missing) runs with its defaults (but for server.methods,
# which also lists M-SEARCH) in front of the suite's origin server; its token is a dummy, which
# the origin ignores. Scores count required tests
# (not browser-only) that pass their own assertions, without failing them for a dependency that
# is an optimal test (the suite's `honorDependencies = false`), and list the ones that fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:?usage: bench/cache-tests.sh CACHE_TESTS_DIR}
SUITE=$(cd "$SUITE" && pwd)
ORIGIN=18400 GATEWAY=18480 ADMIN=18481
WORK=$(mktemp -d /tmp/cloudcasa-cache-tests.XXXXXX)
PIDS=()
cleanup() {
  [[ -f $WORK/origin.pid ]] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[[ -x target/debug/cloudcasa-gateway ]] || cargo build --locked --bin cloudcasa-gateway
echo -n dummy >"$WORK/token"
cat >"$WORK/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GATEWAY"
# The suite tests invalidation by an extension method (M-SEARCH); by default the gateway refuses
# methods server.methods does not list (501), so this run lists it, as an operator whose API
# has such a method would. Everything else is the default.
methods = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "M-SEARCH"]
[admin]
listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$ORIGIN"
[token]
file = "$WORK/token"
[audit]
enabled = false
TOML
(cd "$SUITE" && exec npm run --silent server --port="$ORIGIN" --pidfile="$WORK/origin.pid") \
  >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
target/debug/cloudcasa-gateway --config "$WORK/gateway.toml" 2>"$WORK/gateway.log" &
PIDS+=($!)
for port in "$ORIGIN" "$GATEWAY"; do
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
  done
done

cat >"$WORK/score.mjs" <<JS
import tests from '$SUITE/tests/index.mjs'
import { determineTestResult, resultTypes } from '$SUITE/test-engine/lib/results.mjs'
import fs from 'fs'
const results = JSON.parse(fs.readFileSync(process.argv[2]))
let required = 0, passed = 0, cdn = 0, cdnPassed = 0
const failed = []
for (const suite of tests) for (const t of suite.tests) {
  if (t.browser_only || !(t.kind === 'required' || t.kind === undefined)) continue
  required++
  const r = determineTestResult(tests, t.id, results, false)
  if (t.cdn_only) cdn++
  if (r === resultTypes.pass) { passed++; if (t.cdn_only) cdnPassed++ }
  else failed.push('  ' + t.id + (t.cdn_only ? ' (CDN only)' : '') + ': ' + JSON.stringify(results[t.id]))
}
console.log(process.argv[3] + ': ' + passed + '/' + required + ' required tests pass (' +
  (passed - cdnPassed) + '/' + (required - cdn) + ' without the CDN-only ones)')
console.log(failed.join('\n'))
JS

for chunk in ${CHUNKS:-25 1}; do
  # The runner takes its concurrency as an argument only; run it with ours.
  (cd "$SUITE" && node --no-warnings --input-type=module -e "
    import { runTests, getResults } from '$SUITE/test-engine/client/runner.mjs'
    import tests from '$SUITE/tests/index.mjs'
    await runTests(tests, false, 'http://127.0.0.1:$GATEWAY', $chunk)
    console.log(JSON.stringify(getResults()))
  ") >"$WORK/results-$chunk.json"
  node "$WORK/score.mjs" "$WORK/results-$chunk.json" "$chunk at once"
done
