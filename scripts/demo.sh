#!/usr/bin/env bash
# Chiffon's main job in one command, on a fresh machine with only Rust and Python:
# plans a request in plain words with no API key (the offline planner), shows the plan,
# executes it on localhost with the real ansible-playbook (bootstrapped into ./.venv),
# streams the progress, and prints the outcome and the audit commit.
#
#   scripts/demo.sh                                   # the default request
#   scripts/demo.sh "Ensure the directory /tmp/chiffon/www exists"
#
# State lands in ./.chiffon (SQLite database, git audit repository).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ansible.sh >/dev/null
export CHIFFON_ANSIBLE_PLAYBOOK="$PWD/.venv/bin/ansible-playbook"
text=${1:-"Write the config file /tmp/chiffon/demo/app.conf"}
exec cargo run -q -p chiffon-cli -- run --yes "$text"
