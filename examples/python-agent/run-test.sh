#!/usr/bin/env bash
# A foreign agent in CI: the Python agent beside this script (written from PROTOCOL.md
# alone) completes a request through the real chiffon-server, PostgreSQL and RabbitMQ.
#
#   examples/python-agent/run-test.sh        # needs `cargo build -p chiffon-server -p chiffon-cli`
#
# It starts the services (scripts/services.sh, which creates the broker user
# `chiffon-agent-python`), installs pika and jsonschema into examples/python-agent/.venv,
# checks the JSON Schemas against PROTOCOL.md's examples, starts chiffon-server (its own
# database, the one-action catalog examples/python-agent/catalog) and agent.py, each with
# its own broker user, then submits, approves and follows a request with the CLI and checks
# that the Python agent ran it. Last, it sends a heartbeat the server must refuse and checks
# that `GET /agents` names the agent and the field. Expected output ends with
# `python-agent: OK`.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/python-agent
bin=${CARGO_TARGET_DIR:-target}/debug
for b in chiffon chiffon-server; do
  [ -x "$bin/$b" ] || { echo "python-agent: $bin/$b missing: cargo build -p chiffon-server -p chiffon-cli" >&2; exit 1; }
done
scripts/services.sh >/dev/null
"$here/setup.sh"
py=$here/.venv/bin/python
"$py" "$here/check_schemas.py"

state=$(mktemp -d)
pids=()
db="chiffon_pyagent_$$_$RANDOM"
psql_admin() { PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -qtAc "$1" >/dev/null; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql_admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$state"
}
fail() {
  echo "python-agent: FAILED: $*" >&2
  for f in "$state"/*.log; do echo "--- $f" >&2; tail -n 30 "$f" >&2; done
  exit 1
}
trap cleanup EXIT

psql_admin "CREATE DATABASE $db"
# shellcheck disable=SC1091
. .chiffon/broker-users.env
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CHIFFON_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/$db
export CHIFFON_BIND=127.0.0.1:$port CHIFFON_URL=http://127.0.0.1:$port
export CHIFFON_AUDIT_REPO="$state/audit"
export CHIFFON_PLAYBOOKS="$PWD/$here/catalog"
export CHIFFON_AGENT_USERS=chiffon-agent-python
export CHIFFON_ORCHESTRATOR_USERS=chiffon-orchestrator
"$bin/chiffon" migrate >/dev/null
CHIFFON_AMQP_URL=$CHIFFON_BROKER_ORCHESTRATOR_URL "$bin/chiffon-server" >"$state/server.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
agent_id="python-ci-$$"
CHIFFON_AMQP_URL=$CHIFFON_BROKER_PYTHON_AGENT_URL CHIFFON_AGENT_ID=$agent_id \
  "$py" "$here/agent.py" >"$state/agent.log" 2>&1 & pids+=($!)

# The agent registers: its heartbeats parse ({total_gb, available_gb, used_percent}).
seen=
for _ in $(seq 1 50); do
  if "$bin/chiffon" --json agents | jq -e --arg id "$agent_id" \
    '.agents[] | select(.agent_id == $id and .broker_user == "chiffon-agent-python" and .memory.total_gb > 0)' >/dev/null; then
    seen=1; break
  fi
  sleep 0.2
done
[ -n "$seen" ] || fail "agent $agent_id never registered"
echo "python-agent: $agent_id registered by broker user chiffon-agent-python"

id=$("$bin/chiffon" --json request "Echo hello" | jq -r .request_id)
for _ in $(seq 1 100); do
  st=$("$bin/chiffon" --json status "$id" | jq -r .status)
  [ "$st" = awaiting_approval ] && break
  [ "$st" = failed ] && fail "request $id failed to plan"
  sleep 0.2
done
[ "$st" = awaiting_approval ] || fail "request $id is $st, not awaiting_approval"
"$bin/chiffon" approve "$id" --comment "python agent CI" >/dev/null
timeout 60 "$bin/chiffon" watch "$id" >"$state/watch.log" 2>&1 || fail "watch $id"
"$bin/chiffon" --json status "$id" | jq -e '
  .status == "completed"
  and (.commit_id | length > 0)
  and (.steps | length == 1)
  and .steps[0].action == "python_echo"
  and .steps[0].broker_user == "chiffon-agent-python"
  and .steps[0].output == "hello from python"' >/dev/null \
  || fail "request $id: $("$bin/chiffon" --json status "$id")"
echo "python-agent: request $id completed by the Python agent (output \"hello from python\", audit commit)"

# A heartbeat the server must refuse (memory without total_gb): listed under `rejected`
# with the agent id and the field, not only dead-lettered.
CHIFFON_AMQP_URL=$CHIFFON_BROKER_PYTHON_AGENT_URL "$py" - "$here" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import os, agent
a = agent.Agent(os.environ["CHIFFON_AMQP_URL"], [], 60)
a.agent_id = "python-broken"
a.connect()
a.publish(agent.envelope("heartbeat", {"agent_id": a.agent_id, "agent_type": "python",
                                       "hostname": "h", "memory": {"available_gb": 1}}))
a.connection.close()
EOF
listed=
for _ in $(seq 1 50); do
  if "$bin/chiffon" --json agents | jq -e '.rejected[] | select(.agent_id == "python-broken"
      and .publisher == "chiffon-agent-python" and .field == "payload.memory.total_gb" and .code == 5004)' >/dev/null; then
    listed=1; break
  fi
  sleep 0.2
done
[ -n "$listed" ] || fail "the refused heartbeat is not listed by GET /agents: $("$bin/chiffon" --json agents)"
echo "python-agent: a refused heartbeat is listed by GET /agents with its field"
echo "python-agent: OK"
