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
# Progress goes to stderr: a line per stage, and cargo's own while it builds (the first
# build compiles a few hundred crates: several minutes on a small machine).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'demo: %s\n' "$*" >&2; }
text=${1:-"Write the config file /tmp/chiffon/demo/app.conf"}
say "1/3 ansible-core in ./.venv (scripts/ansible.sh; a minute the first time)"
scripts/ansible.sh >/dev/null
export CHIFFON_ANSIBLE_PLAYBOOK="$PWD/.venv/bin/ansible-playbook"
say "2/3 building chiffon (cargo build -p chiffon-cli; several minutes the first time)"
cargo build -p chiffon-cli --bin chiffon
say "3/3 chiffon run --yes \"$text\""
exec cargo run -q -p chiffon-cli --bin chiffon -- run --yes "$text"
