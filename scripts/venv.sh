#!/usr/bin/env bash
# Create .venv with Python 3.11+ and install inferplane with the given extras (default: dev).
# torch is pinned first to the CPU build this platform's machines carry; a range would pull a
# multi-GB CUDA build.
set -euo pipefail
extras=${1:-dev}
py=${PYTHON:-}
if [ -z "$py" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      py=$c; break
    fi
  done
fi
[ -n "$py" ] || { echo "need Python >= 3.11 (apt-get install python3)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  if ! "$py" -m venv .venv 2>/dev/null; then
    # Debian splits venv out of the interpreter package.
    if [ "$(id -u)" = 0 ]; then
      apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null
      rm -rf .venv && "$py" -m venv .venv
    else
      echo "python3 -m venv failed: apt-get install python3-venv" >&2; exit 1
    fi
  fi
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q 'torch==2.13.0'
.venv/bin/pip install -q -e ".[$extras]" -c scripts/constraints.txt
