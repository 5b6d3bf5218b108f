#!/usr/bin/env bash
# Runs the README's production setup as written: PostgreSQL + RabbitMQ (vhost `chiffon`),
# `chiffon migrate`, `chiffon-server`, `chiffon-infra-agent` and `chiffon-desktop-agent` as
# separate processes; then submits, approves and waits for a real request through the CLI
# and checks the audit trail. Every process has its own broker user (created by
# scripts/services.sh, URLs in .chiffon/broker-users.env), so the broker vouches for who
# published what; a forged result from the frontend's user is refused. Called by .ci/run;
# needs a built workspace
# (`cargo build --workspace`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/debug
scripts/services.sh >/dev/null
export CHIFFON_ANSIBLE_PLAYBOOK="$PWD/.venv/bin/ansible-playbook"
state=$(mktemp -d)
pids=()
# A database of its own (the README names `chiffon`), so runs never see each other's requests.
db="chiffon_smoke_$$_$RANDOM"
psql_admin() { PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -qtAc "$1" >/dev/null; }
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
export CHIFFON_BIND=127.0.0.1:18080 CHIFFON_URL=http://127.0.0.1:18080
export CHIFFON_AUDIT_REPO="$state/audit"
export CHIFFON_AGENT_USERS=chiffon-agent-infra,chiffon-agent-desktop
export CHIFFON_ORCHESTRATOR_USERS=chiffon-orchestrator
"$bin/chiffon" migrate
CHIFFON_AMQP_URL=$CHIFFON_BROKER_ORCHESTRATOR_URL "$bin/chiffon-server" >"$state/server.log" 2>&1 & pids+=($!)
CHIFFON_AMQP_URL=$CHIFFON_BROKER_INFRA_AGENT_URL "$bin/chiffon-infra-agent" --heartbeat-seconds 2 >"$state/infra.log" 2>&1 & pids+=($!)
CHIFFON_AMQP_URL=$CHIFFON_BROKER_DESKTOP_AGENT_URL "$bin/chiffon-desktop-agent" --heartbeat-seconds 2 >"$state/desktop.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.2; done

target="$state/www"
id=$("$bin/chiffon" --json request "Ensure the directory $target exists" | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
for _ in $(seq 1 100); do
  st=$("$bin/chiffon" --json status "$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [ "$st" = awaiting_approval ] && break
  sleep 0.2
done
"$bin/chiffon" approve "$id" --comment "production smoke"
"$bin/chiffon" watch "$id"
final=$("$bin/chiffon" --json status "$id")
echo "$final" | python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["status"] == "completed", r
assert r["commit_id"], r
print("smoke: request", r["request_id"], "completed, audit commit", r["commit_id"])'
[ -d "$target" ] || { echo "smoke: $target was not created" >&2; exit 1; }
agents=$("$bin/chiffon" --json agents)
echo "$agents" | python3 -c '
import json, sys
agents = json.load(sys.stdin)
agents = agents.get("agents", agents) if isinstance(agents, dict) else agents
users = sorted(a.get("broker_user") or "" for a in agents)
assert users == ["chiffon-agent-desktop", "chiffon-agent-infra"], users
print("smoke: agents registered by their broker users:", users)'
"$bin/chiffon" audit verify
echo "smoke: production setup OK"
