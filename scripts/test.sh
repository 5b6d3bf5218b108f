#!/usr/bin/env bash
# The test command: formatting, lints, then every test of the workspace, the real-service
# suites (PostgreSQL, RabbitMQ, ansible-playbook, git) included.
#
#   scripts/test.sh
#
# Services are started (or installed) by scripts/services.sh, Chromium and chromedriver by
# scripts/chromium.sh, and ansible-core is bootstrapped into ./.venv by scripts/ansible.sh.
# Under CI=true a real-service test that cannot reach its service (or find its browser)
# fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# Chromium and chromedriver for the web console's browser tests.
scripts/chromium.sh >/dev/null
if [ -x scripts/ansible.sh ]; then
  scripts/ansible.sh
  export CHIFFON_ANSIBLE_PLAYBOOK="$PWD/.venv/bin/ansible-playbook"
fi

export CHIFFON_TEST_DATABASE_URL="${CHIFFON_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export CHIFFON_TEST_AMQP_URL="${CHIFFON_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test"
cargo test --workspace --all-features --no-fail-fast 2>&1 | tee "${CHIFFON_TEST_LOG:-/tmp/chiffon-test.log}"
status=${PIPESTATUS[0]}
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "${CHIFFON_TEST_LOG:-/tmp/chiffon-test.log}" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
echo "tests: ${passed% *} passed, ${passed#* } failed" | tee "${CHIFFON_TEST_SUMMARY:-/tmp/chiffon-test-summary}"
exit "$status"
