#!/usr/bin/env bash
# Runs the templates of examples/cli-scripting and examples/http-api against a real
# `chiffon up` (SQLite, in-process bus and agents, state in a temporary folder, a free
# loopback port). Called by .ci/run; needs `cargo build -p chiffon-cli`.
#
#   examples/run-examples.sh      # ends with "examples: OK"
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/debug
[ -x "$bin/chiffon" ] || { echo "examples: $bin/chiffon missing: cargo build -p chiffon-cli" >&2; exit 1; }
state=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$state"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CHIFFON_URL=http://127.0.0.1:$port
unset CHIFFON_AMQP_URL CHIFFON_TOKEN
CHIFFON_AUDIT_REPO="$state/audit" "$bin/chiffon" up --bind "127.0.0.1:$port" \
  --database-url "sqlite://$state/chiffon.db" --playbooks playbooks >"$state/up.log" 2>&1 &
pid=$!
for _ in $(seq 1 150); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done

echo "== examples/cli-scripting/submit-approve-wait.sh"
CHIFFON_BIN="$bin/chiffon" examples/cli-scripting/submit-approve-wait.sh || { tail -n 30 "$state/up.log" >&2; exit 1; }
echo "== examples/http-api/submit_poll_follow.py"
python3 examples/http-api/submit_poll_follow.py || { tail -n 30 "$state/up.log" >&2; exit 1; }
echo "examples: OK"
