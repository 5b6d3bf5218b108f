#!/usr/bin/env bash
# Creates examples/python-agent/.venv with the pinned requirements (pika, jsonschema).
# Idempotent: does nothing when the venv already has them.
set -euo pipefail
cd "$(dirname "$0")"
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import pika, jsonschema' 2>/dev/null \
  && cmp -s requirements.txt .venv/requirements.txt; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
cp requirements.txt .venv/requirements.txt
