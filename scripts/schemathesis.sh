#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis: every default
# check (no 5xx, documented statuses, content types and schemas, valid data accepted,
# invalid data refused, 405 with `Allow` for other methods, auth enforced, ...).
#
#   scripts/schemathesis.sh            # both modes: with API tokens, then without
#   ST_MAX_EXAMPLES=200 scripts/schemathesis.sh
#
# Installs schemathesis 4.32 into ./.venv-schemathesis when missing, builds and starts a real
# `chiffon-server` (SQLite and the in-process bus in a temporary folder, a free loopback port,
# no LLM keys, no in-process agents), and runs `st run` against it. Exit status: st's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv="$root/.venv-schemathesis"
if ! "$venv/bin/st" --version 2>/dev/null | grep -q ' 4\.32\.'; then
  echo "installing schemathesis 4.32 into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis==4.32.*'
fi

cargo build --quiet -p chiffon-server --bin chiffon-server
server="${CARGO_TARGET_DIR:-$root/target}/debug/chiffon-server"

work=$(mktemp -d "${TMPDIR:-/tmp}/chiffon-schemathesis.XXXXXX")
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run MODE TOKEN MAX_EXAMPLES: one server, one `st run`.
run() {
  local mode=$1 token=$2 examples=$3
  local dir="$work/$mode" port
  port=$(free_port)
  mkdir -p "$dir"
  {
    echo "database_url = \"sqlite://$dir/chiffon.db\""
    echo "bind = \"127.0.0.1:$port\""
    echo "playbooks = \"$root/playbooks\""
    echo "audit_repo = \"$dir/audit\""
    echo "[agents]"
    echo "in_process = false"
    if [ -n "$token" ]; then
      echo "[[tokens]]"
      echo "name = \"schemathesis\""
      echo "token = \"$token\""
      echo "role = \"admin\""
    fi
  } >"$dir/chiffon.toml"
  # A clean environment: no LLM keys, no CHIFFON_* overrides from the caller.
  env -i PATH="$PATH" HOME="$HOME" RUST_LOG=warn \
    "$server" --config "$dir/chiffon.toml" >"$dir/server.log" 2>&1 &
  pid=$!
  local url="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
      "$url/health" 2>/dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$dir/server.log" >&2; return 1; fi
    sleep 0.2
  done
  local auth=()
  if [ -n "$token" ]; then auth=(-H "Authorization: Bearer $token"); fi
  echo "== schemathesis ($mode) against $url"
  local status=0
  (cd "$dir" && "$venv/bin/st" --config-file "$root/scripts/schemathesis.toml" \
    run "$url/openapi.json" "${auth[@]}" \
    --max-examples "$examples" \
    --request-timeout 10 \
    --workers 1 \
    --generation-database none \
    --no-color) || status=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=
  if [ "$status" -ne 0 ]; then
    echo "-- server log ($mode), last lines:" >&2
    tail -n 40 "$dir/server.log" >&2
  fi
  return "$status"
}

token="schemathesis-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
status=0
run tokens "$token" "${ST_MAX_EXAMPLES:-60}" || status=$?
run no-tokens "" "${ST_MAX_EXAMPLES_NO_TOKENS:-20}" || status=$?
exit "$status"
