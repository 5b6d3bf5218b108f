#!/usr/bin/env bash
# Installs ansible-core from PyPI into ./.venv (next to this repository's root) unless an
# `ansible-playbook` is already there, then prints the path of `ansible-playbook`.
# Idempotent: a second run only prints the path. The infrastructure agent looks for
# ./.venv/bin/ansible-playbook after $CHIFFON_ANSIBLE_PLAYBOOK and before $PATH.
#
#   scripts/ansible.sh            # install if needed, print the path
#   PYTHON=python3.12 scripts/ansible.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
bin="$venv/bin/ansible-playbook"

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

# Concurrent callers (parallel tests) wait for one install instead of racing.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${TMPDIR:-/tmp}/chiffon-ansible-install.lock"
    flock 9
    if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
        echo "$bin"
        exit 0
    fi
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found; install Python 3.10+ or set PYTHON" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "ansible-core>=2.16,<2.20" >&2

if ! "$bin" --version >/dev/null 2>&1; then
    echo "error: ansible-playbook did not install into $venv" >&2
    exit 1
fi
echo "$bin"
