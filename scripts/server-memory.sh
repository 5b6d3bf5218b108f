#!/usr/bin/env bash
# The orchestrator's own memory, measured as it runs in production: `chiffon-server` on
# PostgreSQL + RabbitMQ as a process of its own, `chiffon-infra-agent` as another, with
# STORED finished requests already in the database (default 100,000), then TOTAL requests
# (default 2000, `noop`, auto-approved) submitted over the HTTP API, IN_FLIGHT at a time
# (default 32). Prints the server's resident memory (now and its peak) and the agent's.
#
#   scripts/server-memory.sh [TOTAL [IN_FLIGHT [STORED]]]
#
# Builds the release binaries if they are missing (CARGO_TARGET_DIR is honoured). A
# measurement, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
total=${1:-2000}
in_flight=${2:-32}
stored=${3:-100000}
bin=${CARGO_TARGET_DIR:-target}/release
if [ ! -x "$bin/chiffon-server" ] || [ ! -x "$bin/chiffon-infra-agent" ] || [ ! -x "$bin/chiffon" ]; then
  cargo build --release -p chiffon-server -p chiffon-cli -p chiffon-agent-kit
fi
scripts/services.sh >/dev/null
state=$(mktemp -d)
pids=()
db="chiffon_memory_$$_$RANDOM"
psql_admin() { PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d "${2:-postgres}" -qtAc "$1" >/dev/null; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql_admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$state"
}
trap cleanup EXIT

psql_admin "CREATE DATABASE $db"
export CHIFFON_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/$db
# shellcheck disable=SC1091
. .chiffon/broker-users.env
export CHIFFON_BIND=127.0.0.1:18090 CHIFFON_URL=http://127.0.0.1:18090
export CHIFFON_AUDIT_REPO="$state/audit"
export CHIFFON_AGENT_USERS=chiffon-agent-infra,chiffon-agent-desktop
export CHIFFON_ORCHESTRATOR_USERS=chiffon-orchestrator
export CHIFFON_ANSIBLE_PLAYBOOK="$PWD/.venv/bin/ansible-playbook"
"$bin/chiffon" migrate >/dev/null
# The history: finished requests (rejected at planning), as many as asked.
psql_admin "INSERT INTO tasks (id, trace_id, text, requester, submitted_by, status, created_at, updated_at)
  SELECT gen_random_uuid(), md5(g::text), 'noop (stored before the run)', 'history', 'history',
         'rejected', now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval
  FROM generate_series(1, $stored) g" "$db"
cat >"$state/chiffon.toml" <<'EOF'
[llm]
order = ["offline"]

[engine.approval]
auto_approve_max_cost_usd = 0.01
EOF
CHIFFON_CONFIG="$state/chiffon.toml" CHIFFON_AMQP_URL=$CHIFFON_BROKER_ORCHESTRATOR_URL \
  "$bin/chiffon-server" >"$state/server.log" 2>&1 & server=$!; pids+=($server)
CHIFFON_AMQP_URL=$CHIFFON_BROKER_INFRA_AGENT_URL "$bin/chiffon-infra-agent" --state-dir "$state/infra" \
  >"$state/infra.log" 2>&1 & agent=$!; pids+=($agent)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18090) 2>/dev/null && break; sleep 0.2; done

python3 - "$total" "$in_flight" <<'EOF'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

total, in_flight = int(sys.argv[1]), int(sys.argv[2])
base = "http://127.0.0.1:18090"

def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)

def one(i):
    rid = call("POST", "/request", {"text": "noop", "requester": f"memory-{i % 8}"})["request_id"]
    while True:
        r = call("GET", f"/request/{rid}")
        if r["status"] in ("completed", "failed", "cancelled", "rejected"):
            return r["status"]
        time.sleep(0.05)

t = time.time()
with ThreadPoolExecutor(in_flight) as pool:
    ends = list(pool.map(one, range(total)))
done = ends.count("completed")
print(f"server memory: {total} requests in {time.time() - t:.1f}s, {done} completed")
if done != total:
    sys.exit(f"not every request completed: {sorted(set(ends))}")
EOF
rss() { awk -v k="$2:" '$1 == k { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status"; }
echo "server memory: chiffon-server $(rss "$server" VmRSS) resident ($(rss "$server" VmHWM) at most), with $stored requests stored before; chiffon-infra-agent $(rss "$agent" VmRSS)"
