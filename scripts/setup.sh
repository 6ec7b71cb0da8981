#!/usr/bin/env bash
# Create .venv (once) and install the project into it. Re-running is cheap: it reinstalls only when
# pyproject.toml changed. torch comes first and pinned: torch==2.13.0 is a CPU build that pip finds
# locally on our machines; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install --quiet -e ".[test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
