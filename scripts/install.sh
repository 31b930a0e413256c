#!/usr/bin/env bash
# Create ./.venv (if missing) and install vtprune with its pinned dependencies. Idempotent and quiet.
# Usage: bash scripts/install.sh [extras]   (default extras: test,eval)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,eval}"
py="$(command -v python3.11 || command -v python3)"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=".venv/.vtprune-installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "[install] torch pair first (pip takes it from the local wheel cache when present)" >&2
"${pip[@]}" install -c constraints.txt torch==2.14.1 torchvision==0.29.1
echo "[install] vtprune[$extras] and pinned dependencies" >&2
"${pip[@]}" install -c constraints.txt -e ".[$extras]"
rm -f .venv/.vtprune-installed-*
touch "$stamp"
