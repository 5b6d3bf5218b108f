#!/usr/bin/env bash
# Runs examples/mcp/client.py (the official Python MCP SDK) against a real chiffon-server,
# over both transports: streamable HTTP at /mcp, and stdio through `chiffon mcp`.
#
#   examples/mcp/run.sh
#
# Builds `chiffon-server` and `chiffon`, installs the SDK (setup.sh), starts a server on a
# free loopback port (SQLite and the in-process bus in a temporary folder, no LLM keys: the
# offline planner plans; API tokens for a requester and a viewer), then checks:
# the requester's walk-through over HTTP and over stdio, the viewer refused a submission
# (5504) but allowed to read, /mcp without a token answered 401, and a foreign Host 421.
# Exit status 0 when every check passes; about 20 s once built.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

python=$(examples/mcp/setup.sh)
cargo build --quiet -p chiffon-server --bin chiffon-server -p chiffon-cli --bin chiffon
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

work=$(mktemp -d "${TMPDIR:-/tmp}/chiffon-mcp.XXXXXX")
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
requester=mcp-requester-token-0123456789
viewer=mcp-viewer-token-0123456789
cat >"$work/chiffon.toml" <<TOML
database_url = "sqlite://$work/chiffon.db"
bind = "127.0.0.1:$port"
playbooks = "$root/playbooks"
audit_repo = "$work/audit"
[agents]
in_process = false
[[tokens]]
name = "mcp-requester"
token = "$requester"
role = "requester"
[[tokens]]
name = "mcp-viewer"
token = "$viewer"
role = "viewer"
TOML
env -i PATH="$PATH" HOME="$HOME" RUST_LOG=warn \
  "$bin/chiffon-server" --config "$work/chiffon.toml" >"$work/server.log" 2>&1 &
pid=$!
url="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "$url/health" 2>/dev/null; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/server.log" >&2; exit 1; fi
  sleep 0.2
done

status_of() { # METHOD URL [curl args…]: the HTTP status
  python3 - "$@" <<'PY'
import sys, urllib.request, urllib.error
method, url, *hdrs = sys.argv[1:]
req = urllib.request.Request(url, method=method, data=b'{}' if method == "POST" else None)
for h in hdrs:
    k, v = h.split(": ", 1)
    req.add_header(k, v)
req.add_header("Content-Type", "application/json")
req.add_header("Accept", "application/json, text/event-stream")
try:
    print(urllib.request.urlopen(req, timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
}

fail() { echo "FAILED: $*" >&2; cat "$work/server.log" >&2; exit 1; }

echo "== MCP over streamable HTTP ($url/mcp), role requester"
"$python" examples/mcp/client.py --check --transport http --server "$url" --token "$requester" \
  --text "Ensure the directory $work/http exists" || fail "client over HTTP"
echo "== MCP over stdio (chiffon mcp --server $url), role requester"
"$python" examples/mcp/client.py --check --transport stdio --chiffon "$bin/chiffon" \
  --server "$url" --token "$requester" --text "Ensure the directory $work/stdio exists" \
  || fail "client over stdio"
echo "== MCP over streamable HTTP, role viewer"
"$python" examples/mcp/client.py --check --transport http --server "$url" --token "$viewer" \
  --role viewer || fail "client as a viewer"
echo "== /mcp behind the server's guard and tokens"
s=$(status_of POST "$url/mcp")
[ "$s" = 401 ] || fail "/mcp without a token answered $s, not 401"
s=$(status_of POST "$url/mcp" "Authorization: Bearer $requester" "Host: evil.example")
[ "$s" = 421 ] || fail "/mcp with a foreign Host answered $s, not 421"
s=$(status_of POST "$url/mcp" "Authorization: Bearer $requester" "Origin: http://evil.example")
[ "$s" = 403 ] || fail "/mcp with a cross-site Origin answered $s, not 403"
echo "/mcp: 401 without a token, 421 for a foreign Host, 403 for a cross-site Origin"
echo "mcp: all checks passed"
