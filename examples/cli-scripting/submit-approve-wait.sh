#!/usr/bin/env bash
# Scripting the `chiffon` CLI with `--json` and jq: submit a request, wait for its plan,
# approve it, wait for the outcome.
#
# Run against a server (`chiffon up &`, or production):
#
#   CHIFFON_URL=http://127.0.0.1:8080 examples/cli-scripting/submit-approve-wait.sh ["request text"]
#
# Set CHIFFON_TOKEN when the server has tokens (an approver's, or a requester's and then
# approve with another). `chiffon` is taken from PATH, or from CHIFFON_BIN. jq is required
# (installed from Debian when missing and run as root).
#
# Expected output (ids differ):
#
#   submitted 0193...: planning
#   plan: Do nothing and succeed at once (...) (noop message="noop" sleep_ms=0), cost $0
#   approved
#   completed; step noop: noop; audit commit 5f1c...
set -euo pipefail
text=${1:-"Ping"}
chiffon=${CHIFFON_BIN:-chiffon}

if ! command -v jq >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq >/dev/null; }
  else
    echo "this example needs jq (apt-get install jq)" >&2
    exit 1
  fi
fi

# Submit: `--json` prints exactly one JSON object on stdout.
id=$("$chiffon" --json request "$text" | jq -r .request_id)
echo "submitted $id: planning"

# Wait for the plan (or a planning failure).
status=planning
for _ in $(seq 1 150); do
  status=$("$chiffon" --json status "$id" | jq -r .status)
  [ "$status" != planning ] && break
  sleep 0.2
done
if [ "$status" != awaiting_approval ]; then
  echo "request $id is $status, not awaiting approval:" >&2
  "$chiffon" --json status "$id" | jq -c '.error // .' >&2
  exit 1
fi
"$chiffon" --json status "$id" | jq -r '"plan: \(.plan.summary), cost $\(.plan.estimated_cost_usd)"'

# Approve (a person would read the plan first).
"$chiffon" --json approve "$id" --comment "approved by a script" | jq -e '.status' >/dev/null
echo approved

# Wait for the outcome: `watch --json` prints one JSON event per line until the end.
"$chiffon" --json watch "$id" >/dev/null
final=$("$chiffon" --json status "$id")
echo "$final" | jq -r '"\(.status); " + ([.steps[]? | "step \(.action): \(.output // "")"] | join(", ")) + "; audit commit \(.commit_id // "none")"'
[ "$(echo "$final" | jq -r .status)" = completed ]
