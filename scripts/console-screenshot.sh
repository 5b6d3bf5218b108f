#!/usr/bin/env bash
# Renders docs/console-request.png: the web console's page of a request awaiting approval,
# from a real chiffon-server (no tokens, SQLite in a temporary folder, the offline planner),
# with headless Chromium (scripts/chromium.sh installs it).
#
#   scripts/console-screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${1:-$root/docs/console-request.png}"

scripts/chromium.sh >/dev/null
cargo build --quiet -p chiffon-server --bin chiffon-server
server="${CARGO_TARGET_DIR:-$root/target}/debug/chiffon-server"

work=$(mktemp -d "${TMPDIR:-/tmp}/chiffon-screenshot.XXXXXX")
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
env -i PATH="$PATH" HOME="$HOME" RUST_LOG=warn \
  CHIFFON_BIND="127.0.0.1:$port" CHIFFON_DATABASE_URL="sqlite://$work/chiffon.db" \
  CHIFFON_AUDIT_REPO="$work/audit" CHIFFON_PLAYBOOKS="$root/playbooks" \
  "$server" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fsS "$base/health" >/dev/null 2>&1 && break; sleep 0.1; done

id=$(curl -fsS -X POST -H 'content-type: application/json' \
  -d '{"text": "Write the config file /tmp/chiffon/demo/app.conf", "requester": "rita"}' \
  "$base/request" | python3 -c 'import json, sys; print(json.load(sys.stdin)["request_id"])')
for _ in $(seq 100); do
  curl -fsS "$base/request/$id" | grep -q '"status":"awaiting_approval"' && break
  sleep 0.1
done

chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=820,1180 \
  --screenshot="$out" "$base/ui/request/$id" 2>/dev/null
echo "$out"
