#!/usr/bin/env bash
# Installs the official Python MCP SDK (PyPI `mcp`, pinned) into ./.venv-mcp at the
# repository root, for examples/mcp/client.py. Idempotent; prints the venv's python.
#
#   examples/mcp/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MCP_VERSION=2.3.0
venv=.venv-mcp
if ! "$venv/bin/python" -c "import mcp, importlib.metadata as m; assert m.version('mcp') == '$MCP_VERSION'" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "mcp==$MCP_VERSION" >&2
fi
echo "$PWD/$venv/bin/python"
