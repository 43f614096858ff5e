#!/usr/bin/env bash
# Drives chatq's HTTP API from its own OpenAPI document with schemathesis, against the real
# binary: a bounded run (well under two minutes here) that fails on any 5xx, any status code,
# content type or header the document does not name, and any body that does not match its
# schema. Usage: tests/schemathesis/run.sh PATH/TO/chatq PATH/TO/venv
set -euo pipefail
bin=$1
venv=$2
root="$(cd "$(dirname "$0")/../.." && pwd)"
if [ ! -x "$venv/bin/st" ] || ! cmp -s "$root/tests/schemathesis/requirements.txt" "$venv/requirements.installed"; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/tests/schemathesis/requirements.txt"
  cp "$root/tests/schemathesis/requirements.txt" "$venv/requirements.installed"
fi
data="$(mktemp -d)"
log="$data/chatq.log"
# Offline (fallback replies), on loopback without tokens, so every route is reachable; a
# limit high enough that the fuzzer's requests are not all 429s.
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data/db" --rate-limit 1000000 \
  --cache-ttl-secs 60 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
base=""
for _ in $(seq 1 100); do
  base="$(grep -o 'listening on http://[0-9.:]*' "$log" | head -n 1 | sed 's/listening on //' || true)"
  [ -n "$base" ] && break
  sleep 0.1
done
if [ -z "$base" ]; then
  cat "$log"
  echo "chatq did not start" >&2
  exit 1
fi
"$venv/bin/st" run "$base/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --max-examples 150 --request-timeout 20 --seed 1 --no-color
